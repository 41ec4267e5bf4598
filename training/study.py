"""CPU-side evidence for the image recipe
(``fewstep train study {flops,bayes,probe,shapeword,grad,relations,disc,featdist,motion,cpu}``).

* ``flops``: parameters, fp16 size and forward FLOPs per 64x64 image (``torch.utils.flop_counter``)
  of every preset, with an H200 throughput estimate scaled from the measured img/s of the preset
  with the same patch size (base/deep/p2 were measured at batch 512, compiled, bf16).
* ``bayes``: where in sigma a property of the image is decided. For scenes of ``training.data``
  every alternative value of one property of one object (its shape, or its colour) is rendered
  with everything else fixed; the Bayes-optimal classifier on ``x_s = (1-s) x0 + s n`` picks the
  alternative with the smallest ``||x_s - (1-s) x0_k||``. Its accuracy against sigma shows where
  the training sigmas (and the sampler's steps) must be dense.
* ``probe MODEL``: the detector on a trained teacher's one-step x0 predictions from noised held-out
  renders at fixed sigma (is the shape rendered once the layout is given?) and on its samples at a
  few (steps, CFG) settings.
* ``relations MODEL``: which position phrases fail: per absolute position ("at the top") and per pairwise
  relation ("left of"), how often it holds on held-out samples, and how often the opposite relation holds instead.
* ``cpu``: a small convergence study at 32x32 pixels on single-object scenes: proxy models trained
  for the same CPU time each (process CPU seconds: the machine is shared), scored by a fixed validation flow loss (overall, in the
  shape band sigma in [0.5, 0.95], and on object outlines) and by the detector
  (``benchmarks.quality``) on samples (20 Euler steps, CFG 3).

Results: ``docs/default-models.md`` ("Image recipe").
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from fewstep.training.model import (
    PRESETS,
    ModelConfig,
    build_model,
    build_tokenizer,
    sample,
    tokenize,
)

#: measured on one H200 (batch 512, torch.compile, bf16; the first H200 run, 2026-11-29)
MEASURED_IMG_S = {"base": 18900.0, "deep": 19400.0, "p2": 6600.0}
#: the measured preset with the same patch size (same tokens per image)
SAME_TOKENS = {4: "deep", 2: "p2"}


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------

def forward_flops(cfg: ModelConfig, vocab: int = 80) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    m = build_model(cfg, vocab).eval()
    x = torch.randn(1, 3, cfg.size, cfg.size)
    ids = torch.randint(4, vocab, (1, cfg.max_length))
    mask = torch.ones_like(ids)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.denoise(x, torch.tensor([0.5]), m.encode(ids, mask), mask)
    return int(fc.get_total_flops())


def flops_table(presets: list[str]) -> list[dict]:
    rows = []
    for p in presets:
        cfg = PRESETS[p]
        m = build_model(cfg, 80)
        n_tr = sum(q.numel() for q in m.transformer.parameters())
        n_te = sum(q.numel() for q in m.text_encoder.parameters())
        f = forward_flops(cfg)
        rows.append({"preset": p, "layers": cfg.layers, "dim": cfg.dim, "patch": cfg.patch,
                     "tokens": (cfg.size // cfg.patch) ** 2, "params_M": round((n_tr + n_te) / 1e6, 3),
                     "fp16_MB": round(2 * (n_tr + n_te) / 1e6, 2), "fwd_GFLOP": round(f / 1e9, 3),
                     "train_GFLOP": round(3 * f / 1e9, 3)})
    by = {r["preset"]: r for r in rows}
    for r in rows:
        ref = r["preset"] if r["preset"] in MEASURED_IMG_S else SAME_TOKENS.get(r["patch"])
        if ref in MEASURED_IMG_S and ref in by:
            r["h200_img_s_b512"] = round(MEASURED_IMG_S[ref] * by[ref]["fwd_GFLOP"] / r["fwd_GFLOP"])
            r["h200_source"] = "measured" if ref == r["preset"] else f"scaled from {ref} by FLOPs"
    return rows


# ----------------------------------------------------------------------------------------------
# Bayes-optimal decision window
# ----------------------------------------------------------------------------------------------

def bayes_window(size: int, n: int, prop: str, sigmas: list[float], reps: int = 4, seed: int = 0) -> dict:
    from fewstep.training import data as D
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    opts = D.SHAPES if prop == "shape" else tuple(D.COLORS)
    hits = {s: 0 for s in sigmas}
    total = 0
    for _ in range(n):
        sc = D.sample_scene(rng, "train")
        alts = []
        for v in opts:
            s2 = copy.deepcopy(sc)
            setattr(s2.objects[0], prop, v)
            alts.append(s2)
        X = D.render(alts, size)
        ti = opts.index(getattr(sc.objects[0], prop))
        for s in sigmas:
            for _ in range(reps):
                xt = (1 - s) * X[ti] + s * torch.randn(X[ti].shape, generator=g)
                d = ((xt[None] - (1 - s) * X) ** 2).sum((1, 2, 3))
                hits[s] += int(d.argmin()) == ti
        total += reps
    return {f"{s:g}": round(hits[s] / total, 3) for s in sigmas}


def sigma_mass(lo: float, hi: float, loc: float, uniform_frac: float = 0.2, n: int = 200_000) -> float:
    g = torch.Generator().manual_seed(0)
    from fewstep.training.teacher import draw_sigma
    s = draw_sigma(n, g, "cpu", uniform_frac, loc)
    return float(((s >= lo) & (s <= hi)).float().mean())


# ----------------------------------------------------------------------------------------------
# CPU convergence study
# ----------------------------------------------------------------------------------------------

PROXY_TEXT = {"text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_ff": 128}
PROXIES = {
    # 32x32 images, patch 4 -> 8x8 tokens (cheap on 2 CPU cores)
    "w64x4": ModelConfig(dim=64, heads=2, layers=4, patch=4, size=32, **PROXY_TEXT),
    "w48x8": ModelConfig(dim=48, heads=2, layers=8, patch=4, size=32, **PROXY_TEXT),
    # the "unet" preset's kind at 32 px: 32/16/8 px levels, attention at 16 and 8 px
    "u32": ModelConfig(arch="unet", size=32, channels=(32, 64, 64), level_heads=(1, 2, 2), **PROXY_TEXT),
}
RECIPES = {
    # name: (proxy, sigma_loc, edge_weight, batch, lr, low_sigma, sigma_min); the first five as first studied
    "old": ("w64x4", 0.0, 0.0, 64, 1e-3, 0.0, 1e-4),
    "loc": ("w64x4", 0.5, 0.0, 64, 1e-3, 0.0, 1e-4),
    "loc+edge": ("w64x4", 0.5, 4.0, 64, 1e-3, 0.0, 1e-4),
    "loc+edge,b16": ("w64x4", 0.5, 4.0, 16, 5e-4, 0.0, 1e-4),
    "deep,loc+edge": ("w48x8", 0.5, 4.0, 64, 1e-3, 0.0, 1e-4),
    # second round (the low-noise weight of teacher.low_sigma_weight), with and without the outline weight
    "loc+edge+low": ("w64x4", 0.5, 4.0, 64, 1e-3, 0.2, 0.02),
    "loc+low": ("w64x4", 0.5, 0.0, 64, 1e-3, 0.2, 0.02),
    # 2026-11-29 (c419a67): the same recipe on a convolutional UNet
    "unet,loc+edge+low": ("u32", 0.5, 4.0, 64, 1e-3, 0.2, 0.02),
}


def swap_shape(caption: str, shift: int = 1) -> str:
    """The caption with its (first) shape word replaced by another shape; the grammar has no plurals."""
    from fewstep.training.data import SHAPES
    words = caption.split()
    for i, w in enumerate(words):
        if w in SHAPES:
            words[i] = SHAPES[(SHAPES.index(w) + shift) % len(SHAPES)]
            break
    return " ".join(words)


def single_object_pool(n: int, size: int, seed: int, split: str = "train"):
    from fewstep.training import data as D
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        s = D.sample_scene(rng, split)
        if len(s.objects) == 1:
            scenes.append(s)
    return D.render(scenes, size), [s.caption for s in scenes]


def _val_metrics(model, tok, xv, cv, seed: int = 1) -> dict:
    from fewstep.training.teacher import edge_map
    g = torch.Generator().manual_seed(seed)
    n = xv.shape[0]
    noise = torch.randn(xv.shape, generator=g)
    sig = torch.rand(n, generator=g).clamp(0.02, 0.98)
    ids, mask = tokenize(tok, cv)
    with torch.no_grad():
        v = torch.cat([model(((1 - sig[i:i + 64]).view(-1, 1, 1, 1) * xv[i:i + 64]
                              + sig[i:i + 64].view(-1, 1, 1, 1) * noise[i:i + 64]),
                             sig[i:i + 64], ids[i:i + 64], mask[i:i + 64]) for i in range(0, n, 64)])
    err = ((v - (noise - xv)) ** 2).mean((1, 2, 3))
    e = edge_map(xv)[:, 0] > 0.5
    err_edge = (((v - (noise - xv)) ** 2).mean(1) * e).sum((1, 2)) / e.sum((1, 2)).clamp(min=1)
    band = (sig >= 0.5) & (sig <= 0.95)
    out = {"val_loss": float(err.mean()), "val_loss_shape_band": float(err[band].mean()),
           "val_edge_loss_shape_band": float(err_edge[band].mean())}
    return out | shape_word_gains(model, tok, xv, cv, noise, sig)


def shape_word_gains(model, tok, xv, cv, noise, sig) -> dict:
    """Does the model read the shape word? The same noisy inputs in the shape band (sigma 0.6-0.9) scored with the
    true caption, with the shape word swapped, and with no caption: the relative loss increase of each. A model
    that ignores the word gains ~0 from it (the first H200 teacher: +0.9% at sigma 0.9, +57% for no caption)."""
    xs = (1 - sig).view(-1, 1, 1, 1) * xv + sig.view(-1, 1, 1, 1) * noise
    keep = (sig >= 0.6) & (sig <= 0.9)

    @torch.no_grad()
    def band_loss(captions):
        i2, m2 = tokenize(tok, captions)
        vv = torch.cat([model(xs[keep][i:i + 64], sig[keep][i:i + 64], i2[keep][i:i + 64], m2[keep][i:i + 64])
                        for i in range(0, int(keep.sum()), 64)])
        return float(((vv - (noise - xv)[keep]) ** 2).mean())

    true_l = band_loss(cv)
    return {"shape_word_gain": band_loss([swap_shape(c) for c in cv]) / true_l - 1,
            "caption_gain": band_loss([""] * len(cv)) / true_l - 1}


def shape_word_probe(model_dir: str, n: int = 256) -> dict:
    """``shape_word_gains`` of an exported image teacher on ``n`` held-out single-object renders at its size."""
    from fewstep.training.export import load_export
    model, tok, _ = load_export(model_dir, "cpu", torch.float32)
    size = model.transformer.config.sample_size
    xv, cv = single_object_pool(n, size, seed=12345, split="heldout")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(xv.shape, generator=g)
    sig = 0.6 + 0.3 * torch.rand(n, generator=g)
    return {"model": model_dir, "n": n, **{k: round(v, 4) for k, v in
                                             shape_word_gains(model.eval(), tok, xv, cv, noise, sig).items()}}


def run_proxy(name: str, seconds: float, pool, val, n_samples: int, seed: int = 0,
              max_steps: int | None = None) -> dict:
    from fewstep.benchmarks import quality
    from fewstep.training import data as D
    from fewstep.training.teacher import flow_loss, sample_sigma_noise

    proxy, loc, edge, batch, lr, low, sigma_min = RECIPES[name]
    cfg = copy.deepcopy(PROXIES[proxy])
    tok = build_tokenizer(D.vocabulary(), cfg.max_length)
    torch.manual_seed(seed)
    model = build_model(cfg, len(tok)).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    x_all, c_all = pool
    ids_all, mask_all = tokenize(tok, c_all)
    drop = torch.rand(len(c_all), generator=torch.Generator().manual_seed(seed)) < 0.1
    e_ids, e_mask = tokenize(tok, [""])
    ids_all[drop], mask_all[drop] = e_ids[0], e_mask[0]
    g = torch.Generator().manual_seed(seed + 1)
    # budget in CPU seconds of this process (the machine is shared: wall time would not be fair)
    t0 = time.process_time()
    step = 0
    losses = []
    # max_steps: equal optimiser steps for every recipe (CPU seconds buy different step counts when a recipe's
    # per-step cost, or the machine's load, differs)
    while (step < max_steps) if max_steps else (time.process_time() - t0 < seconds):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        x0 = x_all[idx]
        noise, sigma = sample_sigma_noise(x0, seed, step, 0.2, loc, sigma_min)
        lr_now = lr * min(1.0, (step + 1) / 50)
        for gr in opt.param_groups:
            gr["lr"] = lr_now
        opt.zero_grad(set_to_none=True)
        loss = flow_loss(model, x0, ids_all[idx], mask_all[idx], noise, sigma, False, edge, low)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.995, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        losses.append(float(loss.detach()))
        step += 1
    train_s = time.process_time() - t0
    xv, cv = val
    res = {"recipe": name, "proxy": proxy, "sigma_loc": loc, "edge_weight": edge, "low_sigma": low, "batch": batch,
           "lr": lr,
           "steps": step, "images": step * batch, "train_cpu_s": round(train_s, 1),
           "final_train_loss": round(float(np.mean(losses[-20:])), 4)}
    res.update({k: round(v, 4) for k, v in _val_metrics(ema, tok, xv, cv).items()})
    # samples: 20 Euler steps with CFG 3 on held-out single-object prompts
    prompts = cv[:n_samples]
    ids, mask = tokenize(tok, prompts)
    z = torch.randn((n_samples, 3, cfg.size, cfg.size), generator=torch.Generator().manual_seed(7))
    from fewstep.training.model import scheduler_sigmas, to_uint8_list
    imgs = sample(ema, ids, mask, z, scheduler_sigmas(20), 3.0, tokenize(tok, [""]))
    adh = quality.adherence(to_uint8_list(imgs), prompts)
    res.update({f"adh_{k}": round(float(v), 3) for k, v in adh.items() if k != "n"})
    return res


# ----------------------------------------------------------------------------------------------
# Probing a trained teacher (e.g. the first H200 run's base teacher)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def probe_teacher(path: str, n: int, sigmas: list[float], guidance: float, seed: int = 0,
                  sample_cfgs: list[tuple[int, float]] = (), n_samples: int = 32) -> list[dict]:
    """(1) one-step x0 predictions ``x_s - s v`` from noised held-out renders at fixed sigma, scored
    by the detector: does the model render the captioned shape once the layout is given? (2) full
    sampling at a few (steps, CFG) settings on the same prompts."""
    from fewstep.benchmarks import quality
    from fewstep.training import data as D
    from fewstep.training.export import load_export
    from fewstep.training.model import scheduler_sigmas, to_uint8_list

    model, tok, _ = load_export(path, "cpu", torch.float32)
    rng = np.random.default_rng(seed)
    scenes = [D.sample_scene(rng, "heldout") for _ in range(n)]
    x0 = D.render(scenes, 64)
    caps = [s.caption for s in scenes]
    ids, mask = tokenize(tok, caps)
    u_ids, u_mask = tokenize(tok, [""] * n)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in sigmas:
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - s) * x0 + s * noise
        sig = torch.full((n,), s)
        v = model(xt, sig, ids, mask)
        if guidance > 1:
            vu = model(xt, sig, u_ids, u_mask)
            v = vu + guidance * (v - vu)
        pred = (xt - s * v).clamp(-1, 1)
        adh = quality.adherence(to_uint8_list(pred), caps)
        rows.append({"probe": "x0_pred", "sigma": s, "cfg": guidance, "n": n,
                     **{k: round(float(v_), 3) for k, v_ in adh.items() if k != "n"}})
        print(json.dumps(rows[-1]), flush=True)
    for steps, cfg_scale in sample_cfgs:
        z = torch.randn((n_samples, 3, 64, 64), generator=torch.Generator().manual_seed(seed + 5))
        imgs = sample(model, ids[:n_samples], mask[:n_samples], z, scheduler_sigmas(steps), cfg_scale,
                      tokenize(tok, [""]))
        adh = quality.adherence(to_uint8_list(imgs), caps[:n_samples])
        rows.append({"probe": "sample", "steps": steps, "cfg": cfg_scale, "n": n_samples,
                     **{k: round(float(v_), 3) for k, v_ in adh.items() if k != "n"}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def gradient_split(model_dir: str, shards: list[str], lows: list[float], batch: int = 128, seed: int = 4) -> None:
    """Where one training batch's gradient comes from: the samples below sigma 0.15 against the rest, under each
    low-noise weight (teacher.low_sigma_weight), at an exported teacher's weights, or at the raw weights of its
    checkpoint ``shards`` (the model the optimiser was actually stepping). One JSON line per weight."""
    import torch.nn.functional as F
    from safetensors import safe_open

    from fewstep.training import data as D
    from fewstep.training.export import load_export
    from fewstep.training.teacher import TeacherArgs, draw_sigma, edge_map, low_sigma_weight
    recipe = TeacherArgs(out="")  # the teacher's default sigma law and outline weight
    model, tok, _ = load_export(model_dir, "cpu", torch.float32)
    if shards:
        raw = {}
        for f in shards:
            with safe_open(f, "pt") as fh:
                raw.update({k[len("model."):]: fh.get_tensor(k).float() for k in fh.keys() if k.startswith("model.")})
        for n, p in model.named_parameters():
            p.data.copy_(raw[n])
    rng = np.random.default_rng(seed)
    scenes = [D.sample_scene(rng, "train") for _ in range(batch)]
    x0 = D.render(scenes)
    ids, mask = tokenize(tok, [sc.caption for sc in scenes])
    g = torch.Generator().manual_seed(100)
    noise = torch.randn(x0.shape, generator=g)
    sig = draw_sigma(batch, g, "cpu", recipe.uniform_frac, recipe.sigma_loc, sigma_min=recipe.sigma_min)
    s = sig.view(-1, 1, 1, 1)
    xs, w = (1 - s) * x0 + s * noise, 1 + recipe.edge_weight * edge_map(x0)

    def grad(sel):
        model.zero_grad()
        v = model(xs, sig, ids, mask)
        ((((v - (noise - x0)) ** 2 * w) * sel.view(-1, 1, 1, 1)).mean() / w.mean()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    for low in lows:
        sw = low_sigma_weight(sig, low)
        full, useful = grad(sw), grad(sw * (sig >= 0.15).float())
        print(json.dumps({"low_sigma": low, "samples_below_0.15": int((sig < 0.15).sum()),
                          "grad_norm": round(float(full.norm()), 4),
                          "part_below_0.15": round(float((full - useful).norm()), 4),
                          "part_from_0.15": round(float(useful.norm()), 4),
                          "cos_step_useful": round(float(F.cosine_similarity(full, useful, dim=0)), 4),
                          "clip_1_scales_useful_by": round(min(1.0, 1.0 / float(full.norm())), 4)}), flush=True)


@torch.no_grad()
def relation_breakdown(model_dir: str, steps: int, n: int, guidance: float = 0.0, seed: int = 0) -> dict:
    """Where the position check fails: per absolute position phrase and per pairwise relation of ``n`` held-out
    prompts, the rate at which it holds, and (relations) how often the opposite relation holds instead. Only images
    whose objects were all matched by the detector count. Samples walk the served sigmas from the CPU noise."""
    from fewstep.benchmarks import quality as Q
    from fewstep.training import data as D
    from fewstep.training.export import load_export
    from fewstep.training.distill import generate
    from fewstep.training.model import served_sigmas, to_uint8_list

    model, tok, _ = load_export(model_dir, "cpu", torch.float32)
    prompts = D.heldout_prompts(n, seed=seed)
    z = torch.randn((n, 3, 64, 64), generator=torch.Generator().manual_seed(seed + 1))
    x = generate(model, tok, prompts, z, served_sigmas(model_dir, steps), guidance, batch=64)
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    rows: dict[str, list[int]] = {}
    unmatched = 0
    for im, p in zip(to_uint8_list(x), prompts):
        spec = Q.parse_caption(p)
        a = Q._assign(spec, Q.detect(im))
        if any(d is None for d in a):
            unmatched += 1
            continue
        for o, d in zip(spec.objects, a):
            if o.position is not None:
                r = rows.setdefault(f"at {o.position}", [0, 0, 0])
                r[0] += Q.position_of(d.cx, d.cy) == o.position
                r[1] += 1
        for i, rel, j in spec.relations:
            r = rows.setdefault(rel, [0, 0, 0])
            r[0] += Q.relation_holds(a[i], rel, a[j])
            r[1] += 1
            r[2] += Q.relation_holds(a[i], opposite[rel], a[j])
    return {"model": model_dir, "steps": steps, "guidance": guidance, "n": n, "unmatched": unmatched,
            "rows": {k: {"holds": round(v[0] / v[1], 3), "n": v[1], "opposite_holds": round(v[2] / v[1], 3)}
                     for k, v in sorted(rows.items())}}


def discriminator_probe(teacher_dir: str, student_dir: str, n: int = 192, steps: int = 100, batch: int = 32,
                        guidance: float = 3.0, teacher_steps: int = 12, every: int = 20, draws: int = 4,
                        seed: int = 0) -> list[dict]:
    """Can a discriminator tell the one-step student's samples from its teacher's, for the same prompts and noise
    (what ``distill --gan`` asks of it)? Each kind (the pixel ``PatchDiscriminator``; the teacher-feature one of
    ``--gan-features``) trains on the pairs of 3/4 of ``n`` train-split prompts, at the stage's discriminator LR,
    and every ``every`` steps reports on the held-back quarter: the share of pairs in which the teacher's sample
    scores higher than the student's (0.5 = blind), and the mean logit gap (the teacher-feature discriminator: both
    images of a pair under the same noise draws, averaged over ``draws``). CPU, fp32."""
    from fewstep.training import data as D
    from fewstep.training.adversarial import AdversarialLoss
    from fewstep.training.distill import generate
    from fewstep.training.export import load_export
    from fewstep.training.model import scheduler_sigmas, tokenize, uniform_sigmas

    teacher, tok, _ = load_export(teacher_dir, "cpu", torch.float32)
    student, _, _ = load_export(student_dir, "cpu", torch.float32)
    prompts = D.train_prompts(n, seed=seed + 303)
    z = torch.randn((n, 3, 64, 64), generator=torch.Generator().manual_seed(seed + 304))
    real = generate(teacher, tok, prompts, z, scheduler_sigmas(teacher_steps), guidance, batch=64)
    fake = generate(student, tok, prompts, z, uniform_sigmas(1), 0.0, batch=64)
    ids, mask = tokenize(tok, prompts)
    with torch.no_grad():
        emb = teacher.encode(ids, mask)
    k = n * 3 // 4
    rows = []
    for kind in ("patch", "teacher-feature"):
        torch.manual_seed(seed)
        adv = AdversarialLoss(emb.shape[-1], lr=5e-4, device=torch.device("cpu"), autocast=False,
                              teacher_unet=teacher.transformer if kind != "patch" else None)
        g = torch.Generator().manual_seed(seed + 305)
        t0 = time.time()
        def held_out(x):
            # the teacher-feature discriminator draws a noise level and noise per call: judge the teacher's and the
            # student's image of a pair under the same draws (a generator of their own, not the training one), and
            # average over `draws` of them
            d, out = adv.disc, []
            saved = getattr(d, "noise_gen", None)
            for r in range(draws):
                if hasattr(d, "noise_gen"):
                    d.noise_gen = torch.Generator().manual_seed(seed + 1000 + r)
                with torch.no_grad():
                    out.append(adv.logits(x, emb[k:], mask[k:]).flatten(1).mean(1))
            if hasattr(d, "noise_gen"):
                d.noise_gen = saved
            return torch.stack(out).mean(0)

        for step in range(steps + 1):
            if step % every == 0:
                lr, lf = held_out(real[k:]), held_out(fake[k:])
                rows.append({"kind": kind, "step": step,
                             "held_out_real_above_fake": round(float((lr > lf).float().mean()), 3),
                             "held_out_gap": round(float((lr - lf).mean()), 3), "seconds": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
            if step < steps:
                idx = torch.randint(0, k, (batch,), generator=g)
                adv.disc_step(real[idx], fake[idx], emb[idx], mask[idx])
    return rows


def feature_distance_probe(teacher_dir: str, student_dir: str, n: int = 32, guidance: float = 3.0,
                           teacher_steps: int = 12, seed: int = 0) -> dict:
    """What ``distill --feat`` sees on a trained student: the teacher-feature distance between the one-step
    student's samples and the teacher's (the pairs' 12 CFG-3 steps, same prompts and noise), against two references
    (the teacher's samples under a 3x3 blur; another prompt's sample), and how its gradient on the student compares
    with the regression's (norms at W = 1 and cosine, over all trained parameters, at sigma = 1). CPU, fp32."""
    import torch.nn.functional as F

    from fewstep.training import data as D
    from fewstep.training.distill import generate, reflow_loss
    from fewstep.training.export import load_export
    from fewstep.training.features import feature_distance
    from fewstep.training.model import scheduler_sigmas, tokenize

    teacher, tok, _ = load_export(teacher_dir, "cpu", torch.float32)
    teacher.requires_grad_(False).eval()
    student, _, _ = load_export(student_dir, "cpu", torch.float32)
    student.train().requires_grad_(True)
    prompts = D.train_prompts(n, seed=seed + 5)
    z = torch.randn((n, 3, 64, 64), generator=torch.Generator().manual_seed(seed + 1))
    x0 = generate(teacher, tok, prompts, z, scheduler_sigmas(teacher_steps), guidance, batch=64)
    ids, mask = tokenize(tok, prompts)
    # the distill stage's regression terms (DistillArgs' defaults), at sigma = 1: the one-step case
    rec, pred = reflow_loss(student, z, x0, ids, mask, torch.ones(n), 2.0, 0.5, False, 4.0, 0.2, 1e-3,
                            return_pred=True)
    with torch.no_grad():
        emb = teacher.encode(ids, mask)
    g = torch.Generator().manual_seed(seed + 3)
    s = 0.1 + 0.6 * torch.rand(n, generator=g)
    noise = torch.randn(z.shape, generator=g)
    dist = feature_distance(teacher.transformer, pred, x0, s, noise, emb)
    params = [p for p in student.parameters() if p.requires_grad]
    g_rec = torch.autograd.grad(rec, params, retain_graph=True, allow_unused=True)
    g_feat = torch.autograd.grad(dist.mean(), params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(g_rec, g_feat) if a is not None and b is not None]
    n_rec = torch.sqrt(sum((a ** 2).sum() for a, _ in pairs))
    n_feat = torch.sqrt(sum((b ** 2).sum() for _, b in pairs))
    cos = sum((a * b).sum() for a, b in pairs) / (n_rec * n_feat)
    with torch.no_grad():
        blur = F.avg_pool2d(F.pad(x0, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        d_blur = feature_distance(teacher.transformer, blur, x0, s, noise, emb)
        d_other = feature_distance(teacher.transformer, x0.roll(1, 0), x0, s, noise, emb)
    dist, rec = dist.detach(), rec.detach()
    q = torch.quantile(dist, torch.tensor([0.0, 0.5, 0.9, 1.0]))
    return {"n": n, "student_distance_mean": round(float(dist.mean()), 4),
            "student_distance_min_median_p90_max": [round(float(v), 4) for v in q],
            "teacher_blur3_distance_mean": round(float(d_blur.mean()), 4),
            "other_prompt_distance_mean": round(float(d_other.mean()), 4),
            "regression_loss": round(float(rec), 4), "grad_norm_regression": round(float(n_rec), 3),
            "grad_norm_feature_w1": round(float(n_feat), 3), "grad_cosine": round(float(cos), 3)}


def motion_probe(model_dir: str, n: int = 10, frames: int = 64, seed: int = 0) -> dict:
    """How a video model's moving objects move: per held-out single-object "moving" caption, the median per-frame
    displacement of the tracked object along the captioned axis and the motion accuracy
    (``benchmarks.quality._motion_accuracy``: the share of frame steps in the captioned direction, bounces allowed
    near a wall), for the model's stream (engine policy, 1 call per step) and for the dataset's own video of the same
    scene. Tells a model that holds objects still from one that moves them but loses the direction."""
    from fewstep.benchmarks import quality as Q
    from fewstep.training import data as D
    from fewstep.training.video import generate_streams, load_video_export

    model, tok, index = load_video_export(model_dir, "cpu")
    fs = index["fewstep"]
    K, F, size = int(fs["buffer_chunks"]), int(fs["chunk_frames"]), int(fs.get("default_size", 32))
    rng = np.random.default_rng([seed, 1234])   # video-eval's held-out scenes, in its order
    scenes = []
    while len(scenes) < n:
        s = D.sample_video_scene(rng, "heldout")
        if " and " not in s.caption and " moving " in s.caption:
            scenes.append(s)
    vids, _ = generate_streams(model, tok, [s.caption for s in scenes], list(range(n)), frames, K, F, size)

    def track(caption, video):
        o = Q.parse_caption(caption).objects[0]
        axis = Q._DIR[o.motion][0]
        tr = Q._track(o, [Q.detect(f) for f in video])
        xs = np.array([np.nan if d is None else (d.cx if axis == 0 else d.cy) for d in tr])
        return nanmedian(np.abs(np.diff(xs))), Q._motion_accuracy(tr, o.motion)

    def nanmedian(a) -> float:   # NaN (not a warning) when nothing was tracked
        a = np.asarray(a, dtype=float)
        a = a[~np.isnan(a)]
        return float(np.median(a)) if a.size else float("nan")

    rows = []
    for s, v in zip(scenes, vids.numpy()):
        (sm, am), (sd, ad) = track(s.caption, v), track(s.caption, D.render_video_uint8(s, frames, size))
        rows.append({"caption": s.caption, "model_speed": round(sm, 4), "model_motion_accuracy": round(am, 3),
                     "data_speed": round(sd, 4), "data_motion_accuracy": round(ad, 3)})
    keys = ("model_speed", "model_motion_accuracy", "data_speed", "data_motion_accuracy")
    return {"model": model_dir, "streams": n, "frames": frames, "rows": rows,
            **{f"median_{k}": round(nanmedian([r[k] for r in rows]), 4) for k in keys}}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fewstep train study`, built without side effects."""
    ap = argparse.ArgumentParser(prog="fewstep train study", description="CPU-side evidence for the image recipe "
                                 "(results: docs/default-models.md, \"Image recipe\").")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="STUDY")
    f = sub.add_parser("flops", help="parameters, size and FLOPs per image of each preset, with an H200 estimate")
    f.add_argument("--presets", nargs="+", default=["base", "deep", "p2", "deep8", "p2n"],
                   help="model presets to tabulate (default base deep p2 deep8 p2n)")
    b = sub.add_parser("bayes", help="where in sigma a shape or colour is decided (Bayes-optimal classifier)")
    b.add_argument("--n", type=int, default=200, help="scenes per property and image size (default 200)")
    b.add_argument("--sizes", type=int, nargs="+", default=[64, 32], help="image sides in pixels (default 64 32)")
    t = sub.add_parser("probe", help="probe an exported image teacher (x0 predictions at fixed sigma, samplers)")
    t.add_argument("model", help="an exported image teacher folder")
    t.add_argument("--n", type=int, default=96, help="held-out renders noised and predicted (default 96)")
    t.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85],
                   help="noise levels of the x0 predictions (default 0.3 0.5 0.7 0.85)")
    t.add_argument("--cfg", type=float, default=4.0, help="CFG scale of the x0 predictions (<= 1: none; default 4)")
    t.add_argument("--sample", nargs="*", default=[], help="STEPS:CFG settings to sample, e.g. 25:4 100:4 "
                   "(default: none)")
    t.add_argument("--n-samples", type=int, default=32, help="prompts sampled per --sample setting (default 32)")
    sw = sub.add_parser("shapeword", help="does an exported teacher read the shape word? (loss gain when swapped)")
    sw.add_argument("model", help="an exported image teacher folder")
    sw.add_argument("--n", type=int, default=256, help="held-out single-object renders (default 256)")
    gs = sub.add_parser("grad", help="where one batch's gradient comes from, per low-noise weight")
    gs.add_argument("model", help="an exported teacher folder")
    gs.add_argument("--shards", nargs="*", default=[], help="its checkpoint shards: use the raw (not EMA) weights "
                    "(default: the export's EMA weights)")
    gs.add_argument("--lows", nargs="+", type=float, default=[0.0, 0.2, 0.3],
                    help="low-noise weights (teacher --low-sigma values) compared (default 0 0.2 0.3)")
    rl = sub.add_parser("relations", help="position check failures per phrase: absolute positions vs relations")
    rl.add_argument("model", help="an exported image model folder")
    rl.add_argument("--steps", type=int, default=1, help="sampling steps per image (default 1)")
    rl.add_argument("--n", type=int, default=512, help="held-out prompts (default 512)")
    rl.add_argument("--cfg", type=float, default=0.0, help="CFG scale of the samples (default 0: none)")
    dp = sub.add_parser("disc", help="can each discriminator of distill --gan tell the student from its teacher?")
    dp.add_argument("teacher", help="an exported teacher folder")
    dp.add_argument("student", help="an exported student folder")
    dp.add_argument("--n", type=int, default=192, help="train-split prompts; a quarter is held back to report on "
                    "(default 192)")
    dp.add_argument("--steps", type=int, default=100, help="discriminator training steps (default 100)")
    fd = sub.add_parser("featdist", help="distill --feat's distance on a student's samples, and its gradient")
    fd.add_argument("teacher", help="an exported teacher folder")
    fd.add_argument("student", help="an exported student folder")
    fd.add_argument("--n", type=int, default=32, help="prompts sampled by both models (default 32)")
    mo = sub.add_parser("motion", help="a video model's object speed and direction against the dataset's (CPU)")
    mo.add_argument("model", help="an exported video model folder")
    mo.add_argument("--n", type=int, default=10, help="held-out moving-object streams (default 10)")
    mo.add_argument("--frames", type=int, default=64, help="frames per stream (default 64)")
    c = sub.add_parser("cpu", help="a small convergence study of training recipes at 32x32 on the CPU")
    c.add_argument("--seconds", type=float, default=150.0, help="process CPU seconds of training per recipe "
                   "(default 150)")
    c.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipes to train, from RECIPES in "
                   "training/study.py (default: all " + str(len(RECIPES)) + ")")
    c.add_argument("--steps", type=int, default=None, help="equal optimiser steps per recipe instead of --seconds "
                   "(default: --seconds)")
    c.add_argument("--samples", type=int, default=64, help="held-out samples scored by the detector per recipe "
                   "(default 64)")
    c.add_argument("--out", default=None, help="append JSON lines here (default: printed only)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.cmd == "flops":
        for r in flops_table(a.presets):
            print(json.dumps(r), flush=True)
    elif a.cmd == "probe":
        cfgs = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.sample]
        probe_teacher(a.model, a.n, a.sigmas, a.cfg, sample_cfgs=cfgs, n_samples=a.n_samples)
    elif a.cmd == "shapeword":
        print(json.dumps(shape_word_probe(a.model, a.n)), flush=True)
    elif a.cmd == "relations":
        print(json.dumps(relation_breakdown(a.model, a.steps, a.n, a.cfg)), flush=True)
    elif a.cmd == "disc":
        discriminator_probe(a.teacher, a.student, a.n, a.steps)
    elif a.cmd == "motion":
        print(json.dumps(motion_probe(a.model, a.n, a.frames)), flush=True)
    elif a.cmd == "featdist":
        print(json.dumps(feature_distance_probe(a.teacher, a.student, a.n)), flush=True)
    elif a.cmd == "grad":
        gradient_split(a.model, a.shards, a.lows)
    elif a.cmd == "bayes":
        sig = [0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
        for size in a.sizes:
            for prop in ("shape", "color"):
                print(json.dumps({"size": size, "property": prop, "accuracy_by_sigma":
                                  bayes_window(size, a.n, prop, sig)}), flush=True)
        for loc in (0.0, 0.5, 1.0):
            print(json.dumps({"sigma_loc": loc, "uniform_frac": 0.2,
                              "mass_in_[0.5,0.95]": round(sigma_mass(0.5, 0.95, loc), 3),
                              "mass_below_0.2": round(sigma_mass(0.0, 0.2, loc), 3)}), flush=True)
    else:
        if a.threads:
            torch.set_num_threads(a.threads)
        pool = single_object_pool(20000, 32, seed=0)
        val = single_object_pool(256, 32, seed=12345, split="heldout")
        for name in a.recipes:
            r = run_proxy(name, a.seconds, pool, val, a.samples, max_steps=a.steps)
            print(json.dumps(r), flush=True)
            if a.out:
                with open(a.out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
