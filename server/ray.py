"""fewstep on Ray Serve: replicas of the single-process app behind Ray's HTTP proxy.

Each replica is one ``create_app`` (server/app.py): the same routes, limits, errors and OpenAI-compatible API, and one
engine (one GPU per replica on a GPU host, CPU replicas on a CPU host). Ray's proxy is the one HTTP entry point
(WebSockets included); server/ray_routing.py says which replica serves which request.

Run it with ``fewstep serve --replicas N`` (one machine, or ``--ray-address`` for a running cluster), or with Ray's own
tools from a Serve config file (``serve run`` / ``serve deploy`` / KubeRay; deploy/ray/), whose ``import_path`` is
``fewstep.server.ray:build_app`` and whose ``args`` are a ``RayAppConfig``.

A replica answers nothing until its models are loaded and warm: its constructor returns only then (the app's lifespan
loads them), and Ray routes to a replica only after its constructor returns, so compiling replicas get no traffic and
the proxy's ``/-/healthz`` and our ``/ready`` turn true with the first warm replica. A replica whose engine died fails
Ray's health check (``check_health``) and Ray replaces it.

A replica that Ray stops (a redeploy's rolling update, a scale-in, ``serve.shutdown``) drains: Ray's routers stop
sending it work, Ray waits for its ongoing requests (polled every ``graceful_shutdown_wait_loop_s``, at most
``graceful_shutdown_timeout_s``), then runs the app's shutdown. A stream socket is an ongoing request for its whole
life, so the replica ends its stream sessions as soon as Ray begins (``_DrainWhenStopped``: ``stopped``, reason
``shutdown``, close 1001: reconnecting lands on a live replica) and refuses new sockets, while its image requests
finish. Ray gives the user class no hook before that wait (``__del__`` runs after it); the one private detail read
is the replica's ``_shutting_down`` flag (``ray_replica_stopping``; checked by tests/e2e/test_ray.py). Where a Ray
lacks it, streams end when Ray stops the replica and the proxy tells their clients to reconnect (ray_routing.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from .config import ServerConfig, load_config
from .ray_routing import PROXY_CALLBACK, QUEUE_STAT

log = logging.getLogger("fewstep.server")
APP_NAME = "fewstep"
REPLICA_HEADER = "X-Fewstep-Replica"  # on every HTTP response from a replica: which one answered (ids as in /metrics)


class AutoscalingOptions(BaseModel):
    """Ray Serve's autoscaler: replicas follow the ongoing requests per replica (HTTP requests and open sockets)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="never fewer replicas (0: scale to zero when idle)")
    max_replicas: int = Field(4, ge=1, description="never more replicas (one GPU each on a GPU host)")
    target_ongoing_requests: float = Field(8.0, gt=0, description="ongoing requests per replica that the autoscaler "
                                           "aims at: above it, replicas are added")
    upscale_delay_s: float = Field(10.0, ge=0, description="load must stay high this long before scaling out")
    downscale_delay_s: float = Field(120.0, ge=0, description="load must stay low this long before scaling in")
    look_back_period_s: float = Field(30.0, gt=0, description="the window over which Ray averages the ongoing "
                                      "requests it compares with the target (Ray's default, 30 s: a burst scales "
                                      "out early, and scaling in waits for the window to empty too)")

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class RayAppConfig(BaseModel):
    """The ``args`` of the Ray Serve application (a Serve config file's ``args:``; ``fewstep serve --replicas``)."""

    model_config = ConfigDict(extra="forbid")
    server: dict[str, Any] = Field(default_factory=dict, description="ServerConfig fields (server/config.py), nested "
                                   "as in {'engine': {'device': 'cuda'}} or dotted as in {'engine.device': 'cuda'}; "
                                   "each replica reads FEWSTEP_* variables beneath them, so keep API keys in "
                                   "FEWSTEP_API_KEYS rather than here")
    replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: AutoscalingOptions | None = Field(None, description="scale between min and max replicas instead")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica; None: 1 when the engine device is cuda, "
                                   "or auto on a cluster with GPUs; else 0")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    # A WebSocket counts as one ongoing request for its whole life; the app's own admission (queue and session
    # limits, answered 503 with Retry-After) is what bounds the work, so Ray's cap only stops runaway fan-in.
    max_ongoing_requests: int = Field(256, ge=1, description="requests and open sockets per replica before Ray "
                                      "holds new ones back in the proxy")
    graceful_shutdown_timeout_s: float = Field(15.0, ge=0, description="on redeploy or scale-in: time a replica "
                                               "gets to finish its requests before Ray kills it (its streams end "
                                               "with 'stopped' at once; raise this above the longest request)")
    graceful_shutdown_wait_loop_s: float = Field(0.5, gt=0, description="on redeploy or scale-in: how often a "
                                                 "stopping replica checks whether its requests are done (Ray's "
                                                 "default, 2 s, keeps an idle replica up to 2 s longer)")
    health_check_period_s: float = Field(5.0, gt=0, description="how often Ray asks each replica check_health")
    routing_stats_period_s: float = Field(0.5, gt=0, description="how often each replica reports its engine queue "
                                          "to the router")

    @model_validator(mode="after")
    def _server_config_parses(self):
        check_keys(ServerConfig, _nested(self.server))
        self.server_config()  # values checked too: a bad one fails at deploy, not on every replica
        return self

    def server_config(self, environ: dict | None = None) -> ServerConfig:
        return load_config(_dotted(self.server), environ)

    def resolved_num_gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        device = self.server_config().engine.device
        if device == "cuda":
            return 1.0
        if device == "cpu":
            return 0.0
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve deployment options (what ``serve.deployment(...).options`` takes)."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.resolved_num_gpus()},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "health_check_period_s": self.health_check_period_s,
            "request_router_config": RequestRouterConfig(
                request_router_class="fewstep.server.ray_routing:FewstepRouter",
                request_routing_stats_period_s=self.routing_stats_period_s),
        }
        if self.autoscaling is not None:
            a = self.autoscaling
            opts["autoscaling_config"] = AutoscalingConfig(
                min_replicas=a.min_replicas, max_replicas=a.max_replicas, initial_replicas=max(1, a.min_replicas),
                target_ongoing_requests=a.target_ongoing_requests, upscale_delay_s=a.upscale_delay_s,
                downscale_delay_s=a.downscale_delay_s, look_back_period_s=a.look_back_period_s)
        else:
            opts["num_replicas"] = self.replicas
        return opts


def check_keys(model: type[BaseModel], tree: dict, where: str = "server") -> None:
    """Every key names a field (pydantic ignores unknown keys, and a misspelt option in a deployment file would be
    dropped silently)."""
    for key, value in tree.items():
        field = model.model_fields.get(key)
        if field is None:
            raise ValueError(f"{where}.{key} is not an option; expected one of {', '.join(model.model_fields)}")
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            check_keys(sub, value, f"{where}.{key}")


def _nested(tree: dict) -> dict:
    out: dict = {}
    for key, value in _dotted(tree).items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_dotted(value, path + "."))
        else:
            out[path] = value
    return out


class _ReplicaHeader:
    """Names the answering replica on every HTTP response (clients and tests see where a request went), and leaves
    X-Request-Id to Ray's proxy: the proxy hands the replica its request id (the client's, or its own) as the request
    header, which our guard echoes, and then adds the same header to the response itself, so it came back twice."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-fewstep-replica", self.value)]}
            await send(message)

        await self.app(scope, receive, send_named)


def ray_replica_stopping() -> Callable[[], bool] | None:
    """A check of whether Ray has begun stopping the replica this process runs, or None where this Ray keeps that
    elsewhere. Read from Ray's replica actor (``_replica_impl._shutting_down``, set as its graceful shutdown starts,
    before Ray waits for the ongoing requests): the one private detail of Ray that the drain relies on."""
    import ray

    worker = getattr(getattr(ray, "_private", None), "worker", None)
    actors = getattr(getattr(worker, "global_worker", None), "actors", None) or {}
    for actor in list(actors.values()):
        impl = getattr(actor, "_replica_impl", None)
        if isinstance(getattr(impl, "_shutting_down", None), bool):
            return lambda: impl._shutting_down
    return None


class _DrainWhenStopped:
    """ASGI middleware of a replica: from the app's startup, watches whether Ray is stopping the replica, and then
    ends its streams and refuses new sockets (``Guard.drain(refuse_requests=False)``); see the module docstring."""

    POLL_S = 0.1

    def __init__(self, app, guard, replica: str):
        self.app, self.guard, self.replica = app, guard, replica
        self.watcher: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())
        await self.app(scope, receive, send)

    async def _watch(self) -> None:
        stopping = ray_replica_stopping()
        if stopping is None:
            log.warning("replica %s: this Ray does not say when it stops a replica; its streams end when Ray stops "
                        "it, and the proxy tells their clients to reconnect", self.replica)
            return
        while not stopping():
            await asyncio.sleep(self.POLL_S)
        log.info("replica %s: Ray is stopping it; its streams end, its requests finish", self.replica)
        await self.guard.drain(refuse_requests=False)


@serve.ingress()
class FewstepReplica:
    """One replica: the single-process app (create_app) with its engine, on the replica's event loop. (Attributes
    are prefixed: Ray's ASGI wrapper, a base class at run time, owns names such as ``app``.)"""

    def __init__(self, server: dict[str, Any]):
        from .app import create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.fewstep_replica = serve.get_replica_context().replica_id.unique_id
        cfg = RayAppConfig(server=server).server_config()
        if cfg.engine_process:  # the replica reads its engine's queue in-process (record_routing_stats)
            raise ValueError("server.engine_process is not supported on Ray Serve replicas yet; leave it false")
        stream = cfg.engine.stream.model_copy(update={"session_id_prefix": self.fewstep_replica})
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"stream": stream})})
        # load_async=False: the lifespan (run by Ray before the replica takes traffic) waits for load and warm-up
        self.fewstep_app = create_app(cfg, load_async=False)
        self.fewstep_state = self.fewstep_app.state.fewstep
        self.fewstep_state.replica = self.fewstep_replica
        self.fewstep_app.add_middleware(_ReplicaHeader, replica=self.fewstep_replica)
        self.fewstep_app.add_middleware(_DrainWhenStopped, guard=self.fewstep_app.state.guard,
                                        replica=self.fewstep_replica)

    def __serve_build_asgi_app__(self):
        return self.fewstep_app

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes Ray replace the replica."""
        from .routes.health import dead_reason

        reason = dead_reason(self.fewstep_state)
        if reason:
            raise RuntimeError(f"replica {self.fewstep_replica}: {reason}")

    def record_routing_stats(self) -> dict[str, Any]:
        core = self.fewstep_state.core
        if core is None:
            return {QUEUE_STAT: 0}
        return {QUEUE_STAT: core.images.num_waiting + core.images.num_running}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder named by a Serve config file's ``import_path`` (``args``: a RayAppConfig)."""
    options = RayAppConfig.model_validate(args or {})
    deployment = serve.deployment(FewstepReplica, name="FewstepReplica").options(**options.deployment_options())
    return deployment.bind(options.server)


def run(options: RayAppConfig, host: str, port: int, address: str | None) -> int:
    """``fewstep serve --replicas N``: start (or join) a Ray cluster, run the app, and stop it all at SIGTERM/SIGINT."""
    import ray

    # Without an address: a local cluster of this machine, owned by this process (it stops when we exit). Ray puts
    # the driver's working directory on every worker's sys.path; from a source checkout that directory's kernels/
    # would shadow PyPI's `kernels` (imported by diffusers) in the replicas, so the driver connects from elsewhere.
    cwd = os.getcwd()
    # the proxies' answer to a replica lost mid-request (ray_routing.LostReplicaMiddleware): read from the
    # environment by each proxy, which a cluster started here inherits (a joined cluster needs it set on its nodes)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    os.chdir(tempfile.gettempdir())
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    finally:
        os.chdir(cwd)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(options.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"fewstep: serving on http://{host}:{port} through Ray Serve, "
              f"{options.autoscaling and f'{options.autoscaling.min_replicas}-{options.autoscaling.max_replicas}' or options.replicas} "
              "replica(s)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s), the proxy and controller stop
        ray.shutdown()
    return 0
