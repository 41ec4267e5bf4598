"""The engine in its own process (vLLM v1's split): the HTTP process validates, serialises and answers; the engine
process loads the models, schedules and runs them. The GIL of one no longer stalls the other: uvicorn's parsing,
JSON and base64 run while the engine thread launches kernels, and a slow client cannot delay a batch.

    HTTP process                                     engine process (python -P -m fewstep.engines.process)
    EngineProcess.generate(req) --PUSH "gen"------>  EngineCore.add_request (its own thread, as in-process)
                                <--PULL "out"------  the request's future resolves: timings, seeds, image bytes
    (cancelled task)            --PUSH "abort"---->  EngineCore.abort: queued, it never runs
                                <--PULL "obs"------  EngineObserver calls, replayed into the server's metrics
                                <--PULL "state"----  load progress (/ready), then "ready" (capabilities) or "failed"

Two ZeroMQ PUSH/PULL pairs over ipc:// sockets in a private directory. Every message is
``[kind, orjson header, *blobs]``: requests and results are plain fields, image bytes travel as their own frames
(never pickled; an input image for image-to-image is its raw uint8 pixels plus a shape). ``EngineCore`` stays
drivable in-process without any of this (tests, benchmarks); ``fewstep serve --engine-process`` turns it on.

Scope: image models (HTTP images, image edits, the realtime WebSocket). Streams stay with the in-process engine for
now: a server with a video model refuses --engine-process at start-up (server/state.py says so).

Lifetime: the child ignores SIGINT/SIGTERM (a terminal's Ctrl-C or a group kill reaches both processes; the HTTP
process drains first, then sends "stop"), and exits by itself when its parent is gone (polled every 0.5 s), so no
engine is left holding a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import orjson

from .errors import EngineError
from .request import GenerateOutput, GenerateRequest

log = logging.getLogger("fewstep.engines")

_REQ_FIELDS = [f.name for f in fields(GenerateRequest) if f.name != "image"]
_OBSERVED = ("on_batch", "on_queue", "on_stream_step", "on_frames_dropped", "on_sessions", "on_cancelled")


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
                       "models": {n: {"capabilities": _caps_json(p.capabilities), "sizes": _sizes_json(core.sizes[n])}
                                  for n, p in core.pipelines.items()}})

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
            elif kind == b"stop":
                break
    finally:
        core.shutdown()
        out.send("stopped", {})
        out.sock.close()
        inbox.close(linger=0)
    return 0


# -- the server's side -------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    future: Future
    model: str | None


class EngineProcess:
    """The HTTP process's handle on the engine process: ``generate`` as ``AsyncEngine.generate`` (same errors, same
    cancellation), and what the routes read from an in-process core (``pipelines``' capabilities, ``sizes``,
    ``encode_submit``)."""

    streams: dict = {}  # streams are served in-process only (see the module docstring)

    def __init__(self, models: list[tuple[str, str]], ecfg, observer=None, on_state=lambda name, st: None,
                 request_timeout_s: float = 60.0, encode_workers: int = 2):
        import zmq

        self.ecfg, self.observer, self.on_state = ecfg, observer, on_state
        self.request_timeout_s = request_timeout_s
        self.pipelines: dict[str, SimpleNamespace] = {}
        self.sizes: dict = {}
        self.compile_seconds = 0.0
        self.failed = self.stopping = False
        self.ready = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(encode_workers, thread_name_prefix="fewstep-encode")
        self._dir = tempfile.mkdtemp(prefix="fewstep-engine-")
        self._ctx = zmq.Context()
        self._requests = self._ctx.socket(zmq.PUSH)
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

    def open_stream(self, start):
        raise EngineError("streams are not served by a server with --engine-process; serve video models without it",
                          400, "model", "streams_unavailable")

    def watch(self, session_id: str):
        return None

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
        self._fail_pending("the server is shutting down")
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
    def _send(self, kind: str, header: dict, blobs: list[bytes] = ()) -> None:
        with self._send_lock:
            self._requests.send_multipart([kind.encode(), orjson.dumps(header), *blobs], copy=False)

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_result(GenerateOutput("", [], [], {}, error=EngineError(why, 503, None,
                                                                                       "engine_stopped")))

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
            elif kind == b"obs":
                if self.observer is not None:
                    getattr(self.observer, h["method"])(*h["args"])
            elif kind == b"state":
                self.on_state(h["model"], h["state"])
            elif kind == b"ready":
                for name, m in h["models"].items():
                    self.pipelines[name] = SimpleNamespace(capabilities=_caps(m["capabilities"]))
                    self.sizes[name] = _sizes(m["sizes"])
                self.compile_seconds = h["compile_seconds"]
                log.info("engine process %d ready", h["pid"])
                self.ready.set()
            elif kind == b"failed":
                self.failed = True
            elif kind == b"stopped":
                return

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
