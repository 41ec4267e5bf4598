#!/bin/bash
# Two training runs side by side on nvidia-h200-x2, one per GPU (the runs of 2026-11-29, generalised); on a
# one-GPU machine, one after the other. Stages: teacher, distill (image), video-teacher, video-distill (MINUTES 5 / 3;
# the distillation evaluates its student and teacher on VIDEO_N=256 held-out 300-frame streams; 512 took 5.5 min
# alone, so evaluate 512 in a call of its own).
# Run from the repo root on the device, after `source .whl/preamble.sh`:
#   bash training/device/two_gpus.sh teacher "--preset unet4" "--preset unet --batch 512"
#   TEACHER=out/carry/u bash training/device/two_gpus.sh distill "" "--lr 2e-4"
# Each run i (a, b) trains into out/<i>, packs its export into $OUT/<i> at once (it survives a later timeout), runs
# the held-out eval (a teacher at 25 steps, or a student at 1/2/4 steps with its teacher) and repacks the logs.
# $OUT gets 2 files per run (export tar; meta tar with logs, eval and run.txt), so two invocations in one call
# return all 8 files a GPU run brings back (a 2026-11-30 run wrote 13 and lost five).
# Env: NAMES="a b" (the two runs' folder names: a second invocation in one call uses others), GPUS="0 1" (theirs, on
# two GPUs: a teacher and a distillation at once are two invocations, the second with GPUS="1 0"), MINUTES (distill, 4),
# EVAL_TEACHER=0 skips the teacher's 25-step rows in a distill run's eval; PACK_EXTRA="a" returns run a's extra
# students (distill --export-raw / --extra-emas), which every run evaluates.
set -u
export PYTHONUNBUFFERED=1
stage=$1; flags_a=$2; flags_b=$3
read -r name_a name_b <<< "${NAMES:-a b}"
read -r gpu_a gpu_b <<< "${GPUS:-0 1}"
# installed once: two invocations may run at once (GPUS="1 0" puts a second one's first run on the other GPU)
python -P -c "import fewstep.engines" 2>/dev/null ||
  python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/setup.log 2>&1
python -P -c "import fewstep.engines" 2>>/tmp/setup.log || {
  # 2026-11-29: `pip install -e .` reported success, yet fewstep did not import; a namespace shim does
  mkdir -p /tmp/shim/fewstep
  for p in server engines kernels clients benchmarks training; do ln -sfn "$PWD/$p" /tmp/shim/fewstep/$p; done
  export PYTHONPATH=/tmp/shim:$PYTHONPATH
  echo "fewstep: namespace shim" >> /tmp/setup.log
}
one() {  # GPU NAME FLAGS
  local g=$1 d=$2 flags=$3
  mkdir -p $OUT/$d out/$d
  if [ "$stage" = video-teacher ]; then
    CUDA_VISIBLE_DEVICES=$g fewstep train video-teacher --out out/$d --minutes ${MINUTES:-5} $flags \
      > $OUT/$d/run.log 2>&1
    fewstep train pack out/$d $OUT/$d --exports video_teacher >> $OUT/$d/run.log 2>&1
  elif [ "$stage" = video-distill ]; then
    # a run's flags may name its own teacher (--teacher DIR/video_teacher: argparse keeps the last one)
    local teacher=${TEACHER:-}/video_teacher
    [[ " $flags " == *" --teacher "* ]] && teacher=$(sed 's/.*--teacher \([^ ]*\).*/\1/' <<< "$flags")
    CUDA_VISIBLE_DEVICES=$g fewstep train video-distill --teacher $teacher --out out/$d \
      --minutes ${MINUTES:-3} $flags > $OUT/$d/run.log 2>&1
    fewstep train pack out/$d $OUT/$d --exports video_student >> $OUT/$d/run.log 2>&1
    CUDA_VISIBLE_DEVICES=$g timeout ${EVAL_TIMEOUT:-420} fewstep train video-eval --model out/$d/video_student \
      --teacher $teacher --n ${VIDEO_N:-256} --frames 300 --out out/$d >> $OUT/$d/run.log 2>&1
  elif [ "$stage" = teacher ]; then
    CUDA_VISIBLE_DEVICES=$g fewstep train teacher --out out/$d --minutes 8 $flags > $OUT/$d/run.log 2>&1
    fewstep train pack out/$d $OUT/$d --exports teacher >> $OUT/$d/run.log 2>&1
    CUDA_VISIBLE_DEVICES=$g timeout 120 fewstep train eval --model out/$d/teacher --steps 25 --n 512 \
      --out out/$d >> $OUT/$d/run.log 2>&1
  else
    CUDA_VISIBLE_DEVICES=$g fewstep train distill --teacher $TEACHER/teacher --out out/$d \
      --minutes ${MINUTES:-4} $flags > $OUT/$d/run.log 2>&1
    # --export-raw / --extra-emas write more students (student_raw, student_ema<D>): each is evaluated, and packed
    # only for the runs named in PACK_EXTRA (11.6 MB each: a GPU run returns 64 MB)
    local extra=$(cd out/$d && ls -d student_* 2>/dev/null | grep -v '\.tmp' | tr '\n' ' ')
    local packed=student
    [[ " ${PACK_EXTRA:-} " == *" $d "* ]] && packed="student $extra"
    fewstep train pack out/$d $OUT/$d --exports $packed >> $OUT/$d/run.log 2>&1
    local tflag="--teacher $TEACHER/teacher"
    [ "${EVAL_TEACHER:-1}" = 0 ] && tflag=""
    CUDA_VISIBLE_DEVICES=$g timeout 150 fewstep train eval --model out/$d/student $tflag \
      --steps 1 2 4 --n 512 --out out/$d >> $OUT/$d/run.log 2>&1
    for x in $extra; do
      CUDA_VISIBLE_DEVICES=$g timeout 150 fewstep train eval --model out/$d/$x --steps 1 2 4 --n 512 \
        --out out/$d/eval_$x >> $OUT/$d/run.log 2>&1
      cp out/$d/eval_$x/eval.json out/$d/eval_$x.json
    done
  fi
  cp $OUT/$d/run.log out/$d/run.txt && fewstep train pack out/$d $OUT/$d --exports >> out/$d/run.txt 2>&1 &&
    rm $OUT/$d/run.log
}
# FLAGS_B = SKIP runs only the first run
if [ "$(nvidia-smi -L | grep -c '^GPU')" -ge 2 ]; then
  one $gpu_a $name_a "$flags_a" &
  [ "$flags_b" != SKIP ] && one $gpu_b $name_b "$flags_b" &
  wait
else  # one GPU (nvidia-h200): the two runs one after the other
  one 0 $name_a "$flags_a"
  [ "$flags_b" != SKIP ] && one 0 $name_b "$flags_b"
fi
grep -h "first step\|throughput\|chosen CFG\|teacher CFG\|finished\|\[eval\]\|\[video-eval\] [st]\|student (EMA)\|graph" out/$name_a/run.txt out/$name_b/run.txt 2>/dev/null \
  | grep -v "it/s"
