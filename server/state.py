"""What the routes share: the config, the engine (once loaded) and the metrics. Loading runs off the event loop."""

from __future__ import annotations

import logging
import threading
import time

from fewstep.engines.core import AsyncEngine, EngineCore, EngineError
from fewstep.engines.loading import model_kind

from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger("fewstep.server")


class ConfigError(ValueError):
    """A configuration the server cannot serve, found before anything loads; the CLI prints it and exits 2."""


def check_backend(config: ServerConfig, models: list) -> None:
    """Refuse what the chosen backend cannot serve, and say what an unverified backend has been tested on."""
    if config.engine.backend != "tensorrt":
        return
    from fewstep.engines.backends.tensorrt import RUNTIME_STATUS

    try:
        videos = [name for name, path in models if model_kind(path) == "video"]
    except ValueError as e:  # CheckpointError (no such model directory) included
        raise ConfigError(str(e)) from None
    if videos:
        hint = (" (fewstep serve without --model serves the embedded video model too; pass --model default for the "
                "embedded image model alone)" if config.model is None else "")
        raise ConfigError(f"the TensorRT engine serves image models only, and {', '.join(videos)} is a video model"
                          f"{hint}; serve video models with --engine eager or --engine compiled")
    log.warning("--engine tensorrt: %s", RUNTIME_STATUS)


class AppState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine: AsyncEngine | None = None
        self.core: EngineCore | None = None
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
        /health answers at once and /ready turns true only when requests will be fast."""
        import torch

        from fewstep.engines.backends.factory import make_runner

        try:
            ecfg = self.config.engine
            if ecfg.threads:
                torch.set_num_threads(ecfg.threads)
            device = ecfg.resolve_device()
            dtype = ecfg.resolve_dtype(device)
            t0 = time.perf_counter()
            pipes = {}
            for name, path in self.models:
                self.model_states[name] = "loading"
                pipes[name] = make_runner(path, ecfg, device, dtype, name)
                self.model_states[name] = "loaded"
            built = sum(r.compile_seconds for r in pipes.values())
            self.compile_seconds = built or None
            t1 = time.perf_counter()
            core = EngineCore(pipes, ecfg)
            self.model_states.update({name: "warming" for name in pipes})
            if ecfg.warmup:
                core.warmup()
            t2 = time.perf_counter()
            core.observer = self.metrics  # attach after warm-up: warm-up requests are not traffic
            core.start()
            self.core, self.engine = core, AsyncEngine(core)
            log.info("%s loaded on %s/%s in %.1f s (compilation included), warm-up %.1f s", ", ".join(
                f"{p.capabilities.kind} model {n}" for n, p in pipes.items()), device,
                str(dtype).removeprefix("torch."), t1 - t0, t2 - t1)
            self.model_states.update({name: "ready" for name in pipes})
            self.ready.set()
        # Last-resort boundary of the loader thread: whatever fails (SystemExit from a missing embedded model
        # included) turns /health 503 (restart me); the details go to the log only, because the exception's text can
        # hold paths and allocator messages.
        except BaseException:  # noqa: BLE001
            log.exception("model load failed")
            self.model_states.update({n: "failed" for n, st in self.model_states.items() if st != "queued"})
            self.load_error = "the model failed to load; see the server log"

    def shutdown(self) -> None:
        if self.core:
            self.core.shutdown()
