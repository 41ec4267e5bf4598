"""The image scheduler: the queue of image requests, admission by estimated work, deadlines, abort, and which
batch runs next. The image counterpart of engines/stream/scheduler.py's ``StreamScheduler``; ``EngineCore`` asks
both what is ready and alternates between them.

Batching: the oldest waiting request fixes the batch key (model, size, steps, guidance, image-to-image strength
or none); compatible requests join,
FIFO, until ``max_batch_size`` images. A batch is ready once it is full or its head has waited ``max_wait`` for
company. The runner may prefer several sub-batches (``Runner.batch_plan``: 2 images as 1+1 rather than padded to
a bucket of 4): then only the first is taken and the rest keep their place.

Admission happens before the queue: work beyond the bound is a 503 with ``retry_after``. The bound is on
estimated work (``ImageWork.cost``: pixels x steps x n, x2 with CFG, in native-size 1-step images), in seconds
once warm-up has timed a native image (``calibrated_unit_s``). Queued work past its deadline is dropped unrun
(504); ``abort`` removes queued work or marks a running request so that its result is discarded.

Locking: the scheduler shares the engine's condition variable (one lock for both queues and the engine thread's
wait), passed in as ``cv``. ``ready`` and ``schedule`` expect the caller to hold it; the other methods take it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import BatchingConfig
from .errors import EngineError, cancelled, overloaded
from .request import GenerateOutput, GenerateRequest

if TYPE_CHECKING:
    from .pipeline import NagParams
    from .runner import Runner


@dataclass
class ImageWork:
    """A validated request: defaults resolved, seeds drawn, its cost and deadline fixed."""

    req: GenerateRequest
    seeds: list[int]
    steps: int
    guidance: float
    height: int
    width: int
    future: Future = field(default_factory=Future)
    cost: float = 1.0  # native-size 1-step images of work (EngineCore.cost)
    deadline: float = float("inf")  # perf_counter time past which it is dropped unrun
    strength: float | None = None  # image-to-image: the input's noise level; None: text-to-image
    nasa_scale: float | None = None  # NASA's alpha for this request's negative prompt (None: no NASA)
    nag: NagParams | None = None  # NAG's renormalised form instead of plain NASA (with nasa_scale set)

    @property
    def key(self):
        # image-to-image requests batch with each other at the same strength (one schedule, one start step)
        return (self.req.model, self.height, self.width, self.steps, self.guidance, self.strength)

    @property
    def images(self) -> int:
        return len(self.seeds)


class ImageScheduler:
    def __init__(self, runners: dict[str, Runner], config: BatchingConfig, cv: threading.Condition):
        self.runners = runners
        self.config = config
        self.observer = None  # EngineObserver; EngineCore.observer sets it
        self._cv = cv
        self._waiting: deque[ImageWork] = deque()
        self._inflight: dict[str, ImageWork] = {}  # request_id -> work whose batch is running
        self._aborted: dict[str, str] = {}  # request_id (in flight) -> reason; its result is discarded
        self._running = 0  # images in running batches, encoding included
        # seconds per work unit, per model: measured at warm-up (bounds the queue in seconds) and as a moving
        # average of the batches run since (estimates Retry-After)
        self.calibrated_unit_s: dict[str, float] = {}
        self.unit_s: dict[str, float] = {}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return self._running

    def _report(self) -> None:
        if self.observer:
            self.observer.on_queue(len(self._waiting), self._running)

    # -- intake ------------------------------------------------------------------------------------------------
    def add(self, work: ImageWork) -> Future:
        """Queue ``work``, or raise EngineError(503) when the queue's bound on work would be passed."""
        bcfg = self.config
        with self._cv:
            # max_queue_seconds 0: no queue at all. A request is admitted only while the engine is idle, so it
            # starts at once (latency first: under load most requests get an immediate 503 instead of a wait).
            if bcfg.max_queue_seconds == 0 and (self._waiting or self._running):
                est = self.queued_seconds()
                raise overloaded("the server does not queue (max_queue_seconds 0) and is busy",
                                 max(1, math.ceil(est)) if est else 1)
            # A request that finds the queue empty always gets in (n and size are bounded by validation), so any
            # valid request can run on an idle server.
            if self._waiting:
                # seconds per unit: measured on the batches run so far (they amortise what a lone warm-up image
                # cannot), else the warm-up's timing
                cal = {**self.calibrated_unit_s, **self.unit_s}
                if bcfg.max_queue_seconds is not None and all(w.req.model in cal for w in self._waiting) \
                        and work.req.model in cal:
                    queued = sum(w.cost * cal[w.req.model] for w in self._waiting)
                    # Whatever the calibration says (one warm-up timing, noisy on a loaded host), the queue always
                    # holds one full batch of native images, so that batching still forms full batches under a
                    # tight bound. A latency-first server sets a small max_batch_size and max_queue_seconds: with
                    # --max-batch-size 1 a request is admitted only while nothing else waits.
                    small = sum(w.cost for w in self._waiting) + work.cost <= bcfg.max_batch_size
                    full = not small and queued + work.cost * cal[work.req.model] > bcfg.max_queue_seconds
                    what = f"~{queued:.1f} s of work queued, the limit is {bcfg.max_queue_seconds:g} s"
                else:
                    queued = sum(w.cost for w in self._waiting)
                    full = queued + work.cost > bcfg.max_queue_work
                    what = f"{queued:g} native-image steps of work queued, the limit is {bcfg.max_queue_work:g}"
                if full:
                    est = self.queued_seconds()
                    raise overloaded(what, max(1, math.ceil(est)) if est is not None else 1)
            self._waiting.append(work)
            self._report()
            self._cv.notify()
        return work.future

    def queued_seconds(self) -> float | None:
        """Estimated seconds of the waiting work, or None while some model in the queue has no measurement."""
        total = 0.0
        for w in self._waiting:
            unit = self.unit_s.get(w.req.model) or self.calibrated_unit_s.get(w.req.model)
            if unit is None:
                return None
            total += w.cost * unit
        return total

    def abort(self, request_id: str, reason: str = "disconnect") -> bool:
        """Queued: the work leaves the queue and never runs. Running: its result is discarded when its batch ends.
        Returns whether the request was found."""
        with self._cv:
            work = next((w for w in self._waiting if w.req.request_id == request_id), None)
            if work is not None:
                self._waiting.remove(work)
                self._report()
            elif request_id in self._inflight:
                self._aborted[request_id] = reason
                return True
            else:
                return False
        self.cancel(work, reason, "queued")
        return True

    def cancel(self, w: ImageWork, reason: str, stage: str) -> None:
        """Resolve ``w`` with its refusal: 504 past its deadline, else 499 (cancelled)."""
        if reason == "deadline":
            waited = (time.perf_counter() - w.req.arrival) * 1e3
            err = EngineError(f"the request's deadline ({(w.deadline - w.req.arrival) * 1e3:.0f} ms) passed after "
                              f"{waited:.0f} ms {'in the queue; nothing ran' if stage == 'queued' else 'running'}",
                              504, None, "deadline_exceeded")
        else:
            err = cancelled(reason)
        if self.observer and hasattr(self.observer, "on_cancelled"):
            self.observer.on_cancelled(w.req.model, reason, stage)
        if not w.future.done():
            w.future.set_result(GenerateOutput(w.req.request_id, [], w.seeds, {}, w.req.model, err))

    # -- what runs next (caller holds cv) ----------------------------------------------------------------------
    def ready(self, now: float, max_wait: float) -> tuple[bool, float | None]:
        """(whether a batch is ready, seconds until the head's wait for company ends; None: nothing waits).
        ``max_wait`` 0: any waiting request is ready (``EngineCore.step`` never waits)."""
        if not self._waiting:
            return False, None
        head = self._waiting[0]
        wait = head.req.arrival + max_wait - now
        if max_wait <= 0 or wait <= 0:
            return True, 0.0
        queued = sum(w.images for w in self._waiting if w.key == head.key)
        return queued >= self.config.max_batch_size, wait

    def schedule(self, now: float) -> list[ImageWork]:
        """Take the oldest request and every compatible one that fits (FIFO within the key). Work past its deadline
        leaves the queue first, unrun; [] when nothing live is left."""
        expired = [w for w in self._waiting if w.deadline <= now]
        if expired:
            self._waiting = deque(w for w in self._waiting if w.deadline > now)
            self._report()
            for w in expired:
                self.cancel(w, "deadline", "queued")
        if not self._waiting:
            return []
        order = list(self._waiting)
        head = order[0]

        def fill(cap: int) -> tuple[list[ImageWork], int]:
            batch, images = [head], head.images
            for w in order[1:]:
                if w.key == head.key and images + w.images <= cap:
                    batch.append(w)
                    images += w.images
            return batch, images

        batch, images = fill(self.config.max_batch_size)
        # The runner may run these images cheaper as several sub-batches than padded to one bucket: take only the
        # first sub-batch; the rest keep their place in the queue for the next step, where newcomers can join them.
        target = self.runners[head.req.model].batch_plan(images, head.height, head.width, head.steps)[0]
        if target < images:
            batch, _ = fill(target)
        taken = set(map(id, batch))
        self._waiting = deque(w for w in order if id(w) not in taken)
        for w in batch:
            self._inflight[w.req.request_id] = w
        return batch

    # -- a batch's life after scheduling -----------------------------------------------------------------------
    def started(self, batch: list[ImageWork]) -> None:
        with self._cv:
            self._running += sum(w.images for w in batch)
            self._report()

    def landed(self, w: ImageWork) -> str | None:
        """``w``'s batch ran: it leaves the in-flight set. Returns the abort reason if its client left meanwhile."""
        with self._cv:
            self._inflight.pop(w.req.request_id, None)
            return self._aborted.pop(w.req.request_id, None)

    def done(self, w: ImageWork) -> None:
        """``w``'s images are answered (or discarded): they stop counting as running."""
        with self._cv:
            self._running -= w.images
            self._report()

    def failed(self, batch: list[ImageWork]) -> None:
        with self._cv:
            self._running -= sum(w.images for w in batch)
            self._report()
            for w in batch:
                self._inflight.pop(w.req.request_id, None)
                self._aborted.pop(w.req.request_id, None)

    def record(self, model: str, seconds: float, cost: float) -> None:
        """A batch of ``cost`` work units took ``seconds``: the moving average that estimates Retry-After (batching
        amortises overheads, so measured batches beat the warm-up's lone image)."""
        unit = seconds / max(cost, 1e-9)
        prev = self.unit_s.get(model)
        self.unit_s[model] = unit if prev is None else 0.8 * prev + 0.2 * unit
