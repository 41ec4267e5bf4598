"""The request router of the Ray Serve app (server/ray.py): which replica serves each HTTP request or WebSocket.

Ray Serve's HTTP proxy hands every request of a deployment to its request router (Ray's documented extension point,
``RequestRouterConfig(request_router_class=...)``; alpha since Ray 2.46). This one runs in the proxy process, so it
imports no torch and no fewstep engine. It applies, in order:

1. Pinned requests go to one replica. A stream session's buffer lives on the replica that started it, and that
   replica writes its Ray replica id before the session id (``StreamConfig.session_id_prefix``: ``ID.TOKEN``), so
   ``GET /v1/stream/ID.TOKEN.mjpeg`` (an extra viewer, often an ``<img>`` tag that can send no header) reaches the
   replica holding the buffer. A request with ``?replica=ID`` is pinned to that replica too: an operator's
   ``GET /metrics?replica=ID`` scrapes one replica's metrics. A pin to a replica that is gone (it died, or was scaled
   in) is routed like any request, and that replica answers 404 ``session_not_found``: the session ended with its
   replica, and the client starts a new one.
2. Everything else (image requests, new WebSockets, health) goes by load: the replicas ranked by the engine queue
   each one reports (``record_routing_stats``: images waiting and running, which leaves long-lived stream sockets out),
   the two least loaded first; Ray then probes those two for their ongoing requests and picks the shorter queue that
   still accepts (power of two choices), falling back to the other replicas if neither does.

WebSockets need no pin: one socket is one request to Ray, held by one replica for its whole life, so a stream's
prompt updates and a realtime socket's inputs all reach the replica that holds its state.

Why the path is read here and not from a header: Ray's own affinity keys (``serve_multiplexed_model_id`` and the
session-id header) are taken from request headers only, and a browser's ``<img src>`` or ``new WebSocket()`` sends
none. The proxy passes the ASGI scope to the router as its own serialized request object; reading ``path`` and
``query_string`` from it is the one private detail this module relies on (checked by tests/e2e/test_ray.py).
"""

from __future__ import annotations

import logging
import pickle
import random
import re
from urllib.parse import parse_qs

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

log = logging.getLogger("fewstep.server")

# /v1/stream/<replica id>.<token>.mjpeg: an MJPEG viewer of an open session (server/routes/stream.py)
_VIEWER = re.compile(r"^/v1/stream/([A-Za-z0-9]+)\.[A-Za-z0-9_-]+\.mjpeg$")
QUEUE_STAT = "queue"  # record_routing_stats key: images waiting and running in the replica's engine


def request_target(pending: PendingRequest | None) -> tuple[str, str] | None:
    """(path, query string) of an HTTP request from Ray's proxy, or None (a handle call, a gRPC request)."""
    if pending is None or not pending.args or not isinstance(pending.args[0], bytes):
        return None
    try:
        # The proxy serialized this object in this very process a moment ago (its ASGI scope, for the replica); no
        # client bytes are unpickled: a client's path and headers are plain strings inside it.
        scope = getattr(pickle.loads(pending.args[0]), "asgi_scope", None)  # noqa: S301
    except Exception:  # noqa: BLE001 - another Ray's request format: route it by load, never fail the request
        return None
    if not isinstance(scope, dict):
        return None
    query = scope.get("query_string", b"")
    return scope.get("path", ""), query.decode("latin-1") if isinstance(query, bytes) else str(query)


def pinned_replica(pending: PendingRequest | None) -> str | None:
    """The replica id this request must reach, or None."""
    target = request_target(pending)
    if target is None:
        return None
    path, query = target
    m = _VIEWER.match(path)
    if m:
        return m.group(1)
    if query:
        ids = parse_qs(query).get("replica")
        if ids:
            return ids[0]
    return None


class FewstepRouter(RequestRouter):
    """Session pinning, then queue depth, then Ray's power of two choices (see the module docstring)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pin = pinned_replica(pending_request)
        if pin is not None:
            held = [r for r in candidate_replicas if r.replica_id.unique_id == pin]
            if held:
                return [held]
        # shuffled first: Ray takes the first of equally short queues, and ties are the rule on an idle deployment
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        if len(shuffled) <= 2:
            return [shuffled]
        ranked = sorted(shuffled, key=lambda r: (r.routing_stats or {}).get(QUEUE_STAT, 0))
        return [ranked[:2], ranked[2:]]


# -- at the proxy: requests whose replica died --------------------------------------------------------------------
RETRY_SAFE = {("POST", "/v1/images/generations")}  # idempotent enough: the client has seen nothing of the first try
MAX_REPLAY_BYTES = 2 << 20  # bodies above this are not kept for a retry (the replicas refuse them at 1 MiB anyway)
LOST_MESSAGE = "the replica serving this request stopped before answering; retry it"
LOST_STREAM_MESSAGE = "the replica holding this stream stopped; reconnect to start a new session"


class LostReplicaMiddleware:
    """ASGI middleware of Ray's HTTP proxy (installed by ``proxy_middlewares`` below): what a client gets when the
    replica serving it dies (killed, out of memory, its node lost), where Ray's proxy alone answers a bare 500 or
    drops the socket.

    * An HTTP request that got no response start: an image generation is sent once more (Ray routes it to a live
      replica); any other request, or a second loss, gets 503 with ``Retry-After: 1`` and OpenAI's error body (code
      ``replica_lost``).
    * A WebSocket that was accepted and not closed by the app: the client gets an ``error`` message (code
      ``replica_lost``) that says to reconnect, then close code 1012 (service restart).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope, receive, send):
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        replay = None
        if (scope.get("method"), scope.get("path")) in RETRY_SAFE:
            replay = await _buffered_body(scope, receive)
        attempts = 2 if replay is not None else 1
        for attempt in range(attempts):
            source = _replaying(replay, receive) if replay is not None else receive
            try:
                await self.app(scope, source, tracking_send)
            except Exception:  # noqa: BLE001 - the proxy's own failure; answered below unless a response started
                if started:
                    raise
            if started:
                return
            if attempt + 1 < attempts:
                log.warning("%s %s: its replica stopped before answering; sent once more", scope.get("method"),
                            scope.get("path"))
        await _json(send, 503, {"error": {"message": LOST_MESSAGE, "type": "server_error", "param": None,
                                          "code": "replica_lost"}}, [(b"retry-after", b"1")])

    async def _websocket(self, scope, receive, send):
        accepted = closed = False

        async def tracking_send(message):
            nonlocal accepted, closed
            if message["type"] == "websocket.accept":
                accepted = True
            elif message["type"] == "websocket.close":
                closed = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001 - the proxy's own failure: the client is told below
            pass
        if accepted and not closed:
            import json

            try:
                await send({"type": "websocket.send", "text": json.dumps(
                    {"type": "error", "message": LOST_STREAM_MESSAGE, "code": "replica_lost", "param": None})})
                await send({"type": "websocket.close", "code": 1012, "reason": "replica lost"})
            except Exception:  # noqa: BLE001 - the client left meanwhile
                pass


async def _buffered_body(scope, receive) -> list[dict] | None:
    """The request's body messages, read in full and kept for one replay; None (nothing read: the body streams
    through and the request is not retried) when its declared length is over MAX_REPLAY_BYTES or not declared."""
    headers = dict(scope.get("headers") or ())
    try:
        length = int(headers.get(b"content-length", b""))
    except ValueError:
        return None  # chunked or malformed: streamed through, never retried
    if length > MAX_REPLAY_BYTES:
        return None
    messages, more = [], True
    while more:
        message = await receive()
        messages.append(message)
        more = message.get("type") == "http.request" and message.get("more_body", False)
    return messages


def _replaying(messages: list[dict], receive):
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


async def _json(send, status: int, body: dict, headers: list) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def proxy_middlewares() -> list:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=fewstep.server.ray_routing:proxy_middlewares gives Ray's HTTP
    proxies (set on every node: ``fewstep serve --replicas`` does for the cluster it starts; deploy/ray/ for others)."""
    from starlette.middleware import Middleware

    return [Middleware(LostReplicaMiddleware)]


PROXY_CALLBACK = "fewstep.server.ray_routing:proxy_middlewares"
