"""The `compiled` backend for video models: the stream's denoiser step compiled and captured per bucket.

A stream step (``StreamPipeline.denoise_step``) is one forward pass over a batch of session buffers
``[B, C, T, h, w]`` plus the per-frame Euler update. This module compiles that function with Inductor and captures
one CUDA graph per (sessions-in-batch bucket, frame size) at start-up, as the image backend does per (batch, size,
steps): ``/ready`` turns true only after every declared bucket is captured. A batch of sessions is padded up to
its bucket (the last row repeated; padded rows are computed and dropped). The graphs are installed on the pipeline
(``StreamPipeline.compiled_steps``), so the stream scheduler, sessions and decoders are untouched.

What stays eager, and why:
* shapes outside the buckets (a frame size not declared, more sessions than the largest bucket, a buffer of
  another length): logged once, never refused;
* steps with a negative prompt (NASA): the steering processor switches per call, and the graphs hold the plain
  pass (as for images);
* the decoders: the causal Wan VAE carries a per-session cache whose shape differs between a session's first
  chunk and the rest, and the embedded pixel-space model has none.
A bucket whose capture fails (an operator Inductor or CUDA graphs cannot take) runs eager too, with the reason
logged: the server still starts.
"""

from __future__ import annotations

import logging
import time

import torch

from ..pipeline import NasaInput, PromptEmbeds
from .compiled import CompileReport, StaticGraph, _embeds, _flatten, _pad_rows

log = logging.getLogger("fewstep.engines")


class CompiledStreamSteps:
    """``StreamPipeline.compiled_steps``: ``__call__`` returns the stepped batch, or None where the eager step must
    run (no bucket, NASA, a failed capture)."""

    def __init__(self, pipe, cfg, max_batch_sessions: int):
        self.pipe = pipe
        self.cfg = cfg
        self.cuda_graphs = cfg.cuda_graphs and pipe.device.type == "cuda"
        self.buckets = sorted({b for b in cfg.stream_buckets if b <= max_batch_sessions} or {1})
        self.sizes = self._sizes(pipe, cfg)
        self.report = CompileReport()
        self._graphs: dict[tuple, StaticGraph | None] = {}  # None: capture failed, that shape runs eager
        self._warned: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        import torch._dynamo as dynamo

        limit = 2 * len(self.buckets) * len(self.sizes)
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), limit))

        def step(flat):
            x, sigma, nxt = flat["/x"], flat["/sigma"], flat["/sigma_next"]
            v = pipe._stream_call(x, sigma, _embeds(flat, "/cond"))
            return x + (nxt - sigma)[:, None, :, None, None] * v

        self._step_fn = torch.compile(step, mode=cfg.mode, dynamic=False) if cfg.compile else step

    @staticmethod
    def _sizes(pipe, cfg) -> list[tuple[int, int]]:
        """The model's default frame size, plus every declared compile size the model serves (one server's
        --compile-sizes may name the image model's sizes too)."""
        served = pipe.served_sizes
        sizes = [served.default(pipe.default_size)]
        for h, w in (tuple(s) for s in cfg.sizes):
            if served.allows(h, w) and (h, w) not in sizes:
                sizes.append((h, w))
        return sizes

    def _bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _eager(self, key: tuple, why: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("compiled stream step: %s for %s; that step runs eagerly", why, key)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond: PromptEmbeds,
                 nasa: NasaInput | None = None) -> torch.Tensor | None:
        n, _, t, h, w = x.shape
        vs = self.pipe.vae_scale_factor
        b = self._bucket(n)
        key = (b, t, h * vs, w * vs)
        if nasa is not None:
            self._eager(key + ("nasa",), "a negative prompt (NASA)")
            return None
        if b is None or (h * vs, w * vs) not in self.sizes or t != self.pipe.buffer_frames:
            self._eager((n, t, h * vs, w * vs), "no captured bucket")
            return None
        flat = _flatten({"x": _pad_rows(x, b), "sigma": _pad_rows(sigma, b), "sigma_next": _pad_rows(sigma_next, b),
                         "cond": PromptEmbeds(_pad_rows(cond.embeds, b), _pad_rows(cond.mask, b), None)})
        graph = self._graph(key, flat)
        if graph is None:
            return None
        return graph(flat)[:n].clone()  # the graph's output is rewritten by its next replay

    def _graph(self, key: tuple, example: dict[str, torch.Tensor]) -> StaticGraph | None:
        if key in self._graphs:
            return self._graphs[key]
        t0 = time.perf_counter()
        try:
            g = StaticGraph(self._step_fn, example, self.cuda_graphs, self._pool)
        # Deliberate fallback: whatever Inductor or the capture cannot take, the eager step still serves.
        except Exception as e:  # noqa: BLE001
            log.exception("compiled stream step: bucket %s failed to compile or capture; it runs eagerly", key)
            self._warned.add(key)
            g = None
            self.report.seconds[f"stream/{'/'.join(map(str, key))}/failed: {type(e).__name__}"] = \
                time.perf_counter() - t0
        else:
            self.report.seconds["stream/" + "/".join(map(str, key))] = time.perf_counter() - t0
        self._graphs[key] = g
        return g

    def warmup(self, progress: bool = True) -> CompileReport:
        """Compile and capture every (sessions, size) bucket now, with the buffer's real noise levels."""
        from tqdm import tqdm

        pipe = self.pipe
        jobs = [(b, hw) for b in self.buckets for hw in self.sizes]
        levels = torch.tensor(pipe.sigmas[:-1], dtype=torch.float32).flip(0).repeat_interleave(pipe.chunk_frames)
        for b, (h, w) in tqdm(jobs, desc="compiling stream buckets", disable=not progress, unit="bucket"):
            cond = pipe.encode_prompt([f"warm-up {i}" for i in range(b)])
            vs = pipe.vae_scale_factor
            x = torch.randn((b, pipe.latent_channels, pipe.buffer_frames, h // vs, w // vs),
                            generator=torch.Generator().manual_seed(0)).to(pipe.device)
            sigma = levels[None].expand(b, -1).to(pipe.device)
            self(x, sigma, sigma, cond)
        if self.cuda_graphs:
            torch.cuda.synchronize()
        return self.report
