"""The backend factory: which runner serves a model directory, on which backend (engines/runner.py).

Image models: eager (``FewStepPipeline``), compiled (``CompiledPipeline``: compiled and captured here, so the
runner comes back ready) or TensorRT (``TensorRTRunner``: engines built or loaded from the cache here). Video
models: ``StreamPipeline``, eager, or with its stream step compiled and captured per (sessions, frame size) bucket
(``CompiledStreamSteps``, captured here); TensorRT refuses video models before anything loads (server/state.py's
``refuse_video_models``)."""

from __future__ import annotations

import logging
import os

import torch

from ..config import EngineConfig
from ..runner import Runner

log = logging.getLogger("fewstep.engines")


def make_runner(path: str | os.PathLike, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                name: str = "model", progress: bool = True) -> Runner:
    """Load ``path`` and wrap it in ``config``'s backend (``auto``: compiled on CUDA, else eager)."""
    from ..loading import load_checkpoint, model_kind
    from ..pipeline import FewStepPipeline
    from ..stream import StreamPipeline

    kind = model_kind(path)
    vae = config.vae if kind == "image" else None  # --vae swaps image decoders; video VAEs are causal (Wan)
    if config.vae and kind == "video":
        log.warning("--vae applies to image models; the video model %s keeps its own decoder", name)
    pipeline = StreamPipeline if kind == "video" else FewStepPipeline
    adapters = config.adapters if kind == "image" else None
    if config.adapters and kind == "video":
        log.warning("--adapters applies to image models; the video model %s runs without", name)
    pipe = pipeline(load_checkpoint(path, device, dtype, vae=vae), device, dtype, config.attention, adapters)
    backend = config.resolve_backend(device)
    if config.backend == "auto":
        log.info("backend auto -> %s (device %s) for %s", backend, device, name)
    runner: Runner = pipe
    if kind == "video" and backend == "compiled":
        from .compiled_stream import CompiledStreamSteps

        pipe.compiled_steps = CompiledStreamSteps(pipe, config.compiled, config.stream.max_batch_sessions)
        rep = pipe.compiled_steps.warmup(progress=progress)
        log.info("compiled backend (%s): stream steps, compile + capture %.1f s over %d graphs", name, rep.total,
                 len(rep.seconds))
    elif backend == "compiled":
        from .compiled import CompiledPipeline

        runner = CompiledPipeline(pipe, config.compiled)
        rep = runner.warmup(progress=progress)
        log.info("compiled backend (%s): compile + capture %.1f s over %d graphs", name, rep.total, len(rep.seconds))
    elif backend == "tensorrt":
        # Builds (or loads from the engine cache) every component, then swaps in engine stand-ins.
        # NOT run on our H200: TensorRT-RTX refuses compute capability 9.0 and full TensorRT is not
        # installable on our machines; the runtime follows the TensorRT API documentation.
        from .tensorrt import enable

        runner = enable(pipe, config)
        for r in runner.builds:
            log.info("tensorrt (%s): %s", name, r.line())
    log.info("%s model %s from %s (%s backend)", kind, name, path, runner.capabilities.backend)
    return runner
