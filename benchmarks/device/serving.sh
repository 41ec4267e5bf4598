#!/usr/bin/env bash
# Device run: the serving path of SD-Turbo's architecture (random weights), 512x512, 1 step, JPEG, on the lent GPU.
#  tests     the GPU tests (CUDA graphs, nvjpeg, the block-sparse kernel, forced out-of-memory, ...)
#  pipeline  in-process per-stage timings, compiled engine, batch 1: the checkpoint's VAE against TAESD
#            (AutoencoderTiny, benchmarks/configs/taesd), same process
#  http      `fewstep bench images` at concurrency 1 and 4 against servers with --max-wait-ms 0 and 5 (the queue time
#            a lone request pays), and with TAESD
# Usage (repo root, on the device, after `pip install .`): PARTS="tests pipeline" bash benchmarks/device/serving.sh $OUT
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
python -P -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
CFG=benchmarks/configs/sd-turbo
WORK=/tmp/fewstep-bench-models
PARTS=${PARTS:-tests pipeline http}

if wants tests; then
  stamp "1. GPU tests"
  timeout "${T_TESTS:-240}" pytest -q -p no:cacheprovider -m gpu -rs --continue-on-collection-errors tests/unit tests/kernels 2>&1 | tail -30 \
    | tee "$OUT/gpu_tests.log"
fi

if wants pipeline; then
  stamp "2. pipeline: own VAE against TAESD, compiled, batch 1"
  timeout "${T_PIPE:-330}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 --iters 30 --warmup 5 \
    --format jpeg --backend compiled --vae own benchmarks/configs/taesd --work $WORK --out "$OUT/pipeline.jsonl" 2>&1 \
    | grep -v "^{" | tail -12 | tee "$OUT/pipeline.log"
fi

serve_and_bench() {  # NAME PORT FLAGS...: a compiled server, then concurrency 1 and 4
  local name=$1 port=$2
  shift 2
  if serve_ready "$name" "$port" --model "$MODEL" --model-name sd-turbo-random --device cuda --engine compiled \
      --compile-buckets 1,4 --compile-sizes 512x512 --max-batch-size 4 "$@"; then
    for c in 1 4; do
      timeout 60 fewstep bench images "http://127.0.0.1:$port" --concurrency $c --num-requests $((c * 60)) \
        --warmup 5 --size 512x512 --steps 1 --output-format jpeg --out "$OUT/http_${name}_c$c.json" 2>&1 | tail -14
    done
  fi
  stop_server
}

if wants http; then
  stamp "3. HTTP"
  MODEL=$(python -P -c "from fewstep.benchmarks.random_weights import build_random_checkpoint as b; import torch; print(b('$CFG', '$WORK/sd-turbo', torch.float16))" | tail -1)
  serve_and_bench wait0 8021 --max-wait-ms 0
  serve_and_bench wait5 8022 --max-wait-ms 5
  [ -d "$WORK/vae-taesd" ] && serve_and_bench taesd 8023 --max-wait-ms 0 --vae "$WORK/vae-taesd"
fi

stamp "done"
save_inductor_cache "$FINAL"
