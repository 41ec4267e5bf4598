"""What the routes share: the config, the engine (once loaded) and the metrics. Loading runs off the event loop."""

from __future__ import annotations

import logging
import threading
import time

from fewstep.engines.core import AsyncEngine, EngineCore, EngineError
from fewstep.engines.loading import model_kind
from fewstep.engines.process import EngineProcess

from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger("fewstep.server")


class ConfigError(ValueError):
    """A configuration the server cannot serve, found before anything loads; the CLI prints it and exits 2."""


def refuse_video_models(config: ServerConfig, models: list, what: str, instead: str) -> None:
    """Raise ConfigError if ``models`` holds a video model that ``what`` (e.g. "the TensorRT engine") cannot serve;
    ``instead`` says how to serve it."""
    try:
        videos = [name for name, path in models if model_kind(path) == "video"]
    except ValueError as e:  # CheckpointError (no such model directory) included
        raise ConfigError(str(e)) from None
    if videos:
        hint = (" (fewstep serve without --model serves the embedded video model too; pass --model default for the "
                "embedded image model alone)" if config.model is None else "")
        raise ConfigError(f"{what} serves image models only, and {', '.join(videos)} is a video model{hint}; "
                          f"{instead}")


def check_backend(config: ServerConfig, models: list) -> None:
    """Refuse what the chosen backend cannot serve, and say what an unverified backend has been tested on."""
    if config.engine.backend != "tensorrt":
        return
    from fewstep.engines.backends.tensorrt import RUNTIME_STATUS

    refuse_video_models(config, models, "the TensorRT engine",
                        "serve video models with --engine eager or --engine compiled")
    log.warning("--engine tensorrt: %s", RUNTIME_STATUS)


class AppState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine: AsyncEngine | None = None
        self.core: EngineCore | EngineProcess | None = None
        self._process: EngineProcess | None = None  # with engine_process, from the start of loading
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.started = int(time.time())
        self.models = config.served_models()
        check_backend(config, self.models)  # before anything loads: a refusal is a one-line error, not a bad /ready
        self.model_name = self.models[0][0]   # the default model: /health, /ready and request metrics name it
        # per model, for /ready: queued -> loading -> warming (all loaded, warm-up running) -> ready | failed
        self.model_states: dict[str, str] = {name: "queued" for name, _ in self.models}
        self.compile_seconds: float | None = None
        # the Ray Serve replica this app runs in (server/ray.py sets it), or None: /metrics labels its samples with it
        self.replica: str | None = None

    def check_limits(self, *, prompt: str | None = None, negative_prompt: str | None = None, n: int | None = None,
                     width: int | None = None, height: int | None = None) -> None:
        """Every request (HTTP and WebSocket) against ``config.limits``, the one source of these limits: raises
        EngineError (400) naming the limit."""
        limits = self.config.limits
        for param, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and len(text) > limits.max_prompt_chars:
                raise EngineError(f"{param} must be at most {limits.max_prompt_chars} characters on this server, got "
                                  f"{len(text)}", 400, param, "prompt_too_long")
        if n is not None and not 1 <= n <= limits.max_n:
            raise EngineError(f"n must be an integer from 1 to {limits.max_n} on this server, got {n}", 400, "n",
                              "invalid_n")
        if width is not None and max(width, height or 0) > limits.max_side:
            raise EngineError(f"size sides must be at most {limits.max_side} pixels on this server, got "
                              f"{width}x{height}", 400, "size", "invalid_size")

    def load(self) -> None:
        """Load the models, warm them up, start the engine thread. Runs in a background thread at start-up so that
        /health answers at once and /ready turns true only when requests will be fast. With ``engine_process`` the
        engine runs in a process of its own (engines/process.py) and this thread waits for it."""
        try:
            if self.config.engine_process:
                self._load_engine_process()
                return
            from fewstep.engines.process import build_core

            core, compile_s = build_core(self.models, self.config.engine, self.model_states.__setitem__)
            self.compile_seconds = compile_s or None
            core.observer = self.metrics  # attach after warm-up: warm-up requests are not traffic
            core.start()
            self.core, self.engine = core, AsyncEngine(core)
            self.model_states.update({name: "ready" for name in core.pipelines})
            self.ready.set()
        # Last-resort boundary of the loader thread: whatever fails (SystemExit from a missing embedded model
        # included) turns /health 503 (restart me); the details go to the log only, because the exception's text can
        # hold paths and allocator messages.
        except BaseException:  # noqa: BLE001
            log.exception("model load failed")
            self._failed()

    def _failed(self) -> None:
        self.model_states.update({n: "failed" for n, st in self.model_states.items() if st != "queued"})
        self.load_error = "the model failed to load; see the server log"

    def _load_engine_process(self) -> None:
        from fewstep.engines.process import EngineProcess

        proc = self._process = EngineProcess(
            [(n, str(p)) for n, p in self.models], self.config.engine, observer=self.metrics,
            on_state=self.model_states.__setitem__, request_timeout_s=self.config.engine.batching.request_timeout_s,
            encode_workers=self.config.engine.encode_workers)
        if not proc.wait_ready():
            log.error("model load failed in the engine process (its log is above)")
            self._failed()
            return
        self.compile_seconds = proc.compile_seconds or None
        self.core = self.engine = proc
        self.model_states.update({name: "ready" for name in proc.pipelines})
        self.ready.set()

    def shutdown(self) -> None:
        if self.core:
            self.core.shutdown()
        elif self._process is not None:  # still loading: stop it (killed if it cannot read "stop" in time)
            self._process.shutdown(timeout=5)
