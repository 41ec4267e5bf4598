"""Throughput probes for choosing the model size / batch on the GPU (``fewstep train bench``).

Measures, per model preset: train-step img/s (eager and torch.compile, compile time), inference
img/s (teacher sampling forward), and the data stream's img/s and the detector's img/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fewstep.training.common import count_params, pick_device, setup_torch
from fewstep.training.model import PRESETS, build_model, build_tokenizer, tokenize
from fewstep.training.teacher import flow_loss


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_train(preset: str, batch: int, dev, compile_: bool, steps: int = 20) -> dict:
    from fewstep.training import data
    cfg = PRESETS[preset]
    tok = build_tokenizer(data.vocabulary(), cfg.max_length)
    model = build_model(cfg, len(tok)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    caps = data.train_prompts(batch, seed=0)
    ids, mask = tokenize(tok, caps, dev)
    x0 = torch.rand(batch, 3, cfg.size, cfg.size, device=dev) * 2 - 1
    noise = torch.randn_like(x0)
    sigma = torch.rand(batch, device=dev)
    fn = torch.compile(flow_loss, dynamic=False) if compile_ else flow_loss
    t0 = time.time()
    for i in range(steps + 3):
        if i == 3:
            _sync(dev)
            t1 = time.time()
        opt.zero_grad(set_to_none=True)
        loss = fn(model, x0, ids, mask, noise, sigma, dev.type == "cuda")
        loss.backward()
        opt.step()
        if i == 0:
            _sync(dev)
            first = time.time() - t0
    _sync(dev)
    dt = time.time() - t1
    n = count_params(model)
    # inference (bf16 autocast, no grad) at 2x batch as in CFG sampling
    model.eval()
    xb = torch.cat([x0, x0])
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        emb = model.encode(torch.cat([ids, ids]), torch.cat([mask, mask]))
        for i in range(13):
            if i == 3:
                _sync(dev)
                t2 = time.time()
            model.denoise(xb, torch.cat([sigma, sigma]), emb, torch.cat([mask, mask]))
        _sync(dev)
    inf = 10 * 2 * batch / (time.time() - t2)
    return {"preset": preset, "params_M": round(n / 1e6, 3), "batch": batch, "compile": compile_,
            "first_step_s": round(first, 1), "train_img_s": round(steps * batch / dt, 1),
            "infer_fwd_img_s": round(inf, 1), "max_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2)
            if dev.type == "cuda" else None}


def bench_stream(batch: int, dev, seconds: float = 15.0) -> dict:
    from fewstep.training import data
    from fewstep.training.stream import BatchStream
    tok = build_tokenizer(data.vocabulary(), 32)
    s = BatchStream(seed=0, batch=batch, size=64, split="train", device=dev, start_step=0, tokenizer=tok,
                    drop_prob=0.1)
    try:
        next(s)
        _sync(dev)
        t0 = time.time()
        n = 0
        while time.time() - t0 < seconds:
            next(s)
            n += 1
        _sync(dev)
        return {"stream_img_s": round(n * batch / (time.time() - t0), 1), "workers": s.workers}
    finally:
        s.close()


def bench_scorer(n: int = 256) -> dict:
    import numpy as np

    from fewstep.training import data
    from fewstep.training.metrics import Scorer
    rng = np.random.default_rng(0)
    sc = [data.sample_scene(rng, "heldout") for _ in range(n)]
    ims = list(data.to_uint8(data.render(sc, 64)))
    with Scorer() as s:
        s.adherence(ims[:16], [x.caption for x in sc[:16]])  # warm the workers
        t0 = time.time()
        r = s.adherence(ims, [x.caption for x in sc])
        return {"scorer_img_s": round(n / (time.time() - t0), 1), "scorer_workers": s.workers,
                "render_accuracy": r["accuracy"]}


def _time(fn, n: int, dev) -> float:
    _sync(dev)
    t0 = time.time()
    for _ in range(n):
        fn()
    _sync(dev)
    return (time.time() - t0) / n


def bench_variants(preset: str, batch: int, chunk: int, dev, compile_: bool, steps: int = 20) -> list[dict]:
    """The distill stage's two hot loops, eager against channels-last against a CUDA graph (and torch.compile):
    the student's optimizer step (``reflow_loss`` with the stage's defaults, batch ``batch``) and the teacher's pair
    sampler (12 Euler steps with CFG at ``chunk`` prompts, i.e. 2 x chunk rows per forward). Also checks that a
    replayed step computes what the eager step computes (same weights, same batches)."""
    import copy

    from fewstep.training import data
    from fewstep.training.common import make_adamw
    from fewstep.training.distill import DistillArgs, draw_sigma, reflow_loss
    from fewstep.engines.backends.compiled import StaticGraph
    from fewstep.training.graphs import CapturedTrainStep
    from fewstep.training.model import sample, scheduler_sigmas
    d = DistillArgs(teacher="", out="")
    cfg = PRESETS[preset]
    tok = build_tokenizer(data.vocabulary(), cfg.max_length)
    torch.manual_seed(0)
    base = build_model(cfg, len(tok)).to(dev)
    caps = data.train_prompts(max(batch, chunk), seed=0)
    ids_all, mask_all = tokenize(tok, caps, dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def batch_of(k):
        g.manual_seed(k)
        z = torch.randn(batch, 3, cfg.size, cfg.size, device=dev, generator=g)
        x0 = (torch.rand(batch, 3, cfg.size, cfg.size, device=dev, generator=g) * 2 - 1)
        return z, x0, ids_all[:batch], mask_all[:batch], draw_sigma(batch, g, dev, d.p_one, d.p_grid)

    batches = [batch_of(k) for k in range(steps + 4)]
    rows = []

    def loss_fn(model):
        return lambda z, x0, ids, mask, sigma: reflow_loss(model, z, x0, ids, mask, sigma, d.w_one, d.w_perc, True,
                                                           d.w_edge, d.low_sigma, d.huber)

    cuda = dev.type == "cuda"
    for mode in (["eager", "eager_cl", "graph", "graph_cl"] + (["compile"] if compile_ else [])) if cuda else ["eager"]:
        model = copy.deepcopy(base).train()
        if mode.endswith("_cl"):
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        t0 = time.time()
        losses = []
        if mode.startswith("graph"):
            opt = make_adamw(model, 1e-4, 0.0, dev, capturable=True)
            step = CapturedTrainStep(loss_fn(model), params, opt, 1.0, batches[:2])
            step.record()
            losses += [float(o[0]) for o in step.warmup_out]
            first = time.time() - t0
            for b in batches[2:4]:
                losses.append(float(step(*b)[0]))
            i = iter(batches * 2)
            dt = _time(lambda: step(*next(i)), steps, dev)
        else:
            opt = make_adamw(model, 1e-4, 0.0, dev) if mode != "compile" else \
                torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), fused=True)
            f = loss_fn(model)
            if mode == "compile":
                f = torch.compile(f, dynamic=False)

            def eager_step(b):
                opt.zero_grad(set_to_none=True)
                loss = f(*b)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()
                return loss.detach()
            for k, b in enumerate(batches[:4]):
                losses.append(float(eager_step(b)))
                if k == 0:
                    first = time.time() - t0
            i = iter(batches * 2)
            dt = _time(lambda: eager_step(next(i)), steps, dev)
        rows.append({"loop": "train_step", "mode": mode, "batch": batch, "first_s": round(first, 1),
                     "ms": round(dt * 1e3, 2), "img_s": round(batch / dt, 1),
                     "first_losses": [round(x, 5) for x in losses]})
        print(json.dumps(rows[-1]), flush=True)

    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    sig = scheduler_sigmas(12)
    uncond = tokenize(tok, [""], dev)
    ids, mask = ids_all[:chunk], mask_all[:chunk]
    z = torch.randn(chunk, 3, cfg.size, cfg.size, device=dev, generator=g)
    ref = None
    for mode in ["eager", "eager_cl", "graph", "graph_cl"] if cuda else ["eager"]:
        m = copy.deepcopy(teacher)
        if mode.endswith("_cl"):
            m.to(memory_format=torch.channels_last)

        def fn(ids, mask, z):
            return sample(m, ids, mask, z, sig, 3.0, uncond, autocast_dtype=torch.bfloat16)
        t0 = time.time()
        if mode.startswith("graph"):
            rec = StaticGraph(lambda d: fn(d["ids"], d["mask"], d["z"]), {"ids": ids, "mask": mask, "z": z},
                              cuda_graph=True)

            def call(ids, mask, z):
                return rec({"ids": ids, "mask": mask, "z": z})
        else:
            call = torch.no_grad()(fn)
        out = call(ids, mask, z).float()
        first = time.time() - t0
        ref = out if ref is None else ref
        dt = _time(lambda: call(ids, mask, z), 5, dev)
        rows.append({"loop": "pair_sampler", "mode": mode, "chunk": chunk, "teacher_steps": 12,
                     "first_s": round(first, 1), "s_per_chunk": round(dt, 4), "pairs_s": round(chunk / dt, 1),
                     "max_abs_diff_vs_eager": round(float((out - ref).abs().max()), 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fewstep train bench`, built without side effects."""
    ap = argparse.ArgumentParser(prog="fewstep train bench", description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["p2n", "deep8", "base"],
                    help="model presets to time (default p2n deep8 base)")
    ap.add_argument("--batch", type=int, default=512, help="images per training step (default 512)")
    ap.add_argument("--no-compile", action="store_true",
                    help="time eager steps only (default: also torch.compile on CUDA)")
    ap.add_argument("--skip-aux", action="store_true",
                    help="skip the data stream's and the detector's img/s (default: measured first)")
    ap.add_argument("--variants", action="store_true",
                    help="the distill stage's step and pair sampler: eager / channels-last / CUDA graph / compile "
                         "(default off: the teacher's train step)")
    ap.add_argument("--chunk", type=int, default=1024,
                    help="with --variants: teacher pairs per pair-sampler call (default 1024)")
    return ap


def main() -> None:
    ap = build_parser()
    a = ap.parse_args()
    dev = pick_device()
    setup_torch(dev)
    if a.variants:
        for p in a.presets:
            bench_variants(p, a.batch, a.chunk, dev, not a.no_compile)
        return
    out = []
    if not a.skip_aux:
        out.append(bench_stream(a.batch, dev))
        print(json.dumps(out[-1]), flush=True)
        out.append(bench_scorer())
        print(json.dumps(out[-1]), flush=True)
    for p in a.presets:
        for c in ([False] if a.no_compile or dev.type != "cuda" else [False, True]):
            try:
                out.append(bench_train(p, a.batch, dev, c))
            except Exception as e:  # keep measuring the others
                out.append({"preset": p, "compile": c, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(json.dumps(out[-1]), flush=True)
            torch.cuda.empty_cache() if dev.type == "cuda" else None


if __name__ == "__main__":
    main()
