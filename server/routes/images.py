"""POST /v1/images/generations: validate, hand to the engine, return base64 images. Nothing heavy here."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request, Response

from fewstep.engines.core import EngineError, GenerateRequest

from ..disconnect import ClientDisconnected, unless_disconnected
from ..protocol import ImageData, ImageGenerationRequest, ImageGenerationResponse, error_responses

router = APIRouter()
DEADLINE_HEADER = "X-Fewstep-Deadline-Ms"


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


@router.post("/v1/images/generations", response_model=ImageGenerationResponse,
             responses=error_responses(400, 401, 403, 404, 413, 429, 503, 504))
async def generate(body: ImageGenerationRequest, request: Request) -> ImageGenerationResponse:
    state = request.app.state.fewstep
    w, h = body.dims()
    state.check_limits(prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=w, height=h)
    if state.engine is None:
        raise EngineError(state.load_error or "the model is still loading; poll GET /ready", 503, None,
                          "not_ready")
    req = GenerateRequest(prompt=body.prompt, model=body.model, n=body.n, height=h, width=w,
                          steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                          negative_prompt=body.negative_prompt, seed=body.seed, output_format=body.output_format,
                          timeout_s=deadline_header(request))
    try:
        out = await unless_disconnected(request, state.engine.generate(req))
    except ClientDisconnected:  # counted by the engine (fewstep_requests_cancelled); nobody reads this answer
        return Response(status_code=499)
    state.metrics.on_request(out.model, 200)
    return ImageGenerationResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=base64.b64encode(img).decode(), seed=s) for img, s in zip(out.images, out.seeds)],
        timings={k: round(v, 3) for k, v in out.timings.items()},
    )
