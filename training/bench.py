"""Throughput probes for choosing the model size / batch on the GPU (``python -m training.bench``).

Measures, per model preset: train-step img/s (eager and torch.compile, compile time), inference
img/s (teacher sampling forward), and the data stream's img/s and the detector's img/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from training.common import count_params, pick_device, setup_torch
from training.model import PRESETS, build_model, build_tokenizer, tokenize
from training.teacher import flow_loss


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_train(preset: str, batch: int, dev, compile_: bool, steps: int = 20) -> dict:
    from training import data
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
    from training import data
    from training.stream import BatchStream
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

    from training import data
    from training.metrics import Scorer
    rng = np.random.default_rng(0)
    sc = [data.sample_scene(rng, "heldout") for _ in range(n)]
    ims = list(data.to_uint8(data.render(sc, 64)))
    with Scorer() as s:
        s.adherence(ims[:16], [x.caption for x in sc[:16]])  # warm the workers
        t0 = time.time()
        r = s.adherence(ims, [x.caption for x in sc])
        return {"scorer_img_s": round(n / (time.time() - t0), 1), "scorer_workers": s.workers,
                "render_accuracy": r["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["p2n", "deep8", "base"])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-aux", action="store_true")
    a = ap.parse_args()
    dev = pick_device()
    setup_torch(dev)
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
