"""Stream scheduling: the moving-buffer policy (what one step does to a buffer) and the session scheduler (which
sessions share the next forward pass).

Moving buffer (StreamDiT)
-------------------------
A session's buffer holds K chunks of F frames, ``x: [C, K*F, H, W]``. With the sigma table
``s_0 = 1 > s_1 > ... > s_K = 0`` (uniform in t through the checkpoint's FlowMatch shift:
``StreamPipeline.noise_levels``), chunk j (0 = front) sits at level ``K-1-j`` in the steady state. One engine
step runs ONE model call over the whole buffer with per-frame timesteps (``sigma * 1000``), moves every chunk one
level down (per-frame Euler), emits the front chunk (now at s_K = 0, fully denoised) and appends a chunk of fresh
noise (level 0) at the back. Every chunk is thus denoised K times while it slides through the buffer, and every
emitted chunk costs exactly one forward pass.

Warm-up (no noisy or brown first frames): a new buffer is K chunks of pure noise, all at level 0, and the ramp
staggers the levels before anything is emitted. Three ramps (``StreamConfig.ramp``, else the checkpoint's
``fewstep.ramp``, else ``"full"``):

* ``"full"``: during the first K-1 steps a chunk advances only while it is short of its steady level (chunk j
  advances while ``level[j] < K-1-j``); the others get ``sigma_next == sigma`` and stay exactly as they are. After
  K-1 ramp steps the levels are staggered (front at K-1) and step K emits the first chunk, fully denoised. Time to
  first frame is K forward passes over the whole buffer (K * K * F frames through the denoiser); buffers keep one
  shape throughout, so ramping sessions batch with running ones.
* ``"trim"``: the same levels, but a ramp step runs the denoiser only on the chunks that move. They are always a
  front run of the buffer (ramp step r moves chunks 0 .. K-2-r), so the forward takes the first n*F frames and the
  rest (pure noise, or chunks parked at their level) is left out: K-1, K-2, ..., 1 chunks, then K at the first
  emission, K(K+1)/2 * F frames instead of K*K*F, still K passes. What changes: a moving chunk no longer attends
  to the parked chunks behind it during the ramp.
* ``"jump"``: the first step takes every chunk straight to its steady level in one Euler step (chunk j from
  sigma 1 to ``sigma_{K-1-j}``, the trimmed forward over chunks 0 .. K-2); step 2 is a steady step and emits.
  Two passes before the first frame, (2K-1) * F frames; the price is fewer, larger steps for chunks 0 .. K-3 (the
  front chunk is denoised in 2 steps instead of K).

After the ramp every ramp leaves the buffer in the steady state, so warm steps are the same whichever ran. A
ramping session whose forward is shorter than the buffer runs in a forward of its own (one per length in a step):
buffers of different lengths cannot share a batch, and padding would change what the frames attend to.

Video-to-video (``"input": "frames"``, SDEdit in the moving buffer)
--------------------------------------------------------------------
The client streams frames; the newest one received wins. A session of strength ``s`` runs the same buffer on a
ladder scaled by ``s`` (``s * sigma_l``: the model is told each frame's own level, so a scaled ladder needs no other
change), and every chunk that enters the buffer is initialised, instead of from pure noise, from the newest input
frame noised to the top of that ladder, ``x = (1 - s) x0 + s noise`` (flow matching). The buffer then denoises it
over its K steps exactly as a text stream's chunk. The noise is drawn once per session and shared by every frame
that enters (StreamDiffusion's fixed noise): with a still camera consecutive chunks start from the same point, so
what changes between output frames is what changed in the input, not the noise. A strength change reaches the
chunks that enter afterwards: each chunk keeps the scale it entered with (``session.scales``).

Why the buffer, not a separate image-to-image pass per frame: output frames keep the moving buffer's temporal
coupling (every chunk is denoised beside its neighbours in one forward pass), each emitted chunk still costs one
forward pass, and frames sessions batch with text sessions of the same size. The price is the buffer's latency:
an input frame shows K chunk periods later (the default video model: 4 chunks of 2 frames at 8 fps, 1 s).
Pixel-space models only: a latent model would need its VAE's encoder per entering chunk (refused at start).

The policy interface is ``init(session)``, ``warm(session)`` (past its ramp: its steps now emit on schedule),
``step(sessions, cond) -> list[Emission | None]`` and ``release(session)``; the checkpoint picks one by name
(``model_index.json``: ``fewstep.policy``, default ``"moving_buffer"``). A second policy (chunk-wise
autoregression with a KV cache, as in Self-Forcing) fits behind it: ``init`` would prefill the cache
from the prompt, ``step`` would run one denoising step of the current chunk against the cache and emit (and
append the chunk's keys/values to the cache) every ``steps_per_chunk`` steps.

Session scheduling
------------------
Round-robin over the open sessions: each engine step takes up to ``max_batch_sessions`` runnable sessions of one
frame size, in rotation order, and moves them to the back of the rotation, so a session runs at most once per
round and no client (however fast it reads) can starve the others. A session is runnable when it is ramping, or
its next chunk is due (paced sessions: ``next_due`` advances by the chunk's frames / fps per emitted chunk; a session due within
``coalesce_ms`` joins the current step, which keeps same-fps sessions in one forward pass), and, for
``on_full="pause"`` sessions, when its outbox has room.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..config import StreamConfig
from ..errors import EngineError, overloaded
from ..pipeline import NagParams, NasaInput, PromptEmbeds
from .pipeline import StreamPipeline, tensor_bytes
from .session import StreamChunk, StreamSession

log = logging.getLogger("fewstep.engines")


class Emission(NamedTuple):
    session: StreamSession
    frames: torch.Tensor  # [C, F, H, W] clean sample
    sigma: float  # the noise level the frames reached: 0.0 by construction


class MovingBufferPolicy:
    """StreamDiT's moving buffer (see the module docstring)."""

    name = "moving_buffer"
    RAMPS = ("full", "trim", "jump")

    def __init__(self, pipe: StreamPipeline, ramp: str = "full"):
        self.pipe = pipe
        self.K = pipe.buffer_chunks
        self.F = pipe.chunk_frames
        self.sigmas = pipe.sigmas  # K + 1 levels, sigmas[K] == 0
        assert len(self.sigmas) == self.K + 1 and self.sigmas[-1] == 0.0
        if ramp not in self.RAMPS:
            raise ValueError(f"ramp {ramp!r} is not one of {list(self.RAMPS)}")
        self.ramp = ramp

    def _noise(self, s: StreamSession, frames: int) -> torch.Tensor:
        c = self.pipe.latent_channels
        h, w = s.height // self.pipe.vae_scale_factor, s.width // self.pipe.vae_scale_factor
        # drawn on the CPU from the session's own generator: identical on every device and in every batch
        return torch.randn((c, frames, h, w), generator=s.generator, dtype=torch.float32).to(self.pipe.device)

    def _entering(self, s: StreamSession, frames: int) -> torch.Tensor:
        """A chunk entering the buffer [C, frames, h, w]: pure noise (text), or the newest input frame noised to
        the session's strength (frames)."""
        if s.input != "frames":
            return self._noise(s, frames)
        st = s.strength
        x0 = torch.from_numpy(s.input_frame).to(self.pipe.device).permute(2, 0, 1).float() / 255.0
        x0 = (2.0 * x0 - 1.0)[:, None]  # [C, 1, h, w] in [-1, 1]: pixel space
        return ((1.0 - st) * x0 + st * s.frame_noise).expand(-1, frames, -1, -1).contiguous()

    def init(self, s: StreamSession) -> None:
        if s.input == "frames":
            s.frame_noise = self._noise(s, 1)  # [C, 1, h, w], drawn once
        s.buffer = self._entering(s, self.K * self.F)  # [C, K*F, h, w]
        s.levels = [0] * self.K
        s.scales = [s.strength if s.input == "frames" else 1.0] * self.K

    def warm(self, s: StreamSession) -> bool:
        return all(lv == self.K - 1 - j for j, lv in enumerate(s.levels))

    def frame_sigmas(self, s: StreamSession) -> torch.Tensor:
        """Per-frame sigma [K*F] of the buffer as it is now."""
        return torch.tensor([self.sigmas[lv] * c for lv, c in zip(s.levels, s.scales)],
                            dtype=torch.float32).repeat_interleave(self.F)

    def _advance(self, s: StreamSession) -> list[int]:
        """Levels each chunk moves down in the next step."""
        if self.warm(s):
            return [1] * self.K
        target = [self.K - 1 - j for j in range(self.K)]
        if self.ramp == "jump":  # straight to the steady level, in one step
            return [t - lv for t, lv in zip(target, s.levels)]
        return [int(lv < t) for t, lv in zip(target, s.levels)]  # one level a step until staggered

    def forward_frames(self, s: StreamSession, adv: list[int]) -> int:
        """Frames of the buffer that go through the denoiser in a step with advances ``adv``: all of them, except
        in a trimmed ramp step (``"trim"``, ``"jump"``), where only the moving chunks (a front run) do."""
        if self.ramp == "full" or all(adv):
            return self.K * self.F
        moving = sum(1 for a in adv if a)
        assert all(adv[:moving]), "a ramp moves a front run of chunks"
        return moving * self.F

    def step(self, sessions: list[StreamSession], cond: PromptEmbeds,
             nasa: NasaInput | None = None) -> list[Emission | None]:
        """One forward pass over every session's buffer (one per forward length, where a trimmed ramp step makes
        some shorter); returns each session's emitted chunk (or None)."""
        adv = [self._advance(s) for s in sessions]
        lengths = [self.forward_frames(s, a) for s, a in zip(sessions, adv)]
        dev = self.pipe.device
        xs: list[torch.Tensor | None] = [None] * len(sessions)
        for n in sorted(set(lengths), reverse=True):  # the full-length (running) group first
            rows = [i for i, t in enumerate(lengths) if t == n]
            x = torch.stack([sessions[i].buffer[:, :n] for i in rows])  # [b, C, n, h, w]
            sig = torch.stack([self.frame_sigmas(sessions[i])[:n] for i in rows])
            nxt = torch.stack([
                torch.tensor([self.sigmas[lv + a] * c for lv, a, c in zip(sessions[i].levels, adv[i],
                                                                          sessions[i].scales)],
                             dtype=torch.float32).repeat_interleave(self.F)[:n] for i in rows])
            if len(rows) == len(sessions):
                c, ng = cond, nasa
            else:
                idx = torch.tensor(rows)
                c = cond[idx.to(cond.embeds.device)]
                ng = None if nasa is None else NasaInput(nasa.negative[idx.to(nasa.negative.embeds.device)],
                                                         nasa.alpha[idx.to(nasa.alpha.device)])
            x = self.pipe.denoise_step(x, sig.to(dev), nxt.to(dev), c, ng)
            for j, i in enumerate(rows):
                s = sessions[i]
                # frames past n did not move (sigma_next == sigma): they are the buffer's own
                xs[i] = x[j] if n == self.K * self.F else torch.cat([x[j], s.buffer[:, n:]], dim=1)
                s.denoised_frames += n
                s.forwards += 1
        out: list[Emission | None] = []
        for i, (s, ad) in enumerate(zip(sessions, adv)):
            s.levels = [lv + a for lv, a in zip(s.levels, ad)]
            x = xs[i]
            if s.levels[0] == self.K:  # front chunk reached sigma 0: emit it, slide, append fresh noise
                out.append(Emission(s, x[:, : self.F].clone(), self.sigmas[self.K]))
                s.buffer = torch.cat([x[:, self.F:], self._entering(s, self.F)], dim=1)
                s.levels = s.levels[1:] + [0]
                s.scales = s.scales[1:] + [s.strength if s.input == "frames" else 1.0]
            else:
                s.buffer = x.clone()  # no view into the batch tensor: a closed session frees its share
                out.append(None)
        return out

    def release(self, s: StreamSession) -> None:
        s.buffer = None
        s.levels = []
        s.scales = []
        s.decoder_state = None


def session_state_bytes(s: StreamSession) -> int:
    """Bytes of device state a session holds: its buffer and, for Wan, its causal-VAE cache."""
    return tensor_bytes([s.buffer, s.decoder_state])


POLICIES = {MovingBufferPolicy.name: MovingBufferPolicy}


def make_policy(pipe: StreamPipeline, ramp: str | None = None):
    """The checkpoint's policy (``fewstep.policy``) with warm-up ramp ``ramp``; None: the checkpoint's
    ``fewstep.ramp``, else ``"full"``."""
    from ..loading import CheckpointError

    name = pipe.ckpt.meta.get("policy", MovingBufferPolicy.name)
    if name not in POLICIES:
        raise CheckpointError(f"{pipe.ckpt.path / 'model_index.json'}: fewstep.policy {name!r} is not one of "
                              f"{sorted(POLICIES)}")
    if ramp is None:
        ramp = pipe.ckpt.meta.get("ramp", "full")
        if ramp not in MovingBufferPolicy.RAMPS:
            raise CheckpointError(f"{pipe.ckpt.path / 'model_index.json'}: fewstep.ramp {ramp!r} is not one of "
                                  f"{list(MovingBufferPolicy.RAMPS)}")
    return POLICIES[name](pipe, ramp)


@dataclass
class StepResult:
    chunks: list[StreamChunk]
    sessions: int
    dropped_frames: int


class StreamScheduler:
    """Open sessions of one video model: registry, round-robin batching, stepping and emission."""

    def __init__(self, model: str, pipe: StreamPipeline, config: StreamConfig, cache,
                 submit: Callable[..., Future], wake: Callable[[], None] = lambda: None):
        self.model = model
        self.pipe = pipe
        self.policy = make_policy(pipe, config.ramp)
        self.config = config
        self.cache = cache  # the engine's PromptCache
        self.submit = submit  # runs a callable in the engine's encode pool
        self.wake = wake  # wakes the engine loop (a paused session got room, a session opened ...)
        self.transition_steps = config.transition_steps or pipe.buffer_chunks
        self._sessions: dict[str, StreamSession] = {}
        self._order: deque[str] = deque()  # round-robin rotation
        self._lock = threading.RLock()
        ov = config.overlap_decode
        self._decode_stream = (torch.cuda.Stream(pipe.device) if pipe.device.type == "cuda" and ov in ("on", "auto")
                               else None)

    # -- registry (any thread) -----------------------------------------------------------------------------------
    def free_memory(self) -> int | None:
        """Bytes the pipeline's GPU can still give, or None where there is no budget to keep (CPU). Blocks torch
        has cached but not used count as free: the driver reports them as taken long after a burst has closed."""
        if self.pipe.device.type != "cuda":
            return None
        free = torch.cuda.mem_get_info(self.pipe.device)[0]
        return free + torch.cuda.memory_reserved(self.pipe.device) - torch.cuda.memory_allocated(self.pipe.device)

    def _memory_refusal(self, new: StreamSession) -> str | None:
        """Why ``new`` would not fit in GPU memory, or None. Sessions allocate lazily (the buffer on their first
        step, a Wan decoder cache on their first chunk, and a decode briefly drops the cache's reference), so every
        open session is charged what it still lacks of its size's estimate, and the new one all of it."""
        free = self.free_memory()
        if free is None:
            return None
        est = self.pipe.session_state_estimate
        owed = sum(max(0, est(x.height, x.width) - session_state_bytes(x)) for x in self._sessions.values())
        mine = est(new.height, new.width)
        need = owed + mine + int(self.config.reserve_gib * 2**30)
        if free >= need:
            return None
        return (f"GPU memory: {free / 2**30:.1f} GiB free, a new stream needs {need / 2**30:.1f} GiB "
                f"({mine / 2**30:.2f} GiB for its state, {owed / 2**30:.2f} GiB still to be allocated by open "
                f"streams, {self.config.reserve_gib:g} GiB reserve)")

    def add(self, s: StreamSession) -> None:
        with self._lock:
            if len(self._sessions) >= self.config.max_sessions:
                raise overloaded(f"{len(self._sessions)} open streams")
            why = self._memory_refusal(s)
            if why is not None:
                log.warning("stream refused: %s", why)
                raise overloaded(why)
            self._sessions[s.id] = s
            self._order.append(s.id)
        s.owner.on_take = self.wake

    def get(self, session_id: str) -> StreamSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions)

    def update_prompt(self, session_id: str, prompt: str | None, negative_prompt: str | None = None,
                      nasa_scale: float | None = None, nag: dict | None = None) -> bool:
        """``prompt`` None: unchanged. ``negative_prompt`` None: unchanged, "": cleared. ``nasa_scale``: plain NASA
        at that alpha from now on; ``nag`` (``scale``/``tau``/``alpha``, each optional): NAG's renormalised form, the
        fields left out as they were (or the defaults). Newest wins if several arrive before the next step."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return False
            if prompt is not None:
                s.pending_prompt = prompt
                s.prompt = prompt
            if negative_prompt is not None:
                s.pending_negative = negative_prompt
                s.negative_prompt = negative_prompt or None
            if nasa_scale is not None:
                s.nasa_scale, s.nag = float(nasa_scale), None
            if nag:
                s.nag = NagParams.of(nag.get("scale"), nag.get("tau"), nag.get("alpha"), base=s.nag)
        return True

    def set_input_frame(self, session_id: str, frame, index: int) -> bool:
        """The newest input frame of a frames session ([H, W, 3] uint8 at its size); an older index than the one
        held is ignored (newest wins, never queued). Returns whether the session is open."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.closed:
                return False
            s.input_frames += 1
            if index > s.input_index:
                s.input_frame, s.input_index = frame, index
        self.wake()
        return True

    def set_strength(self, session_id: str, strength: float) -> bool:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return False
            s.strength = strength  # chunks entering from the next step on
        return True

    def close(self, session_id: str, reason: str = "closed") -> StreamSession | None:
        """Take the session out of the rotation now; its tensors go as soon as no step is using them."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return None
            try:
                self._order.remove(session_id)
            except ValueError:
                pass
            s.closed = True
            for o in s.outboxes:
                o.close(reason)
            if not s.in_step:
                self.policy.release(s)
                s.release()
        return s

    # -- schedule --------------------------------------------------------------------------------------------------
    def _runnable(self, s: StreamSession, now: float) -> bool:
        if s.closed or s.finished or (s.input == "frames" and s.input_frame is None):
            return False  # a frames session starts with its first input frame (set_input_frame wakes the engine)
        if s.buffer is None or not self.policy.warm(s):
            return True  # new or ramping: no frame leaves this step, run it as soon as possible
        if s.owner.on_full == "pause" and s.owner.full():
            return False
        return s.fps <= 0 or now >= s.next_due - self.config.coalesce_ms / 1e3

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until some session becomes runnable by the clock alone (0: one is runnable now; None: never)."""
        best = None
        with self._lock:
            for s in self._sessions.values():
                if self._runnable(s, now):
                    return 0.0
                if s.closed or s.finished or s.fps <= 0 or (s.owner.on_full == "pause" and s.owner.full()) \
                        or (s.input == "frames" and s.input_frame is None):
                    continue
                wait = s.next_due - self.config.coalesce_ms / 1e3 - now
                best = wait if best is None else min(best, wait)
        return None if best is None else max(best, 0.0)

    def schedule(self, now: float | None = None) -> list[StreamSession]:
        """Pick up to max_batch_sessions runnable sessions of one size, round-robin, and mark them in a step."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            picked: list[StreamSession] = []
            key = None
            for sid in self._order:
                s = self._sessions[sid]
                if not self._runnable(s, now):
                    continue
                k = (s.height, s.width)
                if key is None:
                    key = k
                elif k != key:
                    continue
                picked.append(s)
                if len(picked) >= self.config.max_batch_sessions:
                    break
            for s in picked:
                self._order.remove(s.id)
                self._order.append(s.id)
                s.in_step = True
        return picked

    # -- run + emit ------------------------------------------------------------------------------------------------
    def _prepare(self, batch: list[StreamSession]) -> None:
        """Encode new prompts (batched, through the prompt cache) and start new buffers. Engine thread."""
        with self._lock:
            todo = [(s, s.pending_prompt) for s in batch if s.pending_prompt is not None]
            for s, _ in todo:
                s.pending_prompt = None
            negs = [(s, s.pending_negative) for s in batch if s.pending_negative is not None]
            for s, _ in negs:
                s.pending_negative = None
        if negs:  # a negative prompt takes effect at the next step, whole (NASA needs no blend: it steers)
            texts = [p for _, p in negs if p]
            rows = self.cache.get_many(self.model + "\0neg", self.pipe, texts, self.pipe.negative_embeds) \
                if texts else None
            i = 0
            for s, p in negs:
                s.neg_cond = rows[i] if p else None
                i += bool(p)
        if todo:
            rows = self.cache.get_many(self.model, self.pipe, [p for _, p in todo])
            for i, (s, _) in enumerate(todo):
                if s.cond is None:
                    s.cond = rows[i]
                else:  # a prompt update: blend from what the last step used, reach the new prompt in N steps
                    s.cond_from = s.last_cond or s.cond
                    s.cond = rows[i]
                    s.transition = (0, self.transition_steps)
                    s.prompt_version += 1
        for s in batch:
            if s.buffer is None:
                self.policy.init(s)

    def _nasa(self, batch: list[StreamSession]) -> NasaInput | None:
        """NASA inputs of a step where a session has a negative prompt: the others ride along with alpha 0."""
        if all(s.neg_cond is None for s in batch):
            return None
        blank = self.cache.get_many(self.model + "\0neg", self.pipe, [""], self.pipe.negative_embeds)
        rows = [s.neg_cond if s.neg_cond is not None else blank for s in batch]
        alpha = torch.tensor([s.nasa_scale if s.neg_cond is not None else 0.0 for s in batch])
        nag = NasaInput.nag_rows([s.nag if s.neg_cond is not None else None for s in batch])
        return NasaInput(PromptEmbeds.cat(rows), alpha, nag)

    def step(self, batch: list[StreamSession]) -> StepResult:
        """Run one forward pass for ``batch`` (from ``schedule``) and emit the finished chunks."""
        t0 = time.perf_counter()
        try:
            self._prepare(batch)
            cond = PromptEmbeds.cat([s.step_cond() for s in batch])
            emitted = self.policy.step(batch, cond, self._nasa(batch))
            t1 = time.perf_counter()
            done = [e for e in emitted if e is not None]
            frames = None
            pending = None
            if done and self._decode_stream is not None:
                frames, pending = self._decode_overlapped(done)
            elif done:
                out = self.pipe.decode_frames(torch.stack([e.frames for e in done]),
                                              sessions=[e.session for e in done])
                # a list when rows differ in length (a Wan session's first chunk is shorter), else one tensor
                frames = [f.cpu().numpy() for f in out] if isinstance(out, list) else out.cpu().numpy()
            t2 = time.perf_counter()
        # Last-resort boundary of the engine thread: a failed step ends its sessions with an error, never the engine.
        except Exception as e:  # noqa: BLE001
            log.exception("stream step failed")
            with self._lock:
                for s in batch:
                    s.in_step = False
            for s in batch:
                self.close(s.id, f"error: {type(e).__name__}: {e}")
            return StepResult([], len(batch), 0)

        chunks: list[StreamChunk] = []
        dropped = 0
        step_ms = (t1 - t0) * 1e3
        with self._lock:
            for s in batch:
                s.in_step = False
                s.steps += 1
                s.last_step_ms, s.last_batch = step_ms, len(batch)
            for i, e in enumerate(done):
                s = e.session
                if s.closed:
                    continue
                f = frames[i]  # [F, H, W, 3]
                if s.max_frames is not None:
                    f = f[: s.max_frames - s.frames_generated]
                now = time.perf_counter()
                chunk = StreamChunk(s.id, f, s.next_index,
                                    {"step_ms": step_ms, "decode_ms": (t2 - t1) * 1e3, "batch_size": len(batch),
                                     "since_open_ms": (now - s.opened_at) * 1e3},
                                    now, s.prompt_version, pending=pending)
                s.next_index += chunk.num_frames
                s.frames_generated += chunk.num_frames
                if s.fps > 0:
                    period = chunk.num_frames / s.fps  # a Wan session's first chunk is shorter
                    if s.first_chunk_at is None:
                        s.next_due = now + period
                    else:  # keep the ideal grid, but cap the debt after a stall at one period: at most one
                        # chunk of catch-up instead of a burst that would overrun the client's outbox
                        s.next_due = max(s.next_due + period, now - period)
                if s.first_chunk_at is None:
                    s.first_chunk_at = now
                if s.max_frames is not None and s.frames_generated >= s.max_frames:
                    chunk.final = True
                    s.finished = True
                if s.start.format != "raw":
                    chunk.encoded(s.start.format, s.start.quality, self.submit)  # encode while the next step runs
                for o in s.outboxes:
                    dropped += o.put(chunk)
                chunks.append(chunk)
            for s in batch:
                if s.finished and not s.closed:
                    self._sessions.pop(s.id, None)
                    if s.id in self._order:
                        self._order.remove(s.id)
                    for o in s.outboxes:
                        o.close("finished")
                    s.closed = True
                if s.closed:  # closed while it was in this step, or just finished: free its tensors now
                    self.policy.release(s)
                    s.release()
        return StepResult(chunks, len(batch), dropped)

    def _decode_overlapped(self, done: list[Emission]) -> tuple[object, tuple]:
        """Launch the decode of ``done`` and the copy of its frames into pinned host memory on the decode stream,
        after this step's forward pass (an event, not a host sync), and return at once: host arrays whose pixels
        arrive with the returned (start, end) events (``StreamChunk.wait``). The next forward pass runs on the
        default stream meanwhile. One decode stream: a Wan session's decoder cache is written and read in chunk
        order."""
        side = self._decode_stream
        x = torch.stack([e.frames for e in done])
        side.wait_stream(torch.cuda.current_stream(x.device))
        x.record_stream(side)  # allocated on the default stream, read on this one
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record()
            out = self.pipe.decode_frames(x, sessions=[e.session for e in done])
            rows = out if isinstance(out, list) else [out]
            host = [torch.empty(r.shape, dtype=r.dtype, pin_memory=True) for r in rows]
            for h, r in zip(host, rows):
                h.copy_(r, non_blocking=True)
            end.record()
        frames = [h.numpy() for h in host] if isinstance(out, list) else host[0].numpy()
        return frames, (start, end)

    def subscribe(self, session_id: str, capacity: int):
        """Attach an extra viewer (MJPEG) to a session; returns its Outbox, or None for an unknown id."""
        from .session import Outbox

        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.closed:
                return None
            if len(s.outboxes) - 1 >= self.config.max_viewers:
                raise EngineError(f"this stream already has {self.config.max_viewers} viewers", 429, None,
                                  "too_many_viewers")
            o = Outbox(capacity, "drop_oldest")
            s.outboxes.append(o)
            return o

    def unsubscribe(self, session_id: str, outbox) -> None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None and outbox in s.outboxes[1:]:
                s.outboxes.remove(outbox)
        outbox.close("unsubscribed")

    def close_all(self, reason: str = "shutdown") -> None:
        with self._lock:
            ids = list(self._sessions)
        for sid in ids:
            self.close(sid, reason)
