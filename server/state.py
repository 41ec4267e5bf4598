"""What the routes share: the config, the engine (once loaded) and the metrics. Loading runs off the event loop."""

from __future__ import annotations

import logging
import threading
import time

from fewstep.engines.core import AsyncEngine, EngineCore

from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger("fewstep.server")


class AppState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine: AsyncEngine | None = None
        self.core: EngineCore | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.started = int(time.time())
        self.model_name = config.served_name()

    def load(self) -> None:
        """Load the model, warm it up, start the engine thread. Runs in a background thread at start-up so that
        /health answers at once and /ready turns true only when requests will be fast."""
        from fewstep.engines.loading import load_checkpoint
        from fewstep.engines.pipeline import FewStepPipeline

        try:
            ecfg = self.config.engine
            device = ecfg.resolve_device()
            dtype = ecfg.resolve_dtype(device)
            path = self.config.model_dir()
            t0 = time.perf_counter()
            pipe = FewStepPipeline(load_checkpoint(path, device, dtype), device, dtype, ecfg.attention)
            t1 = time.perf_counter()
            core = EngineCore({self.model_name: pipe}, ecfg)
            if ecfg.warmup:
                core.warmup()
            t2 = time.perf_counter()
            core.observer = self.metrics  # attach after warm-up: warm-up requests are not traffic
            core.start()
            self.core, self.engine = core, AsyncEngine(core)
            log.info("model %s loaded from %s on %s/%s in %.1f s, warm-up %.1f s", self.model_name, path, device,
                     str(dtype).removeprefix("torch."), t1 - t0, t2 - t1)
            self.ready.set()
        except BaseException as e:  # noqa: BLE001 - reported on /ready and in the log, the process keeps serving
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", self.load_error)

    def shutdown(self) -> None:
        if self.core:
            self.core.shutdown()
