"""Prompt adherence / diversity through ``benchmarks.quality``, spread over CPU worker processes.

``benchmarks.quality.adherence`` is a pure-numpy detector at roughly 0.1-0.2 s per image on one
core, so scoring a few hundred images inline would eat a large part of a GPU call's budget. The
scorer splits the images into chunks, scores them in a process pool and recombines the rates
(weighted by chunk size), which gives exactly what one ``adherence`` call over all images gives.
"""

from __future__ import annotations

import os

import numpy as np


def _adherence_chunk(args):
    images, captions = args
    from fewstep.benchmarks import quality
    return quality.adherence(images, captions)


def combine(parts: list[dict]) -> dict:
    total = sum(int(p.get("n", 0)) for p in parts)
    out: dict = {"n": total}
    keys = {k for p in parts for k, v in p.items() if isinstance(v, (int, float)) and k != "n"}
    for k in sorted(keys):
        out[k] = (sum(float(p.get(k, 0.0)) * int(p.get("n", 0)) for p in parts) / total) if total else 0.0
    return out


class Scorer:
    """``Scorer(workers).adherence(uint8_images, captions) -> dict`` (``accuracy`` + per-check
    rates + ``n``); ``diversity(images) -> float``. Use as a context manager or call close()."""

    def __init__(self, workers: int | None = None):
        if workers is None:
            workers = max(0, min(14, (os.cpu_count() or 1) - 2))
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing as mp
            self.pool = mp.get_context("spawn").Pool(workers)

    def adherence(self, images, captions: list[str]) -> dict:
        images = [np.asarray(im) for im in images]
        captions = list(captions)
        if self.pool is None or len(images) < 8:
            from fewstep.benchmarks import quality
            return combine([quality.adherence(images, captions)])
        n = len(images)
        nchunks = min(n, self.workers * 3)
        bounds = np.linspace(0, n, nchunks + 1).astype(int)
        jobs = [(images[a:b], captions[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return combine(self.pool.map(_adherence_chunk, jobs))

    @staticmethod
    def diversity(images) -> float:
        from fewstep.benchmarks import quality
        return float(quality.diversity([np.asarray(im) for im in images]))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
