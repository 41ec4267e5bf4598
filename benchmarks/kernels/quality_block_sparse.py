"""Effect of block-sparse self-attention on the output quality of the trained students.

For the image student (``training eval`` protocol) and the video student (``training video-eval``
protocol) this runs the existing evaluation building blocks once per attention setting, on the same
prompts and seeds, and records per setting:

* the achieved sparsity: mean over calls (weighted by batch) and layers of the processors'
  ``last_sparsity`` (fraction of skipped blocks), per layer too, and how many processor calls fell
  back to dense (``fallback_calls``, must be 0 for a sparse setting to mean anything);
* image: strict adherence + per-check rates (``training.metrics.Scorer.adherence`` =
  ``benchmarks.quality.adherence``), and ``flips``: fraction of prompts whose per-check result
  (``benchmarks.quality.score``) differs from the dense run;
* video: the ``training.video.aggregate`` metrics of ``score_stream`` (identity_consistency,
  frame_adherence, chunk_adherence, ...);
* ``mad_u8``: mean absolute pixel difference to the dense output of the same seeds, in uint8 levels
  (video: also over the first and second half of each stream, to show drift through the moving
  buffer).

Backends: on CUDA the Triton kernel (``enable_block_sparse_attention(..., backend="triton")``, fp16
weights as in ``training eval``); elsewhere the fp32 torch reference (``backend="reference"``: the same
adaptive mask, attention computed densely with the expanded block mask). The backend is recorded in
every row. These models have short sequences (image 32x32 = 1024 tokens, video buffer 8 frames x 16x16
= 2048 tokens), so the *speed* of sparse attention is not measured here, only its effect on quality.

    fewstep bench kernels-quality --out benchmarks/results/kernels/quality_block_sparse_cpu.json
    fewstep bench kernels-quality --only video --video-n 28 --frames 300 --out OUT_DIR   # CUDA
    fewstep bench kernels-quality --settings dense "block_sparse(threshold=0.9,block=64)"

``--out`` is a ``.json`` path (the table goes next to it as ``.md``) or a directory (then
``quality_block_sparse_{cpu,cuda}.json/.md`` inside).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.clients.bench_util import git_commit
from fewstep.server.config import DEFAULT_MODEL_DIR, DEFAULT_VIDEO_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]  # git metadata of an editable install's checkout

# image: 1024 tokens -> 16 key blocks of 64 / 32 of 32; topk=7 / 3 of 16 (+ the forced diagonal band)
# keeps ~50% / ~75% of the blocks skipped
IMAGE_SETTINGS = [
    "dense",
    "block_sparse(threshold=1.0,block=64)",  # control: every block kept, through the sparse path
    "block_sparse(threshold=0.95,block=64)",
    "block_sparse(threshold=0.9,block=64)",
    "block_sparse(threshold=0.8,block=64)",
    "block_sparse(threshold=0.9,block=32)",
    "block_sparse(threshold=0.9,block=64,tile_3d=1x8x8)",
    "block_sparse(threshold=none,topk=7,block=64)",
    "block_sparse(threshold=none,topk=3,block=64)",
]
# video: 2048 tokens (8 frames x 16 x 16) -> 32 key blocks of 64 / 64 of 32; a 2x4x8 tile = 2 frames (one
# chunk, one noise level) x 4 x 8 patches = one block of 64; topk=15 / 7 of 32 -> ~50% / ~75% skipped.
# On CPU the reference backend costs ~8x dense SDPA per attention, so the list is kept short.
VIDEO_SETTINGS = [
    "dense",
    "block_sparse(threshold=0.9,block=64)",
    "block_sparse(threshold=0.8,block=64)",
    "block_sparse(threshold=0.9,block=64,tile_3d=2x4x8)",
    "block_sparse(threshold=0.9,block=32)",
    "block_sparse(threshold=none,topk=15,block=64)",
    "block_sparse(threshold=none,topk=7,block=64)",
    "block_sparse(threshold=none,topk=7,block=64,tile_3d=2x4x8)",
]
IMAGE_CHECKS = ["background", "colors", "count", "positions", "shapes", "sizes"]
VIDEO_KEYS = ["chunk_adherence", "frame_strict_adherence", "identity_consistency", "frame_adherence",
              "motion_accuracy", "color_change_accuracy"]


def log(msg: str) -> None:
    print(f"[quality_block_sparse] {msg}", file=sys.stderr, flush=True)


def backend_for(device: torch.device) -> str:
    """The Triton kernel on CUDA, the fp32 torch reference elsewhere."""
    return "triton" if device.type == "cuda" else "reference"


def env_info(device: torch.device) -> dict:
    import diffusers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "platform": platform.platform()}


def _cfg(setting: str):
    from fewstep.kernels.attention_processor import BlockSparseConfig

    return BlockSparseConfig.parse(setting)


def apply_setting(denoiser: torch.nn.Module, setting: str, backend: str) -> int:
    """Install ``setting`` ("dense" or a block_sparse option) on the denoiser; returns #sparse modules."""
    from fewstep.kernels.attention_processor import disable_block_sparse_attention, enable_block_sparse_attention

    cfg = _cfg(setting)
    if cfg is None:
        disable_block_sparse_attention(denoiser)
        return 0
    return enable_block_sparse_attention(denoiser, cfg, backend=backend)


class SparsityMeter:
    """Reads every processor's ``last_sparsity`` after each denoiser forward (batch-weighted)."""

    def __init__(self, denoiser: torch.nn.Module):
        from fewstep.kernels.attention_processor import block_sparse_processors

        self.procs = block_sparse_processors(denoiser)
        self.sums = [0.0] * len(self.procs)
        self.weights = [0] * len(self.procs)
        self.calls = 0
        self.fallback_calls = 0
        self._pre = denoiser.register_forward_pre_hook(self._before)
        self._post = denoiser.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, mod, args):
        for p in self.procs:
            p.last_sparsity = None

    def _after(self, mod, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states")
        b = int(x.shape[0])
        self.calls += 1
        for i, p in enumerate(self.procs):
            if p.last_sparsity is None:
                self.fallback_calls += 1
            else:
                self.sums[i] += float(p.last_sparsity) * b
                self.weights[i] += b

    def close(self) -> dict:
        self._pre.remove()
        self._post.remove()
        per_layer = [s / w if w else None for s, w in zip(self.sums, self.weights)]
        vals = [v for v in per_layer if v is not None]
        return {"sparsity": round(float(np.mean(vals)), 4) if vals else (None if self.procs else 0.0),
                "sparsity_per_layer": [None if v is None else round(v, 4) for v in per_layer],
                "sparse_modules": len(self.procs), "denoiser_calls": self.calls,
                "fallback_calls": self.fallback_calls}


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------------------------
# image student: the `fewstep train eval` protocol (heldout_prompts, _noise salt 21, _generate, Scorer)
# ---------------------------------------------------------------------------------------------------------

def image_study(model_dir: str | Path, settings: list[str], *, n: int, device: torch.device, backend: str,
                seed: int = 0, batch: int = 32) -> dict:
    from fewstep.benchmarks import quality as Q
    from fewstep.training import data
    from fewstep.training.evaluate import _generate, _noise
    from fewstep.training.export import load_export
    from fewstep.training.metrics import Scorer
    from fewstep.training.model import served_sigmas, to_uint8_list

    model, tok, index = load_export(model_dir, device)
    fs = index.get("fewstep", {})
    steps = int(fs.get("default_steps", 1))
    guidance = float(fs.get("default_guidance_scale", 0.0))
    cfg = model.transformer.config
    tokens = (64 // cfg.patch_size) ** 2  # training.evaluate._noise draws 64x64 images
    prompts = data.heldout_prompts(n, seed=seed)
    noise = _noise(n, seed, 21, device)
    rows, dense_u8, dense_checks = [], None, None
    with Scorer(0 if device.type != "cuda" else None) as scorer:
        for setting in _with_dense_first(settings):
            modules = apply_setting(model.transformer, setting, backend)
            meter = SparsityMeter(model.transformer)
            t0 = time.time()
            imgs, _ = _generate(model, tok, prompts, noise, served_sigmas(model_dir, steps), guidance, batch)
            gen_s = time.time() - t0
            sp = meter.close()
            u8 = np.stack(to_uint8_list(imgs))
            adh = scorer.adherence(list(u8), prompts)
            per = [Q.score(im, p) for im, p in zip(u8, prompts)]
            checks = np.array([[bool(r[c]) for c in IMAGE_CHECKS] for r in per])
            if dense_u8 is None:
                dense_u8, dense_checks = u8, checks
            row = {"model": "image", "path": str(model_dir), "setting": setting,
                   "backend": backend if modules else "dense", **sp,
                   "adherence": round(float(adh["accuracy"]), 4),
                   "checks": {c: round(float(adh[c]), 4) for c in IMAGE_CHECKS},
                   "flips": round(float((checks != dense_checks).any(1).mean()), 4),
                   "mad_u8": round(_mad(u8, dense_u8), 4),
                   "mad_u8_worst_image": round(max(_mad(a, b) for a, b in zip(u8, dense_u8)), 4),
                   "n": n, "steps": steps, "guidance": guidance, "tokens": tokens,
                   "generate_seconds": round(gen_s, 1)}
            rows.append(row)
            log(f"image {setting}: sparsity {row['sparsity']} adherence {row['adherence']:.3f} "
                f"flips {row['flips']:.3f} mad {row['mad_u8']:.2f} ({gen_s:.0f} s)")
    apply_setting(model.transformer, "dense", backend)
    return {"model": str(model_dir), "n": n, "steps": steps, "guidance": guidance, "tokens": tokens,
            "prompts": "heldout_prompts", "seed": seed, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# video student: the `fewstep train video-eval` protocol (scenes/seeds as video_evaluate, engine policy)
# ---------------------------------------------------------------------------------------------------------

def video_study(model_dir: str | Path, settings: list[str], *, n: int, frames: int, device: torch.device,
                backend: str, seed: int = 0, split: str = "heldout", workers: int = 0) -> dict:
    """``workers`` > 1: score the streams in a spawn pool (as video_evaluate does on GPU hosts)."""
    from fewstep.training import data as D
    from fewstep.training.common import step_seed
    from fewstep.training.video import _score_job, aggregate, generate_streams, load_video_export

    model, tok, index = load_video_export(model_dir, device)
    fs = index.get("fewstep", {})
    K, F = int(fs["buffer_chunks"]), int(fs["chunk_frames"])
    size = int(fs.get("default_size", 32))
    guidance = float(fs.get("default_guidance_scale", 0.0))  # video_evaluate's student row: 1 call, no CFG
    # a DiT's buffer is one token grid; a StreamUNetModel attends over frames at two levels (8 x 16 x 16 and
    # 8 x 8 x 8 cells at 32 px), and its spatial attention within each frame: no single grid (tile_3d is ignored)
    p = model.transformer.config.get("patch_size")
    grid = (K * F, size // p, size // p) if p else None
    tokens = int(np.prod(grid)) if grid else None
    # the scenes and seeds video_evaluate draws for (seed, split, n)
    rng = np.random.default_rng([seed, 1234])
    prompts = [D.sample_video_scene(rng, split).caption for _ in range(n)]
    seeds = [int(step_seed(seed, i, 61) % (2**31)) for i in range(n)]
    half = (frames // F // 2) * F
    rows, dense, pool = [], None, None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
    try:
        for setting in _with_dense_first(settings):
            modules = apply_setting(model.transformer, setting, backend)
            meter = SparsityMeter(model.transformer)
            t0 = time.time()
            vids, timing = generate_streams(model, tok, prompts, seeds, frames, K, F, size, 1, guidance)
            gen_s = time.time() - t0
            sp = meter.close()
            u8 = vids.numpy()  # [n, frames, H, W, 3]
            jobs = [(u8[i], prompts[i], F) for i in range(n)]  # _score_job = training.video.score_stream
            per_stream = pool.map(_score_job, jobs) if pool is not None else [_score_job(j) for j in jobs]
            agg = aggregate(per_stream)
            if dense is None:
                dense = u8
            row = {"model": "video", "path": str(model_dir), "setting": setting,
                   "backend": backend if modules else "dense", **sp,
                   **{k: agg[k] for k in VIDEO_KEYS + ["chunk_adherence_first_half", "chunk_adherence_second_half"]},
                   "mad_u8": round(_mad(u8, dense), 4),
                   "mad_u8_first_half": round(_mad(u8[:, :half], dense[:, :half]), 4) if half else None,
                   "mad_u8_second_half": round(_mad(u8[:, half:], dense[:, half:]), 4),
                   "streams": n, "frames": frames, "K": K, "F": F, "tokens": tokens,
                   "token_grid": grid, "buffer_steps": timing["buffer_steps"], "generate_seconds": round(gen_s, 1),
                   "per_stream": [{"caption": c, **{k: r.get(k) for k in VIDEO_KEYS}}
                                  for c, r in zip(prompts, per_stream)]}
            rows.append(row)
            log(f"video {setting}: sparsity {row['sparsity']} identity {row['identity_consistency']} "
                f"chunk_adh {row['chunk_adherence']} mad {row['mad_u8']:.2f} ({gen_s:.0f} s)")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    apply_setting(model.transformer, "dense", backend)
    return {"model": str(model_dir), "n": n, "frames": frames, "split": split, "seed": seed, "K": K, "F": F,
            "tokens": tokens, "token_grid": grid, "rows": rows}


def _with_dense_first(settings: list[str]) -> list[str]:
    # every delta is against the dense run of the same seeds: run it first (once)
    rest = [s for s in settings if _cfg(s) is not None]
    return ["dense"] + rest


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------

def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _delta(v, ref) -> str:
    return "-" if v is None or ref is None else f"{v - ref:+.3f}"


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Block-sparse attention: effect on quality ({m['device_type']})", "",
             (f"Backend **{m['backend']}** on {m['env']['device']}; commit `{m['commit']}`, {m['date']}, "
              f"{m['wall_seconds']:.0f} s wall."), "", f"`{m['command']}`", "",
             ("Sparsity = mean fraction of skipped (query block, key block) pairs over calls and self-attention "
              "layers (`last_sparsity`). `mad` = mean |pixel - dense pixel| in uint8 levels, same seeds. Deltas "
              "are against the dense row. These sequences are short, so speed is not measured here."), ""]
    img = result.get("image")
    if img:
        lines += [f"## Image student ({img['model']})", "",
                  (f"{img['n']} held-out prompts (`heldout_prompts`, seed {img['seed']}), {img['steps']} step(s), "
                   f"{img['tokens']} tokens. `flips`: fraction of prompts whose per-check pass/fail differs from "
                   f"dense. Resolution: one prompt = {1 / img['n']:.3f} of a rate."), ""]
        head = ["setting", "sparsity", "adherence", "Δ adh", "flips", "mad", "worst-img mad"] + IMAGE_CHECKS
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ref = img["rows"][0]
        for r in img["rows"]:
            cells = [f"`{r['setting']}`", _f(r["sparsity"]), _f(r["adherence"]),
                     _delta(r["adherence"], ref["adherence"]), _f(r["flips"]), _f(r["mad_u8"], "{:.2f}"),
                     _f(r["mad_u8_worst_image"], "{:.2f}")]
            cells += [f"{r['checks'][c]:.3f} ({_delta(r['checks'][c], ref['checks'][c])})" for c in IMAGE_CHECKS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    vid = result.get("video")
    if vid:
        lines += [f"## Video student ({vid['model']})", "",
                  (f"{vid['n']} {vid['split']} streams x {vid['frames']} frames (moving buffer K={vid['K']} x "
                   f"F={vid['F']}, engine policy, 1 call per chunk), "
                   + (f"buffer = {vid['tokens']} tokens (grid {'x'.join(map(str, vid['token_grid']))})"
                      if vid.get("token_grid") else "a UNet: attention within frames and across the buffer's frames")
                   + f". Per-stream metrics are averaged over "
                   f"{vid['n']} streams; `mad` halves: frames before / after the middle of each stream."), ""]
        head = (["setting", "sparsity"] + [f"{k} (Δ)" for k in VIDEO_KEYS]
                + ["mad", "mad 1st half", "mad 2nd half"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ref = vid["rows"][0]
        for r in vid["rows"]:
            cells = [f"`{r['setting']}`", _f(r["sparsity"])]
            cells += [f"{_f(r[k])} ({_delta(r[k], ref[k])})" for k in VIDEO_KEYS]
            cells += [_f(r["mad_u8"], "{:.2f}"), _f(r["mad_u8_first_half"], "{:.2f}"),
                      _f(r["mad_u8_second_half"], "{:.2f}")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    fb = [f"{r['model']} `{r['setting']}`" for part in (img, vid) if part for r in part["rows"]
          if r["setting"] != "dense" and r["fallback_calls"]]
    if fb:
        lines += ["**Warning:** these settings had processor calls that fell back to dense: " + ", ".join(fb), ""]
    return "\n".join(lines)


def out_paths(out: str | Path, device: torch.device) -> tuple[Path, Path]:
    out = Path(out)
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    name = f"quality_block_sparse_{'cuda' if device.type == 'cuda' else 'cpu'}"
    return out / f"{name}.json", out / f"{name}.md"


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from fewstep.training.common import pick_device, setup_torch, write_json

    t_start = time.time()
    device = pick_device(args.device)
    setup_torch(device)
    backend = args.backend or backend_for(device)
    meta = {"device_type": device.type, "backend": backend, "env": env_info(device), "commit": git_commit(where=REPO),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["fewstep", "bench", "kernels-quality",
                                 *(sys.argv[1:] if argv is None else argv)])}
    result: dict = {"meta": meta}
    if args.only in ("both", "image"):
        result["image"] = image_study(args.image_model, args.image_settings or args.settings or IMAGE_SETTINGS,
                                      n=args.n, device=device, backend=backend, seed=args.seed, batch=args.batch)
    if args.only in ("both", "video"):
        result["video"] = video_study(args.video_model, args.video_settings or args.settings or VIDEO_SETTINGS,
                                      n=args.video_n, frames=args.frames, device=device, backend=backend,
                                      seed=args.seed, workers=args.workers)
    meta["wall_seconds"] = round(time.time() - t_start, 1)
    for part in ("image", "video"):  # self-contained rows
        for r in result.get(part, {}).get("rows", []):
            r.update(commit=meta["commit"], date=meta["date"], device=meta["env"]["device"])
    if args.out:
        js, md = out_paths(args.out, device)
        js.parent.mkdir(parents=True, exist_ok=True)
        write_json(js, result)
        md.write_text(markdown(result), encoding="utf-8")
        log(f"wrote {js} and {md} ({meta['wall_seconds']:.0f} s)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-model", default=str(DEFAULT_MODEL_DIR), help="image student directory (default: the embedded "
                   "image model, as out/r4/student)")
    p.add_argument("--video-model", default=str(DEFAULT_VIDEO_MODEL_DIR), help="video student directory (default: the "
                   "embedded video model)")
    p.add_argument("--only", choices=["both", "image", "video"], default="both",
                   help="which student to study (default both)")
    p.add_argument("--settings", nargs="+", default=None,
                   help='attention settings for both models ("dense" is always run first; default: the built-in '
                        'lists IMAGE_SETTINGS and VIDEO_SETTINGS)')
    p.add_argument("--image-settings", nargs="+", default=None,
                   help="attention settings for the image student only, over --settings (default: --settings)")
    p.add_argument("--video-settings", nargs="+", default=None,
                   help="attention settings for the video student only, over --settings (default: --settings)")
    p.add_argument("--n", type=int, default=None, help="image: held-out prompts (CPU default 48, CUDA 512)")
    p.add_argument("--video-n", type=int, default=None, help="video: streams (CPU default 4, CUDA 28)")
    p.add_argument("--frames", type=int, default=None, help="video: frames per stream (CPU default 12, CUDA 300)")
    p.add_argument("--batch", type=int, default=32, help="images generated per batch (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="video scoring processes (default: 0 on CPU, min(14, cores - 2) on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts, scenes and noise; every setting "
                   "gets the same (default 0)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (default auto: CUDA when torch sees a "
                   "GPU)")
    p.add_argument("--backend", choices=["triton", "reference"], default=None,
                   help="sparse attention implementation: the Triton kernel or the fp32 torch reference "
                        "(default: triton on CUDA, reference elsewhere)")
    p.add_argument("--out", default=None, help="where results go: a .json path (the table as .md next "
                   "to it) or a directory (default: not written)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    # CPU defaults keep the whole run under ~15 minutes on 2 (shared) cores with the reference backend;
    # CUDA defaults are the evaluations' own (training eval --n 512, video-eval --n 28 --frames 300)
    args.n = args.n or (512 if cuda else 48)
    args.video_n = args.video_n or (28 if cuda else 4)
    args.frames = args.frames or (300 if cuda else 12)
    if args.workers is None:
        args.workers = max(0, min(14, (os.cpu_count() or 1) - 2)) if cuda else 0
    run(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
