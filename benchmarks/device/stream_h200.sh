#!/usr/bin/env bash
# Device run: streams delivered to a client (`fewstep bench stream`, unpaced, JPEG frames over WebSocket).
#  1. the embedded default video model (`--model default-video`, trained weights, 32x32): one 10,000-frame
#     session (per-frame cost against stream length), then 1/2/4/8 concurrent sessions of 300 frames
#  2. Wan2.1-T2V-1.3B architecture at 832x480 with a 4-step buffer (configs/wan2.1-t2v-1.3b-stream), 1/2/4/8
#     sessions of 90 frames (8 chunks: 9 frames, then 12 per chunk), per engine in ENGINES (default "eager compiled
#     compiled+overlap": the compiled one captures the stream step per 1/2/4 sessions at 832x480, +overlap adds
#     --overlap-decode on; files *_compiled_*, *_compiled+overlap_*)
#  3. the warm-up ramps (`--stream-ramp`, docs/benchmarks.md 2026-12-08): time to first frame of each of RAMPS on
#     Wan at 832x480 (1 and 4 sessions of 90 frames) and on the default video model (1 session of 300 frames);
#     a server per ramp, the same commands as 1 and 2 otherwise
# Usage (repo root, on the device): bash benchmarks/device/stream_h200.sh "$OUT"
#   (PARTS="default wan ramps" by default; RAMPS="full trim jump" by default)
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"

serve() {  # serve MODEL PORT LOG [args...]: start a server and wait until it is ready (or gone)
  local model=$1 port=$2 log=$3; shift 3
  fewstep serve --model "$model" --device cuda --port "$port" --max-sessions 64 "$@" \
    > "$log" 2>&1 &
  SERVER=$!
  for i in $(seq 1 "${T_READY:-240}"); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { echo "server exited:"; tail -20 "$log"; return 1; }
    sleep 1
  done
  echo "server not ready after ${T_READY:-240} s"; tail -5 "$log"; return 1
}

PARTS=${PARTS:-default wan ramps}
RAMPS=${RAMPS:-full trim jump}
if wants default; then
stamp "1. default video model"
if serve default-video 8012 "$OUT/serve_default.log"; then
  timeout 120 fewstep bench stream http://127.0.0.1:8012 --sessions 1 --frames 10000 --fps 0 \
    --out "$OUT/stream_default_long.json" 2>&1 | tail -12
  for n in 1 2 4 8; do
    timeout 60 fewstep bench stream http://127.0.0.1:8012 --sessions $n --frames 300 --fps 0 \
      --out "$OUT/stream_default_s$n.json" 2>&1 | grep -E "Aggregate|first frame|per session|dropped"
  done
fi
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
fi

if wants wan; then
stamp "2. Wan2.1-1.3B stream, 832x480"
fewstep bench random-weights benchmarks/configs/wan2.1-t2v-1.3b-stream /tmp/rwan --dtype bfloat16
for engine in ${ENGINES:-eager compiled compiled+overlap}; do
  tag=$([ "$engine" = eager ] && echo "" || echo "_$engine")
  extra=()
  [ "${engine#*+}" = overlap ] && extra+=(--overlap-decode on)
  if serve /tmp/rwan 8013 "$OUT/serve_wan$tag.log" --dtype bfloat16 --engine "${engine%+*}" --compile-sizes 832x480 \
      --compile-stream-buckets 1,2,4 "${extra[@]}"; then
    for n in 1 2 4 8; do
      timeout 150 fewstep bench stream http://127.0.0.1:8013 --sessions $n --frames 90 --fps 0 \
        --size 832x480 --out "$OUT/stream_wan${tag}_s$n.json" 2>&1 | grep -E "Aggregate|first frame|per session|dropped"
    done
  fi
  kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
done
fi
if wants ramps; then
stamp "3. warm-up ramps: $RAMPS"
for r in $RAMPS; do
  if serve default-video 8014 "$OUT/serve_default_ramp_$r.log" --stream-ramp "$r"; then
    timeout 60 fewstep bench stream http://127.0.0.1:8014 --sessions 1 --frames 300 --fps 0 \
      --out "$OUT/stream_default_ramp_${r}_s1.json" 2>&1 | grep -E "Aggregate|first frame"
  fi
  kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
done
[ -d /tmp/rwan ] || fewstep bench random-weights benchmarks/configs/wan2.1-t2v-1.3b-stream /tmp/rwan --dtype bfloat16
for r in $RAMPS; do
  if serve /tmp/rwan 8015 "$OUT/serve_wan_ramp_$r.log" --dtype bfloat16 --stream-ramp "$r"; then
    for n in 1 4; do
      timeout 150 fewstep bench stream http://127.0.0.1:8015 --sessions $n --frames 90 --fps 0 \
        --size 832x480 --out "$OUT/stream_wan_ramp_${r}_s$n.json" 2>&1 | grep -E "Aggregate|first frame"
    done
  fi
  kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
done
fi
stamp "done"
