"""The engine in its own process (vLLM v1's split): the HTTP process validates, serialises and answers; the engine
process loads the models, schedules and runs them. The GIL of one no longer stalls the other: uvicorn's parsing,
JSON and base64 run while the engine thread launches kernels, and a slow client cannot delay a batch.

    HTTP process                                     engine process (python -P -m fewstep.engines.process)
    EngineProcess.generate(req) --PUSH "gen"------>  EngineCore.add_request (its own thread, as in-process)
                                <--PULL "out"------  the request's future resolves: timings, seeds, image bytes
    (cancelled task)            --PUSH "abort"---->  EngineCore.abort: queued, it never runs
                                <--PULL "obs"------  EngineObserver calls, replayed into the server's metrics
                                <--PULL "state"----  load progress (/ready), then "ready" (capabilities) or "failed"
    EngineProcess.open_stream   --PUSH "sopen"---->  EngineCore.open_stream (same admission, same errors)
                                <--PULL "sopened"--  the session's public fields, or the refusal
    await watch(session_id)     --PUSH "swatch"--->  EngineCore.subscribe: an MJPEG viewer's own outbox
    AsyncStream.update / ...    --PUSH "supdate" "sstrength" "sframe" (an input frame: raw pixels) "sclose"
                                       "sunwatch"    the same EngineCore calls as in-process
    (a chunk taken here)        --PUSH "scredit"-->  the outbox may ship its next chunk
                                <--PULL "chunk"----  one chunk of an outbox: raw uint8 frames, index, timings, stats
                                <--PULL "send"-----  an outbox ended (finished, error, closed): its reason

Two ZeroMQ PUSH/PULL pairs over ipc:// sockets in a private directory. Every message is
``[kind, orjson header, *blobs]``: requests and results are plain fields, image bytes travel as their own frames
(never pickled; an input image for image-to-image is its raw uint8 pixels plus a shape). ``EngineCore`` stays
drivable in-process without any of this (tests, benchmarks); ``fewstep serve --engine-process`` turns it on.

Scope: everything the in-process engine serves: image models (HTTP images, image edits, the realtime WebSocket) and
video models (WS /v1/stream with text or frames input, MJPEG, POST /v1/videos). The routes hold an ``AsyncStream``
either way: its ``core`` is this handle, its session a ``_RemoteSession`` (the public fields; stats as of the last
chunk), its outbox one on this side.

Streams: the engine process ships raw frames and the server encodes them (JPEG, WebP, fMP4) in its own pool, as the
in-process engine does in its pool; the engine process's Python thread never encodes. Flow control is by credit: an
outbox in the engine process ships a chunk only while the server's outbox for it has room (``_SERVER_CHUNKS``; a
chunk taken by the route grants the next). Chunks therefore wait in the engine's bounded outbox, under its drop policy
(latest wins: dropped frames are counted there) or its pause (clips of POST /v1/videos never lose a frame), never in a
socket buffer or an unbounded queue; the bridge adds at most ``_SERVER_CHUNKS`` chunk periods of latency to a slow
client's worst case. Times (a chunk's ``created``, a session's ``opened_at``) are ``time.perf_counter()`` values,
CLOCK_MONOTONIC on Linux, the same clock in both processes. An engine process that dies ends every open stream with
``ENGINE_STOPPED`` (the routes tell the client to reconnect); the server's drain ends them with ``shutdown`` as
in-process.

Lifetime: the child ignores SIGINT/SIGTERM (a terminal's Ctrl-C or a group kill reaches both processes; the HTTP
process drains first, then sends "stop"), and exits by itself when its parent is gone (polled every 0.5 s), so no
engine is left holding a GPU.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import orjson

from .core import AsyncStream, check_fps, check_frame_format, check_prompt, check_stream_guidance, check_strength
from .errors import ENGINE_STOPPED, EngineError
from .request import GenerateOutput, GenerateRequest
from .stream import Outbox, StreamChunk, StreamSession, StreamStart

log = logging.getLogger("fewstep.engines")

_REQ_FIELDS = [f.name for f in fields(GenerateRequest) if f.name != "image"]
_OBSERVED = ("on_batch", "on_queue", "on_stream_step", "on_frames_dropped", "on_sessions", "on_cancelled")
_SESSION_FIELDS = ("id", "model", "height", "width", "seed", "fps", "input", "prompt", "negative_prompt")
_STREAM_KINDS = {b"sopen", b"swatch", b"supdate", b"sstrength", b"sframe", b"sclose", b"sunwatch", b"scredit"}
# chunks an outbox on the server's side holds (and the credits its engine-side outbox starts with): one, so that the
# engine's outbox, with its drop policy, keeps what a slow client has not taken
_SERVER_CHUNKS = 1


def _error_json(e: BaseException) -> dict:
    if isinstance(e, EngineError):
        return {"message": str(e), "status": e.status, "param": e.param, "code": e.code, "retry_after": e.retry_after}
    # anything else is the engine's own failure: its text (paths, allocator messages) stays in the engine's log
    log.error("engine process: request failed: %r", e)
    return {"message": "the engine failed on this request; see the server log", "status": 500, "param": None,
            "code": "engine_error", "retry_after": None}


def _error(d: dict) -> EngineError:
    return EngineError(d["message"], d["status"], d["param"], d["code"], d["retry_after"])


def _caps_json(caps) -> dict:
    d = asdict(caps)
    spec = caps.prompt_completion
    d["prompt_completion"] = None if spec is None else [spec[0].pattern, spec[1]]
    return d


def _caps(d: dict):
    import re

    from .runner import Capabilities
    from .sizes import ServedSizes

    s = d["sizes"]
    sizes = ServedSizes(tuple(tuple(x) for x in s["sizes"]), None if s["side_range"] is None
                        else tuple(s["side_range"]), s["step"])
    spec = d["prompt_completion"]
    return Capabilities(**{**d, "sizes": sizes, "example_prompts": tuple(d["example_prompts"]),
                           "guidance_modes": tuple(d["guidance_modes"]),
                           "prompt_completion": None if spec is None else (re.compile(spec[0]), spec[1])})


def _sizes_json(sizes) -> dict:
    return asdict(sizes)


def _sizes(d: dict):
    from .sizes import ServedSizes

    return ServedSizes(tuple(tuple(x) for x in d["sizes"]), None if d["side_range"] is None
                       else tuple(d["side_range"]), d["step"])


def _stream_json(pipe) -> dict | None:
    """What the stream routes read from a video model's pipeline (``started``, fMP4 muxing); None: an image model."""
    if pipe.capabilities.kind != "video":
        return None
    return {k: getattr(pipe, k) for k in ("fps", "frames_per_chunk", "first_chunk_frames", "buffer_chunks")}


def _start_json(start: StreamStart) -> dict:
    """A stream's start as the engine process opens it: raw frames (the server encodes them, in its own pool)."""
    return {**asdict(start), "format": "raw"}


def _session_json(s: StreamSession) -> dict:
    return {k: getattr(s, k) for k in _SESSION_FIELDS}


def _chunk_message(oid: int, model: str, chunk: StreamChunk, stats: dict) -> tuple[dict, list]:
    frames = np.ascontiguousarray(chunk.frames, dtype=np.uint8)
    return ({"oid": oid, "model": model, "first_index": chunk.first_index, "shape": list(frames.shape),
             "timings": chunk.timings, "created": chunk.created, "prompt_version": chunk.prompt_version,
             "final": chunk.final, "stats": stats}, [frames])


def _chunk(session_id: str, h: dict, blobs: list) -> StreamChunk:
    frames = np.frombuffer(blobs[0], dtype=np.uint8).reshape(h["shape"])
    return StreamChunk(session_id, frames, h["first_index"], h["timings"], h["created"], h["prompt_version"],
                       h["final"])


def _settle(fut: Future, result=None, error: BaseException | None = None) -> bool:
    """Resolve ``fut``; False when its waiter had given up (cancelled) and what it asked for must be undone."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        return False
    return True


# -- the engine process ------------------------------------------------------------------------------------------
class _Sender:
    """The engine process's one PUSH socket, shared by the reader thread and the engine thread (ZeroMQ sockets are
    not thread-safe: every send holds the lock)."""

    def __init__(self, sock):
        self.sock, self.lock = sock, threading.Lock()

    def send(self, kind: str, header: dict, blobs: list[bytes] = ()) -> None:
        with self.lock:
            self.sock.send_multipart([kind.encode(), orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY),
                                      *blobs], copy=False)


class _ObserverProxy:
    """EngineObserver of the engine process: each call becomes an "obs" message for the server's metrics."""

    def __init__(self, out: _Sender):
        self._out = out
        for name in _OBSERVED:
            setattr(self, name, self._forward(name))

    def _forward(self, name):
        def call(*args):
            self._out.send("obs", {"method": name, "args": list(args)})
        return call

    def on_output(self, out: GenerateOutput) -> None:
        pass  # the "out" message carries it (the server replays it into its metrics when the future resolves)


class _Forward:
    """One outbox of a stream session in the engine process, shipped to the server: a chunk leaves while the server's
    outbox for it has room (a credit), else it waits here under the outbox's own drop policy; once the outbox has
    ended and is empty, "send" says why. Called from the engine thread (a chunk was put) and the reader (a credit)."""

    def __init__(self, out: _Sender, oid: int, session: StreamSession, outbox: Outbox, on_end, ship):
        self.out, self.oid, self.session, self.outbox, self.on_end = out, oid, session, outbox, on_end
        self.ship = ship  # the bridge's one shipping thread: sends in order, and waits for overlapped decodes
        self.credits = _SERVER_CHUNKS
        self.ended = False
        self.lock = threading.Lock()

    def start(self) -> None:
        self.outbox.set_notify(self.pump)  # ships at once what is already queued

    def grant(self) -> None:
        with self.lock:
            self.credits += 1
        self.pump()

    def pump(self) -> None:
        with self.lock:
            if self.ended:
                return
            while self.credits > 0 and (chunk := self.outbox.take()) is not None:
                self.credits -= 1
                # the pixels of an overlapped decode (StreamConfig.overlap_decode) are waited for on the shipping
                # thread, never on the engine thread that put the chunk
                self.ship(lambda c=chunk, st=self.session.stats(): self.out.send(
                    "chunk", *_chunk_message(self.oid, self.session.model, c.wait(), st)))
            if not self.outbox.ended:
                return
            self.ended = True
            end = {"oid": self.oid, "reason": self.outbox.reason, "stats": self.session.stats()}
            self.ship(lambda: self.out.send("send", end))
        self.on_end(self.oid)

    def detach(self) -> None:
        """The server closed its side: nothing more is shipped."""
        self.outbox.set_notify(None)
        with self.lock:
            self.ended = True


class _StreamBridge:
    """The engine process's side of the stream messages: each is the EngineCore call the in-process routes make."""

    def __init__(self, core, out: _Sender):
        self.core, self.out = core, out
        self.forwards: dict[int, _Forward] = {}
        self.lock = threading.Lock()
        self._shipper = ThreadPoolExecutor(1, thread_name_prefix="fewstep-ship")

    def ship(self, send) -> None:
        """Run ``send`` on the one shipping thread (FIFO: an outbox's chunks and its end leave in order)."""
        def run():
            try:
                send()
            # Last-resort boundary of the shipping thread: a failed send is logged, the next one still goes.
            except Exception:  # noqa: BLE001
                log.exception("engine process: shipping a stream message failed")
        self._shipper.submit(run)

    def handle(self, kind: bytes, h: dict, blobs: list) -> None:
        try:
            getattr(self, kind.decode())(h, blobs)
        except EngineError as e:  # the session ended meanwhile (its "send" tells the server) or a stale update
            log.debug("engine process: %s for a stream: %s", kind.decode(), e)
        # Last-resort boundary of one stream message: a bug fails that message (logged), never the engine process.
        except Exception:  # noqa: BLE001
            log.exception("engine process: %s failed", kind.decode())

    def _forward(self, oid: int, session: StreamSession, outbox: Outbox) -> None:
        f = _Forward(self.out, oid, session, outbox, self._ended, self.ship)
        with self.lock:
            self.forwards[oid] = f
        f.start()

    def _ended(self, oid: int) -> None:
        with self.lock:
            self.forwards.pop(oid, None)

    def _detach(self, oids) -> list[_Forward]:
        with self.lock:
            found = [f for f in (self.forwards.pop(o, None) for o in oids) if f is not None]
        for f in found:
            f.detach()
        return found

    def sopen(self, h: dict, blobs: list) -> None:
        try:
            s = self.core.open_stream(StreamStart(**h["start"]))
        except Exception as e:  # noqa: BLE001 - refused (EngineError) or failed: the server's caller hears either
            self.out.send("sopened", {"oid": h["oid"], "error": _error_json(e)})
            return
        # the answer goes out before any chunk can (one socket, in order)
        self.out.send("sopened", {"oid": h["oid"], "session": _session_json(s), "stats": s.stats()})
        self._forward(h["oid"], s, s.owner)

    def swatch(self, h: dict, blobs: list) -> None:
        try:
            s = self.core.stream_session(h["session_id"])
            outbox = None if s is None else self.core.subscribe(s.id)
        except Exception as e:  # noqa: BLE001 - too many viewers (EngineError) or failed
            self.out.send("swatched", {"oid": h["oid"], "error": _error_json(e)})
            return
        self.out.send("swatched", {"oid": h["oid"], "found": outbox is not None})
        if outbox is not None:
            self._forward(h["oid"], s, outbox)

    def sunwatch(self, h: dict, blobs: list) -> None:
        for f in self._detach([h["oid"]]):
            self.core.unsubscribe(h["session_id"], f.outbox)

    def sclose(self, h: dict, blobs: list) -> None:
        with self.lock:
            oids = [o for o, f in self.forwards.items() if f.session.id == h["session_id"]]
        self._detach(oids)
        self.core.close_stream(h["session_id"], h["reason"])

    def scredit(self, h: dict, blobs: list) -> None:
        with self.lock:
            f = self.forwards.get(h["oid"])
        if f is not None:
            f.grant()

    def supdate(self, h: dict, blobs: list) -> None:
        self.core.update_prompt(h["session_id"], h["prompt"], h["negative_prompt"], h["nasa_scale"],
                                h.get("nag_fields"))

    def sstrength(self, h: dict, blobs: list) -> None:
        self.core.update_strength(h["session_id"], h["strength"])

    def sframe(self, h: dict, blobs: list) -> None:
        # a copy: the buffer is read-only, and the engine hands the frame to torch
        frame = np.frombuffer(blobs[0], dtype=np.uint8).reshape(h["shape"]).copy()
        self.core.set_input_frame(h["session_id"], frame, h["index"])


def build_core(models: list[tuple[str, str]], ecfg, on_state=lambda name, st: None):
    """Load and warm every model, as ``fewstep serve`` does in-process: (core, compile seconds). ``on_state(name,
    state)`` follows each model through loading -> loaded -> warming (the server's /ready)."""
    import torch

    from .backends.factory import make_runner
    from .core import EngineCore

    if ecfg.threads:
        torch.set_num_threads(ecfg.threads)
    device = ecfg.resolve_device()
    dtype = ecfg.resolve_dtype(device)
    t0 = time.perf_counter()
    pipes = {}
    for name, path in models:
        on_state(name, "loading")
        pipes[name] = make_runner(path, ecfg, device, dtype, name)
        on_state(name, "loaded")
    compile_s = sum(r.compile_seconds for r in pipes.values())
    t1 = time.perf_counter()
    core = EngineCore(pipes, ecfg)
    for name in pipes:
        on_state(name, "warming")
    if ecfg.warmup:
        core.warmup()
    log.info("%s loaded on %s/%s in %.1f s (compilation included), warm-up %.1f s", ", ".join(
        f"{p.capabilities.kind} model {n}" for n, p in pipes.items()), device, str(dtype).removeprefix("torch."),
        t1 - t0, time.perf_counter() - t1)
    return core, compile_s


def _request(header: dict, blobs: list) -> GenerateRequest:
    req = GenerateRequest(**{k: header[k] for k in _REQ_FIELDS})
    if header.get("image_shape"):
        req.image = np.frombuffer(blobs[0], dtype=np.uint8).reshape(header["image_shape"])
    return req


def _output_message(out: GenerateOutput) -> tuple[dict, list]:
    header = {"request_id": out.request_id, "seeds": out.seeds, "timings": out.timings, "model": out.model,
              "arrival": out.arrival, "done": out.done, "error": None if out.error is None else _error_json(out.error),
              "arrays": None}
    blobs = []
    if out.images and isinstance(out.images[0], np.ndarray):  # output_format "raw": uint8 arrays
        header["arrays"] = [list(a.shape) for a in out.images]
        blobs = [np.ascontiguousarray(a).tobytes() for a in out.images]
    else:
        blobs = list(out.images)
    return header, blobs


def child_main(args: dict) -> int:
    """The engine process: build the core, then serve the request socket until "stop" or the parent is gone."""
    import zmq

    from .config import EngineConfig

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process drains first, then sends "stop"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(args["requests"])
    out = _Sender(ctx.socket(zmq.PUSH))
    out.sock.setsockopt(zmq.LINGER, 2000)
    out.sock.connect(args["results"])
    try:
        core, compile_s = build_core([tuple(m) for m in args["models"]],
                                     EngineConfig.model_validate_json(args["engine"]),
                                     lambda name, st: out.send("state", {"model": name, "state": st}))
    # Last-resort boundary of the engine process's start: whatever failed, the server turns /health 503 and keeps
    # the details in the log (this process's stderr is the server's).
    except BaseException:  # noqa: BLE001
        log.exception("model load failed (engine process)")
        out.send("failed", {})
        out.sock.close()
        return 1
    core.observer = _ObserverProxy(out)
    core.start()
    out.send("ready", {"compile_seconds": compile_s, "pid": os.getpid(),
                       "models": {n: {"capabilities": _caps_json(p.capabilities), "sizes": _sizes_json(core.sizes[n]),
                                      "stream": _stream_json(p)} for n, p in core.pipelines.items()}})
    streams = _StreamBridge(core, out)

    def deliver(fut: Future) -> None:  # on the engine thread
        header, blobs = _output_message(fut.result())
        out.send("out", header, blobs)

    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    try:
        while True:
            if not poller.poll(500):
                if os.getppid() != parent:
                    log.warning("engine process: the server process is gone; stopping")
                    break
                continue
            kind, header, *blobs = inbox.recv_multipart()
            h = orjson.loads(header)
            if kind == b"gen":
                req = _request(h, blobs)
                try:
                    core.add_request(req).add_done_callback(deliver)
                except EngineError as e:  # refused at admission: answered at once, like in-process
                    out.send("out", {"request_id": req.request_id, "error": _error_json(e)})
            elif kind == b"abort":
                core.abort(h["request_id"], h["reason"])
            elif kind in _STREAM_KINDS:
                streams.handle(kind, h, blobs)
            elif kind == b"stop":
                break
    finally:
        core.shutdown()
        streams._shipper.shutdown(wait=True)  # the streams' last chunks and ends leave before "stopped"
        out.send("stopped", {})
        out.sock.close()
        inbox.close(linger=0)
    return 0


# -- the server's side -------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    future: Future
    model: str | None


class _RemoteSession:
    """The server's side of a stream session of the engine process: the public fields of ``StreamSession`` that the
    routes read, its outboxes on this side (oid -> Outbox; ``owner`` the first) and its stats as of the engine's last
    message about it."""

    def __init__(self, oid: int, fields: dict, stats: dict, start: StreamStart, owner: Outbox):
        for k in _SESSION_FIELDS:
            setattr(self, k, fields[k])
        self.oid, self.start, self.owner = oid, start, owner
        self.opened_at = start.arrival
        self.outboxes: dict[int, Outbox] = {oid: owner}
        self.last_stats = stats

    @property
    def frames_dropped(self) -> int:
        return self.last_stats["frames_dropped"]

    def stats(self) -> dict:
        # queued: in the engine's outbox, plus the chunk (at most) in the owner's outbox here
        return {**self.last_stats, "queued_chunks": self.last_stats["queued_chunks"] + len(self.owner)}


class EngineProcess:
    """The HTTP process's handle on the engine process: ``generate``, ``open_stream`` and ``watch`` as
    ``AsyncEngine``'s (same errors, same cancellation), the stream calls ``AsyncStream`` makes on a core, and what
    the routes read from an in-process core (``pipelines``, ``sizes``, ``streams``, ``check_fps``,
    ``encode_submit``)."""

    def __init__(self, models: list[tuple[str, str]], ecfg, observer=None, on_state=lambda name, st: None,
                 request_timeout_s: float = 60.0, encode_workers: int = 2):
        import zmq

        self.ecfg, self.observer, self.on_state = ecfg, observer, on_state
        self.request_timeout_s = request_timeout_s
        self.pipelines: dict[str, SimpleNamespace] = {}
        self.sizes: dict = {}
        self.streams: dict[str, SimpleNamespace] = {}  # the video models' pipelines (fps, frames per chunk, ...)
        self.compile_seconds = 0.0
        self.failed = self.stopping = False
        self.ready = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._calls: dict[int, tuple[Future, object]] = {}  # oid -> (answer, context): "sopen" and "swatch"
        self._sessions: dict[str, _RemoteSession] = {}
        self._boxes: dict[int, tuple[_RemoteSession, Outbox]] = {}  # oid -> this side's outbox of a session
        self._oids = itertools.count(1)
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(encode_workers, thread_name_prefix="fewstep-encode")
        self._dir = tempfile.mkdtemp(prefix="fewstep-engine-")
        self._ctx = zmq.Context()
        self._requests = self._ctx.socket(zmq.PUSH)
        # a send waits at most 1 s for room (the engine process reads continuously; a dead one no more): never the
        # event loop blocked for good
        self._requests.setsockopt(zmq.SNDTIMEO, 1000)
        self._requests.bind(f"ipc://{self._dir}/requests")
        self._results = self._ctx.socket(zmq.PULL)
        self._results.bind(f"ipc://{self._dir}/results")
        self._send_lock = threading.Lock()
        args = {"models": [list(m) for m in models], "engine": ecfg.model_dump_json(),
                "requests": f"ipc://{self._dir}/requests", "results": f"ipc://{self._dir}/results"}
        # -P: never the working directory first on sys.path (a checkout's kernels/ folder would shadow PyPI's)
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "fewstep.engines.process",
                                      orjson.dumps(args).decode()])
        self._reader = threading.Thread(target=self._read, name="fewstep-engine-results", daemon=True)
        self._reader.start()

    # -- what the routes use -------------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        if not self.alive():
            raise EngineError("the engine process has stopped; the server must be restarted", 503, None,
                              "engine_stopped")
        fut: Future = Future()
        with self._lock:
            self._pending[req.request_id] = _Pending(fut, req.model)
        header = {k: getattr(req, k) for k in _REQ_FIELDS}
        blobs = []
        if req.image is not None:
            header["image_shape"] = list(req.image.shape)
            blobs = [np.ascontiguousarray(req.image, dtype=np.uint8).tobytes()]
        self._send("gen", header, blobs)
        timeout = self.request_timeout_s if req.timeout_s is None else req.timeout_s
        remaining = req.arrival + timeout - time.perf_counter()
        try:
            out = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), max(remaining, 0) + 0.05)
        except asyncio.CancelledError:
            self._send("abort", {"request_id": req.request_id, "reason": "disconnect"})
            raise
        except (TimeoutError, asyncio.TimeoutError):
            # the engine drops it (queued: never runs; running: its result is discarded); the client hears now
            self._send("abort", {"request_id": req.request_id, "reason": "deadline"})
            raise EngineError(f"the request's deadline ({timeout * 1e3:.0f} ms) passed while its batch ran", 504,
                              None, "deadline_exceeded") from None
        if out.error is not None:
            raise out.error
        return out

    async def open_stream(self, start: StreamStart) -> AsyncStream:
        """As ``AsyncEngine.open_stream``: the engine process admits the session (same errors) and ships its chunks
        as raw frames; ``AsyncStream.encoded`` encodes them here."""
        check_frame_format(start.format)
        session = await self._answer(self._call("sopen", start, {"start": _start_json(start)}),
                                     lambda s: self.close_stream(s.id, "disconnected"))
        return AsyncStream(self, session, session.owner)

    async def watch(self, session_id: str) -> AsyncStream | None:
        """An extra viewer on an open session (its own bounded outbox, here and in the engine); None: unknown id."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            return None
        outbox = await self._answer(self._call("swatch", s, {"session_id": session_id}),
                                    lambda o: o is not None and self.unsubscribe(session_id, o))
        return None if outbox is None else AsyncStream(self, s, outbox, owner=False)

    # the calls of AsyncStream on its core, checked here as EngineCore checks them (the route answers at once); the
    # engine process applies them in order, as its core would have
    def update_prompt(self, session_id: str, prompt: str | None, negative_prompt: str | None = None,
                      nasa_scale: float | None = None, nag_fields: dict[str, float | None] | None = None) -> None:
        if prompt is not None:
            check_prompt(prompt)
        s = self._session(session_id)
        nag_fields = {k: v for k, v in (nag_fields or {}).items() if v is not None}
        if negative_prompt or nasa_scale is not None or nag_fields:
            neg = s.negative_prompt if negative_prompt is None else negative_prompt
            check_stream_guidance(s.model, self.pipelines[s.model].capabilities.guidance_modes, neg, nasa_scale,
                                  nag_fields)
        if prompt is not None:
            s.prompt = prompt
        if negative_prompt is not None:
            s.negative_prompt = negative_prompt or None
        self._send("supdate", {"session_id": session_id, "prompt": prompt, "negative_prompt": negative_prompt,
                               "nasa_scale": nasa_scale, "nag_fields": nag_fields})

    def update_strength(self, session_id: str, strength: float) -> None:
        check_strength(strength)
        self._session(session_id)
        self._send("sstrength", {"session_id": session_id, "strength": strength})

    def set_input_frame(self, session_id: str, frame, index: int) -> None:
        self._session(session_id)
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        self._send("sframe", {"session_id": session_id, "index": index, "shape": list(frame.shape)}, [frame])

    def close_stream(self, session_id: str, reason: str = "closed") -> bool:
        """As ``EngineCore.close_stream``: the session ends in the engine; chunks not taken are dropped (counted,
        reason "closed"). Returns whether it was open."""
        return self._end_session(session_id, reason, discard=True, tell_engine=True)

    def close_streams(self, reason: str = "shutdown") -> None:
        """As ``EngineCore.close_streams`` (the drain): every route sees its stream end with ``reason``."""
        with self._lock:
            ids = list(self._sessions)
        for sid in ids:
            self._end_session(sid, reason, discard=False, tell_engine=True)

    def unsubscribe(self, session_id: str, outbox: Outbox) -> None:
        with self._lock:
            oid = next((o for o, (_, b) in self._boxes.items() if b is outbox), None)
            s = None if oid is None else self._boxes.pop(oid)[0]
            if s is not None:
                s.outboxes.pop(oid, None)
        if s is not None:
            self._send("sunwatch", {"oid": oid, "session_id": session_id})
        outbox.close("unsubscribed")
        leftover = outbox.discard()
        if leftover and s is not None and self.observer is not None:
            self.observer.on_frames_dropped(s.model, leftover, "closed")

    def check_fps(self, fps: float, allow_unpaced: bool) -> None:
        check_fps(self.ecfg.stream, fps, allow_unpaced)

    def encode_submit(self, fn, *args) -> Future:
        """CPU work of the HTTP side (JSON, base64, input image decoding), off the event loop."""
        return self._pool.submit(fn, *args)

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.failed and self._reader.is_alive()

    def dead_reason(self) -> str | None:
        if self.stopping or self.alive():
            return None
        return "the engine process has stopped; see the server log"

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the models are loaded and warm (True) or the engine process failed or exited (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if not self.alive() or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process (it finishes nothing new: the server drained first) and close the sockets."""
        self.stopping = True
        if self.proc.poll() is None:
            self._send("stop", {})
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("engine process did not stop in %.0f s; killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        self._fail_pending("the server is shutting down", "shutdown")
        with self._send_lock:
            self._closed = True
            self._requests.close(linger=0)
        self._results.close(linger=0)
        self._ctx.term()
        self._pool.shutdown(wait=False)
        for name in ("requests", "results"):
            try:
                os.unlink(os.path.join(self._dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass

    # -- internals -----------------------------------------------------------------------------------------------
    def _send(self, kind: str, header: dict, blobs: list = ()) -> None:
        import zmq

        with self._send_lock:
            if self._closed or self.proc.poll() is not None:  # nobody reads: the reader ends what waits
                return
            try:
                self._requests.send_multipart([kind.encode(), orjson.dumps(header), *blobs], copy=False)
            except zmq.Again:
                log.warning("engine process: %r not sent (the engine process does not read)", kind)

    def _call(self, kind: str, context, header: dict) -> Future:
        """Send a stream message that the engine answers ("sopen", "swatch"); the answer resolves the future."""
        if not self.alive():
            raise EngineError("the engine process has stopped; the server must be restarted", 503, None,
                              "engine_stopped")
        fut: Future = Future()
        oid = next(self._oids)
        with self._lock:
            self._calls[oid] = (fut, context)
        self._send(kind, {"oid": oid, **header})
        return fut

    @staticmethod
    async def _answer(fut: Future, undo):
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            # the caller left while the engine answered: what it opened is closed as soon as the answer is here
            # (a future still pending is cancelled with the task: the reader undoes it, see _settle)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or undo(f.result()))
            raise

    def _session(self, session_id: str) -> _RemoteSession:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise EngineError("no such stream session", 404, "session_id", "session_not_found")
        return s

    def _outbox(self, oid: int) -> Outbox:
        box = Outbox(_SERVER_CHUNKS)
        box.on_take = lambda: self._send("scredit", {"oid": oid})  # room here again: the engine ships the next
        return box

    def _end_session(self, session_id: str, reason: str, discard: bool, tell_engine: bool) -> bool:
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return False
            boxes = list(s.outboxes.values())
            for oid in s.outboxes:
                self._boxes.pop(oid, None)
            s.outboxes.clear()
        if tell_engine:
            self._send("sclose", {"session_id": session_id, "reason": reason})
        leftover = 0
        for box in boxes:
            box.close(reason)
            if discard:
                leftover += box.discard()
        if leftover and self.observer is not None:
            self.observer.on_frames_dropped(s.model, leftover, "closed")
        return True

    def _fail_pending(self, why: str, stream_reason: str = ENGINE_STOPPED) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            calls, self._calls = self._calls, {}
            sessions = list(self._sessions)
        for p in pending.values():
            if not p.future.done():
                p.future.set_result(GenerateOutput("", [], [], {}, error=EngineError(why, 503, None,
                                                                                       "engine_stopped")))
        for fut, _ in calls.values():
            _settle(fut, error=EngineError(why, 503, None, "engine_stopped"))
        for sid in sessions:  # the engine's sessions are gone with it
            self._end_session(sid, stream_reason, discard=False, tell_engine=False)

    def _read(self) -> None:
        try:
            self._read_loop()
        # Last-resort boundary of the result reader: if it dies, no answer can arrive any more; fail what waits and
        # let /health say so (dead_reason), rather than leave requests to their deadlines.
        except Exception:  # noqa: BLE001
            log.exception("engine process: the result reader failed")
            self.failed = True
            self._fail_pending("the engine process's answers can no longer be read; the server must be restarted")

    def _read_loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        while True:
            try:
                ready = poller.poll(200)
            except zmq.ZMQError:  # the context was terminated: shutdown
                return
            if not ready:
                if self.proc.poll() is not None:
                    if not self.stopping:
                        log.error("engine process exited with code %s", self.proc.returncode)
                    self.failed = not self.stopping
                    self._fail_pending("the engine process has stopped; the server must be restarted")
                    return
                continue
            kind, header, *blobs = self._results.recv_multipart()
            h = orjson.loads(header)
            if kind == b"out":
                self._resolve(h, blobs)
            elif kind == b"chunk":
                self._chunk_arrived(h, blobs)
            elif kind == b"send":
                self._outbox_ended(h)
            elif kind == b"sopened":
                self._opened(h)
            elif kind == b"swatched":
                self._watched(h)
            elif kind == b"obs":
                if self.observer is not None:
                    getattr(self.observer, h["method"])(*h["args"])
            elif kind == b"state":
                self.on_state(h["model"], h["state"])
            elif kind == b"ready":
                for name, m in h["models"].items():
                    self.pipelines[name] = SimpleNamespace(capabilities=_caps(m["capabilities"]), **(m["stream"] or {}))
                    self.sizes[name] = _sizes(m["sizes"])
                    if m["stream"] is not None:
                        self.streams[name] = self.pipelines[name]
                self.compile_seconds = h["compile_seconds"]
                log.info("engine process %d ready", h["pid"])
                self.ready.set()
            elif kind == b"failed":
                self.failed = True
            elif kind == b"stopped":
                return

    def _opened(self, h: dict) -> None:
        with self._lock:
            fut, start = self._calls.pop(h["oid"], (None, None))
        if fut is None:
            return
        if h.get("error"):
            _settle(fut, error=_error(h["error"]))
            return
        s = _RemoteSession(h["oid"], h["session"], h["stats"], start, self._outbox(h["oid"]))
        with self._lock:
            self._sessions[s.id] = s
            self._boxes[s.oid] = (s, s.owner)
        if not _settle(fut, s):
            self.close_stream(s.id, "disconnected")

    def _watched(self, h: dict) -> None:
        with self._lock:
            fut, s = self._calls.pop(h["oid"], (None, None))
        if fut is None:
            return
        if h.get("error"):
            _settle(fut, error=_error(h["error"]))
            return
        if not h["found"]:
            _settle(fut, None)
            return
        box = self._outbox(h["oid"])
        with self._lock:
            s.outboxes[h["oid"]] = box
            self._boxes[h["oid"]] = (s, box)
        if not _settle(fut, box):
            self.unsubscribe(s.id, box)

    def _chunk_arrived(self, h: dict, blobs: list) -> None:
        with self._lock:
            s, box = self._boxes.get(h["oid"], (None, None))
        if box is None:  # its viewer left while it crossed: dropped, as what the engine's outbox held then
            if self.observer is not None:
                self.observer.on_frames_dropped(h["model"], h["shape"][0], "closed")
            return
        s.last_stats = h["stats"]
        chunk = _chunk(s.id, h, blobs)
        if box is s.owner and s.start.format != "raw":  # as the engine does in-process: encoding starts now
            chunk.encoded(s.start.format, s.start.quality, self._pool.submit)
        dropped = box.put(chunk)  # never more than the credits granted: a drop here would be the bridge's bug
        if dropped and self.observer is not None:
            self.observer.on_frames_dropped(s.model, dropped, "behind")

    def _outbox_ended(self, h: dict) -> None:
        with self._lock:
            s, box = self._boxes.pop(h["oid"], (None, None))
            if box is None:
                return
            s.outboxes.pop(h["oid"], None)
            s.last_stats = h["stats"]
            if h["oid"] == s.oid:  # the session is over in the engine (finished, failed): as in-process, unknown
                self._sessions.pop(s.id, None)
        box.close(h["reason"])

    def _resolve(self, h: dict, blobs: list) -> None:
        with self._lock:
            p = self._pending.pop(h["request_id"], None)
        if p is None:  # answered already (deadline passed, aborted): nobody waits
            return
        if h.get("timings") is None:  # refused at admission
            out = GenerateOutput(h["request_id"], [], [], {}, model=p.model or "", error=_error(h["error"]))
        else:
            images = [bytes(b) for b in blobs]
            if h["arrays"]:
                images = [np.frombuffer(b, dtype=np.uint8).reshape(s) for b, s in zip(images, h["arrays"])]
            out = GenerateOutput(h["request_id"], images, h["seeds"], h["timings"], model=h["model"],
                                 error=None if h["error"] is None else _error(h["error"]), arrival=h["arrival"],
                                 done=h["done"])
            if self.observer is not None:
                self.observer.on_output(out)
        p.future.set_result(out)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")
    return child_main(orjson.loads(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
