"""``fewstep train {teacher,distill,eval,agd,agd-eval,all,video-teacher,video-distill,video-eval,pack,unpack,
check} ...`` -- see training/README.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny model, a few steps, CPU-friendly (tests; default off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the run's data, weights and noise (default 0)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (default auto: CUDA when torch sees a GPU, "
                   "else the CPU)")


def _train_common(p: argparse.ArgumentParser, minutes: float, batch: str, lr: str, compiled: str | None) -> None:
    """Flags of every training stage; ``batch``, ``lr`` and ``compiled`` state the stage's own defaults (``compiled``
    None: the stage always runs eagerly and has no --no-compile)."""
    _common(p)
    p.add_argument("--minutes", type=float, default=minutes,
                   help=f"wall-clock budget of the stage, from the command's start, export included (default "
                        f"{minutes:g})")
    p.add_argument("--resume", action="store_true", help="continue from DIR/<stage>_ckpt/ (default: start afresh)")
    p.add_argument("--batch", type=int, default=None, help=f"training batch per optimizer step (default {batch})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {lr})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this (absolute) step (default: when --minutes run out; --tiny: a few steps)")
    if compiled is not None:
        p.add_argument("--no-compile", dest="compile", action="store_false",
                       help=f"no torch.compile: run the step eagerly ({compiled})")
    p.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints (default 60)")


def _stage_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` (a stage's args dataclass) from the parsed options named like its fields, then ``overrides``: a new
    option needs its field and its flag, not a third list here."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewstep train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="STAGE")

    t = sub.add_parser("teacher", help="train the flow-matching teacher from scratch")
    t.add_argument("--out", required=True, help="run directory DIR (required): the teacher is exported to "
                   "DIR/teacher, checkpoints and logs go beside it")
    _train_common(t, 8.0, batch="512 for UNet presets, 256 for DiTs; --tiny 8", lr="5e-4; --tiny 1e-3",
                  compiled="default: compiled")
    from fewstep.training.model import DEFAULT_PRESET, PRESETS
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"model preset (default {DEFAULT_PRESET}; training/model.py says what each is)")
    t.add_argument("--ema-decay", type=float, default=0.9995,
                   help="decay of the weights' EMA, which is what gets exported (default 0.9995)")
    t.add_argument("--sigma-loc", type=float, default=0.8, help="logit-normal location of the training "
                   "sigmas; 0 puts the median sigma at 0.5 (default 0.8)")
    t.add_argument("--edge-weight", type=float, default=4.0, help="shape-aware loss weight on outlines "
                   "(0: plain MSE; default 4)")
    t.add_argument("--low-sigma", type=float, default=0.2,
                   help="loss weight min(1, (sigma/LOW)^2) on nearly clean samples (0: off; see teacher.py; default 0.2)")
    t.add_argument("--sigma-min", type=float, default=0.02, help="smallest training sigma (default 0.02)")
    t.add_argument("--workers", type=int, default=None, help="scene-sampling worker processes (default: "
                   "min(14, CPU cores - 2) on CUDA, none on the CPU)")
    t.add_argument("--reuse", type=int, default=2, help="training steps per freshly rendered batch "
                   "(default 2)")
    t.add_argument("--no-flip", dest="flip", action="store_false", help="no left-right flip augmentation (default: "
                   "flipped)")
    t.add_argument("--drop-background", type=float, default=0.0,
                   help="share of captions trained without their ' on a BG background' phrase (0: off, the default; try "
                        "0.25)")

    d = sub.add_parser("distill", help="reflow + one-step distillation into the student")
    d.add_argument("--teacher", required=True, help="exported teacher directory (DIR/teacher)")
    d.add_argument("--out", required=True, help="run directory DIR (required): the student is exported to "
                   "DIR/student, checkpoints and logs go beside it")
    _train_common(d, 4.0, batch="512; --tiny 8", lr="8e-4; --tiny 1e-3",
                  compiled="the default here: see --compile")
    d.add_argument("--teacher-steps", type=int, default=None, help="Euler steps for teacher pairs (default 12; "
                   "--tiny 2)")
    d.add_argument("--guidance", type=float, default=None, help="CFG scale for the pairs (default: the "
                   "best of --guidance-grid, searched on the teacher)")
    d.add_argument("--guidance-grid", type=float, nargs="+", default=None,
                   help="CFG scales searched when --guidance is not given (default 2 3 4 5 6; --tiny 1 3)")
    d.add_argument("--gen-frac", type=float, default=0.25, help="fraction of the budget spent making "
                   "pairs (default 0.25)")
    d.add_argument("--p-one", type=float, default=0.85, help="fraction of student samples drawn at sigma 1 (one step; default 0.85)")
    d.add_argument("--compile", dest="compile", action="store_true", help="torch.compile the sampler and the step "
                   "(default off: eager)")
    d.set_defaults(compile=False)  # see DistillArgs.compile
    d.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the student step eagerly (default: recorded as a CUDA graph after its first step)")
    d.add_argument("--max-pairs", type=int, default=None,
                   help="most teacher pairs kept in the pool (default 400000; --tiny 32)")
    d.add_argument("--freeze-text", action="store_true",
                   help="keep the student's text encoder frozen at the teacher's weights (default: trained)")
    d.add_argument("--dmd", type=float, default=0.0,
                   help="weight of the DMD distribution-matching term on one-step samples (0: off, the default; try 1)")
    d.add_argument("--dmd-batch", type=int, default=None, help="one-step samples per step for --dmd "
                   "(default 128)")
    d.add_argument("--dmd-lr", type=float, default=None, help="the fake score network's LR (default: --lr's)")
    d.add_argument("--drop-background", type=float, default=0.0,
                   help="share of pair prompts without their ' on a BG background' phrase (0: off, the default)")
    d.add_argument("--gan", type=float, default=0.0,
                   help="adversarial term on one-step samples, as a share of the regression's gradient (0: off, the "
                        "default)")
    d.add_argument("--gan-batch", type=int, default=None, help="one-step samples judged per step "
                   "for --gan (default 256)")
    d.add_argument("--gan-features", action="store_true",
                   help="--gan judges through the frozen teacher UNet's encoder at a random noise level (LADD; default: "
                        "a pixel discriminator)")
    d.add_argument("--gan-lr", type=float, default=None, help="the discriminator's LR for --gan "
                   "(default 5e-4)")
    d.add_argument("--gan-warmup", type=int, default=150,
                   help="--gan: steps with the discriminator alone, then as many ramping the generator's weight "
                        "(default 150)")
    d.add_argument("--feat", type=float, default=0.0,
                   help="weight of a perceptual distance on the frozen teacher UNet's encoder features (0: off, the "
                        "default; try 1)")
    d.add_argument("--feat-batch", type=int, default=None, help="predictions per step compared by "
                   "--feat (default 128)")
    d.add_argument("--feat-sigma", type=float, nargs=2, default=(0.1, 0.7), metavar=("LO", "HI"),
                   help="--feat reads both images noised at a level drawn from U[LO, HI] (default 0.1 0.7)")
    d.add_argument("--ema-decay", type=float, default=0.999, help="decay of the exported EMA of the "
                   "student (default 0.999)")
    d.add_argument("--export-raw", action="store_true", help="also export the raw weights to "
                   "DIR/student_raw (default off)")
    d.add_argument("--extra-emas", type=float, nargs="+", default=(),
                   help="also keep EMAs at these decays and export each to DIR/student_ema<D> (default none)")
    d.add_argument("--huber", type=float, default=1e-3,
                   help="pseudo-Huber constant on the per-sample velocity error (0: mean squares; default 1e-3)")

    e = sub.add_parser("eval", help="held-out adherence / diversity / grid of an exported model")
    e.add_argument("--model", required=True, help="exported model directory to score (required), e.g. "
                   "DIR/student")
    e.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4],
                   help="step counts the model is scored at (default 1 2 4)")
    e.add_argument("--teacher", default=None, help="also score this exported teacher, for comparison "
                   "(default: none)")
    e.add_argument("--teacher-steps", type=int, default=25, help="the teacher's Euler steps (default 25; "
                   "--tiny 4)")
    e.add_argument("--teacher-guidance", type=float, default=None,
                   help="the teacher's CFG scale (default: the scale the student was distilled with, else the "
                        "teacher's own, else 4)")
    e.add_argument("--n", type=int, default=512, help="held-out prompts scored (default 512; --tiny 4)")
    e.add_argument("--out", default=None, help="where results and the image grid go (default: the parent of "
                   "--model)")
    e.add_argument("--batch", type=int, default=512, help="images generated per batch (default 512; --tiny 8)")
    e.add_argument("--no-background", action="store_true",
                   help="score the same held-out prompts without their ' on a BG background' phrase (default off)")
    _common(e)

    ag = sub.add_parser("agd", help="guidance adapters for the teacher (AGD): CFG's two passes per step in one")
    ag.add_argument("--teacher", required=True, help="exported teacher directory (DIR/teacher), frozen")
    ag.add_argument("--out", required=True, help="run directory DIR (required): the teacher copy with its adapters "
                    "goes to DIR/agd (adapters in DIR/agd/adapters), checkpoints and logs beside it")
    _train_common(ag, 4.0, batch="256 guided-trajectory states; --tiny 8", lr="1e-3; --tiny 1e-2", compiled=None)
    ag.add_argument("--rank", type=int, default=16, help="adapter rank, 1..64 for the CUDA kernel (default 16)")
    ag.add_argument("--max-guidance", type=float, default=6.0,
                    help="each training trajectory's CFG scale is drawn from U[1, G] (default 6)")
    ag.add_argument("--teacher-steps", type=int, default=None,
                    help="Euler steps of the guided trajectories, on the sigmas the engine serves the teacher with "
                         "(default: the teacher's default_steps, 25; --tiny 2)")
    ag.add_argument("--gen-frac", type=float, default=0.25,
                    help="fraction of the budget spent sampling guided trajectories (default 0.25)")
    ag.add_argument("--max-states", type=int, default=None,
                    help="capacity of the state pool on the device (default 400000, ~20 GB at 64 px; --tiny 64)")
    ag.add_argument("--ema-decay", type=float, default=0.995,
                    help="decay of the adapters' EMA, which is what gets exported (default 0.995)")

    ae = sub.add_parser("agd-eval", help="held-out prompts, same noise: CFG (two passes per step) against the "
                                         "guidance adapters (one pass)")
    ae.add_argument("--teacher", required=True, help="exported teacher directory (DIR/teacher or DIR/agd)")
    ae.add_argument("--adapters", required=True, help="the adapters folder (DIR/agd/adapters)")
    ae.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0],
                    help="CFG scales compared, each as CFG and as adapters (default 2 4)")
    ae.add_argument("--steps", type=int, default=None, help="sampling steps (default: the teacher's default_steps, "
                    "25; --tiny 2)")
    ae.add_argument("--n", type=int, default=512, help="held-out prompts scored (default 512; --tiny 4)")
    ae.add_argument("--batch", type=int, default=512, help="images per sampler batch, also the timing batch "
                    "(default 512; --tiny 4)")
    ae.add_argument("--out", default=None, help="where agd_eval.json, agd_eval.md and agd_grid.png go (default: "
                    "the run directory above the adapters' export)")
    ae.add_argument("--div-prompts", type=int, default=16, help="diversity: this many held-out prompts ... "
                    "(default 16; --tiny 1)")
    ae.add_argument("--div-seeds", type=int, default=8, help="... each sampled from this many seeds (default 8; "
                    "--tiny 2)")
    _common(ae)

    a = sub.add_parser("all", help="both models in one process: teacher -> distill -> eval, then video teacher -> "
                                   "video distill -> video eval (default budgets: 8 + 3.8 + 5 + 3 = 19.8 min)")
    a.add_argument("--out", required=True, help="run directory DIR (required): every stage's exports, "
                   "checkpoints, logs and results")
    _common(a)
    a.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"image model preset (default {DEFAULT_PRESET})")
    a.add_argument("--teacher-minutes", type=float, default=8.0, help="budget of the image teacher (default 8)")
    a.add_argument("--distill-minutes", type=float, default=3.8, help="budget of the image distillation "
                   "(default 3.8)")
    a.add_argument("--video-teacher-minutes", type=float, default=5.0, help="budget of the video teacher "
                   "(default 5)")
    a.add_argument("--video-distill-minutes", type=float, default=3.0, help="budget of the video distillation "
                   "(default 3)")
    a.add_argument("--no-video", dest="video", action="store_false", help="the image model only (default: both)")
    a.add_argument("--n", type=int, default=512, help="held-out prompts of the image eval (default 512; --tiny 8)")
    a.add_argument("--video-n", type=int, default=28, help="held-out streams of the video eval (default 28; "
                   "--tiny 4)")
    a.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the teachers eagerly and never compile the video distillation (default: the teachers "
                        "compiled, the video distillation as its budget decides, the image distillation eager)")

    from fewstep.training.video import DEFAULT_VIDEO_PRESET, VIDEO_PRESETS
    vt = sub.add_parser("video-teacher", help="train the streaming video teacher (per-frame noise levels)")
    vt.add_argument("--out", required=True, help="run directory DIR (required): the teacher is exported to "
                    "DIR/video_teacher, checkpoints and logs go beside it")
    _train_common(vt, 5.0, batch="128 windows; --tiny 4", lr="5e-4; --tiny 1e-3",
                  compiled="default: compiled, or a CUDA graph on CUDA; see --no-cuda-graphs")
    vt.add_argument("--preset", default=DEFAULT_VIDEO_PRESET, choices=sorted(VIDEO_PRESETS),
                    help=f"video preset (default {DEFAULT_VIDEO_PRESET}: StreamUNetModel; small: the StreamDiT of the "
                         "2026-11-29; training/video.py says what each is)")
    vt.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="compile the step (--no-compile: eager) instead of recording it as a CUDA graph (default: "
                         "a CUDA graph on CUDA)")
    vt.add_argument("--ema-decay", type=float, default=0.999,
                    help="decay of the weights' EMA, which is what gets exported (default 0.999)")
    vt.add_argument("--edge-weight", type=float, default=4.0, help="shape-aware loss weight on outlines "
                    "(0: plain MSE; default 4)")
    vt.add_argument("--guidance", type=float, default=3.0, help="CFG scale recorded in the export as the "
                    "teacher's (default 3)")
    vt.add_argument("--workers", type=int, default=None, help="window-sampling worker processes (default: "
                    "min(14, CPU cores - 2) on CUDA, none on the CPU)")

    vd = sub.add_parser("video-distill", help="distill the video teacher onto the engine's K-level moving buffer")
    vd.add_argument("--teacher", required=True, help="exported video teacher (DIR/video_teacher)")
    vd.add_argument("--out", required=True, help="run directory DIR (required): the student is exported to "
                    "DIR/video_student, checkpoints and logs go beside it")
    _train_common(vd, 3.5, batch="96 buffer states; --tiny 3", lr="1e-4; --tiny 1e-3",
                  compiled="default: see --compile")
    vd.add_argument("--substeps", type=int, default=4, help="teacher Euler sub-steps per ladder level "
                    "(default 4; --tiny 1)")
    vd.add_argument("--guidance", type=float, default=None, help="teacher CFG (default: searched over --guidance-grid)")
    vd.add_argument("--guidance-grid", type=float, nargs="+", default=[2.0, 3.0, 4.5],
                    help="teacher CFG scales searched when --guidance is not given (default 2 3 4.5)")
    vd.add_argument("--streams", type=int, default=None, help="rollout streams per teacher "
                    "rollout (default 192; --tiny 4)")
    vd.add_argument("--steps-per-rollout", type=int, default=None,
                    help="optimizer steps per teacher rollout (default 8, --tiny 2; with --batch 96 and 192 "
                         "streams each target is used ~4x)")
    vd.add_argument("--replay", type=int, default=4, help="replay buffer capacity, in rollouts "
                    "(default 4)")
    vd.add_argument("--compile", dest="compile", action="store_true",
                    help="compile the student step (default: only on CUDA for budgets >= 7 min; --no-compile: never)")
    vd.set_defaults(compile=None)

    ve = sub.add_parser("video-eval", help="300-frame streams with the engine's policy: video_metrics + adherence")
    ve.add_argument("--model", required=True, help="exported video model directory to score (required), e.g. "
                    "DIR/video_student")
    ve.add_argument("--teacher", default=None, help="also score this exported video teacher, for comparison "
                    "(default: none)")
    ve.add_argument("--teacher-substeps", type=int, default=None,
                    help="the teacher's Euler sub-steps per level (default: those the student was distilled with)")
    ve.add_argument("--teacher-guidance", type=float, default=None,
                    help="the teacher's CFG scale (default: the scale the student was distilled with)")
    ve.add_argument("--n", type=int, default=16, help="streams scored, one prompt each (default 16; --tiny 2)")
    ve.add_argument("--frames", type=int, default=300, help="frames per stream (default 300; --tiny 12)")
    ve.add_argument("--split", default="heldout", choices=["heldout", "train"],
                    help="which captions the prompts come from (default heldout)")
    ve.add_argument("--out", default=None, help="where results and the frame strips go (default: the parent of "
                    "--model)")
    ve.add_argument("--workers", type=int, default=None, help="scoring processes (default: min(14, CPU cores - 2); "
                    "--tiny 0)")
    ve.add_argument("--div-prompts", type=int, default=4, help="diversity: the first N prompts ... "
                    "(default 4; --tiny 2)")
    ve.add_argument("--div-seeds", type=int, default=4, help="... each streamed from this many seeds (< 2: skip; "
                    "default 4)")
    _common(ve)

    pk = sub.add_parser("pack", help="pack DIR into DEST (an $OUT folder) in <= 8 files < 16 MB")
    pk.add_argument("dir", help="the run directory to pack")
    pk.add_argument("dest", help="folder the packed files are written to (created if missing)")
    pk.add_argument("--exports", nargs="*", default=None, help="export folders (default: teacher student)")
    pk.add_argument("--ckpt", nargs="*", default=[], help="stages whose checkpoint shards to include, e.g. "
                    "teacher (default: none)")

    up = sub.add_parser("unpack", help="restore a packed folder into DIR")
    up.add_argument("src", help="a folder written by fewstep train pack")
    up.add_argument("dir", help="the run directory to restore into (created if missing)")

    ck = sub.add_parser("check", help="validate an exported model directory")
    ck.add_argument("dir", help="the exported model directory, e.g. DIR/student")
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
    elif args.cmd == "agd":
        from fewstep.training.agd import AgdArgs, train_agd
        train_agd(_stage_args(AgdArgs, args, budget_start=started))
    elif args.cmd == "agd-eval":
        from fewstep.training.agd import AgdEvalArgs, evaluate_agd
        kw = dict(n=4, batch=4, div_prompts=1, div_seeds=2, grid_prompts=2) if args.tiny else {}
        evaluate_agd(_stage_args(AgdEvalArgs, args, steps=args.steps or (2 if args.tiny else None), **kw))
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
