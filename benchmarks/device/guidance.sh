#!/usr/bin/env bash
# Device run: the guidance kernels (issue "Kernels II") on the GPU, SD-Turbo's architecture (random weights).
#  tests    the kernel tests on CUDA (every case of test_fused_cfg / test_adapter_linear / test_nasa_attention runs on
#           the GPU when there is one), the guidance tests of the engine
#  kernels  `fewstep bench guidance`: fused CFG update, fused adapter linear, NASA dual cross-attention against torch
#  e2e      in-process, 512^2, 4 steps, guidance 4: CFG (two passes a step) against random AGD-style adapters of rank 16
#           and 64 (one pass), CUDA graphs of eager code (no Inductor: minutes of compile saved; same backend for all)
# Usage (repo root, on the device, after `pip install .`):
#   FEWSTEP_COMMIT=<sha> PARTS="tests kernels e2e" bash benchmarks/device/guidance.sh $OUT
source "$(dirname "$0")/common.sh"
begin_run "${1:-/tmp/out}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
CFG=benchmarks/configs/sd-turbo
WORK=/tmp/fewstep-bench-models
PARTS=${PARTS:-tests kernels e2e}

if wants tests; then
  stamp "1. guidance kernel tests on CUDA"
  timeout "${T_TESTS:-240}" pytest -q -p no:cacheprovider -rs tests/kernels/test_fused_cfg.py \
    tests/kernels/test_adapter_linear.py tests/kernels/test_nasa_attention.py tests/unit/engines/test_guidance.py \
    2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi

if wants kernels; then
  stamp "2. fewstep bench guidance"
  timeout "${T_KERNELS:-240}" fewstep bench guidance --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench_guidance.log"
fi

if wants e2e; then
  stamp "3. end to end: CFG against adapters, 4 steps, guidance 4"
  timeout "${T_E2E:-300}" fewstep bench pipeline --config $CFG --size 512 --steps 4 --guidance-scale 4 \
    --adapters-rank 0 16 64 --batch 1 4 --iters 20 --warmup 3 --format jpeg --backend compiled --no-inductor \
    --work $WORK --out "$OUT/guidance_e2e.jsonl" 2>&1 | grep -v "^{" | tail -16 | tee "$OUT/guidance_e2e.log"
fi

stamp "done"
