"""POST /v1/images/generations: validate, hand to the engine, return the images. Nothing heavy here.

Answers:
* JSON (the default, OpenAI's Images API shape: ``ImageGenerationResponse``): serialised once with orjson and
  returned as bytes (no second pydantic validation of the response; the schema is documented through
  ``responses=``). Base64 and serialisation of large answers run in the engine's encode pool, off the event loop.
* Raw image bytes, for ``n=1`` when the client's ``Accept`` prefers ``image/png``, ``image/jpeg`` or ``image/webp``
  (``image/*`` takes the body's ``output_format``): the format named by Accept wins over ``output_format``. The
  seed is in ``X-Fewstep-Seed``, the stage timings in ``Server-Timing`` (``denoise;dur=12.3``, ...) and the batch
  size in ``X-Fewstep-Batch-Size``.
* ``n>1`` with an Accept that admits only images: 406 (one image per response body; ask for JSON, or n=1). When
  the Accept admits JSON too (``image/png, application/json;q=0.5``), n>1 answers JSON. An Accept that names neither
  (``text/html``) is ignored: JSON, as before.
"""

from __future__ import annotations

import asyncio
import base64
import time

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from fewstep.engines.core import EngineError, GenerateOutput, GenerateRequest

from ..disconnect import ClientDisconnected, unless_disconnected
from ..protocol import ErrorResponse, ImageGenerationRequest, ImageGenerationResponse, error_responses

router = APIRouter()
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
    """``ImageGenerationResponse`` as bytes: base64 once, serialised once."""
    return orjson.dumps({
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(img).decode("ascii"), "seed": s} for img, s in zip(out.images,
                                                                                                 out.seeds)],
        "timings": {k: round(v, 3) for k, v in out.timings.items()},
    })


@router.post("/v1/images/generations", response_class=JSONResponse, responses=RESPONSES)
async def generate(body: ImageGenerationRequest, request: Request) -> Response:
    state = request.app.state.fewstep
    w, h = body.dims()
    state.check_limits(prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=w, height=h)
    raw = negotiate(request.headers.get("accept"), body.n, body.output_format)  # before any work: 406 costs nothing
    if state.engine is None:
        raise EngineError(state.load_error or "the model is still loading; poll GET /ready", 503, None,
                          "not_ready")
    req = GenerateRequest(prompt=body.prompt, model=body.model, n=body.n, height=h, width=w,
                          steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                          negative_prompt=body.negative_prompt, nasa_scale=body.nasa_scale, seed=body.seed,
                          output_format=raw or body.output_format, timeout_s=deadline_header(request))
    try:
        out = await unless_disconnected(request, state.engine.generate(req))
    except ClientDisconnected:  # counted by the engine (fewstep_requests_cancelled); nobody reads this answer
        return Response(status_code=499)
    state.metrics.on_request(out.model, 200)
    headers = {"Server-Timing": server_timing(out.timings), "Vary": "Accept"}
    if raw:
        headers[SEED_HEADER] = str(out.seeds[0])
        headers[BATCH_HEADER] = str(int(out.timings.get("batch_size", 1)))
        return Response(out.images[0], media_type=f"image/{raw}", headers=headers)
    if sum(len(img) for img in out.images) > POOL_BYTES:
        content = await asyncio.wrap_future(state.core.encode_submit(render_json, out))
    else:
        content = render_json(out)
    return Response(content, media_type="application/json", headers=headers)
