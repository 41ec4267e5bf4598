"""EngineCore: owns the device and runs ``step()`` = schedule -> run -> emit.

It runs without HTTP: tests add requests and call ``step()`` directly. The server drives the same object from a
dedicated thread (``EngineCore.start``), so the asyncio loop never touches the GPU; ``AsyncEngine`` bridges
results back to the loop.

Batching: the oldest waiting request fixes the batch key (model, size, steps, guidance, CFG); compatible requests
join until ``max_batch_size`` images. In the serving loop the first request waits up to ``max_wait_ms`` for
company. Each image keeps its own generator, so batching never changes a result.

Streams: a video model (``model_index.json``: ``fewstep.kind == "video"``) serves stream sessions
(``open_stream`` / ``update_prompt`` / ``close_stream``); engines/stream/ holds the sessions, the moving-buffer
policy and the round-robin session scheduler. The same engine thread runs image batches and stream steps; when
both are ready it alternates between them, so neither kind of traffic can starve the other.

Admission happens before the queue (``add_request`` / ``open_stream``): a size the model does not serve
(engines/sizes.py) is a 400; work beyond the queue's bound is a 503 with ``retry_after`` (engines/scheduler.py's
``ImageScheduler`` holds the image queue, its bound, deadlines and aborts). Every image request has a deadline
(``batching.request_timeout_s`` or its own ``timeout_s``): queued work past it is dropped unrun (504). ``abort``
(vLLM's ``abort_request``) removes queued work or discards a running batch's result; ``AsyncEngine.generate`` calls
it when its task is cancelled (the client disconnected).

The models run through runners (engines/runner.py: eager, compiled or TensorRT); what each serves comes from its
``capabilities``. Errors are engines/errors.py's, re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol

import numpy as np
import torch

from .config import EngineConfig, StreamConfig
from .encode import encode_image, encode_jpeg_gpu, gpu_jpeg_available
from .errors import EngineError, model_not_found
from .init_image import fit_image
from .pipeline import NAG_RANGES, NagParams, NasaInput, PromptEmbeds
from .request import GenerateOutput, GenerateRequest
from .runner import Runner
from .scheduler import ImageScheduler, ImageWork
from .sizes import ServedSizes
from .stream import FRAME_FORMATS, Outbox, StreamChunk, StreamScheduler, StreamSession, StreamStart

log = logging.getLogger("fewstep.engines")

STAGES = ("queue", "encode_prompt", "denoise", "decode", "encode_image")


# -- admission checks of streams, shared with the engine process's server side (engines/process.py), which answers
# a stream's updates without a round trip to the engine ------------------------------------------------------------
def check_prompt(prompt: str | None) -> None:
    if not prompt or not prompt.strip():
        raise EngineError("prompt must be a non-empty string", 400, "prompt", "invalid_prompt")


def check_strength(strength: float) -> None:
    if not 0.0 < float(strength) <= 1.0:
        raise EngineError(f"strength must be in (0, 1], got {strength:g}", 400, "strength", "invalid_strength")


def check_frame_format(fmt: str) -> None:
    if fmt not in FRAME_FORMATS:
        raise EngineError(f"format must be one of {list(FRAME_FORMATS)}, got {fmt!r}", 400, "format",
                          "invalid_format")


def check_fps(cfg: StreamConfig, fps: float, allow_unpaced: bool) -> None:
    """0 (unpaced, streams only) or a rate from stream.min_fps to stream.max_fps; raises EngineError(400)."""
    if (fps == 0 and allow_unpaced) or cfg.min_fps <= fps <= cfg.max_fps:
        return
    lead = "0 (unpaced) or " if allow_unpaced else ""
    raise EngineError(f"fps must be {lead}from {cfg.min_fps:g} to {cfg.max_fps:g}, got {fps:g}", 400, "fps",
                      "invalid_fps")


def check_stream_guidance(model: str, guidance_modes: tuple[str, ...], negative_prompt: str | None,
                          nasa_scale: float | None, nag_fields: dict[str, float | None] | None = None) -> None:
    """Streams take negative prompts through NASA only (one pass per step, no CFG), plain or in NAG's form."""
    what = f"model {model!r} supports guidance modes {', '.join(guidance_modes)}"
    check_nag_fields(nasa_scale, nag_fields)
    given = "nasa_scale" if nasa_scale is not None else next((k for k, v in (nag_fields or {}).items()
                                                              if v is not None), None)
    if given is not None and not (negative_prompt and negative_prompt.strip()):
        raise EngineError(f"{given} needs a negative_prompt", 400, given, "invalid_guidance")
    if negative_prompt and negative_prompt.strip() and "nasa" not in guidance_modes:
        raise EngineError(f"negative_prompt is not supported on streams of this model: {what}", 400,
                          "negative_prompt", "invalid_guidance")


class EngineObserver(Protocol):
    """What the engine reports; the server's metrics implement it. The engine itself imports no metrics lib."""

    def on_batch(self, model: str, images: int) -> None: ...
    def on_queue(self, waiting: int, running: int) -> None: ...
    def on_output(self, out: GenerateOutput) -> None: ...
    def on_stream_step(self, model: str, sessions: int, frames: int) -> None: ...
    def on_frames_dropped(self, model: str, frames: int, reason: str) -> None: ...
    def on_sessions(self, active: int) -> None: ...
    def on_cancelled(self, model: str, reason: str, stage: str) -> None: ...


class PromptCache:
    """LRU of per-prompt embeddings (one row each, on the device), keyed by (model, prompt)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict[tuple[str, str], PromptEmbeds] = OrderedDict()
        self.hits = self.misses = 0

    def get_many(self, model: str, pipe: Runner, prompts: list[str],
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


class _StageMarks:
    """Boundaries of one batch's stages (text encoding, denoising, decoding [, copy to the host]): host clock
    readings after a device sync when stages run in sequence (exact per stage), or CUDA events when they overlap
    (no host sync; read once the last event has completed)."""

    def __init__(self, device: torch.device, events: bool):
        self.device, self.events = device, events and device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.events:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())

    def wait(self) -> None:
        if self.events:
            self.marks[-1].synchronize()

    def last_host(self) -> float:
        return self.marks[-1]

    def stage_ms(self) -> dict[str, float]:
        m = self.marks
        if self.events:
            ms = [m[0].elapsed_time(m[1]), m[1].elapsed_time(m[2]), m[2].elapsed_time(m[-1])]
        else:
            ms = [(m[1] - m[0]) * 1e3, (m[2] - m[1]) * 1e3, (m[-1] - m[2]) * 1e3]
        return dict(zip(("encode_prompt_ms", "denoise_ms", "decode_ms"), ms))


def check_nag_fields(nasa_scale: float | None, nag_fields: dict[str, float | None] | None) -> NagParams | None:
    """NAG's parameters from a request's nag_scale / nag_tau / nag_alpha (the ones left out: DEFAULT_NAG_*), None
    where none is given; a 400 for a value outside NAG_RANGES or for nasa_scale beside them."""
    given = {k: v for k, v in (nag_fields or {}).items() if v is not None}
    if not given:
        return None
    if nasa_scale is not None:
        raise EngineError(f"nasa_scale (plain NASA) and {', '.join(given)} (NAG's renormalised form) do not combine; "
                          "give one of them", 400, "nasa_scale", "invalid_guidance")
    for k, v in given.items():
        lo, hi = NAG_RANGES[k]
        if not lo <= float(v) <= hi:
            raise EngineError(f"{k} must be from {lo:g} to {hi:g}, got {float(v):g}", 400, k, "invalid_guidance")
    return NagParams.of(given.get("nag_scale"), given.get("nag_tau"), given.get("nag_alpha"))


class EngineCore:
    def __init__(self, pipelines: dict[str, Runner], config: EngineConfig | None = None,
                 observer: EngineObserver | None = None):
        if not pipelines:
            raise ValueError("EngineCore needs at least one pipeline")
        self.pipelines = pipelines  # model name -> Runner
        caps = {name: runner.capabilities for name, runner in pipelines.items()}
        # requests that name no model: images go to the first image model, streams to the first video model (a
        # server of both embedded models serves each kind without the client naming one)
        image = [n for n, c in caps.items() if c.kind != "video"]
        video = [n for n, c in caps.items() if c.kind == "video"]
        self.default_model = (image or video)[0]
        self.default_stream_model = (video or image)[0]
        self.config = config or EngineConfig()
        self.cache = PromptCache(self.config.prompt_cache_size)
        self.sizes: dict[str, ServedSizes] = {
            name: ServedSizes.from_config(self.config.sizes) if self.config.sizes else c.sizes
            for name, c in caps.items()}
        self._cv = threading.Condition()
        self.images = ImageScheduler(pipelines, self.config.batching, self._cv)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(self.config.encode_workers, thread_name_prefix="fewstep-encode")
        self.streams: dict[str, StreamScheduler] = {
            name: StreamScheduler(name, pipe, self.config.stream, self.cache, self._pool.submit, self._wake)
            for name, pipe in pipelines.items() if caps[name].kind == "video"}
        self._images_turn = True  # who goes first when an image batch and a stream step are both ready
        self._nvjpeg_failed = False
        # overlapped stages (_execute): one landing thread, and at most two batches enqueued ahead of it
        self._lander = ThreadPoolExecutor(1, thread_name_prefix="fewstep-land")
        self._landing_slots = threading.BoundedSemaphore(2)
        self._jpeg_stream = None
        self.observer = observer
        if self.config.gpu_jpeg == "on" and not any(gpu_jpeg_available(p.device) for p in pipelines.values()):
            raise ValueError("gpu_jpeg 'on' needs a CUDA pipeline and torchvision with nvjpeg; use 'auto' or 'off'")

    @property
    def observer(self) -> EngineObserver | None:
        return self._observer

    @observer.setter
    def observer(self, observer: EngineObserver | None) -> None:
        self._observer = self.images.observer = observer

    @property
    def calibrated_unit_s(self) -> dict[str, float]:
        """Seconds per native-size 1-step image, per model, timed at warm-up (bounds the queue in seconds)."""
        return self.images.calibrated_unit_s

    # -- intake ------------------------------------------------------------------------------------------------
    def validate(self, req: GenerateRequest) -> ImageWork:
        """Resolve defaults and check the request against the model; raises EngineError with a helpful message."""
        model = req.model or self.default_model
        if model not in self.pipelines:
            raise model_not_found(model, self.pipelines)
        req.model = model
        caps = self.pipelines[model].capabilities
        if model in self.streams:
            raise EngineError(f"model {model!r} is a video model; use the WebSocket /v1/stream or POST /v1/videos",
                              400, "model", "video_model")
        dh, dw = self.sizes[model].default(caps.default_size)
        h = dh if req.height is None else req.height  # 0 is a size (refused below), not "default"
        w = dw if req.width is None else req.width
        self.check_size(model, h, w)
        strength = None
        pipe = self.pipelines[model]
        if req.image is not None:
            strength = float(req.strength)
            if not caps.img2img:
                raise EngineError(f"model {model!r} on the {caps.backend} backend does not run image-to-image", 400,
                                  "image", "img2img_unsupported")
            check_strength(strength)
            steps = req.steps or pipe.img2img_default_steps(strength)
            try:
                pipe.img2img_schedule(steps, strength)
            except ValueError as e:
                raise EngineError(str(e), 400, "strength", "invalid_strength") from None
        else:
            steps = req.steps or caps.default_steps
        guidance = caps.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
        max_n = self.config.batching.max_batch_size * 4
        # a request runs as one batch: runners with a fixed profile (TensorRT) cap it at their batch max
        max_n = min(max_n, caps.max_images_per_batch or max_n)
        if req.n > max_n:
            raise EngineError(f"n must be at most {max_n} on this server", 400, "n", "invalid_n")
        base = req.seed if req.seed is not None else secrets.randbelow(2**62)
        # image i of a request uses seed + i, so n=4 at seed s reproduces four n=1 requests at s..s+3.
        seeds = [base + i for i in range(req.n)]
        bcfg = self.config.batching
        timeout = bcfg.request_timeout_s if req.timeout_s is None else float(req.timeout_s)
        if not 0 < timeout <= bcfg.max_request_timeout_s:
            raise EngineError(f"the deadline must be from 1 ms to {bcfg.max_request_timeout_s * 1e3:.0f} ms, got "
                              f"{timeout * 1e3:g} ms", 400, "deadline", "invalid_deadline")
        nag_fields = {"nag_scale": req.nag_scale, "nag_tau": req.nag_tau, "nag_alpha": req.nag_alpha}
        nasa_scale, nag = self.check_guidance(model, guidance, req.negative_prompt, req.nasa_scale, nag_fields)
        run = steps if strength is None else pipe.img2img_steps(steps, strength)  # denoiser steps that run
        return ImageWork(req, seeds, steps, guidance, h, w, Future(), self.cost(model, h, w, run, guidance, req.n),
                         req.arrival + timeout, strength=strength, nasa_scale=nasa_scale, nag=nag)

    def check_guidance(self, model: str, guidance: float, negative_prompt: str | None, nasa_scale: float | None,
                       nag_fields: dict[str, float | None] | None = None) -> tuple[float | None, NagParams | None]:
        """Admission by guidance mode: a negative prompt goes to CFG where this guidance scale runs CFG, else to
        NASA where the model has it; anything else is a 400 naming what the model supports. Returns the NASA scale
        the request runs with (None: no NASA) and, where it asked for NAG's renormalised form (``nag_fields``:
        nag_scale / nag_tau / nag_alpha, None where not given), its parameters."""
        runner = self.pipelines[model]
        modes = runner.capabilities.guidance_modes
        has_neg = bool(negative_prompt and negative_prompt.strip())
        cfg = runner.uses_cfg(guidance)
        what = f"model {model!r} supports guidance modes {', '.join(modes)}"
        nag = check_nag_fields(nasa_scale, nag_fields)
        given = "nasa_scale" if nasa_scale is not None else next((k for k, v in (nag_fields or {}).items()
                                                                  if v is not None), None)
        if given is not None:
            if not has_neg:
                raise EngineError(f"{given} needs a negative_prompt", 400, given, "invalid_guidance")
            if cfg:
                raise EngineError(f"{given} applies to NASA, but at guidance_scale {guidance:g} the negative prompt "
                                  f"runs through CFG; use guidance_scale <= 1 for NASA ({what})", 400, given,
                                  "invalid_guidance")
            if "nasa" not in modes:
                raise EngineError(f"{given} is not supported: {what}", 400, given, "invalid_guidance")
        if not has_neg or cfg:
            return None, None
        if "nasa" in modes:
            from .pipeline import DEFAULT_NASA_SCALE

            return (DEFAULT_NASA_SCALE if nasa_scale is None else float(nasa_scale)), nag
        hint = "a guidance_scale above 1 (CFG)" if "cfg" in modes else "no negative_prompt"
        raise EngineError(f"negative_prompt is not supported at guidance_scale {guidance:g}: {what}; use {hint}",
                          400, "negative_prompt", "invalid_guidance")

    def check_size(self, model: str, height: int, width: int) -> None:
        """Admission by size: what the model's architecture can run, then the sizes it serves (engines/sizes.py)."""
        try:
            self.pipelines[model].check_size(height, width)
            self.sizes[model].check(height, width)
        except ValueError as e:
            raise EngineError(str(e), 400, "size", "invalid_size") from None

    def cost(self, model: str, height: int, width: int, steps: int, guidance: float, n: int = 1) -> float:
        """Estimated work in native-size 1-step images: pixels x steps x n, twice with CFG (two denoiser passes)."""
        runner = self.pipelines[model]
        cfg = 2 if runner.uses_cfg(guidance) else 1
        return height * width / runner.capabilities.default_size ** 2 * steps * n * cfg

    def add_request(self, req: GenerateRequest) -> Future:
        """Validate and queue ``req``; raises EngineError (400/404 invalid, 503 with retry_after at capacity)."""
        return self.images.add(self.validate(req))

    def abort(self, request_id: str, reason: str = "disconnect") -> bool:
        """Cancel a request (vLLM's ``abort_request``): queued, it leaves the queue and never runs; in a running
        batch, its result is discarded. Its future resolves with a 'cancelled' error. Returns whether it was found."""
        return self.images.abort(request_id, reason)

    @property
    def num_waiting(self) -> int:
        return self.images.num_waiting

    # -- streams -----------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _stream_model(self, model: str | None) -> tuple[str, StreamScheduler]:
        model = model or self.default_stream_model
        if model not in self.pipelines:
            raise model_not_found(model, self.pipelines)
        if model not in self.streams:
            raise EngineError(f"model {model!r} is an image model; streams need a video model (use "
                              "/v1/images/generations or the WebSocket /v1/realtime)", 400, "model", "image_model")
        return model, self.streams[model]

    def open_stream(self, start: StreamStart) -> StreamSession:
        """Validate and register a stream session; the engine thread encodes its prompt and starts its buffer."""
        model, sched = self._stream_model(start.model)
        caps = sched.pipe.capabilities
        check_prompt(start.prompt)
        dh, dw = self.sizes[model].default(caps.default_size)
        h = dh if start.height is None else start.height
        w = dw if start.width is None else start.width
        self.check_size(model, h, w)
        cfg = self.config.stream
        fps = caps.fps if start.fps is None else float(start.fps)
        self.check_fps(fps, allow_unpaced=True)
        check_frame_format(start.format)
        if start.max_frames is not None and not 1 <= start.max_frames <= cfg.max_video_frames:
            raise EngineError(f"num_frames must be from 1 to {cfg.max_video_frames}", 400, "num_frames",
                              "invalid_num_frames")
        if start.input not in ("text", "frames"):
            raise EngineError(f'input must be "text" or "frames", got {start.input!r}', 400, "input", "invalid_input")
        if start.input == "frames":
            check_strength(start.strength)
            if sched.pipe.vae is not None:
                raise EngineError(f'model {model!r} is a latent video model; "input": "frames" needs a pixel-space '
                                  "one (the embedded default video model)", 400, "input", "frames_unsupported")
        check_stream_guidance(model, caps.guidance_modes, start.negative_prompt, start.nasa_scale,
                              {"nag_scale": start.nag_scale, "nag_tau": start.nag_tau, "nag_alpha": start.nag_alpha})
        seed = start.seed if start.seed is not None else secrets.randbelow(2**62)
        session = StreamSession(start, model, h, w, seed, fps, cfg.outbox_chunks, cfg.session_id_prefix)
        sched.add(session)  # raises EngineError(503) at capacity
        self._report_sessions()
        self._wake()
        return session

    def check_fps(self, fps: float, allow_unpaced: bool) -> None:
        check_fps(self.config.stream, fps, allow_unpaced)

    def _find_stream(self, session_id: str) -> tuple[StreamScheduler, StreamSession] | None:
        for sched in self.streams.values():
            s = sched.get(session_id)
            if s is not None:
                return sched, s
        return None

    def stream_session(self, session_id: str) -> StreamSession | None:
        found = self._find_stream(session_id)
        return found[1] if found else None

    def update_prompt(self, session_id: str, prompt: str | None, negative_prompt: str | None = None,
                      nasa_scale: float | None = None, nag_fields: dict[str, float | None] | None = None) -> None:
        """The new prompt conditions the session's next step (its next chunk) and blends in over
        ``stream.transition_steps`` steps; a new negative prompt ("" clears it) and NASA scale apply from that step
        on; ``nasa_scale`` switches the session to plain NASA, any of ``nag_fields`` (nag_scale / nag_tau /
        nag_alpha) to NAG's renormalised form. None leaves a field as it is. Several updates before that step: the
        newest wins."""
        if prompt is not None:
            check_prompt(prompt)
        found = self._find_stream(session_id)
        if found is None:
            raise EngineError("no such stream session", 404, "session_id", "session_not_found")
        nag_fields = {k: v for k, v in (nag_fields or {}).items() if v is not None}
        if negative_prompt or nasa_scale is not None or nag_fields:
            session = found[1]
            neg = session.negative_prompt if negative_prompt is None else negative_prompt
            check_stream_guidance(session.model, self.pipelines[session.model].capabilities.guidance_modes, neg,
                                  nasa_scale, nag_fields)
        nag = {k.removeprefix("nag_"): v for k, v in (nag_fields or {}).items()}
        if not found[0].update_prompt(session_id, prompt, negative_prompt, nasa_scale, nag):
            raise EngineError("no such stream session", 404, "session_id", "session_not_found")
        self._wake()

    def set_input_frame(self, session_id: str, frame, index: int) -> None:
        """The newest input frame of a ``"frames"`` session ([H, W, 3] uint8 at the session's size, the client's
        frame index): the next chunk entering its buffer starts from it."""
        found = self._find_stream(session_id)
        if found is None or not found[0].set_input_frame(session_id, frame, index):
            raise EngineError("no such stream session", 404, "session_id", "session_not_found")

    def update_strength(self, session_id: str, strength: float) -> None:
        """A ``"frames"`` session's new strength: chunks entering its buffer from the next step on use it."""
        check_strength(strength)
        found = self._find_stream(session_id)
        if found is None or not found[0].set_strength(session_id, strength):
            raise EngineError("no such stream session", 404, "session_id", "session_not_found")

    def close_stream(self, session_id: str, reason: str = "closed") -> bool:
        """Stop a session: it leaves the rotation before the next step, its tensors are freed as soon as no step
        holds them (at most the one in flight). Idempotent; returns whether the session was open."""
        found = self._find_stream(session_id)
        if found is None:
            return False
        sched, session = found
        closed = sched.close(session_id, reason) is not None
        # Chunks generated but never taken by the viewer count as dropped too (reason "closed").
        leftover = sum(o.discard() for o in session.outboxes)
        if leftover and self.observer:
            self.observer.on_frames_dropped(sched.model, leftover, "closed")
        self._report_sessions()
        return closed

    def subscribe(self, session_id: str) -> Outbox | None:
        """An extra viewer's outbox on an open session (MJPEG); None if the id is unknown."""
        found = self._find_stream(session_id)
        if found is None:
            return None
        return found[0].subscribe(session_id, self.config.stream.outbox_chunks)

    def unsubscribe(self, session_id: str, outbox: Outbox) -> None:
        found = self._find_stream(session_id)
        if found is not None:
            found[0].unsubscribe(session_id, outbox)
        outbox.close("unsubscribed")
        leftover = outbox.discard()
        if leftover and self.observer and found is not None:
            self.observer.on_frames_dropped(found[0].model, leftover, "closed")

    @property
    def num_sessions(self) -> int:
        return sum(len(s) for s in self.streams.values())

    def _report_sessions(self) -> None:
        if self.observer:
            self.observer.on_sessions(self.num_sessions)

    def encode_submit(self, fn, *args) -> Future:
        """Run CPU work (image / video encoding) in the engine's encode pool, off the event loop."""
        return self._pool.submit(fn, *args)

    def _stream_wait(self, now: float) -> float | None:
        """Seconds until some session is due (0.0: a stream step is ready now); None: no session is open."""
        waits = [x for x in (sc.next_wakeup(now) for sc in self.streams.values()) if x is not None]
        return min(waits) if waits else None

    def stream_step(self, now: float | None = None) -> list[StreamChunk]:
        """One stream step: a forward pass over the runnable sessions of one video model (round-robin)."""
        now = time.perf_counter() if now is None else now
        for sched in self.streams.values():
            batch = sched.schedule(now)
            if batch:
                return self._run_stream(sched, batch)
        return []

    def _run_stream(self, sched: StreamScheduler, batch: list[StreamSession]) -> list[StreamChunk]:
        res = sched.step(batch)
        if self.observer:
            self.observer.on_stream_step(sched.model, res.sessions, sum(c.num_frames for c in res.chunks))
            if res.dropped_frames:
                self.observer.on_frames_dropped(sched.model, res.dropped_frames, "behind")
        if any(c.final for c in res.chunks) or any(s.closed for s in batch):
            self._report_sessions()
        return res.chunks

    # -- schedule ----------------------------------------------------------------------------------------------
    def _next(self, now: float, max_wait: float) -> tuple[list[ImageWork], bool, float | None]:
        """What runs next, decided in this one place for ``step`` and the serving loop (caller holds _cv):
        (an image batch or [], whether a stream step is due, else seconds until something may be ready or None).
        When an image batch and a stream step are both ready they alternate, so neither starves the other."""
        images_ready, img_wait = self.images.ready(now, max_wait)
        stream_wait = self._stream_wait(now)
        streams_ready = stream_wait == 0.0
        if images_ready and (self._images_turn or not streams_ready):
            batch = self.images.schedule(now)
            if batch:
                self._images_turn = False
                return batch, False, None
            img_wait = None  # everything queued had passed its deadline
        if streams_ready:
            self._images_turn = True
            return [], True, None
        waits = [x for x in (img_wait, stream_wait) if x is not None]
        return [], False, min(waits) if waits else None

    # -- run ---------------------------------------------------------------------------------------------------
    def _overlapping(self, pipe: Runner) -> bool:
        return self.config.overlap_stages == "on" or (self.config.overlap_stages == "auto"
                                                       and pipe.device.type == "cuda")

    def _execute(self, batch: list[ImageWork]) -> list[Future]:
        """Run the GPU stages for a batch; image encoding continues in the pool. Returns the works' futures.

        Stages in sequence (``overlap_stages`` off): the engine thread syncs the device after each stage, so each
        stage's time is exact, and it starts the next batch only once this one's images are on the host. Stages
        overlapped: the engine thread only enqueues (text encoding, denoising, decoding, the copy to pinned host
        memory, then an event) and goes on to the next batch at once; the landing thread waits for the event and
        hands the images to the encode pool. The GPU never idles while the host copies, encodes and answers, and
        the host launches batch N+1 while batch N still runs. Stage times then come from CUDA events."""
        head = batch[0]
        model = head.req.model
        pipe = self.pipelines[model]
        overlap = self._overlapping(pipe)
        start = time.perf_counter()
        n_images = sum(w.images for w in batch)
        if overlap:
            self._landing_slots.acquire()  # bounds the batches enqueued ahead of the host (their memory)
        self.images.started(batch)
        if self.observer:
            self.observer.on_batch(model, n_images)
        marks = _StageMarks(pipe.device, events=overlap)
        try:
            prompts = [w.req.prompt for w in batch for _ in w.seeds]
            marks.mark()
            cond = self.cache.get_many(model, pipe, prompts)
            uncond = nasa = None
            if pipe.uses_cfg(head.guidance):
                neg = [w.req.negative_prompt or "" for w in batch for _ in w.seeds]
                uncond = self.cache.get_many(model + "\0neg", pipe, neg, pipe.negative_embeds)
            elif any(w.nasa_scale is not None for w in batch):
                # NASA per image: requests without a negative prompt ride along with alpha 0 (no steering)
                neg = [w.req.negative_prompt if w.nasa_scale is not None else "" for w in batch for _ in w.seeds]
                alpha = torch.tensor([w.nasa_scale or 0.0 for w in batch for _ in w.seeds])
                nag = NasaInput.nag_rows([w.nag if w.nasa_scale is not None else None for w in batch for _ in w.seeds])
                nasa = NasaInput(self.cache.get_many(model + "\0neg", pipe, neg, pipe.negative_embeds), alpha, nag)
            marks.mark()
            gens = [torch.Generator("cpu").manual_seed(s) for w in batch for s in w.seeds]
            init = None
            if head.strength is not None:  # image-to-image: every request of the batch carries an image
                init = torch.from_numpy(np.stack([fit_image(w.req.image, head.height, head.width)
                                                  for w in batch for _ in w.seeds]))
            extra = {} if nasa is None else {"nasa": nasa}
            if init is not None:
                extra.update(init=init, strength=head.strength)
            latents = pipe.denoise(cond, gens, head.height, head.width, head.steps, head.guidance, uncond, **extra)
            marks.mark()
            decoded = pipe.decode(latents)  # [B, H, W, 3] uint8 on the pipeline's device
            marks.mark()  # in sequence: without the sync the decoder's GPU time would be billed to encode_image
            jpeg_gpu = self._gpu_jpeg(pipe) and all(w.req.output_format == "jpeg" for w in batch)
            if overlap:
                if jpeg_gpu:  # a copy of its own: the next batch's graph replay rewrites the decoder's output
                    pending = decoded.clone()
                else:  # ordered on the stream before the next batch, so no graph output is read late
                    pending = torch.empty(decoded.shape, dtype=decoded.dtype, pin_memory=pipe.device.type == "cuda")
                    pending.copy_(decoded, non_blocking=True)
                marks.mark()  # the landing thread waits for this one
                self._lander.submit(self._land, batch, pending, jpeg_gpu, marks, start, n_images)
                return [w.future for w in batch]
            images, jpeg_gpu = self._to_host(decoded, jpeg_gpu)
            if not jpeg_gpu:
                marks.mark()  # the copy to the host counts as decoding; nvjpeg's time as encode_image
        # Last-resort boundary of the engine thread: a failed batch fails its requests, never the engine.
        except Exception as e:  # noqa: BLE001
            if overlap:
                self._landing_slots.release()
            self._fail(batch, pipe, e)
            return [w.future for w in batch]
        self._hand_out(batch, images, jpeg_gpu, marks.stage_ms(), start, n_images, marks.last_host())
        return [w.future for w in batch]

    def _to_host(self, decoded: torch.Tensor, jpeg_gpu: bool) -> tuple[object, bool]:
        """The decoded batch on the host: JPEG bytes from nvjpeg, else uint8 arrays. (images, still jpeg_gpu)."""
        if jpeg_gpu:  # the batch leaves the GPU already compressed; timed as encode_image
            try:
                return encode_jpeg_gpu(decoded), True
            # Deliberate fallback: any nvjpeg failure (a torchvision without nvjpeg for this GPU, a CUDA error,
            # an older encode_jpeg without batches) hands JPEG encoding to the CPU encoder for good.
            except Exception:  # noqa: BLE001
                log.exception("nvjpeg encoding failed; JPEG responses are encoded on the CPU from now on")
                self._nvjpeg_failed = True
        return decoded.cpu().numpy(), False  # .cpu() synchronizes

    def _land(self, batch: list[ImageWork], pending: torch.Tensor, jpeg_gpu: bool, marks: "_StageMarks",
              start: float, n_images: int) -> None:
        """Landing thread (overlapped stages): wait for the batch's last event, then answer as in sequence."""
        try:
            marks.wait()
            landed = time.perf_counter()
            if jpeg_gpu:
                with torch.cuda.stream(self._side_stream(pending.device)):
                    pending.record_stream(torch.cuda.current_stream(pending.device))
                    images, jpeg_gpu = self._to_host(pending, True)
            else:
                images = pending.numpy()
        # Last-resort boundary of the landing thread: an asynchronous CUDA error surfaces here; it fails this
        # batch's requests (and is logged), never the thread.
        except Exception as e:  # noqa: BLE001
            self._fail(batch, self.pipelines[batch[0].req.model], e)
            return
        finally:
            self._landing_slots.release()
        self._hand_out(batch, images, jpeg_gpu, marks.stage_ms(), start, n_images, landed)

    def _side_stream(self, device: torch.device):
        if self._jpeg_stream is None:
            self._jpeg_stream = torch.cuda.Stream(device)
        return self._jpeg_stream

    def _fail(self, batch: list[ImageWork], pipe: Runner, e: Exception) -> None:
        head = batch[0]
        n_images = sum(w.images for w in batch)
        if isinstance(e, torch.OutOfMemoryError):
            # The allocator's text (sizes, fragmentation hints) is for the log, not the client.
            log.error("out of device memory in a batch of %d images at %dx%d, %d steps: %s", n_images,
                      head.width, head.height, head.steps, e)
            e = EngineError(f"the server ran out of device memory running a batch of {n_images} image(s) at "
                            f"{head.width}x{head.height}; retry, or ask for fewer images", 503, None,
                            "out_of_memory", retry_after=1)
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()  # give back the failed batch's cached blocks before the next one
        else:
            log.exception("batch failed", exc_info=e)
        self.images.failed(batch)
        for w in batch:
            w.future.set_result(GenerateOutput(w.req.request_id, [], w.seeds, {}, head.req.model, e))

    def _hand_out(self, batch: list[ImageWork], images, jpeg_gpu: bool, stage: dict, start: float, n_images: int,
                  t_decoded: float) -> None:
        """The batch's images are on the host: record its time, then encode and answer each request in the pool."""
        model = batch[0].req.model
        self.images.record(model, (stage["encode_prompt_ms"] + stage["denoise_ms"] + stage["decode_ms"]) / 1e3,
                           sum(w.cost for w in batch))  # for Retry-After
        offset = 0
        for w in batch:
            imgs = images[offset: offset + len(w.seeds)]
            offset += len(w.seeds)
            self._pool.submit(self._finish, w, imgs, dict(stage, queue_ms=(start - w.req.arrival) * 1e3),
                              n_images, t_decoded, jpeg_gpu)

    def _gpu_jpeg(self, pipe) -> bool:
        return self.config.gpu_jpeg != "off" and not self._nvjpeg_failed and gpu_jpeg_available(pipe.device)

    def _finish(self, w: ImageWork, imgs, timings: dict, batch_size: int, t_decoded: float,
                encoded: bool = False) -> None:
        aborted = self.images.landed(w)
        if aborted is not None:  # its client left while the batch ran: no encoding, no output, counted apart
            self.images.done(w)
            self.images.cancel(w, aborted, "running")
            return
        try:
            fmt = w.req.output_format
            if encoded:  # JPEG bytes from the GPU
                data = list(imgs)
            else:
                data = list(imgs) if fmt == "raw" else [encode_image(im, fmt) for im in imgs]
            done = time.perf_counter()
            timings["encode_image_ms"] = (done - t_decoded) * 1e3
            timings["total_ms"] = (done - w.req.arrival) * 1e3
            timings["batch_size"] = batch_size
            out = GenerateOutput(w.req.request_id, data, w.seeds, timings, w.req.model, arrival=w.req.arrival,
                                 done=done)
        # Last-resort boundary (an encode-pool worker): whatever fails reaches the request as its error, or its
        # client would wait forever.
        except Exception as e:  # noqa: BLE001
            out = GenerateOutput(w.req.request_id, [], w.seeds, timings, w.req.model, e)
        self.images.done(w)
        if self.observer:
            self.observer.on_output(out)
        w.future.set_result(out)

    def step(self) -> list[GenerateOutput | StreamChunk]:
        """Run one unit of work, with no batching wait: an image batch or a stream step, alternating when both
        are ready. Returns the finished image outputs or the emitted stream chunks."""
        now = time.perf_counter()
        with self._cv:
            batch, stream, _ = self._next(now, 0.0)
        if batch:
            return [f.result() for f in self._execute(batch)]
        if stream:
            return list(self.stream_step(now))
        return []

    # -- serving loop ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fewstep-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        max_wait = self.config.batching.max_wait_ms / 1e3
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    now = time.perf_counter()
                    batch, stream, wait = self._next(now, max_wait)
                    if batch or stream:
                        break
                    self._cv.wait(wait)
            if batch:
                self._execute(batch)
            else:
                self.stream_step(now)  # picks nothing if the due session closed meanwhile: the loop re-checks

    def warmup(self) -> None:
        """One tiny generation per model, so first-request latency excludes lazy init (cuDNN handles, ...)."""
        for name, pipe in self.pipelines.items():
            if name in self.streams:  # a video model: run a short unpaced stream through ramp-up and emission
                s = self.open_stream(StreamStart(prompt="warm-up", model=name, seed=0, fps=0, format="raw"))
                while s.frames_generated < 2 * pipe.frames_per_chunk and not s.closed:
                    self.stream_step()
                    s.owner.take()
                self.close_stream(s.id)
                continue
            caps = pipe.capabilities
            h, w = self.sizes[name].default(caps.default_size)
            for _ in range(2):
                t0 = time.perf_counter()
                fut = self.add_request(GenerateRequest(prompt="warm-up", model=name, seed=0, height=h, width=w,
                                                       output_format="raw"))
                while not fut.done():
                    self.step()
            # the second run (lazy init done) calibrates the queue bound: seconds per native-size 1-step image
            cost = self.cost(name, h, w, caps.default_steps, caps.default_guidance)
            self.calibrated_unit_s[name] = (time.perf_counter() - t0) / cost
            self.images.unit_s[name] = self.calibrated_unit_s[name]
            log.info("warm-up %s: %.1f ms per native-size 1-step image (queue bound %s)", name,
                     self.calibrated_unit_s[name] * 1e3, f"{self.config.batching.max_queue_seconds:g} s of work"
                     if self.config.batching.max_queue_seconds else f"{self.config.batching.max_queue_work:g} units")

    def dead_reason(self) -> str | None:
        """Why this engine can no longer serve (its thread died), or None; /health answers 503 with it."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return "the engine thread has stopped; see the server log"
        return None

    def close_streams(self, reason: str = "shutdown") -> None:
        """End every stream session (the server's drain: each transport sends ``stopped`` with ``reason``)."""
        for sched in self.streams.values():
            sched.close_all(reason)

    def shutdown(self) -> None:
        self.close_streams("shutdown")
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        self._lander.shutdown(wait=True)  # landed batches hand their encoding to the pool: stop it after
        self._pool.shutdown(wait=True)


class AsyncEngine:
    """asyncio face of an EngineCore running in its own thread."""

    def __init__(self, core: EngineCore):
        self.core = core

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        """Raises EngineError (bad request, capacity, 504 past the deadline). Cancelling the awaiting task (the
        client disconnected) aborts the request in the engine: queued, it never runs."""
        fut = self.core.add_request(req)  # raises EngineError synchronously for bad requests
        timeout = self.core.config.batching.request_timeout_s if req.timeout_s is None else req.timeout_s
        # the engine drops queued work at its deadline; this bounds the wait for work already running too
        remaining = req.arrival + timeout - time.perf_counter()
        try:
            out = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), max(remaining, 0) + 0.05)
        except asyncio.CancelledError:
            self.core.abort(req.request_id, "disconnect")
            raise
        except (TimeoutError, asyncio.TimeoutError):
            self.core.abort(req.request_id, "deadline")  # queued: resolves fut with a 504; running: discarded
            if not fut.done():
                raise EngineError(f"the request's deadline ({timeout * 1e3:.0f} ms) passed while its batch ran", 504,
                                  None, "deadline_exceeded") from None
            out = fut.result()
        if out.error is not None:
            raise out.error
        return out

    async def open_stream(self, start: StreamStart) -> "AsyncStream":
        """Open a stream session; its chunks arrive through ``AsyncStream.next_chunk`` (raises EngineError).
        A coroutine because the engine process's bridge (engines/process.py) answers it over a socket."""
        session = self.core.open_stream(start)
        return AsyncStream(self.core, session, session.owner)

    async def watch(self, session_id: str) -> "AsyncStream | None":
        """An extra viewer on an open session (its own bounded outbox); None for an unknown id."""
        outbox = self.core.subscribe(session_id)
        if outbox is None:
            return None
        return AsyncStream(self.core, self.core.stream_session(session_id), outbox, owner=False)


class AsyncStream:
    """asyncio face of one outbox of a stream session: ``await next_chunk()`` until it returns None (ended).
    ``core`` is an EngineCore, or the engine process's handle (engines/process.py: the same stream methods, the
    session's public fields and an outbox of its own on the server's side)."""

    def __init__(self, core: EngineCore, session: StreamSession, outbox: Outbox, owner: bool = True):
        self.core, self.session, self.outbox, self.owner = core, session, outbox, owner
        self._event = asyncio.Event()
        loop = asyncio.get_running_loop()

        def notify() -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the loop is gone (shutdown); nobody is waiting any more
                pass

        outbox.set_notify(notify)

    @property
    def id(self) -> str:
        return self.session.id

    async def next_chunk(self, timeout: float | None = None) -> StreamChunk | None:
        """The next chunk, or None once the stream ended; raises TimeoutError after ``timeout`` seconds. Its frames
        are on the host (an overlapped decode is waited for in the pool, never on the event loop)."""
        while True:
            chunk = self.outbox.take()
            if chunk is not None:
                if chunk.pending is not None:
                    await self.run_in_pool(chunk.wait)
                return chunk
            if self.outbox.closed:
                return None
            self._event.clear()
            if len(self.outbox) or self.outbox.closed:  # raced with a put
                continue
            if timeout is None:
                await self._event.wait()
            else:
                await asyncio.wait_for(self._event.wait(), timeout)

    async def encoded(self, chunk: StreamChunk, fmt: str, quality: int = 85) -> list[bytes]:
        """The chunk's frames encoded as ``fmt``, in the engine's encode pool (never on the event loop)."""
        return await asyncio.wrap_future(chunk.encoded(fmt, quality, self.core.encode_submit))

    async def run_in_pool(self, fn, *args):
        return await asyncio.wrap_future(self.core.encode_submit(fn, *args))

    def update(self, prompt: str | None, negative_prompt: str | None = None, nasa_scale: float | None = None,
               nag_fields: dict[str, float | None] | None = None) -> None:
        self.core.update_prompt(self.session.id, prompt, negative_prompt, nasa_scale, nag_fields)

    def update_strength(self, strength: float) -> None:
        self.core.update_strength(self.session.id, strength)

    def set_input_frame(self, frame, index: int) -> None:
        self.core.set_input_frame(self.session.id, frame, index)

    def close(self, reason: str = "closed") -> None:
        """Owner: end the session. Viewer: detach from it."""
        self.outbox.set_notify(None)
        if self.owner:
            self.core.close_stream(self.session.id, reason)
        else:
            self.core.unsubscribe(self.session.id, self.outbox)
