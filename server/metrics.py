"""Prometheus metrics (seconds), fed by the same timings the response carries and the benchmarks read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fewstep.engines.core import STAGES, GenerateOutput

# Few-step latencies span ~1 ms (cached prompt encode on a GPU) to tens of seconds (CPU, large batches).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Inter-frame times: 1 ms (hundreds of fps) to 2 s (a stalled stream).
FRAME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.0167, 0.025, 0.033, 0.05, 0.067, 0.1, 0.125, 0.2, 0.3, 0.5, 1.0, 2.0)


class Metrics:
    """One registry per app, so several apps (tests) never share counters. Implements EngineObserver."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_time = Histogram("fewstep_request_queue_time_seconds", "Time a request waited before its batch ran",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fewstep_e2e_request_latency_seconds", "Arrival at the engine to encoded images",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("fewstep_stage_latency_seconds", "Per-stage latency", ["model", "stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("fewstep_batch_size", "Images per forward pass", ["model"], buckets=BATCH_BUCKETS,
                               registry=r)
        self.running = Gauge("fewstep_num_requests_running", "Images in the running batch", registry=r)
        self.waiting = Gauge("fewstep_num_requests_waiting", "Requests waiting in the engine queue", registry=r)
        self.requests = Counter("fewstep_requests", "Finished HTTP generation requests", ["model", "status"],
                                registry=r)
        self.errors = Counter("fewstep_request_errors", "Failed requests by error code", ["model", "code"],
                              registry=r)
        self.images = Counter("fewstep_images_generated", "Images generated", ["model"], registry=r)
        self.cancelled = Counter("fewstep_requests_cancelled", "Requests cancelled before their result was sent: "
                                 "reason 'disconnect' (the client left) or 'deadline' (past its deadline); stage "
                                 "'queued' (never ran) or 'running' (its batch ran, the result was discarded)",
                                 ["model", "reason", "stage"], registry=r)
        # streams
        self.ttff = Histogram("fewstep_time_to_first_frame_seconds", "Stream start to its first frame handed to "
                              "the transport (includes buffer warm-up, decode and encode)", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_frame = Histogram("fewstep_inter_frame_latency_seconds", "Time between consecutive chunks sent "
                                     "to a viewer divided by the chunk's frames; observed once per frame",
                                     ["model"], buckets=FRAME_BUCKETS, registry=r)
        self.frames = Counter("fewstep_frames_generated", "Frames emitted by stream sessions", ["model"], registry=r)
        self.frames_dropped = Counter("fewstep_frames_dropped", "Frames generated but never delivered: 'behind' = "
                                      "dropped because the viewer fell behind (latest wins), 'closed' = still "
                                      "queued when the viewer left", ["model", "reason"], registry=r)
        self.sessions = Gauge("fewstep_active_sessions", "Open stream sessions", registry=r)
        self.stream_batch = Histogram("fewstep_stream_batch_sessions", "Stream sessions per forward pass", ["model"],
                                      buckets=BATCH_BUCKETS, registry=r)

    # EngineObserver
    def on_batch(self, model: str, images: int) -> None:
        self.batch.labels(model).observe(images)

    def on_queue(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def on_output(self, out: GenerateOutput) -> None:
        if out.error is not None:
            return
        t = out.timings
        self.queue_time.labels(out.model).observe(t["queue_ms"] / 1e3)
        self.e2e.labels(out.model).observe(t["total_ms"] / 1e3)
        for s in STAGES:
            self.stage.labels(out.model, s).observe(t[f"{s}_ms"] / 1e3)
        self.images.labels(out.model).inc(len(out.images))

    def on_stream_step(self, model: str, sessions: int, frames: int) -> None:
        self.stream_batch.labels(model).observe(sessions)
        if frames:
            self.frames.labels(model).inc(frames)

    def on_frames_dropped(self, model: str, frames: int, reason: str) -> None:
        self.frames_dropped.labels(model, reason).inc(frames)

    def on_sessions(self, active: int) -> None:
        self.sessions.set(active)

    def on_cancelled(self, model: str, reason: str, stage: str) -> None:
        self.cancelled.labels(model, reason, stage).inc()

    # transports
    def on_first_frame(self, model: str, seconds: float) -> None:
        self.ttff.labels(model).observe(seconds)

    def on_chunk_sent(self, model: str, frames: int, seconds_since_previous: float) -> None:
        per_frame = seconds_since_previous / max(frames, 1)
        h = self.inter_frame.labels(model)
        for _ in range(frames):
            h.observe(per_frame)

    # HTTP layer
    def on_request(self, model: str, status: int, code: str | None = None) -> None:
        self.requests.labels(model, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, code or str(status)).inc()

    def render(self, labels: dict[str, str] | None = None) -> bytes:
        """The text exposition; ``labels`` (e.g. {"replica": id} on a Ray Serve replica) are added to every sample,
        so that one scrape target per replica, or their concatenation, keeps the replicas apart."""
        return generate_latest(_Labelled(self.registry, labels) if labels else self.registry)


class _Labelled:
    """A registry view whose samples carry extra labels (prometheus_client has no constant labels per registry)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry, self.labels = registry, labels

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield family
