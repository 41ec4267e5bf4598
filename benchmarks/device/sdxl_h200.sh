#!/usr/bin/env bash
# Device run: SDXL-Turbo architecture (random weights), 1 step, batch 1, at 512 and 1024: fewstep eager/compiled
# against diffusers eager/compiled in the same process. Usage (repo root, on the device): bash ... "$OUT"
set -uo pipefail
FINAL=$(mkdir -p "${1:-/tmp/out}" && cd "${1:-/tmp/out}" && pwd)  # what comes back: results.tgz (+ inductor_cache.tgz); at most 8 files may return
OUT=/tmp/fewstep_run_$$  # every log, row and report goes here, and into results.tgz at exit
mkdir -p "$FINAL" "$OUT"
trap '(cd "$OUT" && tar czf "$FINAL/results.tgz" -- * 2>/dev/null; ls -la "$FINAL")' EXIT
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/common.sh"
restore_inductor_cache
timeout "${T_SDXL:-300}" python -m benchmarks.pipeline_bench --config benchmarks/configs/sdxl-turbo --size 512 1024 \
  --steps 1 --batch 1 --iters 10 --warmup 2 --format jpeg --backend eager compiled \
  --baseline diffusers-eager diffusers-compile --out "$OUT/pipeline_sdxl.jsonl" 2>&1 | grep -v "^{" \
  | tee "$OUT/pipeline_sdxl.log"
save_inductor_cache "$FINAL"
