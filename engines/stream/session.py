"""Stream sessions: what one client's video stream holds, and the chunks it yields.

A session owns its state outright: its own CPU ``torch.Generator`` (every noise draw of the stream comes from it,
so a stream's frames never depend on who it was batched with), its prompt conditioning, the moving buffer
``[C, K*F, H, W]`` with a noise level per chunk, the next frame index, and bounded outboxes (one for the owner,
plus optional viewers such as an MJPEG tag) that the transport drains.

Threads: the engine thread writes buffers and puts chunks; transports (the asyncio loop) read outboxes and call
``EngineCore.update_prompt`` / ``close_stream``. Outboxes carry their own lock; everything else a transport may
touch goes through the scheduler's lock.

Drop policy ("latest wins"): an outbox keeps at most ``capacity`` undelivered chunks. When the engine emits a chunk
into a full outbox, the OLDEST undelivered chunk is dropped and its frames are counted (``dropped_frames``, and
``fewstep_frames_dropped_total``). A slow client therefore sees a gap in frame indices, never a growing delay: its
worst-case latency is ``capacity`` chunk periods. Finite clips (``POST /v1/videos``) use ``on_full="pause"``
instead: the session is not stepped while its outbox is full, so no frame of a clip is ever lost.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from ..pipeline import DEFAULT_NASA_SCALE, NagParams, PromptEmbeds

FRAME_FORMATS = ("jpeg", "webp", "raw")


@dataclass
class StreamStart:
    """What a client asks for when it opens a stream."""

    prompt: str
    model: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    fps: float | None = None  # target frames/s; None: the model's own fps; 0: unpaced (as fast as the engine goes)
    max_frames: int | None = None  # a finite clip ends after this many frames; None: runs until closed
    on_full: Literal["drop_oldest", "pause"] = "drop_oldest"
    format: str = "jpeg"  # what the engine pre-encodes for the owner: jpeg | webp | raw (no encoding)
    quality: int = 85
    input: Literal["text", "frames"] = "text"  # "frames": video-to-video from the client's frames (set_input_frame)
    strength: float = 0.6  # "frames": the noise level each input frame enters the buffer at (1.0 ignores it)
    negative_prompt: str | None = None  # NASA: steered away from in the cross-attention (video models' mode nasa)
    nasa_scale: float | None = None  # NASA's alpha; None: DEFAULT_NASA_SCALE
    # NAG's renormalised form of NASA instead of plain subtraction (any given: NAG; left out: DEFAULT_NAG_*)
    nag_scale: float | None = None
    nag_tau: float | None = None
    nag_alpha: float | None = None
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class StreamChunk:
    """F consecutive frames of one session, as they leave the engine."""

    session_id: str
    frames: np.ndarray  # [F, H, W, 3] uint8
    first_index: int  # index of frames[0] in the session; frames of a chunk are consecutive
    timings: dict[str, float]  # step_ms, decode_ms, batch_size (sessions in the forward pass), since_open_ms
    created: float  # time.perf_counter() when the chunk left the engine
    prompt_version: int  # bumps when a prompt update starts to reach the frames
    final: bool = False  # last chunk of a finite clip
    # overlapped decode (StreamConfig.overlap_decode): CUDA events (start, end) of the decode and the copy into
    # ``frames`` (pinned host memory); ``wait`` before reading a pixel. None: the frames are there.
    pending: tuple | None = field(default=None, repr=False)
    _encoded: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])  # known before the pixels: the host buffer exists from the launch

    def wait(self) -> "StreamChunk":
        """Block until the frames are on the host (overlapped decode); records the decode's GPU time."""
        pending = self.pending
        if pending is not None:
            start, end = pending
            end.synchronize()
            self.timings["decode_ms"] = start.elapsed_time(end)
            self.pending = None
        return self

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + self.num_frames)

    def encoded(self, fmt: str, quality: int, submit: Callable[..., Future]) -> Future:
        """Future of the frames encoded as ``fmt`` (list of bytes), computed once per format via ``submit``."""
        from ..encode import encode_image

        key = (fmt, quality)
        with self._lock:
            fut = self._encoded.get(key)
            if fut is None:
                fut = self._encoded[key] = submit(lambda: [encode_image(f, fmt, quality)
                                                           for f in self.wait().frames])
        return fut


class Outbox:
    """Bounded queue of chunks for one viewer: the engine thread puts, one consumer takes (see module doc)."""

    def __init__(self, capacity: int, on_full: str = "drop_oldest"):
        if on_full not in ("drop_oldest", "pause"):
            raise ValueError(f"on_full must be 'drop_oldest' or 'pause', got {on_full!r}")
        self.capacity = capacity
        self.on_full = on_full
        self._q: deque[StreamChunk] = deque()
        self._lock = threading.Lock()
        self._notify: Callable[[], None] | None = None  # wakes the consumer (set by the transport)
        self.on_take: Callable[[], None] | None = None  # wakes the engine (a paused session may run again)
        self.dropped_frames = 0  # dropped because the viewer fell behind (latest wins)
        self.discarded_frames = 0  # still queued when the viewer left
        self.taken_frames = 0
        self.closed = False
        self.reason = ""

    def set_notify(self, fn: Callable[[], None] | None) -> None:
        with self._lock:
            self._notify = fn
            pending = bool(self._q) or self.closed
        if fn is not None and pending:
            fn()

    def put(self, chunk: StreamChunk) -> int:
        """Queue a chunk; returns the number of frames dropped to make room (0 when there was room)."""
        dropped = 0
        with self._lock:
            if self.closed:
                return 0
            while len(self._q) >= self.capacity:
                old = self._q.popleft()  # latest wins: the oldest undelivered chunk goes
                dropped += old.num_frames
            self._q.append(chunk)
            self.dropped_frames += dropped
            notify = self._notify
        if notify:
            notify()
        return dropped

    def take(self) -> StreamChunk | None:
        with self._lock:
            chunk = self._q.popleft() if self._q else None
            if chunk is not None:
                self.taken_frames += chunk.num_frames
        if chunk is not None and self.on_take:
            self.on_take()
        return chunk

    def full(self) -> bool:
        with self._lock:
            return len(self._q) >= self.capacity

    def __len__(self) -> int:
        return len(self._q)

    def close(self, reason: str = "closed") -> None:
        """No more chunks will come; what is queued can still be taken."""
        with self._lock:
            if self.closed:
                return
            self.closed, self.reason = True, reason
            notify = self._notify
        if notify:
            notify()

    def clear(self) -> None:
        with self._lock:
            self._q.clear()

    def discard(self) -> int:
        """Drop every queued chunk (the viewer left); returns their frames (counted as dropped, reason "closed")."""
        with self._lock:
            n = sum(c.num_frames for c in self._q)
            self._q.clear()
            self.discarded_frames += n
        return n

    @property
    def ended(self) -> bool:
        with self._lock:
            return self.closed and not self._q


class StreamSession:
    """One client's stream. Fields below the marker belong to the engine thread (the stream policy)."""

    def __init__(self, start: StreamStart, model: str, height: int, width: int, seed: int, fps: float,
                 outbox_capacity: int, id_prefix: str = ""):
        # 128 random bits: the id is the capability to read the frames; the prefix (a replica's id, or none) says
        # where the buffer lives and is no secret
        self.id = (f"{id_prefix}." if id_prefix else "") + secrets.token_urlsafe(16)
        self.start = start
        self.model = model
        self.height, self.width = height, width
        self.seed = seed
        self.fps = fps
        self.max_frames = start.max_frames
        self.prompt = start.prompt
        self.pending_prompt: str | None = start.prompt  # encoded by the engine thread before the next step
        self.prompt_version = 0
        self.outboxes: list[Outbox] = [Outbox(outbox_capacity, start.on_full)]  # [0]: the owner's
        self.opened_at = start.arrival
        self.first_chunk_at: float | None = None
        self.closed = False
        self.finished = False
        self.in_step = False
        self.last_step_ms = 0.0
        self.last_batch = 0
        # -- engine thread ---------------------------------------------------------------------------------------
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.cond: PromptEmbeds | None = None  # current conditioning, one row on the device
        # NASA: the negative prompt ("" or None: none), its alpha, and its embedding once the engine encoded it;
        # pending_negative is set (like pending_prompt) when it changes, "" clearing it
        self.negative_prompt = start.negative_prompt or None
        self.pending_negative: str | None = self.negative_prompt
        self.nasa_scale = DEFAULT_NASA_SCALE if start.nasa_scale is None else float(start.nasa_scale)
        self.nag: NagParams | None = None  # NAG's (phi, tau, alpha) when the session asked for the renormalised form
        if any(v is not None for v in (start.nag_scale, start.nag_tau, start.nag_alpha)):
            self.nag = NagParams.of(start.nag_scale, start.nag_tau, start.nag_alpha)
        self.neg_cond: PromptEmbeds | None = None
        self.cond_from: PromptEmbeds | None = None  # during a prompt transition: what we blend away from
        self.last_cond: PromptEmbeds | None = None  # what the last step used (a new update blends from it)
        self.transition = (0, 0)  # (steps done, steps total) of the running prompt transition
        self.buffer: torch.Tensor | None = None  # [C, K*F, H, W] fp32; chunk 0 (front) is the least noisy
        self.levels: list[int] = []  # per chunk: index into the policy's sigma table (0 = pure noise)
        self.decoder_state: list | None = None  # Wan: the causal VAE's cache after the session's last chunk
        self.next_index = 0  # index of the next frame to emit
        self.next_due = 0.0  # perf_counter time the next chunk is due (paced sessions)
        self.steps = 0  # engine steps the session took part in
        self.forwards = 0  # denoiser calls its buffer went through (a step runs one, or one per buffer length)
        self.denoised_frames = 0  # frames of its buffer those calls took: the work its ramp and stream cost
        self.frames_generated = 0
        # video-to-video ("input": "frames"): the newest input frame wins (set by the transport, under the
        # scheduler's lock); each chunk entering the buffer starts from it, noised at the strength it entered with
        self.input = start.input
        self.strength = start.strength
        self.input_frame: np.ndarray | None = None  # [H, W, 3] uint8 at the session's size
        self.input_index = -1  # the client's index of input_frame (an older frame decoded late never replaces it)
        self.input_frames = 0  # input frames received
        self.frame_noise: torch.Tensor | None = None  # [C, 1, h, w]: one draw, shared by every entering frame
        self.scales: list[float] = []  # per chunk: its sigma ladder's scale (its strength; 1.0 for text)

    @property
    def owner(self) -> Outbox:
        return self.outboxes[0]

    @property
    def frames_dropped(self) -> int:
        return sum(o.dropped_frames for o in self.outboxes)

    def step_cond(self) -> PromptEmbeds:
        """Conditioning for this step. During a prompt transition it blends linearly from the old to the new
        embeddings, reaching the new prompt fully after ``transition[1]`` steps (one chunk's residence in the
        buffer by default), so frames already half-denoised under the old prompt morph instead of jumping."""
        done, total = self.transition
        if self.cond_from is None or done >= total:
            self.cond_from = None
            self.last_cond = self.cond
            return self.cond
        a = (done + 1) / total
        self.transition = (done + 1, total)
        old, new = self.cond_from, self.cond
        mask = None if new.mask is None else torch.maximum(old.mask, new.mask)
        pooled = None if new.pooled is None else torch.lerp(old.pooled, new.pooled, a)
        out = PromptEmbeds(torch.lerp(old.embeds, new.embeds, a), mask, pooled)
        if done + 1 >= total:
            self.cond_from = None
        self.last_cond = out
        return out

    def release(self) -> None:
        """Drop every tensor the session holds (called once the session left the engine for good)."""
        self.buffer = None
        self.cond = self.cond_from = self.last_cond = self.neg_cond = None
        self.levels = []
        self.input_frame = self.frame_noise = None
        for o in self.outboxes:
            o.close("closed")

    def stats(self) -> dict:
        owner = self.owner
        return {
            "frames_generated": self.frames_generated,
            "frames_dropped": self.frames_dropped,
            "frames_taken": owner.taken_frames,
            "queued_chunks": len(owner),
            "steps": self.steps,
            "step_ms": round(self.last_step_ms, 3),
            "batch_size": self.last_batch,
            "prompt_version": self.prompt_version,
        }
