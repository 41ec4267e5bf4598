"""Stage 3: held-out evaluation of an exported model (and optionally the teacher).

``fewstep train eval --model DIR/student --steps 1 2 4 [--teacher DIR/teacher --teacher-steps 25] [--n 512]``

* prompts: ``training.data.heldout_prompts(n)`` (compositional pairs never rendered in training);
* adherence: ``benchmarks.quality.adherence`` (strict: every stated property must be detected);
* diversity: ``benchmarks.quality.diversity`` over ``--div-seeds`` seeds for each of
  ``--div-prompts`` prompts (mean over prompts);
* writes ``OUT/eval.json``, ``OUT/eval.md`` (table) and ``OUT/grid.png`` (prompts x models),
  ``OUT`` defaulting to the parent of ``--model``.

The sampler here is the minimal one of :mod:`training.model` (Euler on the sigmas the engine serves for the
export: its scheduler config and ``flow_sigmas`` hint,
weights in fp16 on CUDA as served, fp32 on the CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.training.common import log, pick_device, read_json, setup_torch, step_seed, write_json
from fewstep.training.export import load_export
from fewstep.training.model import sample, served_sigmas, to_uint8_list, tokenize


@dataclass
class EvalArgs:
    model: str
    steps: list = field(default_factory=lambda: [1, 2, 4])
    teacher: str | None = None
    teacher_steps: int = 25
    teacher_guidance: float | None = None
    guidance: float | None = None
    n: int = 512
    div_prompts: int = 16
    div_seeds: int = 8
    grid_prompts: int = 8
    out: str | None = None
    seed: int = 0
    batch: int = 512
    tiny: bool = False
    device: str = "auto"
    no_background: bool = False   # the same held-out prompts without " on a BG background" (data.without_background)


@torch.no_grad()
def _generate(model, tok, prompts, noise, sig, guidance, batch) -> tuple[torch.Tensor, float]:
    dev = noise.device
    uncond = tokenize(tok, [""], dev)
    outs = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.time()
    for i in range(0, len(prompts), batch):
        ids, mask = tokenize(tok, prompts[i:i + batch], dev)
        outs.append(sample(model, ids, mask, noise[i:i + batch], sig, guidance, uncond))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.time() - t0
    return torch.cat(outs).clamp(-1, 1), dt


def _noise(n: int, seed: int, salt: int, device) -> torch.Tensor:
    # generated on the CPU so that every device sees the same noise for the same seed
    g = torch.Generator().manual_seed(step_seed(seed, 0, salt))
    return torch.randn((n, 3, 64, 64), generator=g).to(device)


def evaluate(args: EvalArgs) -> dict:
    from fewstep.training import data
    from fewstep.training.metrics import Scorer

    device = pick_device(args.device)
    setup_torch(device)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    n = args.n
    prompts = data.heldout_prompts(n, seed=args.seed)
    div_prompts = data.heldout_prompts(args.div_prompts, seed=args.seed + 1)
    if args.no_background:
        prompts = [data.without_background(p) for p in prompts]
        div_prompts = [data.without_background(p) for p in div_prompts]
    noise = _noise(n, args.seed, 21, device)
    div_noise = _noise(args.div_prompts * args.div_seeds, args.seed, 22, device)
    div_list = [p for p in div_prompts for _ in range(args.div_seeds)]

    configs = []   # (label, path, steps, guidance)
    model_index = read_json(Path(args.model) / "model_index.json")
    fs = model_index.get("fewstep", {})
    g_student = args.guidance if args.guidance is not None else float(fs.get("default_guidance_scale", 0.0))
    for s in args.steps:
        configs.append((Path(args.model).name or "model", args.model, int(s), g_student))
    if args.teacher:
        tfs = read_json(Path(args.teacher) / "model_index.json").get("fewstep", {})
        g_t = args.teacher_guidance
        if g_t is None:
            g_t = float(fs.get("teacher_guidance_scale", tfs.get("default_guidance_scale", 4.0)))
        configs.append(("teacher", args.teacher, int(args.teacher_steps), g_t))

    rows, grid_imgs = [], []
    scorer = Scorer(0 if args.tiny or device.type != "cuda" else None)
    loaded: dict[str, tuple] = {}
    try:
        for label, path, steps, guidance in configs:
            if path not in loaded:
                loaded = {path: load_export(path, device)}     # keep one model in memory
            model, tok, _ = loaded[path]
            sig = served_sigmas(path, steps)     # exactly the schedule `fewstep serve` walks for this export
            imgs, dt = _generate(model, tok, prompts, noise, sig, guidance, args.batch)
            # warm timing (the first call includes allocator / kernel selection warm-up)
            _, dt2 = _generate(model, tok, prompts[: min(n, args.batch)], noise[: min(n, args.batch)],
                               sig, guidance, args.batch)
            ms = 1000.0 * dt2 / min(n, args.batch)
            t0 = time.time()
            adh = scorer.adherence(to_uint8_list(imgs), prompts)
            t_score = time.time() - t0
            dimgs, _ = _generate(model, tok, div_list, div_noise, sig, guidance, args.batch)
            du = to_uint8_list(dimgs)
            div = [scorer.diversity(du[i * args.div_seeds:(i + 1) * args.div_seeds])
                   for i in range(args.div_prompts)]
            row = {"model": label, "path": str(path), "steps": steps, "sigmas": [round(v, 4) for v in sig],
                   "guidance": guidance,
                   "accuracy": adh.get("accuracy"), "checks": {k: v for k, v in adh.items() if k not in ("accuracy", "n")},
                   "diversity": float(sum(div) / max(1, len(div))), "n": n,
                   "ms_per_image_batch": round(ms, 4), "batch": args.batch, "score_seconds": round(t_score, 1)}
            rows.append(row)
            grid_imgs.append((f"{label} {steps} step{'s' if steps > 1 else ''}"
                              + (f" cfg {guidance:g}" if guidance > 1 else ""),
                              to_uint8_list(imgs[: args.grid_prompts])))
            log(f"[eval] {label} {steps} steps (cfg {guidance:g}): adherence {row['accuracy']:.3f} "
                f"diversity {row['diversity']:.3f} | {ms:.3f} ms/image at batch {args.batch} | "
                + " ".join(f"{k} {v:.2f}" for k, v in row["checks"].items()))
    finally:
        scorer.close()

    result = {"model": str(args.model), "teacher": args.teacher, "n": n,
              "prompts": "heldout_prompts" + (" without their background phrase" if args.no_background else ""),
              "seed": args.seed, "device": str(device), "rows": rows,
              "diversity_protocol": f"{args.div_prompts} heldout prompts x {args.div_seeds} seeds"}
    write_json(out / "eval.json", result)
    (out / "eval.md").write_text(markdown_table(result), encoding="utf-8")
    draw_grid(prompts[: args.grid_prompts], grid_imgs, out / "grid.png")
    log(f"[eval] wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'grid.png'}")
    return result


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    checks = sorted({k for r in rows for k in r["checks"]})
    head = ["model", "steps", "cfg", "adherence", "diversity", "ms/img"] + checks
    lines = [f"Held-out evaluation: {result['n']} prompts (`{result['prompts']}`), device {result['device']}; "
             f"diversity: {result['diversity_protocol']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["steps"]), f"{r['guidance']:g}", f"{r['accuracy']:.3f}", f"{r['diversity']:.3f}",
                 f"{r['ms_per_image_batch']:.3f}"] + [f"{r['checks'].get(c, float('nan')):.3f}" for c in checks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_grid(prompts: list[str], columns: list[tuple[str, list]], path: Path, cell: int = 128) -> None:
    """Rows = prompts (caption on the left), columns = models/step counts; PIL's default font."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    text_w, head_h, pad = 230, 24, 4
    W = text_w + len(columns) * (cell + pad) + pad
    H = head_h + len(prompts) * (cell + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    dr = ImageDraw.Draw(canvas)
    for j, (label, _) in enumerate(columns):
        dr.text((text_w + j * (cell + pad) + pad, 6), label, fill=(0, 0, 0), font=font)
    for i, p in enumerate(prompts):
        y = head_h + i * (cell + pad) + pad
        dr.multiline_text((6, y + 4), "\n".join(textwrap.wrap(p, 36)), fill=(0, 0, 0), font=font, spacing=2)
        for j, (_, ims) in enumerate(columns):
            if i < len(ims):
                im = Image.fromarray(ims[i]).resize((cell, cell), Image.NEAREST)
                canvas.paste(im, (text_w + j * (cell + pad) + pad, y))
    canvas.save(path)
