"""Python SDK for a fewstep server (client side only: no torch, no numpy).

The server speaks an OpenAI-Images-shaped HTTP API::

    from fewstep.clients.python import FewstepClient

    with FewstepClient("http://127.0.0.1:8000") as client:
        result = client.images.generate("a red fox in snow", steps=4, seed=1)
        open("fox.png", "wb").write(result.images[0])
        print(result.timings)          # fewstep's per-stage server timings, or None

``AsyncFewstepClient`` has the same surface with ``async`` methods.

Errors: any 4xx/5xx answer raises :class:`FewstepError` built from the OpenAI
error body ``{"error": {"message", "type", "param", "code"}}`` (other bodies, e.g.
FastAPI's ``{"detail": ...}`` or plain text, are folded into ``message``). A
transport failure (refused connection, timeout, broken stream) raises
:class:`FewstepConnectionError`, a subclass with ``status=None``, so one
``except FewstepError`` catches everything the client can raise.

Streams (WebSocket; needs the ``websockets`` package)::

    with FewstepClient(url) as client:
        with client.stream("a koi pond", size=256, seed=3, fps=8) as s:    # WS /v1/stream
            for frame in s:                   # Frame(index, data=JPEG bytes, timestamp_ms, ...)
                if frame.index == 40:
                    s.update("a koi pond at night")   # reaches the next chunk, blends in smoothly
                if frame.index >= 100:
                    s.stop()                  # the loop ends at the server's "stopped"
        with client.realtime() as rt:         # WS /v1/realtime: newest input wins
            img = rt.generate("a red fox", seed=1).image
        mp4 = client.videos.generate("waves", num_frames=48)   # POST /v1/videos (fMP4, streamed)

``AsyncFewstepClient``: ``stream = await client.stream(...)`` then ``async for frame in stream``.

Extending: endpoints live on small resource objects (``client.images``) that call
the client's ``_request`` helper; request bodies and response parsing are plain
module functions shared by the sync and async clients. New resources (streaming,
realtime, ...) can follow the same pattern: add a class taking the client and
attach it in ``__init__`` (or subclass the client).
"""

from __future__ import annotations

import base64
import binascii
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "IMAGES_PATH",
    "MODELS_PATH",
    "HEALTH_PATH",
    "READY_PATH",
    "DEFAULT_TIMEOUT",
    "FewstepError",
    "FewstepConnectionError",
    "ImagesResult",
    "FewstepClient",
    "AsyncFewstepClient",
    "build_images_body",
    "parse_images_response",
    "normalize_base_url",
]

IMAGES_PATH = "/v1/images/generations"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
READY_PATH = "/ready"
DEFAULT_TIMEOUT = 120.0


# --------------------------------------------------------------------------- errors


class FewstepError(Exception):
    """An error answer from the server (or, for the subclass, no answer at all).

    Attributes mirror the OpenAI error object: ``status`` (HTTP status, ``None``
    for transport errors), ``message``, ``type``, ``param``, ``code``; ``body`` is
    the decoded JSON body when there was one.
    """

    def __init__(
        self,
        status: int | None,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"HTTP {self.status}" if self.status is not None else "no response"
        if self.type:
            head += f" {self.type}"
        extra = []
        if self.param:
            extra.append(f"param={self.param}")
        if self.code is not None:
            extra.append(f"code={self.code}")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{head}: {self.message}{tail}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, "
            f"type={self.type!r}, param={self.param!r}, code={self.code!r})"
        )

    @classmethod
    def from_response(cls, resp: httpx.Response) -> "FewstepError":
        """Build the error from a 4xx/5xx response (best effort on odd bodies)."""
        status = resp.status_code
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            return cls(
                status,
                str(err.get("message") or resp.reason_phrase or "error"),
                err.get("type"),
                err.get("param"),
                err.get("code"),
                body,
            )
        if isinstance(body, dict) and "detail" in body:  # FastAPI default error shape
            detail = body["detail"]
            message = detail if isinstance(detail, str) else repr(detail)
            return cls(status, message, None, None, None, body)
        text = resp.text.strip()[:1000] if resp.content else ""
        return cls(status, text or resp.reason_phrase or f"HTTP {status}", None, None, None, body)


class FewstepConnectionError(FewstepError):
    """No (complete) HTTP answer: connection refused/reset, timeout, protocol error.

    ``status`` is ``None``; ``type`` is ``"timeout"`` or ``"connection_error"``; the
    original httpx exception is chained as ``__cause__``.
    """

    @classmethod
    def from_exception(cls, exc: httpx.TransportError) -> "FewstepConnectionError":
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
        return cls(None, f"{type(exc).__name__}: {exc}".rstrip(": "), kind, None, None, None)


# ------------------------------------------------------------- bodies and results


@dataclass
class ImagesResult:
    """Decoded answer of ``images.generate``.

    ``images``: encoded image files (PNG/JPEG/WebP bytes, as asked in
    ``output_format``), one per generated image. ``timings``: the server's
    per-stage timings dict (fewstep only; ``None`` from other servers).
    """

    images: list[bytes]
    timings: dict[str, Any] | None = None
    created: int | None = None
    output_format: str = "png"
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level response keys

    def __len__(self) -> int:
        return len(self.images)


def normalize_base_url(base_url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all give ``http://h:8000``."""
    url = base_url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def _size_str(size: str | tuple[int, int]) -> str:
    if isinstance(size, str):
        return size
    w, h = size
    return f"{int(w)}x{int(h)}"


def build_images_body(
    prompt: str,
    *,
    n: int = 1,
    size: str | tuple[int, int] = "512x512",
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    nasa_scale: float | None = None,
    output_format: str = "png",
    model: str | None = None,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON body for ``POST /v1/images/generations``; ``None`` options are left out
    so that the body also suits OpenAI-compatible servers without fewstep's extras."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "n": int(n),
        "size": _size_str(size),
        "response_format": "b64_json",
    }
    if model is not None:
        body["model"] = model
    if output_format is not None:
        body["output_format"] = output_format
    if seed is not None:
        body["seed"] = int(seed)
    if steps is not None:
        body["num_inference_steps"] = int(steps)
    if guidance_scale is not None:
        body["guidance_scale"] = float(guidance_scale)
    if negative_prompt is not None:
        body["negative_prompt"] = negative_prompt
    if nasa_scale is not None:  # NASA's alpha (models whose guidance_modes list nasa)
        body["nasa_scale"] = float(nasa_scale)
    if extra_body:
        body.update(extra_body)
    return body


def parse_images_response(resp: httpx.Response, output_format: str = "png") -> ImagesResult:
    """Decode a 2xx images response; raises :class:`FewstepError` if it is malformed."""

    def bad(msg: str) -> FewstepError:
        return FewstepError(resp.status_code, msg, "invalid_response", None, None, None)

    try:
        payload = resp.json()
    except ValueError:
        raise bad("response is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise bad("response has no 'data' list")
    images: list[bytes] = []
    for i, item in enumerate(payload["data"]):
        b64 = item.get("b64_json") if isinstance(item, dict) else None
        if not isinstance(b64, str):
            raise bad(f"data[{i}] has no 'b64_json' string")
        try:
            images.append(base64.b64decode(b64, validate=True))
        except (binascii.Error, ValueError):
            raise bad(f"data[{i}].b64_json is not valid base64") from None
    timings = payload.get("timings")
    extra = {k: v for k, v in payload.items() if k not in ("data", "timings", "created")}
    return ImagesResult(
        images=images,
        timings=timings if isinstance(timings, dict) else None,
        created=payload.get("created"),
        output_format=output_format,
        extra=extra,
    )


def _auth_headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    if api_key:
        out.setdefault("Authorization", f"Bearer {api_key}")
    return out


def _models_from(resp: httpx.Response) -> list[dict[str, Any]]:
    try:
        payload = resp.json()
    except ValueError:
        raise FewstepError(resp.status_code, "response is not JSON", "invalid_response") from None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise FewstepError(resp.status_code, "response has no 'data' list", "invalid_response")
    return data


# ----------------------------------------------------------------------- sync client


class Images:
    """``client.images``: the image-generation endpoints (sync)."""

    def __init__(self, client: "FewstepClient") -> None:
        self._client = client

    def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: str | tuple[int, int] = "512x512",
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        nasa_scale: float | None = None,
        output_format: str = "png",
        model: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> ImagesResult:
        body = build_images_body(
            prompt, n=n, size=size, seed=seed, steps=steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, nasa_scale=nasa_scale, output_format=output_format, model=model,
            extra_body=extra_body,
        )
        resp = self._client._request("POST", IMAGES_PATH, json=body)
        return parse_images_response(resp, output_format)


class FewstepClient:
    """Synchronous client over ``httpx.Client``.

    ``base_url`` is the server root (a trailing ``/v1`` is accepted and dropped).
    ``api_key`` is sent as ``Authorization: Bearer``. Pass ``http_client`` to reuse
    or customise an ``httpx.Client`` (the caller then owns closing it).
    """

    health_path = HEALTH_PATH
    ready_path = READY_PATH

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self._headers = _auth_headers(api_key, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self.images = Images(self)
        self.videos = Videos(self)

    def _request(self, method: str, path: str, *, json: Any = None, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(
                method, self.base_url + path, json=json, headers=self._headers, **kw
            )
        except httpx.TransportError as exc:
            raise FewstepConnectionError.from_exception(exc) from exc
        if resp.is_error:
            raise FewstepError.from_response(resp)
        return resp

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the ``data`` list (each item has at least ``id``)."""
        return _models_from(self._request("GET", MODELS_PATH))

    def _probe(self, path: str) -> bool:
        try:
            self._request("GET", path)
        except FewstepError:
            return False
        return True

    def health(self) -> bool:
        """True when the server process answers 2xx on the liveness path."""
        return self._probe(self.health_path)

    def ready(self) -> bool:
        """True when the server answers 2xx on the readiness path (model loaded)."""
        return self._probe(self.ready_path)

    def stream(self, prompt: str, *, size: str | int | tuple[int, int] | None = None, seed: int | None = None,
               fps: float | None = None, format: str = "jpeg", quality: int | None = None,
               model: str | None = None, open_timeout: float = 30.0, input: str | None = None,
               strength: float | None = None) -> "Stream":
        """Open ``WS /v1/stream`` and start a session; iterate the returned :class:`Stream` for frames.
        ``input="frames"``: video-to-video from the frames you send (:meth:`Stream.send_frame`) at ``strength``."""
        import json

        conn = _connect_sync(self, STREAM_PATH, open_timeout)
        try:
            conn.send(json.dumps(build_start_message(prompt, size=size, seed=seed, fps=fps, format=format,
                                                     quality=quality, model=model, input=input,
                                                     strength=strength)))
            started = _await_started(conn.recv(open_timeout))
        except BaseException:  # close on any exit, cancellation included, then re-raise
            conn.close()
            raise
        return Stream(conn, started)

    def realtime(self, open_timeout: float = 30.0) -> "Realtime":
        """Open ``WS /v1/realtime`` (newest-wins image generation)."""
        return Realtime(_connect_sync(self, REALTIME_PATH, open_timeout))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "FewstepClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- async client


class AsyncImages:
    """``client.images``: the image-generation endpoints (async)."""

    def __init__(self, client: "AsyncFewstepClient") -> None:
        self._client = client

    async def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: str | tuple[int, int] = "512x512",
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        nasa_scale: float | None = None,
        output_format: str = "png",
        model: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> ImagesResult:
        body = build_images_body(
            prompt, n=n, size=size, seed=seed, steps=steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, nasa_scale=nasa_scale, output_format=output_format, model=model,
            extra_body=extra_body,
        )
        resp = await self._client._request("POST", IMAGES_PATH, json=body)
        return parse_images_response(resp, output_format)


class AsyncFewstepClient:
    """Asynchronous client over ``httpx.AsyncClient``; same surface as :class:`FewstepClient`."""

    health_path = HEALTH_PATH
    ready_path = READY_PATH

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self._headers = _auth_headers(api_key, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self.images = AsyncImages(self)
        self.videos = AsyncVideos(self)

    async def _request(
        self, method: str, path: str, *, json: Any = None, **kw: Any
    ) -> httpx.Response:
        try:
            resp = await self._http.request(
                method, self.base_url + path, json=json, headers=self._headers, **kw
            )
        except httpx.TransportError as exc:
            raise FewstepConnectionError.from_exception(exc) from exc
        if resp.is_error:
            raise FewstepError.from_response(resp)
        return resp

    async def models(self) -> list[dict[str, Any]]:
        return _models_from(await self._request("GET", MODELS_PATH))

    async def _probe(self, path: str) -> bool:
        try:
            await self._request("GET", path)
        except FewstepError:
            return False
        return True

    async def health(self) -> bool:
        return await self._probe(self.health_path)

    async def ready(self) -> bool:
        return await self._probe(self.ready_path)

    async def stream(self, prompt: str, *, size: str | int | tuple[int, int] | None = None, seed: int | None = None,
                     fps: float | None = None, format: str = "jpeg", quality: int | None = None,
                     model: str | None = None, open_timeout: float = 30.0, input: str | None = None,
                     strength: float | None = None) -> "AsyncStream":
        """Open ``WS /v1/stream`` and start a session; ``async for frame in stream``."""
        import asyncio
        import json

        conn = await _connect_async(self, STREAM_PATH, open_timeout)
        try:
            await conn.send(json.dumps(build_start_message(prompt, size=size, seed=seed, fps=fps, format=format,
                                                           quality=quality, model=model, input=input,
                                                           strength=strength)))
            started = _await_started(await asyncio.wait_for(conn.recv(), open_timeout))
        except BaseException:  # close on any exit, cancellation included, then re-raise
            await conn.close()
            raise
        return AsyncStream(conn, started)

    async def realtime(self, open_timeout: float = 30.0) -> "AsyncRealtime":
        """Open ``WS /v1/realtime``."""
        return AsyncRealtime(await _connect_async(self, REALTIME_PATH, open_timeout))

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncFewstepClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


# ======================================================================= streaming
#
# WS /v1/stream (live video), WS /v1/realtime (newest-wins images) and POST /v1/videos (fMP4 clip). The
# ``websockets`` package is imported lazily, so the images client works without it.

STREAM_PATH = "/v1/stream"
REALTIME_PATH = "/v1/realtime"
VIDEOS_PATH = "/v1/videos"
# Binary frame header (server/stream_protocol.py documents it; a test keeps the two in sync):
# magic b"FSTR", version u8, payload type u8, prompt version u16, frame index u64, timestamp ms f64; little-endian.
FRAME_HEADER = struct.Struct("<4sBBHQd")
FRAME_MAGIC = b"FSTR"
PAYLOAD_NAMES = {1: "jpeg", 2: "webp", 3: "fmp4", 4: "raw"}


@dataclass
class Frame:
    """One binary message of a stream: an encoded frame (or, for ``format="fmp4"``, a piece of the MP4)."""

    index: int  # frame index in the session; a gap means the server dropped frames (this client fell behind)
    data: bytes = field(repr=False)
    format: str  # "jpeg" | "webp" | "fmp4" | "raw"
    timestamp_ms: float  # server clock: ms from the session's start to the frame leaving the engine
    prompt_version: int  # increments on the first frame a prompt update reaches
    received_at: float  # time.perf_counter() when this client received it
    session_id: str = ""


def parse_frame(data: bytes, session_id: str = "", received_at: float | None = None) -> Frame:
    if len(data) < FRAME_HEADER.size:
        raise FewstepError(None, f"binary message of {len(data)} bytes is shorter than the frame header",
                           "invalid_response")
    magic, _version, ptype, pversion, index, ts = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise FewstepError(None, f"binary message does not start with {FRAME_MAGIC!r}", "invalid_response")
    return Frame(index, bytes(data[FRAME_HEADER.size:]), PAYLOAD_NAMES.get(ptype, str(ptype)), ts, pversion,
                 time.perf_counter() if received_at is None else received_at, session_id)


def ws_url(base_url: str, path: str) -> str:
    url = normalize_base_url(base_url)
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):] + path
    return "ws://" + url[len("http://"):] + path if url.startswith("http://") else url + path


INPUT_PAYLOADS = {"jpeg": 1, "webp": 2}


def pack_input_frame(image: bytes, index: int, format: str = "jpeg", timestamp_ms: float | None = None) -> bytes:
    """A camera frame for a ``input="frames"`` stream: the 24-byte header (payload type 1 JPEG / 2 WebP, prompt
    version 0, this client's frame counter and ms clock) + the encoded image."""
    if format not in INPUT_PAYLOADS:
        raise ValueError(f"input frames are JPEG or WebP, got {format!r}")
    ts = time.perf_counter() * 1e3 if timestamp_ms is None else timestamp_ms
    return FRAME_HEADER.pack(FRAME_MAGIC, 1, INPUT_PAYLOADS[format], 0, index, ts) + image


def build_start_message(prompt: str, *, size: str | int | tuple[int, int] | None = None, seed: int | None = None,
                        fps: float | None = None, format: str = "jpeg", quality: int | None = None,
                        model: str | None = None, input: str | None = None,
                        strength: float | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "start", "prompt": prompt, "format": format}
    if size is not None:
        msg["size"] = size if isinstance(size, int) else _size_str(size)
    for k, v in (("seed", seed), ("fps", fps), ("quality", quality), ("model", model), ("input", input),
                 ("strength", strength)):
        if v is not None:
            msg[k] = v
    return msg


def build_update_message(prompt: str | None = None, strength: float | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "update"}
    if prompt is not None:
        msg["prompt"] = prompt
    if strength is not None:
        msg["strength"] = strength
    return msg


def _stream_error(msg: dict[str, Any]) -> FewstepError:
    return FewstepError(None, str(msg.get("message", "stream error")), "stream_error", msg.get("param"),
                        msg.get("code"), msg)


def _json(text: str) -> dict[str, Any]:
    import json

    try:
        msg = json.loads(text)
    except ValueError:
        raise FewstepError(None, "server sent a text message that is not JSON", "invalid_response") from None
    if not isinstance(msg, dict):
        raise FewstepError(None, "server sent a JSON message that is not an object", "invalid_response")
    return msg


class _StreamState:
    """What the sync and async stream share: the started info, the latest stats, gap accounting."""

    def __init__(self, started: dict[str, Any]):
        self.info = started
        self.session_id: str = started["session_id"]
        self.stats: dict[str, Any] | None = None
        self.mime: str | None = None
        self.stopped: dict[str, Any] | None = None
        self.frames_received = 0
        self.frames_missing = 0  # gaps in frame indices seen by this client (frames the server dropped)
        self._next_index: int | None = None
        self.error: FewstepError | None = None

    def on_text(self, text: str) -> bool:
        """Handle a JSON message; returns True when the stream has ended."""
        msg = _json(text)
        kind = msg.get("type")
        if kind == "stats":
            self.stats = msg
        elif kind == "init":
            self.mime = msg.get("mime")
        elif kind == "stopped":
            self.stopped = msg
            return True
        elif kind == "error":
            self.error = _stream_error(msg)
            if msg.get("code") == "stream_failed":
                raise self.error
        return False

    def on_frame(self, data: bytes) -> Frame:
        f = parse_frame(data, self.session_id)
        if f.format != "fmp4":
            if self._next_index is not None and f.index > self._next_index:
                self.frames_missing += f.index - self._next_index
            self._next_index = f.index + 1
        self.frames_received += 1
        return f


class Stream:
    """A running stream session (sync). Iterate for frames; ``update(prompt)`` and ``stop()`` at any time::

        with client.stream("a koi pond", size=256, seed=3, fps=8) as s:
            for frame in s:                # Frame(index, data=JPEG bytes, ...)
                if frame.index == 40:
                    s.update("a koi pond at night")
                if frame.index >= 100:
                    s.stop()               # iteration ends at the server's "stopped"

    ``session_id``, ``info`` (the ``started`` message), ``stats`` (the latest ``stats`` message) and
    ``frames_missing`` (index gaps: frames dropped because this client fell behind) are live attributes.
    """

    def __init__(self, conn, started: dict[str, Any]):
        self._conn = conn
        self._state = _StreamState(started)
        self._input_index = -1  # this client's counter of input frames sent
        self.session_id = self._state.session_id
        self.info = started

    def __getattr__(self, name: str):  # stats, mime, stopped, frames_received, frames_missing
        state = self.__dict__.get("_state")
        if state is None:
            raise AttributeError(name)
        return getattr(state, name)

    def __iter__(self):
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                try:
                    msg = self._conn.recv()
                except ConnectionClosed:
                    return
                if isinstance(msg, str):
                    if self._state.on_text(msg):
                        return
                else:
                    yield self._state.on_frame(msg)
        finally:
            if self._state.stopped is not None:
                self.close()

    def update(self, prompt: str | None = None, strength: float | None = None) -> None:
        self._send(build_update_message(prompt, strength))

    def send_frame(self, image: bytes, format: str = "jpeg") -> int:
        """Send one input frame (``input="frames"`` streams): JPEG or WebP bytes of any size. Returns its index.
        Newest wins on the server: frames sent faster than it generates are dropped there, never queued."""
        from websockets.exceptions import ConnectionClosed

        self._input_index += 1
        index = self._input_index
        try:
            self._conn.send(pack_input_frame(image, index, format))
        except ConnectionClosed:
            pass
        return index

    def stop(self) -> None:
        """Ask the server to end the session; iteration ends when its ``stopped`` message arrives."""
        self._send({"type": "stop"})

    def _send(self, msg: dict[str, Any]) -> None:
        import json

        from websockets.exceptions import ConnectionClosed

        try:
            self._conn.send(json.dumps(msg))
        except ConnectionClosed:
            pass

    def close(self, timeout: float = 2.0) -> None:
        """End the session and close the socket. A running session is stopped first and the frames still in
        flight are drained (up to ``timeout`` s): a reader that left the loop early has a full receive queue, and
        without the drain the WebSocket close handshake would wait for its whole close timeout."""
        from websockets.exceptions import ConnectionClosed

        if self._state.stopped is None:
            try:
                self._send({"type": "stop"})
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    msg = self._conn.recv(timeout=left)
                    if isinstance(msg, str) and self._state.on_text(msg):
                        break
            except (TimeoutError, ConnectionClosed, FewstepError):
                pass
        self._conn.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncStream:
    """A running stream session (async): ``async for frame in stream``; ``await update(...)``, ``await stop()``."""

    def __init__(self, conn, started: dict[str, Any]):
        self._conn = conn
        self._state = _StreamState(started)
        self._input_index = -1  # this client's counter of input frames sent
        self.session_id = self._state.session_id
        self.info = started

    def __getattr__(self, name: str):
        state = self.__dict__.get("_state")
        if state is None:
            raise AttributeError(name)
        return getattr(state, name)

    async def __aiter__(self):
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                try:
                    msg = await self._conn.recv()
                except ConnectionClosed:
                    return
                if isinstance(msg, str):
                    if self._state.on_text(msg):
                        return
                else:
                    yield self._state.on_frame(msg)
        finally:
            if self._state.stopped is not None:
                await self.aclose()

    async def update(self, prompt: str | None = None, strength: float | None = None) -> None:
        await self._send(build_update_message(prompt, strength))

    async def send_frame(self, image: bytes, format: str = "jpeg") -> int:
        """Send one input frame (``input="frames"`` streams); see :meth:`Stream.send_frame`."""
        from websockets.exceptions import ConnectionClosed

        self._input_index += 1
        index = self._input_index
        try:
            await self._conn.send(pack_input_frame(image, index, format))
        except ConnectionClosed:
            pass
        return index

    async def stop(self) -> None:
        await self._send({"type": "stop"})

    async def _send(self, msg: dict[str, Any]) -> None:
        import json

        from websockets.exceptions import ConnectionClosed

        try:
            await self._conn.send(json.dumps(msg))
        except ConnectionClosed:
            pass

    async def aclose(self, timeout: float = 2.0) -> None:
        """End the session and close the socket (a running session is stopped and drained first, see
        :meth:`Stream.close`)."""
        import asyncio

        from websockets.exceptions import ConnectionClosed

        if self._state.stopped is None:
            async def drain() -> None:
                await self._send({"type": "stop"})
                while True:
                    msg = await self._conn.recv()
                    if isinstance(msg, str) and self._state.on_text(msg):
                        return

            try:
                await asyncio.wait_for(drain(), timeout)
            except (asyncio.TimeoutError, TimeoutError, ConnectionClosed, FewstepError):
                pass
        await self._conn.close()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _await_started(first: str | bytes) -> dict[str, Any]:
    if not isinstance(first, str):
        raise FewstepError(None, "expected the 'started' message, got binary data", "invalid_response")
    msg = _json(first)
    if msg.get("type") == "error":
        raise _stream_error(msg)
    if msg.get("type") != "started" or "session_id" not in msg:
        raise FewstepError(None, f"expected the 'started' message, got {msg.get('type')!r}", "invalid_response")
    return msg


@dataclass
class RealtimeMessage:
    """An answer on /v1/realtime: ``type`` is "result" (``image`` holds the decoded bytes), "dropped" or "error"."""

    type: str
    request_id: str | None
    image: bytes | None = None
    format: str | None = None
    seed: int | None = None
    timings: dict[str, Any] | None = None
    message: str | None = None
    code: str | None = None
    received_at: float = 0.0


def _realtime_message(text: str) -> RealtimeMessage:
    msg = _json(text)
    image = msg.get("image")
    return RealtimeMessage(msg.get("type", ""), msg.get("request_id"),
                           base64.b64decode(image) if isinstance(image, str) else None, msg.get("format"),
                           msg.get("seed"), msg.get("timings"), msg.get("message"), msg.get("code"),
                           time.perf_counter())


def build_realtime_input(prompt: str, *, seed: int | None = None, request_id: str | None = None,
                         size: str | int | tuple[int, int] | None = None, steps: int | None = None,
                         format: str = "jpeg", model: str | None = None, image: bytes | None = None,
                         strength: float | None = None, image_b64: str | None = None) -> dict[str, Any]:
    """``image``: encoded PNG/JPEG/WebP bytes, sent base64 (or ``image_b64``: base64 or a data URL as it is):
    image-to-image at ``strength``."""
    import base64
    import uuid

    msg: dict[str, Any] = {"prompt": prompt, "request_id": request_id or uuid.uuid4().hex, "format": format}
    if size is not None:
        msg["size"] = size if isinstance(size, int) else _size_str(size)
    if image is not None:
        msg["image"] = base64.b64encode(image).decode("ascii")
    elif image_b64 is not None:
        msg["image"] = image_b64
    for k, v in (("seed", seed), ("steps", steps), ("model", model), ("strength", strength)):
        if v is not None:
            msg[k] = v
    return msg


class Realtime:
    """WS /v1/realtime (sync). ``send`` returns the request_id; ``recv`` the next answer; ``generate`` waits for
    the answer to its own input. Newest wins on the server: a waiting input is replaced by a newer one and
    answered ``dropped``."""

    def __init__(self, conn):
        self._conn = conn

    def send(self, prompt: str, **kw: Any) -> str:
        import json

        msg = build_realtime_input(prompt, **kw)
        self._conn.send(json.dumps(msg))
        return msg["request_id"]

    def recv(self, timeout: float | None = None) -> RealtimeMessage:
        return _realtime_message(self._conn.recv(timeout))

    def generate(self, prompt: str, timeout: float | None = 120.0, **kw: Any) -> RealtimeMessage:
        rid = self.send(prompt, **kw)
        while True:
            m = self.recv(timeout)
            if m.request_id != rid:
                continue
            if m.type == "error":
                raise FewstepError(None, m.message or "error", "realtime_error", None, m.code)
            return m

    def __iter__(self):
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                yield self.recv()
            except ConnectionClosed:
                return

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Realtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncRealtime:
    """WS /v1/realtime (async); same surface as :class:`Realtime`."""

    def __init__(self, conn):
        self._conn = conn

    async def send(self, prompt: str, **kw: Any) -> str:
        import json

        msg = build_realtime_input(prompt, **kw)
        await self._conn.send(json.dumps(msg))
        return msg["request_id"]

    async def recv(self) -> RealtimeMessage:
        return _realtime_message(await self._conn.recv())

    async def generate(self, prompt: str, **kw: Any) -> RealtimeMessage:
        rid = await self.send(prompt, **kw)
        while True:
            m = await self.recv()
            if m.request_id != rid:
                continue
            if m.type == "error":
                raise FewstepError(None, m.message or "error", "realtime_error", None, m.code)
            return m

    async def __aiter__(self):
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    async def aclose(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> "AsyncRealtime":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def build_video_body(prompt: str, *, num_frames: int = 16, size: str | int | tuple[int, int] | None = None,
                     seed: int | None = None, fps: float | None = None, model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "num_frames": int(num_frames), "format": "mp4"}
    if size is not None:
        body["size"] = size if isinstance(size, int) else _size_str(size)
    for k, v in (("seed", seed), ("fps", fps), ("model", model)):
        if v is not None:
            body[k] = v
    return body


class Videos:
    """``client.videos``: POST /v1/videos, a finite clip as fragmented MP4 (sync)."""

    def __init__(self, client: "FewstepClient") -> None:
        self._client = client

    def stream(self, prompt: str, **kw: Any):
        """Yield the MP4's bytes as the server sends them (the first piece arrives after the first chunk)."""
        c = self._client
        try:
            with c._http.stream("POST", c.base_url + VIDEOS_PATH, json=build_video_body(prompt, **kw),
                                headers=c._headers) as resp:
                if resp.is_error:
                    resp.read()
                    raise FewstepError.from_response(resp)
                yield from resp.iter_bytes()
        except httpx.TransportError as exc:
            raise FewstepConnectionError.from_exception(exc) from exc

    def generate(self, prompt: str, **kw: Any) -> bytes:
        return b"".join(self.stream(prompt, **kw))


class AsyncVideos:
    """``client.videos``: POST /v1/videos (async)."""

    def __init__(self, client: "AsyncFewstepClient") -> None:
        self._client = client

    async def stream(self, prompt: str, **kw: Any):
        c = self._client
        try:
            async with c._http.stream("POST", c.base_url + VIDEOS_PATH, json=build_video_body(prompt, **kw),
                                      headers=c._headers) as resp:
                if resp.is_error:
                    await resp.aread()
                    raise FewstepError.from_response(resp)
                async for piece in resp.aiter_bytes():
                    yield piece
        except httpx.TransportError as exc:
            raise FewstepConnectionError.from_exception(exc) from exc

    async def generate(self, prompt: str, **kw: Any) -> bytes:
        return b"".join([p async for p in self.stream(prompt, **kw)])


def _ws_headers(client) -> dict[str, str] | None:
    return dict(client._headers) or None


def _connect_sync(client, path: str, open_timeout: float):
    from websockets.sync.client import connect

    try:
        conn = connect(ws_url(client.base_url, path), additional_headers=_ws_headers(client), max_size=None,
                       open_timeout=open_timeout)
    except (OSError, TimeoutError) as exc:
        raise FewstepConnectionError(None, f"{type(exc).__name__}: {exc}", "connection_error") from exc
    # websockets >= 17.1 warns about connections used outside a `with`; Stream / Realtime own closing this one
    return conn.__enter__()


async def _connect_async(client, path: str, open_timeout: float):
    from websockets.asyncio.client import connect

    try:
        return await connect(ws_url(client.base_url, path), additional_headers=_ws_headers(client), max_size=None,
                             open_timeout=open_timeout)
    except (OSError, TimeoutError) as exc:
        raise FewstepConnectionError(None, f"{type(exc).__name__}: {exc}", "connection_error") from exc


__all__ += ["STREAM_PATH", "REALTIME_PATH", "VIDEOS_PATH", "Frame", "parse_frame", "Stream", "AsyncStream",
            "Realtime", "AsyncRealtime", "RealtimeMessage", "Videos", "AsyncVideos", "build_start_message",
            "build_realtime_input", "build_video_body", "ws_url"]
