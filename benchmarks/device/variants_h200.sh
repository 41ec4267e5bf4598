#!/usr/bin/env bash
# Device run: (1) the compiled backend's options on SD-Turbo 512², 1 step, batch 1, each against the plain fp16
# compiled engine in the same run (docs/benchmarks.md records the choices): fused QKV, channels-last, bf16, and
# a dynamic batch dimension (start-up); (2, with SCALING=1) eager scaling curves: latency against resolution 256..1024 and
# against batch 1..64. Streams: stream_h200.sh. Usage: bash ... "$OUT"
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
CFG=benchmarks/configs/sd-turbo
PARTS=${PARTS:-variants dynamic}  # each variant is a cold ~100 s compile: PARTS=variants alone fits one call
if wants variants; then
for v in "" "--fuse-qkv" "--channels-last" "--dtype bfloat16"; do
  stamp "compiled $v"
  timeout "${T_VAR:-90}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 \
    --iters 20 --warmup 3 --format jpeg --backend compiled $v --out "$OUT/variants.jsonl" 2>&1 | tail -3
done
fi

if wants dynamic; then
stamp "dynamic batch: one compile for buckets 4 and 16 (compile_s and latency against core_h200's static run)"
timeout "${T_DYN:-200}" fewstep bench pipeline --config $CFG --size 512 --steps 1 --batch 1 4 16 \
  --iters 10 --warmup 2 --format jpeg --backend compiled --dynamic-batch --out "$OUT/variants.jsonl" 2>&1 | tail -7
fi

if [ "${SCALING:-0}" = 1 ]; then  # measured 2026-11-29 (docs/benchmarks.md); SCALING=1 to repeat
stamp "scaling (eager)"
timeout "${T_SCALE:-80}" fewstep bench pipeline --config $CFG --size 256 512 768 1024 --steps 1 \
  --batch 1 --iters 6 --warmup 2 --format jpeg --backend eager --out "$OUT/scaling.jsonl" 2>&1 | tail -12
timeout "${T_SCALE:-80}" fewstep bench pipeline --config $CFG --size 512 --steps 1 \
  --batch 1 2 4 8 16 32 64 --iters 5 --warmup 2 --format jpeg --backend eager --out "$OUT/scaling.jsonl" 2>&1 \
  | tail -18
fi
stamp "done"
save_inductor_cache "$FINAL"
