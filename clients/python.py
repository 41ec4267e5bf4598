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

Extending: endpoints live on small resource objects (``client.images``) that call
the client's ``_request`` helper; request bodies and response parsing are plain
module functions shared by the sync and async clients. New resources (streaming,
realtime, ...) can follow the same pattern: add a class taking the client and
attach it in ``__init__`` (or subclass the client).
"""

from __future__ import annotations

import base64
import binascii
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
        output_format: str = "png",
        model: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> ImagesResult:
        body = build_images_body(
            prompt, n=n, size=size, seed=seed, steps=steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, output_format=output_format, model=model,
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
        output_format: str = "png",
        model: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> ImagesResult:
        body = build_images_body(
            prompt, n=n, size=size, seed=seed, steps=steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, output_format=output_format, model=model,
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

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncFewstepClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
