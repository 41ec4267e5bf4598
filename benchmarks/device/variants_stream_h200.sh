#!/usr/bin/env bash
# Device run: (1) the compiled backend's layout/precision options on SD-Turbo 512², 1 step, batch 1, each against
# the plain fp16 compiled engine in the same run (benchmarks/NOTES.md records the choices); (2) the stream path on
# the default video model's architecture (random weights): one 10,000-frame session (per-frame cost against
# stream length) and 1/2/4/8 concurrent sessions of 300 frames; (3) eager scaling curves: latency against
# resolution 256..1024 and against batch 1..64. Usage: bash ... "$OUT"
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
CFG=benchmarks/configs/sd-turbo
for v in "" "--fuse-qkv" "--channels-last" "--dtype bfloat16"; do
  stamp "compiled $v"
  timeout "${T_VAR:-90}" python -m benchmarks.pipeline_bench --config $CFG --size 512 --steps 1 --batch 1 \
    --iters 20 --warmup 3 --format jpeg --backend compiled $v --out "$OUT/variants.jsonl" 2>&1 | tail -3
done

stamp "stream"
python -m benchmarks.random_weights stream-default /tmp/rvid
python -m fewstep.server.cli serve --model /tmp/rvid --device cuda --port 8012 --max-sessions 64 > "$OUT/serve_stream.log" 2>&1 &
SERVER=$!
for i in $(seq 1 120); do
  curl -sf http://127.0.0.1:8012/ready >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited:"; tail -20 "$OUT/serve_stream.log"; break; }
  sleep 1
done
stamp "stream server ready"
timeout 100 python -m fewstep.server.cli bench stream http://127.0.0.1:8012 --sessions 1 --frames 10000 --fps 0 \
  --out "$OUT/stream_long.json" 2>&1 | tail -14
for n in 1 2 4 8; do
  timeout 40 python -m fewstep.server.cli bench stream http://127.0.0.1:8012 --sessions $n --frames 300 --fps 0 \
    --out "$OUT/stream_s$n.json" 2>&1 | grep -E "Aggregate|first frame|per session|dropped"
done
kill $SERVER; wait $SERVER 2>/dev/null
stamp "scaling (eager)"
timeout "${T_SCALE:-80}" python -m benchmarks.pipeline_bench --config $CFG --size 256 512 768 1024 --steps 1 \
  --batch 1 --iters 6 --warmup 2 --format jpeg --backend eager --out "$OUT/scaling.jsonl" 2>&1 | tail -12
timeout "${T_SCALE:-80}" python -m benchmarks.pipeline_bench --config $CFG --size 512 --steps 1 \
  --batch 1 2 4 8 16 32 64 --iters 5 --warmup 2 --format jpeg --backend eager --out "$OUT/scaling.jsonl" 2>&1 \
  | tail -18
stamp "done"
