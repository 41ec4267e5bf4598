"""Request / response types of the HTTP surface (pydantic). Shaped like OpenAI's Images API, plus the extra
fields open servers add (seed, num_inference_steps, guidance_scale, negative_prompt) and fewstep's timings."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from fewstep.engines.pipeline import NAG_RANGES
from fewstep.engines.samplers import MAX_STEPS, MIN_STEPS

# Prompt length, n and the largest side are bounded by the live config (LimitsConfig), checked in one place:
# AppState.check_limits. The models here check only what no config changes (types, formats, the smallest side).
MIN_SIDE = 64
NASA_MAX = 4.0  # nasa_scale's ceiling: beyond ~1 the subtracted attention dominates the prompt's own


def _nag_range(name: str) -> AfterValidator:
    lo, hi = NAG_RANGES[name]

    def check(v: float | None) -> float | None:
        # a message of our own (not pydantic's one-sided "less than or equal to"), the same over HTTP and WebSocket
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"{name} must be from {lo:g} to {hi:g}, got {v:g}")
        return v
    return AfterValidator(check)


# NAG's request fields (images, realtime, stream start and update), bounded by engines.pipeline.NAG_RANGES
NagScale = Annotated[float | None, _nag_range("nag_scale")]
NagTau = Annotated[float | None, _nag_range("nag_tau")]
NagAlpha = Annotated[float | None, _nag_range("nag_alpha")]


def nag_field(name: str, what: str):
    """A NAG request field's default and schema; any of nag_scale / nag_tau / nag_alpha given selects NAG's
    renormalised form of NASA, the others default."""
    lo, hi = NAG_RANGES[name]
    return Field(None, json_schema_extra={"minimum": lo, "maximum": hi},
                 description=f"{what} (from {lo:g} to {hi:g}); with a negative_prompt on models with guidance mode "
                 "nasa, any nag_* field selects Normalized Attention Guidance's renormalised form instead of plain "
                 "NASA (not together with nasa_scale)")


_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageGenerationRequest(BaseModel):
    # OpenAI clients send fields we do not use (quality, style, user): accepted, kept aside in model_extra, and named
    # back to the client in the X-Fewstep-Ignored-Fields header (server/routes/images.py), never silently dropped
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, strict=True, description="images to generate; at most limits.max_n (16 by default)")
    size: str | None = Field(None, description='"WxH", e.g. "512x512"; default: the model\'s native size',
                             # in the schema only: the validator below words the error ('size must look like ...')
                             json_schema_extra={"pattern": r"^(\d{1,5}x\d{1,5}|auto)$"})
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # strict: JSON true is not 1 (pydantic's lax mode would take it), as for n
    seed: int | None = Field(None, ge=0, le=2**62, strict=True)
    num_inference_steps: int | None = Field(None, ge=MIN_STEPS, le=MAX_STEPS, strict=True)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="above 1: CFG (or guidance adapters, "
                                         "guidance mode agd) on models that take it; default: the model's")
    negative_prompt: str | None = Field(None, description="what to steer away from: through CFG where "
                                        "guidance_scale runs CFG, else through NASA (guidance mode nasa); a 400 on "
                                        "models with neither (GET /v1/models lists guidance_modes)")
    nasa_scale: float | None = Field(None, ge=0.0, le=NASA_MAX, description="NASA's alpha: how strongly the "
                                     "negative prompt's cross-attention is subtracted (default 0.5; needs a "
                                     "negative_prompt and guidance mode nasa)")
    nag_scale: NagScale = nag_field("nag_scale", "NAG's phi: extrapolation away from the negative prompt's "
                                        "attention, Z+ + (phi - 1)(Z+ - Z-) (default 3)")
    nag_tau: NagTau = nag_field("nag_tau", "NAG's tau: the steered features' L1 norm is clipped at tau times "
                                      "the prompt's own, per token (default 2.5)")
    nag_alpha: NagAlpha = nag_field("nag_alpha", "NAG's alpha: the share of steered features blended into the "
                                        "prompt's own (default 0.5)")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must be a non-empty string")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return None
        m = _SIZE.match(v)
        if not m:
            raise ValueError(f'size must look like "512x512" (width x height in pixels), got {v!r}')
        w, h = int(m[1]), int(m[2])
        if min(w, h) < MIN_SIDE:
            raise ValueError(f"size sides must be at least {MIN_SIDE} pixels, got {w}x{h}")
        return v

    def dims(self) -> tuple[int | None, int | None]:
        if self.size is None:
            return None, None
        w, h = (int(x) for x in self.size.split("x"))
        return w, h


class ImageData(BaseModel):
    b64_json: str
    seed: int | None = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    timings: dict[str, float] = Field(default_factory=dict, description="per-stage milliseconds: queue, "
                                      "encode_prompt, denoise, decode, encode_image, total; plus batch_size")


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fewstep"
    default_size: int | None = None
    sizes: str | None = None  # the sizes admission accepts, e.g. "64x64" (engines/sizes.py)
    default_steps: int | None = None
    default_guidance_scale: float | None = None  # 0: guidance-distilled (no second branch unless asked for)
    sampler: str | None = None
    kind: Literal["image", "video"] = "image"
    chunk_frames: int | None = None  # video models: frames per emitted chunk
    fps: float | None = None  # video models: default fps target
    # what the engine appends to prompts that do not match "unless" (the checkpoint's fewstep.prompt_completion;
    # the embedded models: " on a white background" to prompts that name no background)
    prompt_completion: dict[str, str] | None = None
    # prompts the model is known to draw (the checkpoint's fewstep.example_prompts); clients offer them, the page
    # starts with the first
    example_prompts: list[str] = Field(default_factory=list)
    # how the model takes guidance: none (plain pass), cfg (doubled batch at guidance_scale > 1; negative prompts
    # there), agd (guidance adapters: guidance_scale > 1 in one pass), nasa (negative prompts at guidance_scale <= 1)
    guidance_modes: list[Literal["none", "cfg", "agd", "nasa"]] = Field(default_factory=lambda: ["none"])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- health ---------------------------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok", "dead"]
    error: str | None = Field(None, description="why the process cannot serve again (status 'dead', 503)")


class ModelState(BaseModel):
    id: str
    state: Literal["queued", "loading", "loaded", "warming", "ready", "failed"]


class ReadyResponse(BaseModel):
    ready: bool
    model: str = Field(..., description="the default model (kept for clients of earlier versions)")
    models: list[ModelState] = Field(..., description="every served model and its state")
    error: str | None = Field(None, description="set when a model failed to load (the details are in the log)")


# -- the error statuses the server answers, for the OpenAPI schema (routes' ``responses=``) ---------------------------
_ERRORS = {
    400: "Invalid request: a field or parameter fails validation or a server limit; 'param' names it",
    401: "Missing or invalid API key (servers started with --api-key)",
    403: "The browser's Origin is not allowed (--allow-origin)",
    404: "No such resource",
    413: "The request body is larger than limits.max_body_bytes",
    429: "Rate limit or concurrent-stream limit per client; see Retry-After",
    503: "Not ready (loading), at capacity, out of device memory, or shutting down; see Retry-After",
    504: "The request's deadline (X-Fewstep-Deadline-Ms or the server's default) passed",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a route: each status with OpenAI's error body (``ErrorResponse``) and what it means."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}
