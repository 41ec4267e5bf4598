"""Streamed training batches from ``training.data``, rendered on the training device.

Batch ``k`` is, by definition, ``training.data.sample_batch(np.random.default_rng([seed, k]),
batch, size, split, device)``: any step's data is a pure function of (seed, k), so resuming needs
only the step counter. On CUDA the work is overlapped with training:

* the scene *descriptions* (pure-Python layout sampling, ~0.1-0.2 ms each) are drawn by a pool of
  CPU worker processes, in exactly the order ``sample_batch`` would draw them;
* a background thread renders them with ``training.data.render(..., device=cuda)`` on a side CUDA
  stream (the renderer's host->device copies then never stall the training stream), tokenises the
  captions, and queues ready batches.

On the CPU (tests, ``--tiny``) or with ``workers=0`` it simply calls ``sample_batch`` inline.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque

import numpy as np
import torch

from fewstep.training.model import tokenize


def batch_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def drop_captions(captions: list[str], seed: int, step: int, prob: float, bg_prob: float = 0.0) -> list[str]:
    """Caption dropout for CFG (``prob``: the empty caption) after background-phrase dropout (``bg_prob``: the
    caption without " on a BG background", see ``data.without_background``); each from its own random stream, so
    turning one on leaves the other's draws as they were."""
    captions = list(captions)
    if bg_prob > 0:
        from fewstep.training.data import drop_backgrounds
        captions = drop_backgrounds(captions, np.random.default_rng([seed, step, 2]), bg_prob)
    if prob <= 0:
        return captions
    r = np.random.default_rng([seed, step, 1]).random(len(captions))
    return ["" if u < prob else c for u, c in zip(r, captions)]


_WORKER: dict = {}


def _worker_init(vocab: dict, max_length: int, drop_prob: float, bg_prob: float = 0.0) -> None:
    _WORKER.update(vocab=vocab, max_length=max_length, drop_prob=drop_prob, bg_prob=bg_prob)


def _scenes_for_step(args):
    """Worker: the scenes sample_batch would draw for this step, as ``data.scene_arrays`` (no rendering), plus
    the tokenised captions after caption dropout (word-level lookup, see model.fast_tokenize)."""
    seed, step, batch, split = args
    from fewstep.training import data
    from fewstep.training.model import fast_tokenize
    rng = batch_rng(seed, step)
    scenes = [data.sample_scene(rng, split) for _ in range(batch)]
    caps_in = drop_captions([s.caption for s in scenes], seed, step, _WORKER["drop_prob"], _WORKER["bg_prob"])
    ids, mask = fast_tokenize(caps_in, _WORKER["vocab"], _WORKER["max_length"])
    return data.scene_arrays(scenes), caps_in, ids, mask


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(0, min(14, n - 2))


class BatchStream:
    """Iterator over training batches: ``next(stream) -> (step, images, ids, mask, captions)``."""

    def __init__(self, *, seed: int, batch: int, size: int, split: str, device: torch.device,
                 start_step: int, tokenizer, drop_prob: float = 0.0, workers: int | None = None,
                 prefetch: int = 3, bg_prob: float = 0.0):
        from fewstep.training import data
        self.data = data
        self.seed, self.batch, self.size, self.split = seed, batch, size, split
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.drop_prob, self.bg_prob = drop_prob, bg_prob
        self.next_step = start_step
        self.threaded = self.device.type == "cuda"
        if workers is None:
            workers = default_workers() if self.threaded else 0
        self.pool = None
        can_split = hasattr(data, "sample_scene") and hasattr(data, "render_arrays")
        if workers > 0 and can_split and self.threaded:
            import multiprocessing as mp
            self.pool = mp.get_context("spawn").Pool(
                workers, initializer=_worker_init,
                initargs=(dict(tokenizer.get_vocab()), int(tokenizer.model_max_length), drop_prob, bg_prob))
            self._verified = False
            self.window = 2 * workers + 2
        self.workers = workers if self.pool is not None else 0
        if self.threaded:
            self.stream = torch.cuda.Stream(device=self.device)
            self.q: queue.Queue = queue.Queue(maxsize=prefetch)
            self.stop = threading.Event()
            self.error: BaseException | None = None
            self.thread = threading.Thread(target=self._run, name="batch-render", daemon=True)
            self.thread.start()

    # -- producer -------------------------------------------------------------------------------
    def _produce(self, step: int, work) -> tuple:
        if work is None:
            imgs, caps = self.data.sample_batch(batch_rng(self.seed, step), self.batch, self.size,
                                                self.split, self.device)
            caps_in = drop_captions(caps, self.seed, step, self.drop_prob, self.bg_prob)
            ids, mask = tokenize(self.tokenizer, caps_in)
        else:
            arrays, caps_in, ids_np, mask_np = work
            imgs = self.data.render_arrays(arrays, self.size, self.device)
            ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
            if not self._verified:  # the workers' fast tokenizer must equal the real one
                ref_ids, ref_mask = tokenize(self.tokenizer, caps_in)
                if not (torch.equal(ref_ids, ids) and torch.equal(ref_mask, mask)):
                    raise RuntimeError("worker tokenisation differs from the tokenizer's")
                self._verified = True
        if self.device.type == "cuda":
            ids = ids.pin_memory().to(self.device, non_blocking=True)
            mask = mask.pin_memory().to(self.device, non_blocking=True)
        return imgs.float(), ids, mask, caps_in

    def _run(self) -> None:
        try:
            pending: deque = deque()
            submit = self.next_step
            step = self.next_step
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                while not self.stop.is_set():
                    work = None
                    if self.pool is not None:
                        while len(pending) < self.window:
                            pending.append(self.pool.apply_async(
                                _scenes_for_step, ((self.seed, submit, self.batch, self.split),)))
                            submit += 1
                        work = pending.popleft().get()
                    imgs, ids, mask, caps = self._produce(step, work)
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    item = (step, imgs, ids, mask, caps, ev)
                    while not self.stop.is_set():
                        try:
                            self.q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    step += 1
        except BaseException as e:  # surfaced in __next__
            self.error = e
            try:
                self.q.put(None, timeout=5)
            except queue.Full:
                pass

    # -- consumer -------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if not self.threaded:
            step = self.next_step
            imgs, ids, mask, caps = self._produce(step, None)
            self.next_step += 1
            return step, imgs, ids, mask, caps
        while True:
            try:
                item = self.q.get(timeout=1.0)
                break
            except queue.Empty:
                if self.error is not None or not self.thread.is_alive():
                    raise RuntimeError(f"batch stream failed: {self.error!r}") from self.error
        if item is None:
            raise RuntimeError(f"batch stream failed: {self.error!r}") from self.error
        step, imgs, ids, mask, caps, ev = item
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(ev)
        for t in (imgs, ids, mask):
            t.record_stream(cur)
        assert step == self.next_step, (step, self.next_step)
        self.next_step += 1
        return step, imgs, ids, mask, caps

    def close(self) -> None:
        if self.threaded:
            self.stop.set()
            try:
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=10)
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class ReplayBuffer:
    """GPU ring buffer of rendered training images (fp16) + token ids, sampled at random.

    The scene sampler is pure Python and cannot feed a fast GPU step on its own, so the teacher
    ingests one fresh batch every ``reuse`` steps and draws every step's batch at random from the
    last ``capacity`` images (each image is then used ~``reuse`` times, each time with fresh noise
    and sigma). With ``flip``, half of the draws are mirrored left-right with the words "left" and
    "right" swapped in the caption: every shape of ``training.data`` is left-right symmetric and
    positions / relations mirror exactly, so a mirrored sample is a sample of the same distribution.
    Everything is drawn from per-step generators, so it stays a pure function of (seed, step).
    """

    def __init__(self, capacity: int, size: int, max_length: int, device, vocab: dict[str, int] | None = None,
                 flip: bool = True):
        self.cap = capacity
        self.x = torch.empty((capacity, 3, size, size), dtype=torch.float16, device=device)
        self.ids = torch.zeros((capacity, max_length), dtype=torch.long, device=device)
        self.mask = torch.zeros((capacity, max_length), dtype=torch.long, device=device)
        self.n = 0
        self.pos = 0
        self.flip = bool(flip and vocab and "left" in vocab and "right" in vocab)
        if self.flip:
            self.left, self.right = int(vocab["left"]), int(vocab["right"])

    def add(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        b = x.shape[0]
        if b > self.cap:
            x, ids, mask, b = x[-self.cap:], ids[-self.cap:], mask[-self.cap:], self.cap
        idx = (torch.arange(b, device=x.device) + self.pos) % self.cap
        self.x[idx] = x.to(torch.float16)
        self.ids[idx] = ids
        self.mask[idx] = mask
        self.pos = (self.pos + b) % self.cap
        self.n = min(self.cap, self.n + b)

    def sample(self, batch: int, g: torch.Generator):
        dev = self.x.device
        idx = torch.randint(0, self.n, (batch,), generator=g, device=dev)
        x, ids, mask = self.x[idx].float(), self.ids[idx], self.mask[idx]
        if self.flip:
            f = torch.rand(batch, generator=g, device=dev) < 0.5
            x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
            swapped = torch.where(ids == self.left, self.right, torch.where(ids == self.right, self.left, ids))
            ids = torch.where(f.view(-1, 1), swapped, ids)
        return x, ids, mask
