"""What stands between a client and the routes: one pure ASGI middleware (``Guard``).

Per HTTP request or WebSocket, in this order: a request id (``X-Request-Id``, the client's or a new one), refusal
while the server drains, API keys, the ``Origin`` check, per-client limits (requests per second, concurrent
streams), then the body limit on the bytes actually read and, for WebSockets, the idle timeout. ``Guard.drain``
runs at SIGTERM (server/cli.py): new work is refused, stream sessions end with ``stopped`` and their sockets close
with 1001. On a Ray Serve replica that Ray stops (server/ray.py) the drain ends the streams only
(``refuse_requests=False``): Ray waits for the replica's HTTP requests, so one that reaches it meanwhile is served.

Refusals use OpenAI's error body ``{"error": {message, type, param, code}}``; a WebSocket refused before its
handshake gets the same status and body as an HTTP response (ASGI's ``websocket.http.response`` extension), or,
where the server lacks it, a close code 4000 + the HTTP status (4401, 4403, 4429, 4503).

Browsers cannot set headers on a WebSocket or an ``<img>``: there the key travels as the ``token`` query parameter,
which is removed from the scope once checked, so uvicorn's access log never prints it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit

from .config import ServerConfig

log = logging.getLogger("fewstep.server")

# Open without a key: the browser page (it asks for the key) and the API docs. Health and metrics are open unless
# SecurityConfig.protect_metrics.
OPEN_PATHS = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/v1/stream/schema"})
OPEN_PREFIXES = ("/web/",)
HEALTH_PATHS = frozenset({"/health", "/v2/health/live", "/ready", "/v2/health/ready", "/metrics"})
STREAM_PATHS = frozenset({"/v1/stream", "/v1/realtime", "/v1/stream.mjpeg"})
UPLOAD_PATHS = frozenset({"/v1/images/edits"})  # bodies up to limits.max_body_bytes + limits.max_image_bytes
IDLE_CLOSE = 4408    # a WebSocket that neither side used for SecurityConfig.idle_timeout_s
GOING_AWAY = 1001    # shutdown
STREAM_SLOT_WAIT_S = 2.0  # a stream over the per-client limit waits this long for one of the client's slots to free
_RID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def error_json(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def is_stream_path(path: str) -> bool:
    return path in STREAM_PATHS or (path.startswith("/v1/stream/") and path.endswith(".mjpeg"))


class _Bucket:
    """Token bucket: ``rate`` tokens a second up to ``burst``."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: int):
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self, rate: float, burst: int) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or []


class _Socket:
    """One accepted WebSocket as the guard sees it: when either side last used it, whether a stream session runs
    on it (``started`` .. ``stopped`` messages seen), and a way to close it that also ends the app's ``receive``."""

    def __init__(self, receive, send, idle_s: float):
        self._receive, self._send, self.idle_s = receive, send, idle_s
        self.last = time.monotonic()
        self.accepted = self.closed = self.streaming = False
        self._closed = asyncio.Event()
        self._pending: asyncio.Future | None = None
        self._watchdog: asyncio.Task | None = None
        self.close_code = 1000

    async def receive(self) -> dict:
        if self.closed:
            return {"type": "websocket.disconnect", "code": self.close_code}
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({self._pending, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self._pending.done():
            msg, self._pending = self._pending.result(), None
            self.last = time.monotonic()
            return msg
        return {"type": "websocket.disconnect", "code": self.close_code}

    async def send(self, msg: dict) -> None:
        if self.closed:
            return  # closed by the guard (idle, shutdown): what the app still sends goes nowhere
        kind = msg["type"]
        if kind == "websocket.accept":
            self.accepted = True
            self._watchdog = asyncio.ensure_future(self._watch())
        elif kind == "websocket.send":
            self.last = time.monotonic()
            head = (msg.get("text") or "")[:40]
            # our own protocol (server/stream_protocol.py): a session runs from 'started' to 'stopped'
            if '"type":"started"' in head:
                self.streaming = True
            elif '"type":"stopped"' in head:
                self.streaming = False
        elif kind == "websocket.close":
            self.closed = True
        await self._send(msg)

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.close_code = True, code
        self._closed.set()
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # noqa: BLE001 - the peer is already gone
            pass

    async def _watch(self) -> None:
        while not self.closed:
            wait = self.last + self.idle_s - time.monotonic()
            if wait <= 0:
                log.info("closing a WebSocket idle for %.0f s", self.idle_s)
                await self.close(IDLE_CLOSE, "idle timeout")
                return
            await asyncio.sleep(wait)

    def end(self) -> None:
        for task in (self._pending, self._watchdog):
            if task is not None:
                task.cancel()


class Guard:
    """Pure ASGI middleware; see the module docstring. ``on_drain`` ends the engine's stream sessions."""

    class Middleware:
        """What ``app.add_middleware`` builds: binds the app's Guard (kept on ``app.state.guard`` for the drain)."""

        def __init__(self, app, guard: "Guard"):
            guard.app = app
            self.guard = guard

        async def __call__(self, scope, receive, send) -> None:
            await self.guard(scope, receive, send)

    def __init__(self, config: ServerConfig, on_drain=None, app=None):
        self.app, self.config, self.on_drain = app, config, on_drain
        sec = config.security
        self.sec = sec
        self.keys = [k.get_secret_value().encode() for k in sec.api_keys]
        self.allow_origins = {o.rstrip("/").lower() for o in [*sec.allow_origins, *sec.cors_origins]}
        self.max_body = config.limits.max_body_bytes
        # routes that take an image upload: the image's own limit on top of the body's
        self.max_upload = config.limits.max_body_bytes + config.limits.max_image_bytes
        self.max_head = config.http.max_header_bytes
        self.draining = False  # every new request and socket refused (503, Retry-After)
        self.streams_ended = False  # new streams and sockets refused; HTTP requests still admitted
        self.sockets: set[_Socket] = set()
        self.streams: dict[str, int] = {}
        self.buckets: dict[str, _Bucket] = {}

    # -- checks ------------------------------------------------------------------------------------------------
    def _identity(self, scope, presented: bytes | None) -> str:
        """Who the limits count against: the API key (by index, never its text) or the client's address."""
        if not self.keys:
            return "ip:" + (scope.get("client") or ("?",))[0]
        found = None
        for i, key in enumerate(self.keys):  # every key compared, in constant time each: no early exit
            if hmac.compare_digest(presented or b"", key) and presented:
                found = i
        if found is not None:
            return f"key:{found}"
        raise Refusal(401, "missing or invalid API key: send 'Authorization: Bearer KEY' (WebSockets and <img> "
                      "from a browser: the query parameter ?token=KEY)", "invalid_api_key",
                      [(b"www-authenticate", b"Bearer")])

    def _presented_key(self, scope, headers) -> bytes | None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        qs = scope.get("query_string", b"")
        if b"token=" not in qs:
            return None
        pairs = parse_qsl(qs.decode("latin-1"), keep_blank_values=True)
        token = next((v for k, v in pairs if k == "token"), None)
        # drop the key from the scope: the access log prints the query string
        scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")
        return None if token is None else token.encode("latin-1")

    def _check_origin(self, headers) -> None:
        origin = headers.get(b"origin")
        if origin is None or "*" in self.allow_origins:
            return  # not a browser (or an old one): nothing to check
        text = origin.decode("latin-1").rstrip("/").lower()
        if text in self.allow_origins:
            return
        parts = urlsplit(text)
        host = headers.get(b"host", b"").decode("latin-1").lower()
        default = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}.get(parts.scheme, "")
        if parts.netloc and host and (parts.netloc == host or parts.netloc + default == host
                                      or parts.netloc == host + default):
            return
        raise Refusal(403, f"origin {text!r} is not allowed here (serve with --allow-origin to allow it)",
                      "origin_not_allowed")

    def _check_rate(self, who: str) -> None:
        rate = self.sec.requests_per_second
        if not rate:
            return
        burst = max(1, math.ceil(2 * rate))
        bucket = self.buckets.get(who)
        if bucket is None:
            if len(self.buckets) > 10_000:  # forget the idle clients: their buckets have refilled
                now = time.monotonic()
                self.buckets = {k: b for k, b in self.buckets.items() if (now - b.stamp) * rate < burst}
            bucket = self.buckets[who] = _Bucket(burst)
        wait = bucket.take(rate, burst)
        if wait:
            raise Refusal(429, f"rate limit: at most {rate:g} requests a second per client (bursts of {burst})",
                          "rate_limited", [(b"retry-after", str(max(1, math.ceil(wait))).encode())])

    async def _open_stream(self, who: str) -> None:
        limit = self.sec.max_streams_per_client
        if limit and self.streams.get(who, 0) >= limit:
            # A client that just dropped a stream (TCP closed without a close frame) and opens the next one at once
            # races the server: its old slot comes back only when the old handler has seen the disconnect and
            # ended the session. Waiting briefly for that keeps a client within its limit from a spurious 429.
            deadline = time.monotonic() + STREAM_SLOT_WAIT_S
            while self.streams.get(who, 0) >= limit and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.streams.get(who, 0) >= limit:
                raise Refusal(429, f"this client already has {limit} open streams, the most allowed; close one "
                              "first", "too_many_streams", [(b"retry-after", b"5")])
        self.streams[who] = self.streams.get(who, 0) + 1

    def _close_stream(self, who: str) -> None:
        n = self.streams.get(who, 1) - 1
        if n > 0:
            self.streams[who] = n
        else:
            self.streams.pop(who, None)

    async def _admit(self, scope, headers) -> tuple[str, bool]:
        """(identity, counts as a stream) or raises Refusal; a stream's slot is taken."""
        presented = self._presented_key(scope, headers)  # first: strips ?token= before anything is logged
        # uvicorn's h11_max_incomplete_event_size only bounds a head still arriving: one that comes whole in a read
        # (up to 64 KiB) got through whatever its size. The limit, on the head as parsed:
        head = len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b"")) + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > self.max_head:
            raise Refusal(431, f"request line and headers are {head} bytes, more than the limit of {self.max_head}",
                          "headers_too_large")
        path = scope["path"]
        if self.draining or (self.streams_ended and (scope["type"] == "websocket" or is_stream_path(path))):
            raise Refusal(503, "the server is shutting down; retry on another replica", "shutting_down",
                          [(b"retry-after", b"5")])
        open_ = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (
            path in HEALTH_PATHS and not self.sec.protect_metrics)
        self._check_origin(headers)
        if open_:
            return "", False
        who = self._identity(scope, presented)
        if path in HEALTH_PATHS:
            return who, False
        self._check_rate(who)
        stream = is_stream_path(path)
        if stream:
            await self._open_stream(who)
        return who, stream

    # -- ASGI --------------------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _request_id(self, scope, headers) -> str:
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        return rid

    async def _http(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        rid = self._request_id(scope, headers)
        scope["state"]["received"] = time.perf_counter()  # the start of the server's span in a request's waterfall
        rid_header = (b"x-request-id", rid.encode())

        async def respond(status: int, body: bytes, extra: list, close: bool = False) -> None:
            h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), rid_header,
                 *extra]
            if close:  # uvicorn closes the connection after the response: it stops reading the body
                h.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": status, "headers": h})
            await send({"type": "http.response.body", "body": body})

        try:
            who, stream = await self._admit(scope, headers)
        except Refusal as r:
            # closed after the answer: a refused client's body (however long) is never read
            await respond(r.status, error_json(r.status, r.message, r.code), r.headers, close=True)
            return
        size = headers.get(b"content-length", b"")
        max_body = self.max_upload if scope.get("path") in UPLOAD_PATHS else self.max_body
        if size.isdigit() and int(size) > max_body:
            await respond(413, self._too_large(max_body), [], close=True)
            return
        received, cut, started = 0, False, False

        async def limited_receive() -> dict:
            nonlocal received, cut
            if cut:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > max_body:
                    cut = True
                    if not started:
                        await respond(413, self._too_large(max_body), [], close=True)
                    return {"type": "http.disconnect"}  # the route sees a client that left
            return msg

        async def tagged_send(msg: dict) -> None:
            nonlocal started
            if cut:
                return
            if msg["type"] == "http.response.start":
                started = True
                extra = [rid_header]
                if self.draining:  # the client must not reuse this connection: the server closes it soon
                    extra.append((b"connection", b"close"))
                msg = {**msg, "headers": [*msg.get("headers", ()), *extra]}
            await send(msg)

        try:
            await self.app(scope, limited_receive, tagged_send)
        except Exception:
            if not cut:
                raise  # the body limit answered; what the route made of the cut-off body does not matter
        finally:
            if stream:
                self._close_stream(who)

    def _too_large(self, limit: int) -> bytes:
        return error_json(413, f"request body is larger than the limit of {limit} bytes", "body_too_large")

    async def _websocket(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        self._request_id(scope, headers)
        try:
            who, stream = await self._admit(scope, headers)
        except Refusal as r:
            await self._deny(scope, send, r)
            return
        sock = _Socket(receive, send, self.sec.idle_timeout_s)
        self.sockets.add(sock)
        try:
            await self.app(scope, sock.receive, sock.send)
        finally:
            sock.end()
            self.sockets.discard(sock)
            if stream:
                self._close_stream(who)

    async def _deny(self, scope, send, r: Refusal) -> None:
        """Refuse a WebSocket before its handshake: an HTTP response where the server can send one."""
        if "websocket.http.response" in scope.get("extensions", {}):
            body = error_json(r.status, r.message, r.code)
            await send({"type": "websocket.http.response.start", "status": r.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), *r.headers]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 4000 + r.status, "reason": r.message[:120]})

    # -- shutdown ----------------------------------------------------------------------------------------------
    async def drain(self, wait_s: float = 3.0, refuse_requests: bool = True) -> None:
        """Refuse new work, end the stream sessions (their sockets get ``stopped``, MJPEG responses end), then
        close every WebSocket with 1001. ``wait_s`` bounds the wait for the ``stopped`` messages. With
        ``refuse_requests=False`` only new streams and sockets are refused: HTTP requests are still served (a Ray
        Serve replica being stopped, whose requests Ray waits for)."""
        self.streams_ended = True
        if refuse_requests:
            self.draining = True
        if self.on_drain is not None:
            self.on_drain()
        deadline = time.monotonic() + wait_s
        while any(s.streaming and not s.closed for s in self.sockets) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        sockets = [s for s in self.sockets if s.accepted]
        for s in sockets:
            await s.close(GOING_AWAY, "server shutting down")
        log.info("drained: %d WebSocket(s) closed", len(sockets))
