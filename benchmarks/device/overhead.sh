#!/usr/bin/env bash
# Device run: what the HTTP path adds at concurrency 1, SD-Turbo's architecture (random weights), 512x512, 1 step,
# JPEG, the compiled engine (bucket 1), the checkpoint's VAE and TAESD (AutoencoderTiny, random weights).
#  pipeline  in-process batch 1, both decoders (fills Inductor's cache for the servers)
#  http      per decoder and per engine placement (MODES, default "inproc process": in the server's process, then
#            --engine-process), one server (--max-batch-size 1 --max-wait-ms 0): 300 requests as JSON (base64), then
#            300 with Accept: image/jpeg (`--raw-image`: the image is the body, timings in Server-Timing); each report
#            carries the request's waterfall
#  xformers  in-process batch 1 and 16, eager and compiled, --attention dense xformers (the xformers wheel must be in
#            .whl: ../shared/device/wheels.sh uvloop httptools pyzmq xformers; a wheel built for another torch makes
#            the option refuse, and the row says why); then the GPU tests of the option (PSNR against SDPA)
#  fp8       in-process batch 1 and 16, compiled with and without --fp8 (torchao in .whl: wheels.sh ... torchao),
#            then the fp8 GPU test (PSNR against fp16, printed)
#  decoder   the VAE decoder's share at batch 1: compiled with --cudnn-benchmark, and with Inductor's
#            max-autotune-no-cudagraphs mode (its Triton convolution templates), against the plain compiled rows
# The serve log names the event loop and HTTP parser (uvloop/httptools when .whl carries them).
# Usage (repo root, on the device, after `pip install .`):
#   FEWSTEP_COMMIT=<sha> PARTS="pipeline http xformers fp8 decoder" bash benchmarks/device/overhead.sh $OUT
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
CFG=benchmarks/configs/sd-turbo
WORK=/tmp/fewstep-bench-models
PARTS=${PARTS:-pipeline http}
PORT=8041

if wants pipeline; then
  stamp "1. in-process, batch 1, own VAE and TAESD"
  timeout "${T_PIPE:-330}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 --iters 30 --warmup 5 \
    --format jpeg --backend compiled --vae own benchmarks/configs/taesd --work $WORK --out "$OUT/pipeline.jsonl" 2>&1 \
    | grep -v "^{" | tail -8 | tee "$OUT/pipeline.log"
fi

if wants http; then
  stamp "2. HTTP, concurrency 1"
  MODEL=$(python -P -c "from fewstep.benchmarks.random_weights import build_random_checkpoint as b; import torch; print(b('$CFG', '$WORK/sd-turbo', torch.float16))" | tail -1)
  for vae in own taesd; do
    for mode in ${MODES:-inproc process}; do
      extra=()
      [ "$vae" = taesd ] && extra+=(--vae "$WORK/vae-taesd")
      [ "$mode" = process ] && extra+=(--engine-process)
      if serve_ready "${vae}_$mode" $PORT --model "$MODEL" --model-name sd-turbo-random --device cuda \
          --engine compiled --compile-buckets 1 --compile-sizes 512x512 --max-batch-size 1 --max-wait-ms 0 \
          "${extra[@]}"; then
        for answer in json raw; do
          flag=()
          [ "$answer" = raw ] && flag=(--raw-image)
          timeout 90 fewstep bench images "http://127.0.0.1:$PORT" --concurrency 1 --num-requests 300 --warmup 20 \
            --size 512x512 --steps 1 --output-format jpeg --no-progress "${flag[@]}" \
            --out "$OUT/http_${vae}_${mode}_${answer}_c1.json" 2>&1 | tail -40 | tee -a "$OUT/http.log"
        done
      fi
      stop_server
    done
  done
fi

if wants xformers; then
  stamp "3. xformers against SDPA"
  timeout "${T_XF:-300}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 16 --iters 20 \
    --warmup 3 --format jpeg --backend eager compiled --attention dense xformers --work $WORK \
    --out "$OUT/xformers.jsonl" 2>&1 | grep -v "^{" | tail -14 | tee "$OUT/xformers.log"
  timeout 120 pytest -q -p no:cacheprovider -m gpu -rs -s tests/unit/engines/test_attention_option.py 2>&1 \
    | grep -E "PSNR|passed|failed|skipped|cannot" | tee -a "$OUT/xformers.log"
fi

if wants fp8; then
  stamp "4. fp8 linear layers (torchao) against fp16, compiled"
  for flag in "" --fp8; do
    timeout "${T_FP8:-300}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 16 --iters 20 \
      --warmup 3 --format jpeg --backend compiled $flag --work $WORK --out "$OUT/fp8.jsonl" 2>&1 | grep -v "^{" \
      | tail -6 | tee -a "$OUT/fp8.log"
  done
  timeout 120 pytest -q -p no:cacheprovider -m gpu -rs -s tests/unit/engines/test_compiled.py -k fp8 2>&1 \
    | grep -E "PSNR|passed|failed|skipped" | tee -a "$OUT/fp8.log"
fi

if wants decoder; then
  stamp "5. decoder tuning: cuDNN benchmark mode, max-autotune"
  for flags in "--cudnn-benchmark" "--compile-mode max-autotune-no-cudagraphs"; do
    timeout "${T_DEC:-420}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 --iters 30 \
      --warmup 5 --format jpeg --backend compiled $flags --work $WORK --out "$OUT/decoder.jsonl" 2>&1 \
      | grep -v "^{" | tail -5 | tee -a "$OUT/decoder.log"
  done
fi

stamp "done"
