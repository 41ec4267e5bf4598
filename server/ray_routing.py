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
