#!/usr/bin/env bash
# Device run: SD-Turbo architecture (random weights), 512x512, 1 step, on the lent GPU.
# In-process per-stage timings against diffusers eager, then the same model through HTTP at concurrency 1/4/16.
# Usage (repo root, on the device): bash benchmarks/device/core_h200.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"

python -m benchmarks.pipeline_bench --config benchmarks/configs/sd-turbo --size 512 --steps 1 --batch 1 4 16 \
  --iters 20 --warmup 3 --backend eager compiled --baseline diffusers-eager diffusers-compile \
  --out "$OUT/pipeline.jsonl" 2>&1 | tee "$OUT/pipeline.log"

MODEL=/tmp/fewstep-bench-models/sd-turbo
python -m fewstep.server.cli serve --model "$MODEL" --model-name sd-turbo-random --device cuda --port 8011 \
  --engine "${ENGINE:-compiled}" --max-batch-size 16 --max-wait-ms 2 > "$OUT/serve.log" 2>&1 &
SERVER=$!
for i in $(seq 1 400); do
  curl -sf http://127.0.0.1:8011/ready >/dev/null && break
  sleep 1
done
for c in 1 4 16; do
  python -m fewstep.server.cli bench images http://127.0.0.1:8011 --concurrency $c --num-requests $((c * 25)) \
    --warmup 4 --size 512x512 --steps 1 --output-format png --out "$OUT/http_c$c.json" 2>&1 | tail -25
done
kill $SERVER
wait $SERVER 2>/dev/null
tail -5 "$OUT/serve.log"
