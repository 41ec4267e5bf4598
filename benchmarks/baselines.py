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


def load_diffusers(model_dir: str | Path, dtype: torch.dtype, device: torch.device):
    import diffusers

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    pipe = cls.from_pretrained(model_dir, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_diffusers(model_dir, dtype, device, size, steps, batch, iters, warmup, compiled: bool = False) -> dict:
    """Median wall time of ``pipe(prompts)`` to PIL images, text encoder included (a new prompt every call)."""
    pipe = load_diffusers(model_dir, dtype, device)
    if compiled:
        denoiser = "unet" if hasattr(pipe, "unet") else "transformer"
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), mode="reduce-overhead", fullgraph=True))
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    kw = {"clean_caption": False} if type(pipe).__name__.startswith("PixArt") else {}
    times, first = [], None
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        pipe([f"a photo of a cat {i}"] * batch, num_inference_steps=steps, guidance_scale=0.0, height=size,
             width=size, generator=torch.Generator().manual_seed(i), output_type="pil", **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        if i == 0:
            first = ms / 1e3
        if i >= warmup:
            times.append(ms)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"total_ms": round(statistics.median(times), 3), "first_call_s": round(first, 2)}
