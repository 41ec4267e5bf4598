"""POST /v1/images/generations and POST /v1/images/edits (OpenAI's multipart form: image-to-image from the uploaded
``image`` at ``strength``): validate, hand to the engine, return the images. Nothing heavy here: both run one path
(``serve_images``); the upload is decoded in the engine's pool.

Answers:
* JSON (the default, OpenAI's Images API shape: ``ImageGenerationResponse``): serialised once with orjson and
  returned as bytes (no second pydantic validation of the response; the schema is documented through
  ``responses=``). Base64 and serialisation of large answers run in the engine's encode pool, off the event loop.
* Raw image bytes, for ``n=1`` when the client's ``Accept`` prefers ``image/png``, ``image/jpeg`` or ``image/webp``
  (``image/*`` takes the body's ``output_format``): the format named by Accept wins over ``output_format``. The
  seed is in ``X-Fewstep-Seed``, the stage timings in ``Server-Timing`` (``denoise;dur=12.3``, ...) and the batch
  size in ``X-Fewstep-Batch-Size``.
* Either way, fields the request carried that this server does not use (OpenAI's ``quality``, ``style``, ``user``)
  are named in ``X-Fewstep-Ignored-Fields``.
* ``n>1`` with an Accept that admits only images: 406 (one image per response body; ask for JSON, or n=1). When
  the Accept admits JSON too (``image/png, application/json;q=0.5``), n>1 answers JSON. An Accept that names neither
  (``text/html``) is ignored: JSON, as before.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fewstep.engines.core import EngineError, GenerateOutput, GenerateRequest
from fewstep.engines.init_image import InputImageError, decode_image
from fewstep.engines.samplers import MAX_STEPS, MIN_STEPS

from ..disconnect import ClientDisconnected, unless_disconnected
from ..protocol import ErrorResponse, ImageGenerationRequest, ImageGenerationResponse, error_responses

router = APIRouter()
log = logging.getLogger("fewstep.server")

DEADLINE_HEADER = "X-Fewstep-Deadline-Ms"
SEED_HEADER = "X-Fewstep-Seed"
BATCH_HEADER = "X-Fewstep-Batch-Size"
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
# Answers with more image bytes than this are base64-encoded and serialised in the encode pool. Measured on a
# 2-core CI machine: 4 KiB inline takes ~8 us against 0.3-0.7 ms for the hop to the pool and back; 1 MiB inline
# blocks the event loop for ~10-15 ms (base64 + orjson), which every other connection would wait out.
POOL_BYTES = 64 << 10

_BINARY = {"schema": {"type": "string", "format": "binary"}}
RESPONSES = {
    **error_responses(400, 401, 403, 404, 413, 429, 503, 504),
    200: {"model": ImageGenerationResponse,
          "description": "JSON (the default), or for n=1 and an Accept of image/png, image/jpeg or image/webp the "
                         f"image's bytes, with {SEED_HEADER}, {BATCH_HEADER} and Server-Timing headers",
          "content": {t: _BINARY for t in IMAGE_TYPES}},
    406: {"model": ErrorResponse, "description": "n>1 with an Accept that admits only images: raw image answers "
                                                 "hold one image; ask for application/json or n=1"},
}


def deadline_header(request: Request) -> float | None:
    """The client's deadline in seconds from now (``X-Fewstep-Deadline-Ms``), or None for the server default."""
    value = request.headers.get(DEADLINE_HEADER)
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not ms > 0:  # also refuses nan
        raise EngineError(f"{DEADLINE_HEADER} must be a positive number of milliseconds, got {value!r}", 400,
                          "deadline", "invalid_deadline")
    return ms / 1e3


def _accept(header: str) -> list[tuple[str, float]]:
    """``Accept`` -> [(media range, q)], ranges with q=0 (refused) dropped."""
    out = []
    for part in header.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0:
            out.append((media.lower(), q))
    return out


def negotiate(accept: str | None, n: int, output_format: str) -> str | None:
    """The image format to answer with raw bytes, or None for JSON (see the module docstring); raises 406."""
    ranges = _accept(accept or "")

    def match(media: str) -> tuple[float, int]:  # (q, specificity) of the most specific range matching media
        best = (0.0, -1)
        for r, q in ranges:
            spec = 2 if r == media else 1 if r == media.split("/")[0] + "/*" else 0 if r == "*/*" else -1
            if spec > best[1]:
                best = (q, spec)
        return best

    json_q = match("application/json")
    offers = {fmt: match(t) for t, fmt in IMAGE_TYPES.items()}
    named = {fmt: m for fmt, m in offers.items() if m[1] >= 1}  # image types the client asked for by name or image/*
    if not named:
        return None
    # highest q, then the most specific match; on a tie JSON, then the body's output_format
    fmt, m = max(named.items(), key=lambda kv: (kv[1], kv[0] == output_format))
    if json_q[1] >= 0 and json_q >= m:
        return None
    if n > 1:
        if json_q[1] >= 0:
            return None
        raise EngineError(f"an image answer holds one image, and n is {n}: send Accept: application/json for n>1, or "
                          "ask for n=1", 406, "n", "not_acceptable")
    return fmt


def server_timing(timings: dict[str, float]) -> str:
    """``queue;dur=0.1, encode_prompt;dur=2.3, ...`` (W3C Server-Timing, milliseconds) from the output's timings."""
    return ", ".join(f"{k[:-3]};dur={v:.3f}" for k, v in timings.items() if k.endswith("_ms"))


def render_json(out: GenerateOutput) -> bytes:
    """``ImageGenerationResponse`` as bytes: base64 once, serialised once. The base64 step is timed into
    ``timings.serialize_ms`` (the JSON dump after it cannot time itself, and costs little beside it)."""
    t0 = time.perf_counter()
    data = [{"b64_json": base64.b64encode(img).decode("ascii"), "seed": s} for img, s in zip(out.images, out.seeds)]
    out.timings["serialize_ms"] = (time.perf_counter() - t0) * 1e3
    return orjson.dumps({
        "created": int(time.time()),
        "data": data,
        "timings": {k: round(v, 3) for k, v in out.timings.items()},
    })


def waterfall(request: Request, out: GenerateOutput) -> None:
    """Add the server's own parts of a request's span to ``out.timings``, beside the engine's stages:
    ``receive_ms`` (the guard saw the request -> the engine queued it: body, validation, hand-over) and
    ``handoff_ms`` (the engine finished encoding -> this route resumed). With ``queue``, the stages, ``encode_image``
    and ``serialize``, they add up to the server's span, which ``fewstep bench images`` subtracts from the client's
    latency to draw its waterfall."""
    now = time.perf_counter()
    received = request.scope.get("state", {}).get("received")
    if received is not None and out.arrival:
        out.timings["receive_ms"] = max(0.0, (out.arrival - received) * 1e3)
    if out.done:
        out.timings["handoff_ms"] = max(0.0, (now - out.done) * 1e3)


@router.post("/v1/images/generations", response_class=JSONResponse, responses=RESPONSES)
async def generate(body: ImageGenerationRequest, request: Request) -> Response:
    return await serve_images(request, body)


EDIT_RESPONSES = {**RESPONSES, **error_responses(413)}
EDIT_RESPONSES[400] = {"model": ErrorResponse, "description": "Invalid request: a field fails validation or a server "
                       "limit, or the image is not a PNG/JPEG/WebP the server can read, is larger than "
                       "limits.max_image_pixels, or has an unsupported mode (16-bit, float); 'param' names the field"}
EDIT_RESPONSES[413] = {"model": ErrorResponse, "description": "The image is larger than limits.max_image_bytes, or "
                       "the body than limits.max_body_bytes + limits.max_image_bytes"}


@router.post("/v1/images/edits", response_class=JSONResponse, responses=EDIT_RESPONSES)
async def edit(
    request: Request,
    image: Annotated[UploadFile, File(description="the input picture (PNG, JPEG or WebP); center-cropped and "
                                      "resized to the output size")],
    prompt: Annotated[str, Form()],
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1, description="images to generate; at most limits.max_n")] = 1,
    size: Annotated[str | None, Form(description='"WxH"; default: the model\'s native size',
                                     # in the schema only: the model's validator words the error
                                     json_schema_extra={"pattern": r"^(\d{1,5}x\d{1,5}|auto)$"})] = None,
    response_format: Annotated[Literal["b64_json"], Form()] = "b64_json",
    output_format: Annotated[Literal["png", "jpeg", "webp"], Form()] = "png",
    strength: Annotated[float, Form(gt=0.0, le=1.0, description="how far the input is noised before denoising "
                                    "(SDEdit): 1.0 ignores it")] = 0.6,
    seed: Annotated[int | None, Form(ge=0, le=2**62)] = None,
    num_inference_steps: Annotated[int | None, Form(ge=MIN_STEPS, le=MAX_STEPS, description="Euler-family "
                                                    "models: the full schedule, of which the last "
                                                    "int(steps x strength) run; flow models: the steps run")] = None,
    guidance_scale: Annotated[float | None, Form(ge=0.0, le=30.0)] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    mask: Annotated[UploadFile | None, File(description="not supported (inpainting); leave it out")] = None,
) -> Response:
    """OpenAI's image edit (multipart form) as image-to-image: the same answer, limits, deadlines and cancellation as
    /v1/images/generations."""
    state = request.app.state.fewstep
    if mask is not None:
        raise EngineError("mask (inpainting) is not supported; send image and prompt only", 400, "mask",
                          "mask_unsupported")
    try:
        body = ImageGenerationRequest(prompt=prompt, model=model, n=n, size=size, response_format=response_format,
                                      output_format=output_format, seed=seed,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      negative_prompt=negative_prompt)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    limit = state.config.limits.max_image_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise EngineError(f"the image is larger than the limit of {limit} bytes; send a smaller file", 413, "image",
                          "image_too_large")
    return await serve_images(request, body, data, strength)


async def read_image(state, data: bytes):
    """Decoded input image ([H, W, 3] uint8) off the event loop; a bad one is a 400 naming ``image``."""
    try:
        return await asyncio.wrap_future(state.core.encode_submit(decode_image, data,
                                                                  state.config.limits.max_image_pixels))
    except InputImageError as e:
        raise EngineError(str(e), 400, "image", "invalid_image") from None


IGNORED_HEADER = "X-Fewstep-Ignored-Fields"
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_logged_ignored: set[str] = set()


def ignored_fields(body: ImageGenerationRequest) -> str | None:
    """The request's fields that this server accepts but does not use (OpenAI's ``quality``, ``style``, ``user``,
    ...), as a header value; each new name is also logged once. Names that could not be a field (odd characters,
    very long) are counted, not echoed."""
    names = sorted(body.model_extra or {})
    if not names:
        return None
    shown = [n for n in names if _FIELD_NAME.match(n)]
    new = [n for n in shown if n not in _logged_ignored]
    if new and len(_logged_ignored) < 1000:
        _logged_ignored.update(new)
        log.info("image requests carry fields this server ignores: %s", ", ".join(new))
    odd = len(names) - len(shown)
    return ", ".join(shown + ([f"({odd} more with unusual names)"] if odd else []))


async def serve_images(request: Request, body: ImageGenerationRequest, image: bytes | None = None,
                       strength: float = 0.6) -> Response:
    """The one path of both image routes: limits, negotiation, the engine, the answer."""
    state = request.app.state.fewstep
    arrival = time.perf_counter()  # the deadline counts the image's decoding too
    w, h = body.dims()
    state.check_limits(prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=w, height=h)
    raw = negotiate(request.headers.get("accept"), body.n, body.output_format)  # before any work: 406 costs nothing
    if state.engine is None:
        raise EngineError(state.load_error or "the model is still loading; poll GET /ready", 503, None,
                          "not_ready")
    timeout_s = deadline_header(request)
    init = None if image is None else await read_image(state, image)
    req = GenerateRequest(prompt=body.prompt, model=body.model, n=body.n, height=h, width=w,
                          steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                          negative_prompt=body.negative_prompt, nasa_scale=body.nasa_scale, nag_scale=body.nag_scale,
                          nag_tau=body.nag_tau, nag_alpha=body.nag_alpha, seed=body.seed,
                          output_format=raw or body.output_format, timeout_s=timeout_s, image=init, strength=strength,
                          arrival=arrival)
    try:
        out = await unless_disconnected(request, state.engine.generate(req))
    except ClientDisconnected:  # counted by the engine (fewstep_requests_cancelled); nobody reads this answer
        return Response(status_code=499)
    state.metrics.on_request(out.model, 200)
    waterfall(request, out)
    headers = {"Server-Timing": server_timing(out.timings), "Vary": "Accept"}
    ignored = ignored_fields(body)
    if ignored:
        headers[IGNORED_HEADER] = ignored
    if raw:
        headers[SEED_HEADER] = str(out.seeds[0])
        headers[BATCH_HEADER] = str(int(out.timings.get("batch_size", 1)))
        return Response(out.images[0], media_type=f"image/{raw}", headers=headers)
    if sum(len(img) for img in out.images) > POOL_BYTES:
        content = await asyncio.wrap_future(state.core.encode_submit(render_json, out))
    else:
        content = render_json(out)
    headers["Server-Timing"] = server_timing(out.timings)  # now with serialize
    return Response(content, media_type="application/json", headers=headers)
