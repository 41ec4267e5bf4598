#!/usr/bin/env bash
# Device run: SDXL-Turbo architecture (random weights), 1 step, batch 1, at 512 and 1024: fewstep eager/compiled
# against diffusers eager/compiled in the same process. Usage (repo root, on the device): bash ... "$OUT"
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
timeout "${T_SDXL:-300}" fewstep bench pipeline --config benchmarks/configs/sdxl-turbo --size 512 1024 \
  --steps 1 --batch 1 --iters 10 --warmup 2 --format jpeg --backend eager compiled \
  --baseline diffusers-eager diffusers-compile --out "$OUT/pipeline_sdxl.jsonl" 2>&1 | grep -v "^{" \
  | tee "$OUT/pipeline_sdxl.log"
save_inductor_cache "$FINAL"
