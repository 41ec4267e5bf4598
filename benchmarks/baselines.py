"""What a user would otherwise run: the plain diffusers pipeline on the same weights, eager or torch.compile'd.

Always called from the same process run as fewstep's own measurement (benchmarks/pipeline_bench.py), so a ratio
is never formed across runs, GPUs or weights.

The compiled baseline is the recipe diffusers' docs and the anchors' users reach for: the denoiser with
``mode="reduce-overhead"`` (Inductor plus its CUDA graphs) and the VAE decoder with default Inductor. Its first
call (compilation) is reported on its own as ``first_call_s`` and never mixed into the steady-state median.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from fewstep.clients.bench import percentiles


def load_diffusers(model_dir: str | Path, dtype: torch.dtype, device: torch.device):
    import diffusers

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    pipe = cls.from_pretrained(model_dir, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _StageTimer:
    """Per-stage wall times of a diffusers pipeline call, from the outside: the prompt encoder and the VAE decoder
    are wrapped as bound callables, the denoiser gets forward hooks (outside any compiled region). Every boundary
    synchronises, so these runs are kept apart from the end-to-end median, which is timed without them."""

    def __init__(self, pipe, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.ms = {"encode_prompt_ms": 0.0, "denoise_ms": 0.0, "decode_ms": 0.0}
        self._undo = []
        for stage, attr in (("encode_prompt_ms", "encode_prompt"), ("decode_ms", "decode")):
            owner = pipe if attr == "encode_prompt" else pipe.vae
            fn = getattr(owner, attr)
            setattr(owner, attr, self._wrap(stage, fn))
            self._undo.append(lambda owner=owner, attr=attr, fn=fn: setattr(owner, attr, fn))
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        t0 = [0.0]

        def pre(*_):
            self.sync()
            t0[0] = time.perf_counter()

        def post(*_):
            self.sync()
            self.ms["denoise_ms"] += (time.perf_counter() - t0[0]) * 1e3

        hooks = [denoiser.register_forward_pre_hook(pre), denoiser.register_forward_hook(post)]
        self._undo += [h.remove for h in hooks]

    def _wrap(self, stage, fn):
        def timed(*args, **kw):
            self.sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            self.sync()
            self.ms[stage] += (time.perf_counter() - t) * 1e3
            return out
        return timed

    def reset(self):
        self.ms = dict.fromkeys(self.ms, 0.0)

    def remove(self):
        for undo in self._undo:
            undo()


def bench_diffusers(model_dir, dtype, device, size, steps, batch, iters, warmup, compiled: bool = False,
                    stage_iters: int = 5) -> dict:
    """Median wall time of ``pipe(prompts)`` to PIL images, text encoder included (a new prompt every call), then
    per-stage medians from ``stage_iters`` further calls made with synchronising stage timers."""
    pipe = load_diffusers(model_dir, dtype, device)
    if compiled:
        denoiser = "unet" if hasattr(pipe, "unet") else "transformer"
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), mode="reduce-overhead", fullgraph=True))
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    kw = {"clean_caption": False} if type(pipe).__name__.startswith("PixArt") else {}

    def call(i):
        pipe([f"a photo of a cat {i}"] * batch, num_inference_steps=steps, guidance_scale=0.0, height=size,
             width=size, generator=torch.Generator().manual_seed(i), output_type="pil", **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, first = [], None
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        call(i)
        ms = (time.perf_counter() - t0) * 1e3
        if i == 0:
            first = ms / 1e3
        if i >= warmup:
            times.append(ms)
    stages = {}
    if stage_iters:
        timer = _StageTimer(pipe, device)
        per = []
        for i in range(stage_iters):
            timer.reset()
            call(10_000 + i)
            per.append(dict(timer.ms))
        timer.remove()
        stages = {k: round(statistics.median(p[k] for p in per), 3) for k in per[0]}
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    p90, p99 = percentiles(times, (90, 99))
    return {**stages, "total_ms": round(statistics.median(times), 3), "total_p90_ms": round(p90, 3),
            "total_p99_ms": round(p99, 3), "first_call_s": round(first, 2)}
