"""``fewstep train {teacher,distill,eval,all,video-teacher,video-distill,video-eval,pack,unpack,check} ...``
-- see training/README.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny model, a few steps, CPU-friendly (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")


def _train_common(p: argparse.ArgumentParser, minutes: float) -> None:
    _common(p)
    p.add_argument("--minutes", type=float, default=minutes,
                   help="wall-clock budget of the stage, from the command's start, export included")
    p.add_argument("--resume", action="store_true", help="continue from DIR/<stage>_ckpt/")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop at this (absolute) step")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")


def _stage_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` (a stage's args dataclass) from the parsed options named like its fields, then ``overrides``: a new
    option needs its field and its flag, not a third list here."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewstep train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("teacher", help="train the flow-matching teacher from scratch")
    t.add_argument("--out", required=True)
    _train_common(t, 8.0)
    from fewstep.training.model import DEFAULT_PRESET, PRESETS
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"model preset (default {DEFAULT_PRESET}; training/model.py says what each is)")
    t.add_argument("--ema-decay", type=float, default=0.9995)
    t.add_argument("--sigma-loc", type=float, default=0.8, help="logit-normal location of the training sigmas")
    t.add_argument("--edge-weight", type=float, default=4.0, help="shape-aware loss weight on outlines (0: MSE)")
    t.add_argument("--low-sigma", type=float, default=0.2,
                   help="loss weight min(1, (sigma/LOW)^2) on nearly clean samples (0: off; see teacher.py)")
    t.add_argument("--sigma-min", type=float, default=0.02, help="smallest training sigma")
    t.add_argument("--workers", type=int, default=None, help="scene-sampling worker processes")
    t.add_argument("--reuse", type=int, default=2, help="training steps per freshly rendered batch")
    t.add_argument("--no-flip", dest="flip", action="store_false", help="no left-right flip augmentation")
    t.add_argument("--drop-background", type=float, default=0.0,
                   help="share of captions trained without their ' on a BG background' phrase (0: off; try 0.25)")

    d = sub.add_parser("distill", help="reflow + one-step distillation into the student")
    d.add_argument("--teacher", required=True, help="exported teacher directory (DIR/teacher)")
    d.add_argument("--out", required=True)
    _train_common(d, 4.0)
    d.add_argument("--teacher-steps", type=int, default=None, help="Euler steps for teacher pairs (12)")
    d.add_argument("--guidance", type=float, default=None, help="CFG scale for the pairs (default: search)")
    d.add_argument("--guidance-grid", type=float, nargs="+", default=None)
    d.add_argument("--gen-frac", type=float, default=0.25, help="fraction of the budget spent making pairs")
    d.add_argument("--p-one", type=float, default=0.85, help="fraction of student samples drawn at sigma 1 (one step)")
    d.add_argument("--compile", dest="compile", action="store_true", help="torch.compile the sampler and the step")
    d.set_defaults(compile=False)  # see DistillArgs.compile
    d.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the student step eagerly (default: recorded as a CUDA graph after its first step)")
    d.add_argument("--max-pairs", type=int, default=None)
    d.add_argument("--freeze-text", action="store_true")
    d.add_argument("--dmd", type=float, default=0.0,
                   help="weight of the DMD distribution-matching term on one-step samples (0: off; try 1)")
    d.add_argument("--dmd-batch", type=int, default=None, help="one-step samples per step for --dmd (128)")
    d.add_argument("--dmd-lr", type=float, default=None, help="the fake score network's LR (default: --lr's)")
    d.add_argument("--drop-background", type=float, default=0.0,
                   help="share of pair prompts without their ' on a BG background' phrase (0: off)")
    d.add_argument("--gan", type=float, default=0.0,
                   help="adversarial term on one-step samples, as a share of the regression's gradient (0: off)")
    d.add_argument("--gan-batch", type=int, default=None, help="one-step samples judged per step for --gan (256)")
    d.add_argument("--gan-features", action="store_true",
                   help="--gan judges through the frozen teacher UNet's encoder at a random noise level (LADD)")
    d.add_argument("--gan-lr", type=float, default=None, help="the discriminator's LR for --gan (5e-4)")
    d.add_argument("--gan-warmup", type=int, default=150,
                   help="--gan: steps with the discriminator alone, then as many ramping the generator's weight")
    d.add_argument("--feat", type=float, default=0.0,
                   help="weight of a perceptual distance on the frozen teacher UNet's encoder features (0: off; try 1)")
    d.add_argument("--feat-batch", type=int, default=None, help="predictions per step compared by --feat (128)")
    d.add_argument("--feat-sigma", type=float, nargs=2, default=(0.1, 0.7), metavar=("LO", "HI"),
                   help="--feat reads both images noised at a level drawn from U[LO, HI]")
    d.add_argument("--ema-decay", type=float, default=0.999, help="decay of the exported EMA of the student")
    d.add_argument("--export-raw", action="store_true", help="also export the raw weights to DIR/student_raw")
    d.add_argument("--extra-emas", type=float, nargs="+", default=(),
                   help="also keep EMAs at these decays and export each to DIR/student_ema<D>")
    d.add_argument("--huber", type=float, default=1e-3,
                   help="pseudo-Huber constant on the per-sample velocity error (0: mean squares)")

    e = sub.add_parser("eval", help="held-out adherence / diversity / grid of an exported model")
    e.add_argument("--model", required=True)
    e.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    e.add_argument("--teacher", default=None)
    e.add_argument("--teacher-steps", type=int, default=25)
    e.add_argument("--teacher-guidance", type=float, default=None)
    e.add_argument("--n", type=int, default=512)
    e.add_argument("--out", default=None, help="default: the parent of --model")
    e.add_argument("--batch", type=int, default=512)
    e.add_argument("--no-background", action="store_true",
                   help="score the same held-out prompts without their ' on a BG background' phrase")
    _common(e)

    a = sub.add_parser("all", help="both models in one process: teacher -> distill -> eval, then video teacher -> "
                                   "video distill -> video eval (default budgets: 8 + 3.8 + 5 + 3 = 19.8 min)")
    a.add_argument("--out", required=True)
    _common(a)
    a.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"image model preset (default {DEFAULT_PRESET})")
    a.add_argument("--teacher-minutes", type=float, default=8.0)
    a.add_argument("--distill-minutes", type=float, default=3.8)
    a.add_argument("--video-teacher-minutes", type=float, default=5.0)
    a.add_argument("--video-distill-minutes", type=float, default=3.0)
    a.add_argument("--no-video", dest="video", action="store_false", help="the image model only")
    a.add_argument("--n", type=int, default=512)
    a.add_argument("--video-n", type=int, default=28)
    a.add_argument("--no-compile", dest="compile", action="store_false")

    from fewstep.training.video import DEFAULT_VIDEO_PRESET, VIDEO_PRESETS
    vt = sub.add_parser("video-teacher", help="train the streaming video teacher (per-frame noise levels)")
    vt.add_argument("--out", required=True)
    _train_common(vt, 5.0)
    vt.add_argument("--preset", default=DEFAULT_VIDEO_PRESET, choices=sorted(VIDEO_PRESETS),
                    help=f"video preset (default {DEFAULT_VIDEO_PRESET}: StreamUNetModel; small: the StreamDiT of the "
                         "2026-11-29; training/video.py says what each is)")
    vt.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="compile the step (--no-compile: eager) instead of recording it as a CUDA graph")
    vt.add_argument("--ema-decay", type=float, default=0.999)
    vt.add_argument("--edge-weight", type=float, default=4.0)
    vt.add_argument("--guidance", type=float, default=3.0, help="CFG scale recorded for the teacher")
    vt.add_argument("--workers", type=int, default=None)

    vd = sub.add_parser("video-distill", help="distill the video teacher onto the engine's K-level moving buffer")
    vd.add_argument("--teacher", required=True, help="exported video teacher (DIR/video_teacher)")
    vd.add_argument("--out", required=True)
    _train_common(vd, 3.5)
    vd.add_argument("--substeps", type=int, default=4, help="teacher Euler sub-steps per ladder level")
    vd.add_argument("--guidance", type=float, default=None, help="teacher CFG (default: searched over --guidance-grid)")
    vd.add_argument("--guidance-grid", type=float, nargs="+", default=[2.0, 3.0, 4.5])
    vd.add_argument("--streams", type=int, default=None, help="rollout streams per teacher rollout (192)")
    vd.add_argument("--steps-per-rollout", type=int, default=None,
                    help="optimizer steps per teacher rollout (8; with --batch 96 and 192 streams each target is "
                         "used ~4x)")
    vd.add_argument("--replay", type=int, default=4, help="replay buffer capacity, in rollouts")
    vd.add_argument("--compile", dest="compile", action="store_true",
                    help="compile the student step (default: only for budgets >= 7 min)")
    vd.set_defaults(compile=None)

    ve = sub.add_parser("video-eval", help="300-frame streams with the engine's policy: video_metrics + adherence")
    ve.add_argument("--model", required=True)
    ve.add_argument("--teacher", default=None)
    ve.add_argument("--teacher-substeps", type=int, default=None)
    ve.add_argument("--teacher-guidance", type=float, default=None)
    ve.add_argument("--n", type=int, default=16)
    ve.add_argument("--frames", type=int, default=300)
    ve.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ve.add_argument("--out", default=None)
    ve.add_argument("--workers", type=int, default=None)
    ve.add_argument("--div-prompts", type=int, default=4, help="diversity: the first N prompts ...")
    ve.add_argument("--div-seeds", type=int, default=4, help="... each streamed from this many seeds (< 2: skip)")
    _common(ve)

    pk = sub.add_parser("pack", help="pack DIR into DEST (an $OUT folder) in <= 8 files < 16 MB")
    pk.add_argument("dir")
    pk.add_argument("dest")
    pk.add_argument("--exports", nargs="*", default=None, help="export folders (default: teacher student)")
    pk.add_argument("--ckpt", nargs="*", default=[], help="stages whose checkpoint shards to include")

    up = sub.add_parser("unpack", help="restore a packed folder into DIR")
    up.add_argument("src")
    up.add_argument("dir")

    ck = sub.add_parser("check", help="validate an exported model directory")
    ck.add_argument("dir")
    return ap


def _tiny_eval_kw(tiny: bool) -> dict:
    return dict(n=8, div_prompts=2, div_seeds=2, grid_prompts=4, batch=8) if tiny else {}


def main(argv: list[str] | None = None) -> int:
    from fewstep.training.common import UsageError
    try:
        return _main(argv)
    except UsageError as e:
        print(f"fewstep train: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    # A stage's --minutes count from here, not from the import of training.common: called in-process (the tests,
    # after minutes of other work) the import time would eat the budget. In a fresh `fewstep train` the two
    # differ by the import of torch (seconds), well inside the margin each stage keeps for its export.
    started = time.time()
    args = build_parser().parse_args(argv)
    if args.cmd == "teacher":
        from fewstep.training.model import DEFAULT_PRESET
        from fewstep.training.teacher import TeacherArgs, train_teacher
        train_teacher(_stage_args(TeacherArgs, args, preset=args.preset or DEFAULT_PRESET, budget_start=started))
    elif args.cmd == "distill":
        from fewstep.training.distill import DEFAULT_GRID, DistillArgs, distill
        distill(_stage_args(DistillArgs, args, guidance_grid=tuple(args.guidance_grid or DEFAULT_GRID),
                            budget_start=started))
    elif args.cmd == "eval":
        from fewstep.training.evaluate import EvalArgs, evaluate
        kw = dict(n=args.n, batch=args.batch)
        kw.update(_tiny_eval_kw(args.tiny))
        evaluate(EvalArgs(model=args.model, steps=args.steps, teacher=args.teacher,
                          teacher_steps=(4 if args.tiny and args.teacher_steps == 25 else args.teacher_steps),
                          teacher_guidance=args.teacher_guidance, out=args.out, seed=args.seed,
                          tiny=args.tiny, device=args.device, no_background=args.no_background, **kw))
    elif args.cmd == "all":
        from fewstep.training.distill import DistillArgs, distill
        from fewstep.training.evaluate import EvalArgs, evaluate
        from fewstep.training.teacher import TeacherArgs, train_teacher
        t_all = time.time()
        out = Path(args.out)
        preset = {"preset": args.preset} if args.preset else {}
        tdir = train_teacher(TeacherArgs(out=str(out), minutes=args.teacher_minutes, tiny=args.tiny,
                                         seed=args.seed, compile=args.compile, device=args.device,
                                         budget_start=time.time(), **preset))
        sdir = distill(DistillArgs(teacher=str(tdir), out=str(out), minutes=args.distill_minutes,
                                   tiny=args.tiny, seed=args.seed, device=args.device,   # eager: DistillArgs.compile
                                   budget_start=time.time()))
        kw = dict(n=args.n)
        kw.update(_tiny_eval_kw(args.tiny))
        evaluate(EvalArgs(model=str(sdir), steps=[1, 2, 4], teacher=str(tdir),
                          teacher_steps=(4 if args.tiny else 25), out=str(out), seed=args.seed,
                          tiny=args.tiny, device=args.device, **kw))
        if args.video:
            from fewstep.training.video import (VideoDistillArgs, VideoEvalArgs, VideoTeacherArgs, distill_video,
                                        train_video_teacher, video_evaluate)
            # each stage's budget counts from its own start (a single-stage command: from the command's start)
            vt = train_video_teacher(VideoTeacherArgs(
                out=str(out), minutes=args.video_teacher_minutes, tiny=args.tiny, seed=args.seed,
                compile=args.compile, device=args.device, budget_start=time.time()))
            vs = distill_video(VideoDistillArgs(teacher=str(vt), out=str(out), minutes=args.video_distill_minutes,
                                                tiny=args.tiny, seed=args.seed, device=args.device,
                                                compile=None if args.compile else False, budget_start=time.time()))
            video_evaluate(VideoEvalArgs(model=str(vs), teacher=str(vt), n=4 if args.tiny else args.video_n,
                                         frames=40 if args.tiny else 300, out=str(out), seed=args.seed,
                                         tiny=args.tiny, device=args.device))
        print(f"[all] done in {(time.time() - t_all) / 60:.1f} min; students: {sdir}"
              + (f", {vs}" if args.video else ""), flush=True)
    elif args.cmd == "video-teacher":
        from fewstep.training.video import VideoTeacherArgs, train_video_teacher
        train_video_teacher(VideoTeacherArgs(
            out=args.out, minutes=args.minutes, resume=args.resume, tiny=args.tiny, preset=args.preset,
            batch=args.batch, lr=args.lr, ema_decay=args.ema_decay, edge_weight=args.edge_weight,
            guidance=args.guidance, seed=args.seed, compile=args.compile, cuda_graphs=args.cuda_graphs,
            max_steps=args.max_steps, ckpt_every=args.ckpt_every, workers=args.workers, device=args.device,
            budget_start=started))
    elif args.cmd == "video-distill":
        from fewstep.training.video import VideoDistillArgs, distill_video
        distill_video(VideoDistillArgs(
            teacher=args.teacher, out=args.out, minutes=args.minutes, resume=args.resume, tiny=args.tiny,
            batch=args.batch, lr=args.lr, substeps=args.substeps, guidance=args.guidance,
            guidance_grid=tuple(args.guidance_grid), seed=args.seed, streams=args.streams,
            steps_per_rollout=args.steps_per_rollout, replay=args.replay,
            compile=args.compile, max_steps=args.max_steps, ckpt_every=args.ckpt_every, device=args.device,
            budget_start=started))
    elif args.cmd == "video-eval":
        from fewstep.training.video import VideoEvalArgs, video_evaluate
        video_evaluate(VideoEvalArgs(
            model=args.model, teacher=args.teacher, teacher_substeps=args.teacher_substeps,
            teacher_guidance=args.teacher_guidance, n=args.n, frames=args.frames, split=args.split, out=args.out,
            seed=args.seed, tiny=args.tiny, device=args.device, workers=args.workers,
            div_prompts=args.div_prompts, div_seeds=args.div_seeds))
    elif args.cmd == "pack":
        from fewstep.training.pack import pack
        pack(args.dir, args.dest, exports=args.exports, ckpt=args.ckpt)
    elif args.cmd == "unpack":
        from fewstep.training.pack import unpack
        unpack(args.src, args.dir)
    elif args.cmd == "check":
        from fewstep.training.export import summarize
        print(summarize(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
