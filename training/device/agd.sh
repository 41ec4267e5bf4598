#!/bin/bash
# Guidance adapters on one GPU: teacher -> agd -> agd-eval, packed into $OUT as it goes (each part survives a later
# timeout). Run from the repo root on the device, after `source .whl/preamble.sh` (carry .whl: diffusers is not in
# the device image):
#   bash training/device/agd.sh                       # all three: 8 + 4 min of training + ~1 min eval (> 10 min:
#                                                     # give TEACHER_MINUTES=5 AGD_MINUTES=2.5 to fit one call)
#   CARRY=<returned files> bash training/device/agd.sh # a teacher packed by an earlier call (fewstep_teacher.tar):
#                                                     # unpacked, not retrained; agd + agd-eval only
# Env: TEACHER_MINUTES (8), AGD_MINUTES (4), AGD_FLAGS (e.g. "--rank 32 --max-guidance 5"), GUIDANCE ("2 4": the
# scales agd-eval compares), N (512 held-out prompts). $OUT gets fewstep_teacher.tar (when trained here),
# fewstep_agd.tar (the teacher copy + adapters/, 11.7 MB) and fewstep_meta.tar (logs, agd_eval.json/.md, grid).
set -u
export PYTHONUNBUFFERED=1
python -P -c "import fewstep.engines" 2>/dev/null ||
  python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/setup.log 2>&1
python -P -c "import fewstep.engines" 2>>/tmp/setup.log || {
  mkdir -p /tmp/shim/fewstep
  for p in server engines kernels clients benchmarks training; do ln -sfn "$PWD/$p" /tmp/shim/fewstep/$p; done
  export PYTHONPATH=/tmp/shim:$PYTHONPATH
}
run=out/agd
mkdir -p $run $OUT
if [ -n "${CARRY:-}" ]; then
  fewstep train unpack "$CARRY" $run > $OUT/agd_run.log 2>&1
else
  fewstep train teacher --out $run --minutes ${TEACHER_MINUTES:-8} > $OUT/agd_run.log 2>&1
  fewstep train pack $run $OUT --exports teacher >> $OUT/agd_run.log 2>&1
fi
fewstep train agd --teacher $run/teacher --out $run --minutes ${AGD_MINUTES:-4} ${AGD_FLAGS:-} >> $OUT/agd_run.log 2>&1
fewstep train pack $run $OUT --exports agd >> $OUT/agd_run.log 2>&1
timeout ${EVAL_TIMEOUT:-240} fewstep train agd-eval --teacher $run/teacher --adapters $run/agd/adapters \
  --guidance ${GUIDANCE:-2 4} --n ${N:-512} --out $run >> $OUT/agd_run.log 2>&1
cp $OUT/agd_run.log $run/agd_run.txt && fewstep train pack $run $OUT --exports >> $run/agd_run.txt 2>&1 &&
  rm $OUT/agd_run.log
grep -h "finished\|plain conditional\|adapted model\|sampled\|\[agd-eval\]\|^|" $run/agd_run.txt | grep -v "it/s"
