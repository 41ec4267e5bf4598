#!/usr/bin/env bash
# Device run: SD-Turbo architecture (random weights), 512x512, 1 step, on the lent GPU. Every part has its own
# time limit, so one slow part cannot eat the call; every part writes its rows as it goes.
#  (order: in-process first; its compile fills Inductor's cache, so the server's start-up finds it warm)
#  1. in-process per-stage timings, batch 1/4/16: fewstep eager + compiled against diffusers eager + compiled
#  2. the same model through HTTP (compiled engine, JPEG by nvjpeg) at concurrency 1/4/16/32, and PNG at 1
#  3. image encoding: PIL PNG/JPEG/WebP on the CPU against nvjpeg
#  (scaling curves and compile options: variants_h200.sh; streams: stream_h200.sh)
# Usage (repo root, on the device): bash benchmarks/device/core_h200.sh "$OUT"
#  PARTS="pipeline http" by default; a cold compile makes part 1 alone take ~9 min, so a 10-minute call runs
#  PARTS=pipeline and the next call (same warm machine, Inductor's cache warm) PARTS=http
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
CFG=benchmarks/configs/sd-turbo

if [ -n "${PREFLIGHT:-}" ]; then  # passed on the H200 on 2026-11-29 (10 tests, 41 s)
  stamp "0. pre-flight: CUDA graphs and nvjpeg against eager, on tiny models"
  timeout 100 pytest -q tests/unit/engines/test_gpu_jpeg.py tests/unit/engines/test_compiled.py \
    -k "jpeg or (cuda_graphs and not inductor)" 2>&1 | tail -15 | tee "$OUT/preflight.log"
  grep -q "FAILED.*test_compiled" "$OUT/preflight.log" && ENGINE=${ENGINE:-eager}
fi

PARTS=${PARTS:-pipeline http}
if wants pipeline; then
stamp "1. pipeline"
timeout "${T_PIPE:-400}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 4 16 \
  --iters 20 --warmup 3 --format jpeg --backend eager compiled --baseline diffusers-eager diffusers-compile \
  --out "$OUT/pipeline.jsonl" 2>&1 | grep -v "^{" | tee "$OUT/pipeline.log"
fi


if wants http; then
stamp "2. HTTP"
MODEL=$(python -P -c "from fewstep.benchmarks.random_weights import build_random_checkpoint as b; import torch; print(b('$CFG', '/tmp/fewstep-bench-models/sd-turbo', torch.float16))" | tail -1)
fewstep serve --model "$MODEL" --model-name sd-turbo-random --device cuda --port 8011 \
  --engine "${ENGINE:-compiled}" --compile-buckets "${BUCKETS:-1,4,16}" --compile-sizes 512x512 --max-batch-size 16 \
  --max-wait-ms 2 > "$OUT/serve.log" 2>&1 &
SERVER=$!
for i in $(seq 1 "${T_READY:-420}"); do
  curl -sf http://127.0.0.1:8011/ready >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited:"; tail -20 "$OUT/serve.log"; break; }
  sleep 1
done
if curl -sf http://127.0.0.1:8011/ready >/dev/null; then
stamp "server ready"
for c in 1 4 16 32; do
  timeout 60 fewstep bench images http://127.0.0.1:8011 --concurrency $c \
    --num-requests $((c < 4 ? 60 : c * 15)) --warmup $((c + 2)) --size 512x512 --steps 1 --output-format jpeg \
    --out "$OUT/http_jpeg_c$c.json" 2>&1 | tail -22
done
timeout 60 fewstep bench images http://127.0.0.1:8011 --concurrency 1 --num-requests 40 \
  --warmup 3 --size 512x512 --steps 1 --output-format png --out "$OUT/http_png_c1.json" 2>&1 | tail -22
curl -s http://127.0.0.1:8011/metrics | grep -E "^fewstep_(stage|request|batch)" | head -40 > "$OUT/metrics.txt"
else
  echo "server not ready: HTTP part skipped"
fi
kill $SERVER
wait $SERVER 2>/dev/null
grep -iE "compile|warm|error|bucket costs" "$OUT/serve.log" | tail -8
fi

if [ -n "${ENCODE:-}" ]; then  # measured 2026-11-29: results/h200_image_encode.jsonl
  stamp "3. image encoding"
  timeout 60 fewstep bench encode --out "$OUT/encode.jsonl"
fi

stamp "done"
# $OUT returns at most 8 files: everything also travels in one archive
save_inductor_cache "$FINAL"
