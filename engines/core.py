"""EngineCore: owns the device and runs ``step()`` = schedule -> run -> emit.

It runs without HTTP: tests add requests and call ``step()`` directly. The server drives the same object from a
dedicated thread (``EngineCore.start``), so the asyncio loop never touches the GPU; ``AsyncEngine`` bridges
results back to the loop.

Batching: the oldest waiting request fixes the batch key (model, size, steps, guidance, CFG); compatible requests
join until ``max_batch_size`` images. In the serving loop the first request waits up to ``max_wait_ms`` for
company. Each image keeps its own generator, so batching never changes a result.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from .config import EngineConfig
from .encode import encode_image
from .pipeline import FewStepPipeline, PromptEmbeds

log = logging.getLogger("fewstep.engines")

STAGES = ("queue", "encode_prompt", "denoise", "decode", "encode_image")


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status the server should answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class GenerateRequest:
    prompt: str
    model: str | None = None
    n: int = 1
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    output_format: str = "png"  # png | jpeg | webp | raw (uint8 arrays, no encoding)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class GenerateOutput:
    request_id: str
    images: list[bytes | np.ndarray]
    seeds: list[int]
    timings: dict[str, float]  # <stage>_ms for every stage, total_ms, batch_size
    model: str = ""
    error: Exception | None = None


class EngineObserver(Protocol):
    """What the engine reports; the server's metrics implement it. The engine itself imports no metrics lib."""

    def on_batch(self, model: str, images: int) -> None: ...
    def on_queue(self, waiting: int, running: int) -> None: ...
    def on_output(self, out: GenerateOutput) -> None: ...


class PromptCache:
    """LRU of per-prompt embeddings (one row each, on the device), keyed by (model, prompt)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict[tuple[str, str], PromptEmbeds] = OrderedDict()
        self.hits = self.misses = 0

    def get_many(self, model: str, pipe: FewStepPipeline, prompts: list[str],
                 encode: Callable[[list[str]], PromptEmbeds] | None = None) -> PromptEmbeds:
        encode = encode or pipe.encode_prompt
        missing = list(dict.fromkeys(p for p in prompts if (model, p) not in self._d))
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            emb = encode(missing)
            fresh = {p: emb[i] for i, p in enumerate(missing)}
            if self.capacity:
                for p, e in fresh.items():
                    self._d[(model, p)] = e
                while len(self._d) > self.capacity:
                    self._d.popitem(last=False)
        rows = []
        for p in prompts:
            if p in fresh:
                rows.append(fresh[p])
            else:
                self._d.move_to_end((model, p))
                rows.append(self._d[(model, p)])
        return PromptEmbeds.cat(rows)


@dataclass
class _Work:
    req: GenerateRequest
    seeds: list[int]
    steps: int
    guidance: float
    height: int
    width: int
    future: Future

    @property
    def key(self):
        return (self.req.model, self.height, self.width, self.steps, self.guidance)


class EngineCore:
    def __init__(self, pipelines: dict[str, FewStepPipeline], config: EngineConfig | None = None,
                 observer: EngineObserver | None = None):
        if not pipelines:
            raise ValueError("EngineCore needs at least one pipeline")
        self.pipelines = pipelines
        self.default_model = next(iter(pipelines))
        self.config = config or EngineConfig()
        self.observer = observer
        self.cache = PromptCache(self.config.prompt_cache_size)
        self._waiting: deque[_Work] = deque()
        self._cv = threading.Condition()
        self._running = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(self.config.encode_workers, thread_name_prefix="fewstep-encode")

    # -- intake ------------------------------------------------------------------------------------------------
    def validate(self, req: GenerateRequest) -> _Work:
        """Resolve defaults and check the request against the model; raises EngineError with a helpful message."""
        model = req.model or self.default_model
        if model not in self.pipelines:
            raise EngineError(f"model {model!r} is not served here; available: {sorted(self.pipelines)}", 404,
                              "model", "model_not_found")
        req.model = model
        pipe = self.pipelines[model]
        h = req.height or pipe.default_size
        w = req.width or pipe.default_size
        try:
            pipe.check_size(h, w)
        except ValueError as e:
            raise EngineError(str(e), 400, "size", "invalid_size") from None
        steps = req.steps or pipe.default_steps
        guidance = pipe.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
        if req.n > self.config.batching.max_batch_size * 4:
            raise EngineError(f"n must be at most {self.config.batching.max_batch_size * 4} on this server", 400,
                              "n", "invalid_n")
        base = req.seed if req.seed is not None else secrets.randbelow(2**62)
        # image i of a request uses seed + i, so n=4 at seed s reproduces four n=1 requests at s..s+3.
        seeds = [base + i for i in range(req.n)]
        return _Work(req, seeds, steps, guidance, h, w, Future())

    def add_request(self, req: GenerateRequest) -> Future:
        work = self.validate(req)
        with self._cv:
            queued = sum(len(x.seeds) for x in self._waiting)
            if queued + req.n > self.config.batching.max_queue_images:
                raise EngineError(f"server is at capacity ({queued} images waiting); retry later", 503, None,
                                  "overloaded")
            self._waiting.append(work)
            self._report_queue()
            self._cv.notify()
        return work.future

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _report_queue(self) -> None:
        if self.observer:
            self.observer.on_queue(len(self._waiting), self._running)

    # -- schedule ----------------------------------------------------------------------------------------------
    def _schedule(self) -> list[_Work]:
        """Pop the oldest request and every compatible one that fits (FIFO within the key). Caller holds _cv."""
        if not self._waiting:
            return []
        head = self._waiting.popleft()
        batch, images = [head], len(head.seeds)
        limit = self.config.batching.max_batch_size
        keep: deque[_Work] = deque()
        while self._waiting:
            w = self._waiting.popleft()
            if w.key == head.key and images + len(w.seeds) <= limit:
                batch.append(w)
                images += len(w.seeds)
            else:
                keep.append(w)
        self._waiting = keep
        return batch

    # -- run ---------------------------------------------------------------------------------------------------
    def _sync(self, pipe: FewStepPipeline) -> None:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)

    def _execute(self, batch: list[_Work]) -> list[Future]:
        """Run the GPU stages for a batch; image encoding continues in the pool. Returns the works' futures."""
        head = batch[0]
        model = head.req.model
        pipe = self.pipelines[model]
        start = time.perf_counter()
        n_images = sum(len(w.seeds) for w in batch)
        with self._cv:
            self._running += n_images
            self._report_queue()
        if self.observer:
            self.observer.on_batch(model, n_images)
        try:
            prompts = [w.req.prompt for w in batch for _ in w.seeds]
            t0 = time.perf_counter()
            cond = self.cache.get_many(model, pipe, prompts)
            uncond = None
            if pipe.uses_cfg(head.guidance):
                neg = [w.req.negative_prompt or "" for w in batch for _ in w.seeds]
                uncond = self.cache.get_many(model + "\0neg", pipe, neg, pipe.negative_embeds)
            self._sync(pipe)
            t1 = time.perf_counter()
            gens = [torch.Generator("cpu").manual_seed(s) for w in batch for s in w.seeds]
            latents = pipe.denoise(cond, gens, head.height, head.width, head.steps, head.guidance, uncond)
            self._sync(pipe)
            t2 = time.perf_counter()
            images = pipe.decode(latents).cpu().numpy()  # [B, H, W, 3] uint8; .cpu() synchronizes
            t3 = time.perf_counter()
        except Exception as e:  # a failed batch fails its requests, never the engine
            log.exception("batch failed")
            with self._cv:
                self._running -= n_images
                self._report_queue()
            for w in batch:
                w.future.set_result(GenerateOutput(w.req.request_id, [], w.seeds, {}, model, e))
            return [w.future for w in batch]

        stage = {"encode_prompt_ms": (t1 - t0) * 1e3, "denoise_ms": (t2 - t1) * 1e3, "decode_ms": (t3 - t2) * 1e3}
        offset = 0
        for w in batch:
            imgs = images[offset: offset + len(w.seeds)]
            offset += len(w.seeds)
            self._pool.submit(self._finish, w, imgs, dict(stage, queue_ms=(start - w.req.arrival) * 1e3),
                              n_images, t3)
        return [w.future for w in batch]

    def _finish(self, w: _Work, imgs: np.ndarray, timings: dict, batch_size: int, t_decoded: float) -> None:
        try:
            fmt = w.req.output_format
            data = list(imgs) if fmt == "raw" else [encode_image(im, fmt) for im in imgs]
            done = time.perf_counter()
            timings["encode_image_ms"] = (done - t_decoded) * 1e3
            timings["total_ms"] = (done - w.req.arrival) * 1e3
            timings["batch_size"] = batch_size
            out = GenerateOutput(w.req.request_id, data, w.seeds, timings, w.req.model)
        except Exception as e:
            out = GenerateOutput(w.req.request_id, [], w.seeds, timings, w.req.model, e)
        with self._cv:
            self._running -= len(w.seeds)
            self._report_queue()
        if self.observer:
            self.observer.on_output(out)
        w.future.set_result(out)

    def step(self) -> list[GenerateOutput]:
        """Run one batch of whatever is waiting (no batching wait) and return its finished outputs."""
        with self._cv:
            batch = self._schedule()
        if not batch:
            return []
        return [f.result() for f in self._execute(batch)]

    # -- serving loop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fewstep-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        max_wait = self.config.batching.max_wait_ms / 1e3
        limit = self.config.batching.max_batch_size
        while True:
            with self._cv:
                while not self._waiting and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                # Give the head request up to max_wait for compatible company, unless the batch is already full.
                deadline = self._waiting[0].req.arrival + max_wait
                while not self._stop:
                    key = self._waiting[0].key
                    ready = sum(len(w.seeds) for w in self._waiting if w.key == key)
                    left = deadline - time.perf_counter()
                    if ready >= limit or left <= 0:
                        break
                    self._cv.wait(left)
                batch = self._schedule()
            if batch:
                self._execute(batch)

    def warmup(self) -> None:
        """One tiny generation per model, so first-request latency excludes lazy init (cuDNN handles, ...)."""
        for name, pipe in self.pipelines.items():
            for _ in range(2):
                fut = self.add_request(GenerateRequest(prompt="warm-up", model=name, seed=0, output_format="raw"))
                while not fut.done():
                    self.step()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)


class AsyncEngine:
    """asyncio face of an EngineCore running in its own thread."""

    def __init__(self, core: EngineCore):
        self.core = core

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        fut = self.core.add_request(req)  # raises EngineError synchronously for bad requests
        out = await asyncio.wrap_future(fut)
        if out.error is not None:
            raise out.error
        return out
