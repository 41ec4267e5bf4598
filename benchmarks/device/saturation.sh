#!/usr/bin/env bash
# Device run: how close HTTP serving comes to the engine in-process, SD-Turbo's architecture (random weights), 512x512,
# 1 step, JPEG, the compiled engine with buckets 1 and 16 (the in-process run fills Inductor's cache for the server).
#  pipeline  in-process, cold prompts: batch 1 (latency) and batch 16 (the largest bucket's throughput), then the
#            engine's own thread kept busy for SATURATE seconds (default 8) per batch size, stages in sequence and
#            overlapped (--overlap-stages off on: rows +overlap)
#  http      one server (--max-batch-size 16, --max-wait-ms 0); `fewstep bench images` at concurrency 1 (latency and
#            the waterfall of a request), then 16, 32 and 64 (saturation)
#  stream    the embedded video model, one unpaced session of 2,000 frames, read by `fewstep bench stream` and by a
#            bare websockets client (`fewstep bench plain-stream`), twice each, same server
#  tests     the compiled-vs-eager GPU tests (PSNR against eager)
# SERVE_EXTRA: more flags for the HTTP server, e.g. SERVE_EXTRA=--engine-process or "--overlap-stages on".
# Usage (repo root, on the device, after `pip install .`):
#   FEWSTEP_COMMIT=<sha> PARTS="pipeline http" bash benchmarks/device/saturation.sh $OUT
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
CFG=benchmarks/configs/sd-turbo
WORK=/tmp/fewstep-bench-models
PARTS=${PARTS:-pipeline http tests}
PORT=8031

if wants pipeline; then
  stamp "1. pipeline: compiled, batch 1 and 16, cold prompts"
  timeout "${T_PIPE:-300}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 16 --iters 30 --warmup 5 \
    --format jpeg --backend compiled --work $WORK --saturate "${SATURATE:-8}" --overlap-stages off on \
    --out "$OUT/pipeline.jsonl" 2>&1 | grep -v "^{" | tail -12 | tee "$OUT/pipeline.log"
fi

if wants http; then
  stamp "2. HTTP"
  MODEL=$(python -P -c "from fewstep.benchmarks.random_weights import build_random_checkpoint as b; import torch; print(b('$CFG', '$WORK/sd-turbo', torch.float16))" | tail -1)
  if serve_ready sat $PORT --model "$MODEL" --model-name sd-turbo-random --device cuda --engine compiled \
      --compile-buckets 1,16 --compile-sizes 512x512 --max-batch-size 16 --max-wait-ms 0 ${SERVE_EXTRA:-}; then
    timeout 60 fewstep bench images "http://127.0.0.1:$PORT" --concurrency 1 --num-requests 200 --warmup 10 \
      --size 512x512 --steps 1 --output-format jpeg --no-progress --out "$OUT/http_c1.json" 2>&1 | tail -34
    for c in 16 32 64; do
      timeout 60 fewstep bench images "http://127.0.0.1:$PORT" --concurrency $c --duration 12 --warmup $c \
        --size 512x512 --steps 1 --output-format jpeg --no-progress --out "$OUT/http_c$c.json" 2>&1 \
        | grep -iE "throughput|P50 E2E|P99 E2E|failed|completed|successful" | tee -a "$OUT/saturation.log"
    done
  fi
  stop_server
fi

if wants stream; then
  stamp "3. the embedded video model: our bench client against a bare websockets client, same server"
  serve_ready video $((PORT + 1)) --model default-video --device cuda
  for rep in 1 2; do
    timeout 60 fewstep bench plain-stream "ws://127.0.0.1:$((PORT + 1))/v1/stream" --frames 2000 2>&1 | tail -1 \
      | tee -a "$OUT/stream.log"
    timeout 60 fewstep bench stream "http://127.0.0.1:$((PORT + 1))" --sessions 1 --frames 2000 --fps 0 --no-progress \
      --out "$OUT/bench_stream_$rep.json" 2>&1 | grep -iE "fps|first frame" | tee -a "$OUT/stream.log"
  done
  stop_server
fi

if wants tests; then
  stamp "3. compiled against eager on the GPU (PSNR)"
  timeout "${T_TESTS:-150}" pytest -q -p no:cacheprovider -m gpu -rs -s tests/unit/engines/test_compiled.py tests/unit/engines/test_compiled_stream.py 2>&1 \
    | grep -E "PSNR|passed|failed|skipped|Error" | tail -30 | tee "$OUT/gpu_tests.log"
fi

stamp "done"
