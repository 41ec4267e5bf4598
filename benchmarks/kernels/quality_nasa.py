"""Does NASA steer the embedded default student? Negative prompt "red", measured with the training metrics' detector.

Two prompt sets from the ``training.data`` grammar (held-out split, completed with the checkpoint's background
phrase as served):

* colour-free: held-out captions with every colour word removed ("a circle which is above a square"), so the
  model picks the colours; measured: the share of detected objects whose palette colour is red
  (``benchmarks.quality.detect``), and the share of images with any red object;
* adherence: held-out captions that name no red object; measured: strict adherence and per-check rates
  (``benchmarks.quality.adherence``, the training metrics' scorer), to see what NASA costs the positive prompt;
* conflict: held-out captions whose first object is red; measured: the share of red objects, i.e. how far the
  negative prompt pushes against a prompt that asks for the colour.

Settings: no negative prompt; NASA ("red") at each ``--alphas``; NAG's renormalised form of NASA at each ``--nag``
(phi:tau:alpha); CFG with negative "red" at ``--cfg`` (two passes, for comparison). Same prompts and seeds for
every setting. Writes OUT.json (rows) and, with ``--grid``, a picture grid (rows: colour-free prompts, then red-named
prompts; columns: settings).

    fewstep bench nasa-quality --out benchmarks/results/kernels/quality_nasa_cpu.json --grid docs/images/nasa_red.png

``--video``: the same three sets from held-out *video* captions, streamed by the embedded video model (one session
per prompt, the negative prompt and its NASA scale given at ``start``); every one of the first ``--frames`` frames
of each stream is scored. The grid shows each stream's last scored frame.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep bench nasa-quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="image model directory (default: the embedded student)")
    p.add_argument("--n", type=int, default=128, help="prompts per set (default 128)")
    p.add_argument("--seed", type=int, default=0, help="prompt and noise seed (default 0)")
    p.add_argument("--negative", default="red", help='the negative prompt (default "red")')
    p.add_argument("--alphas", default="0.25,0.5,1.0,1.5", help="NASA scales to run (default 0.25,0.5,1.0,1.5)")
    p.add_argument("--nag", default="",
                   help="NAG settings to run, comma-separated phi:tau:alpha triples (nag_scale, nag_tau, nag_alpha), "
                        "e.g. 3:2.5:0.5,5:2.5:0.25 (default: none)")
    p.add_argument("--cfg", type=float, default=2.0, help="CFG guidance scale of the comparison run (0: none)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    p.add_argument("--grid", type=Path, default=None, help="PNG picture grid (colour-free, then red-named prompts x settings)")
    p.add_argument("--grid-rows", type=int, default=8, help="prompts in the grid (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--video", action="store_true",
                   help="streams of the video model (default: the embedded one) instead of images; CFG is not run "
                        "(streams take NASA only)")
    p.add_argument("--frames", type=int, default=16, help="with --video: frames scored per stream (default 16)")
    return p


_COLOR_WORD = None


def colour_free(caption: str) -> str:
    """``caption`` with its colour words removed (articles fixed: every remaining noun starts with a consonant)."""
    global _COLOR_WORD
    from fewstep.training import data as D

    if _COLOR_WORD is None:
        _COLOR_WORD = re.compile(r"\b(a|an) ((?:small |large )?)(" + "|".join(D.COLOR_NAMES) + r") ")
    return _COLOR_WORD.sub(lambda m: f"a {m.group(2)}", caption)


def nag_settings(spec: str) -> list[tuple[str, tuple[float, float, float]]]:
    """``--nag``'s (setting name, (phi, tau, alpha)) pairs."""
    out = []
    for item in filter(None, (t.strip() for t in spec.split(","))):
        try:
            phi, tau, alpha = map(float, item.split(":"))
        except ValueError:
            raise ValueError(f"--nag: {item!r} is not phi:tau:alpha (three numbers)") from None
        out.append((f"nag {phi:g}/{tau:g}/{alpha:g}", (phi, tau, alpha)))
    return out


def red_share(images, colour: str) -> tuple[float, float, float]:
    """(share of detected objects of ``colour``, share of images with one, mean objects detected per image)."""
    from fewstep.benchmarks.quality import detect

    objs = hits = images_hit = 0
    for im in images:
        dets = detect(im)
        n = sum(d.color == colour for d in dets)
        objs += len(dets)
        hits += n
        images_hit += n > 0
    return hits / max(objs, 1), images_hit / max(len(images), 1), objs / max(len(images), 1)


def _commit() -> str:
    """The measured checkout's commit (``FEWSTEP_COMMIT`` first; fewstep.clients.bench_util.git_commit)."""
    from fewstep.clients.bench_util import git_commit

    return git_commit(where=Path(__file__).resolve().parent) or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.nag_list = nag_settings(args.nag)  # a malformed --nag fails before any model loads
    except ValueError as e:
        parser.error(str(e))
    import numpy as np
    import torch

    from fewstep.benchmarks.quality import adherence
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline, NagParams
    from fewstep.server.config import DEFAULT_MODEL_DIR
    from fewstep.training.data import heldout_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.video:
        return video_main(args)
    model = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    pipe = FewStepPipeline(load_checkpoint(model))
    if "nasa" not in pipe.guidance_modes:
        print(f"{model}: no NASA (guidance modes {pipe.guidance_modes})")
        return 2
    pool = heldout_prompts(8 * args.n, args.seed)
    free, named, conflict = _sets(pool, args.n, args.negative)
    seeds = list(range(args.seed, args.seed + args.n))  # enough for every set: each holds at most n prompts
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    settings = [("none", None, None, None)] + [(f"nasa {a:g}", a, None, None) for a in alphas]
    settings += [(name, None, None, nag) for name, nag in args.nag_list]
    if args.cfg > 1:
        settings.append((f"cfg {args.cfg:g}", None, args.cfg, None))

    def run(prompts, alpha, cfg, nag):
        out = []
        params = None if nag is None else NagParams(*nag)
        for i in range(0, len(prompts), 16):  # seeds[i] drives prompt i in every set and setting
            p, s = prompts[i:i + 16], seeds[i:i + 16]
            neg = [args.negative] * len(p) if (alpha is not None or cfg or nag) else None
            out.append(pipe(p, s, guidance_scale=cfg or 0.0, negative_prompts=neg, nasa_scale=alpha,
                            nag=params).numpy())
        return np.concatenate(out)

    rows, grid_cols = [], []
    t0 = time.perf_counter()
    for name, alpha, cfg, nag in settings:
        t = time.perf_counter()
        imgs_free = run(free, alpha, cfg, nag)
        share, any_red, per_image = red_share(imgs_free, args.negative)
        imgs_named = run(named, alpha, cfg, nag)
        adh = adherence(list(imgs_named), [pipe.complete_prompt(c) for c in named])
        imgs_conflict = run(conflict, alpha, cfg, nag)
        conflict_share = red_share(imgs_conflict, args.negative)[0]
        row = {"setting": name, "nasa_scale": alpha, "nag": nag, "guidance_scale": cfg or 0.0,
               "negative": args.negative,
               "red_object_share": share, "images_with_red": any_red, "objects_per_image": per_image,
               "adherence": adh, "conflict_red_object_share": conflict_share, "conflict_n": len(conflict),
               "seconds": time.perf_counter() - t}
        rows.append(row)
        half = args.grid_rows // 2
        grid_cols.append((name, np.concatenate([imgs_free[:half], imgs_conflict[: args.grid_rows - half]])))
        print(f"{name:10s} red objects {share:6.1%}  images with red {any_red:6.1%}  objects/image {per_image:4.2f}  "
              f"strict adherence {adh['accuracy']:6.1%}  colours {adh['colors']:6.1%}  shapes {adh['shapes']:6.1%}  "
              f"red-named prompts: red objects {conflict_share:6.1%}  ({row['seconds']:.0f} s)", flush=True)
    meta = {"model": str(model), "n": args.n, "seed": args.seed, "colour_free_examples": free[:4]}
    return _finish(args, meta, rows, grid_cols, free, conflict, t0, scale=2)


def _finish(args, meta: dict, rows: list, grid_cols, free: list[str], conflict: list[str], t0: float,
            scale: int) -> int:
    """Write the rows (``--out``, with when, where and how they were made) and the picture grid (``--grid``)."""
    import torch

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "command": "fewstep bench nasa-quality " + shlex.join(sys.argv[1:]),
            "env": {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
                              "threads)", "torch": torch.__version__, "python": platform.python_version()},
            **meta, "wall_seconds": time.perf_counter() - t0}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.grid:
        half = args.grid_rows // 2
        _grid(args.grid, grid_cols, free[:half] + conflict[:args.grid_rows - half], scale=scale)
        print(f"wrote {args.grid}")
    return 0


def _sets(captions: list[str], n: int, negative: str) -> tuple[list[str], list[str], list[str]]:
    """(colour-free, naming no ``negative``, first object ``negative``) prompt sets of at most ``n`` each."""
    free = [colour_free(c) for c in captions[:n]]
    named = [c for c in captions if not re.search(rf"\b{negative}\b", c)][:n]
    first = re.compile(rf"^an? (?:small |large )?{negative} ")
    conflict = [c for c in captions if first.match(c)][:n]
    return free, named, conflict


def video_main(args) -> int:
    import numpy as np

    from fewstep.benchmarks.quality import adherence, stream_frames
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.stream import StreamPipeline
    from fewstep.server.config import DEFAULT_VIDEO_MODEL_DIR
    from fewstep.training import data as D

    model = Path(args.model) if args.model else DEFAULT_VIDEO_MODEL_DIR
    pipe = StreamPipeline(load_checkpoint(model))
    if "nasa" not in pipe.guidance_modes:
        print(f"{model}: no NASA (guidance modes {pipe.guidance_modes})")
        return 2
    rng = np.random.default_rng(args.seed)
    free, named, conflict = _sets([D.sample_video_scene(rng, "heldout").caption for _ in range(12 * args.n)],
                                  args.n, args.negative)
    seeds = list(range(args.seed, args.seed + args.n))
    settings = [("none", None, None)] + [(f"nasa {float(a):g}", float(a), None)
                                         for a in args.alphas.split(",") if a.strip()]
    settings += [(name, None, nag) for name, nag in args.nag_list]

    def run(prompts, alpha, nag):
        return stream_frames(pipe, prompts, args.frames, seeds[:len(prompts)],
                             args.negative if (alpha is not None or nag) else None, alpha, nag)

    rows, grid_cols = [], []
    t0 = time.perf_counter()
    for name, alpha, nag in settings:
        t = time.perf_counter()
        vids_free = run(free, alpha, nag)
        share, any_red, per_image = red_share([f for v in vids_free for f in v], args.negative)
        vids_named = run(named, alpha, nag)
        adh = adherence([f for v in vids_named for f in v], [p for p in named for _ in range(args.frames)])
        vids_conflict = run(conflict, alpha, nag)
        conflict_share = red_share([f for v in vids_conflict for f in v], args.negative)[0]
        row = {"setting": name, "nasa_scale": alpha, "nag": nag, "negative": args.negative, "red_object_share": share,
               "frames_with_red": any_red, "objects_per_frame": per_image, "adherence": adh,
               "conflict_red_object_share": conflict_share, "conflict_n": len(conflict),
               "seconds": time.perf_counter() - t}
        rows.append(row)
        half = args.grid_rows // 2
        grid_cols.append((name, np.stack([v[-1] for v in vids_free[:half] + vids_conflict[:args.grid_rows - half]])))
        print(f"{name:10s} red objects {share:6.1%}  frames with red {any_red:6.1%}  objects/frame {per_image:4.2f}  "
              f"strict adherence {adh['accuracy']:6.1%}  colours {adh['colors']:6.1%}  "
              f"red-named prompts: red objects {conflict_share:6.1%}  ({row['seconds']:.0f} s)", flush=True)
    meta = {"model": str(model), "video": True, "n": args.n, "frames": args.frames, "seed": args.seed,
            "sets": {"colour_free": len(free), "no_red": len(named), "red_first": len(conflict)},
            "colour_free_examples": free[:4]}
    return _finish(args, meta, rows, grid_cols, free, conflict, t0, scale=4)


def _grid(path: Path, cols, prompts, scale: int = 2) -> None:
    from PIL import Image, ImageDraw

    n_rows = len(prompts)
    side = cols[0][1].shape[1] * scale
    head, left = 16, 0
    canvas = Image.new("RGB", (left + side * len(cols), head + side * n_rows), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (name, imgs) in enumerate(cols):
        draw.text((left + j * side + 4, 2), name, fill="black")
        for i in range(n_rows):
            tile = Image.fromarray(imgs[i]).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (left + j * side, head + i * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
