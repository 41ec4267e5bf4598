"""Message types of the streaming surfaces: WS /v1/stream, WS /v1/realtime and POST /v1/videos.

Every JSON message carries ``"type"``; there is one pydantic model per message type, and ``GET /v1/stream/schema``
publishes their JSON schema (``schema()`` below).

WS /v1/stream
-------------
client -> server (text)      ``start`` | ``update`` | ``stop``
server -> client (text)      ``started`` | ``init`` (fMP4 only: the MSE MIME type) | ``updated`` | ``stats``
                             (every ``stream.stats_interval_s``) | ``error`` | ``stopped``
client -> server (binary)    with ``"input": "frames"`` only: camera frames, same header (payload type 1 JPEG or
                             2 WebP, prompt version 0, the client's own frame index and ms clock); newest wins
server -> client (binary)    one frame (JPEG / WebP) or one fMP4 piece per message:

    offset  size  field (little-endian)
    0       4     magic b"FSTR"
    4       1     header version (1)
    5       1     payload type: 1 JPEG, 2 WebP, 3 fMP4 bytes, 4 raw RGB24
    6       2     prompt version (uint16, wraps): increments on the first frame a prompt update reaches
    8       8     frame index (uint64); for fMP4, the first frame the bytes complete (may be empty of frames)
    16      8     timestamp (float64): milliseconds from the session's start to the frame leaving the engine
    24      ...   payload

Frame indices are consecutive unless frames were dropped (a gap = frames dropped because the client fell behind).
A bad message gets an ``error`` reply and the socket stays usable.

WS /v1/realtime (fal-style)
---------------------------
client -> server: ``{"prompt", "seed"?, "request_id"?, "size"?, "steps"?, "format"?, "image"?, "strength"?}``
(``"type": "generate"`` may be given or left out; ``image``: base64 or a ``data:image/...;base64,`` URL makes the
input image-to-image at ``strength``). The newest input wins: while one input is being generated, a newer one replaces any input
still waiting, and the replaced input is answered ``{"type": "dropped", "request_id", "reason": "superseded"}``.
server -> client: ``result`` (base64 image, echoing ``request_id``), ``dropped``, ``error`` (with the
``request_id`` when the error belongs to an input).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .protocol import NASA_MAX, NagAlpha, NagScale, NagTau, nag_field

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")

# -- binary frames ---------------------------------------------------------------------------------------------
FRAME_MAGIC = b"FSTR"
FRAME_HEADER_VERSION = 1
FRAME_HEADER = struct.Struct("<4sBBHQd")  # 24 bytes
PAYLOAD_TYPES = {"jpeg": 1, "webp": 2, "fmp4": 3, "raw": 4}


def pack_frame(payload: bytes, payload_type: str, index: int, timestamp_ms: float, prompt_version: int = 0) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, FRAME_HEADER_VERSION, PAYLOAD_TYPES[payload_type], prompt_version & 0xFFFF,
                             index, timestamp_ms) + payload


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    magic, version, ptype, pversion, index, ts = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError(f"not a fewstep frame (magic {magic!r})")
    names = {v: k for k, v in PAYLOAD_TYPES.items()}
    return ({"version": version, "payload_type": names.get(ptype, str(ptype)), "prompt_version": pversion,
             "index": index, "timestamp_ms": ts}, data[FRAME_HEADER.size:])


INPUT_PAYLOADS = {1: "jpeg", 2: "webp"}  # what a client may send as an input frame


def unpack_input_frame(data: bytes, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """A client's input frame (``"input": "frames"``): the checked header and the encoded image. Raises ValueError
    with what to send instead (the image itself is decoded later, off the event loop)."""
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"an input frame is a {FRAME_HEADER.size}-byte header plus a JPEG or WebP image; got "
                         f"{len(data)} bytes")
    magic, version, ptype, _, index, ts = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError(f"an input frame starts with {FRAME_MAGIC!r}, got {magic!r}")
    if version != FRAME_HEADER_VERSION:
        raise ValueError(f"input frame header version must be {FRAME_HEADER_VERSION}, got {version}")
    if ptype not in INPUT_PAYLOADS:
        raise ValueError(f"input frame payload type must be 1 (JPEG) or 2 (WebP), got {ptype}")
    payload = data[FRAME_HEADER.size:]
    if len(payload) > max_bytes:
        raise ValueError(f"the input frame's image is {len(payload)} bytes, more than the limit of {max_bytes}; "
                         "send smaller frames")
    if not payload:
        raise ValueError("the input frame has no image after its header")
    return {"version": version, "payload_type": INPUT_PAYLOADS[ptype], "index": index, "timestamp_ms": ts}, payload


_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def b64_image(value: str, max_bytes: int) -> bytes:
    """Base64 (or a ``data:image/...;base64,`` URL) -> the image's bytes; raises ValueError."""
    body = _DATA_URL.sub("", value, count=1)
    if len(body) > 4 * (max_bytes // 3 + 1) + 4:
        raise ValueError(f"the image is larger than the limit of {max_bytes} bytes; send a smaller one")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image must be base64 (or a data:image/...;base64, URL) of a PNG, JPEG or WebP file") \
            from None
    if len(data) > max_bytes:
        raise ValueError(f"the image is larger than the limit of {max_bytes} bytes; send a smaller one")
    return data


def _check_prompt(v: str) -> str:
    if not v.strip():
        raise ValueError("prompt must be a non-empty string")
    return v


def parse_size(v: str | int | None) -> tuple[int | None, int | None]:
    """'WxH', an int (square) or None -> (width, height)."""
    if v is None:
        return None, None
    if isinstance(v, int):
        return v, v
    m = _SIZE.match(v)
    if not m:
        raise ValueError(f'size must look like "512x512" (width x height in pixels), got {v!r}')
    return int(m[1]), int(m[2])


def _check_size(v: str | int | None) -> str | int | None:
    """The smallest side only: the largest is limits.max_side, checked against the live config (AppState)."""
    w, h = parse_size(v)
    if w is not None and min(w, h) < 16:
        raise ValueError(f"size sides must be at least 16 pixels, got {w}x{h}")
    return v



def validation_message(e: ValidationError, tags: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """The first error of a client message that failed validation, as (message, param), in the API's words.
    ``tags``: the message types of a discriminated union, left out of the parameter path."""
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return "message is not valid JSON", None
    if tags and err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        return "message 'type' must be one of " + ", ".join(f"'{t}'" for t in tags), "type"
    loc = [str(x) for x in err.get("loc", ()) if x not in tags]
    param = loc[0] if loc else None  # the field, not the union member pydantic tried ('size', not 'size.str')
    msg = err.get("msg", "invalid message").removeprefix("Value error, ")
    return (f"invalid '{param}': {msg}" if param else msg), param


# Reusable field types: every message that carries a prompt or a size validates it the same way.
# (the prompt's length limit is limits.max_prompt_chars, checked against the live config by AppState.check_limits)
PromptField = Annotated[str, AfterValidator(_check_prompt)]
SizeField = Annotated[str | int | None, AfterValidator(_check_size)]

class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- WS /v1/stream: client -> server -----------------------------------------------------------------------------
class StartMessage(_Msg):
    """Open the socket's stream session."""

    type: Literal["start"]
    prompt: PromptField
    size: SizeField = Field(None, description='"WxH" or one side; default: the model\'s native size')
    seed: int | None = Field(None, ge=0, le=2**62, description="default: random (reported in 'started')")
    fps: float | None = Field(None, ge=0, le=1000, description="target frames/s; default: the model's fps; "
                              "0: unpaced (as fast as the engine goes)")
    format: Literal["jpeg", "webp", "fmp4"] = "jpeg"
    quality: int = Field(85, ge=1, le=100, description="JPEG / WebP quality")
    model: str | None = None
    input: Literal["text", "frames"] = Field("text", description='"frames": video-to-video from the binary frames '
                                             "the client sends (newest wins); output starts with the first of them")
    strength: float = Field(0.6, gt=0, le=1, description='"frames": how far each input frame is noised before '
                            "denoising (1.0 ignores the input)")
    negative_prompt: str | None = Field(None, description="steered away from in the cross-attention (NASA; video "
                                        "models whose guidance_modes list nasa)")
    nasa_scale: float | None = Field(None, ge=0, le=NASA_MAX, description="NASA's alpha (default 0.5)")
    nag_scale: NagScale = nag_field("nag_scale", "NAG's phi (default 3)")
    nag_tau: NagTau = nag_field("nag_tau", "NAG's tau (default 2.5)")
    nag_alpha: NagAlpha = nag_field("nag_alpha", "NAG's alpha (default 0.5)")



class UpdateMessage(_Msg):
    """Change the prompt mid-stream: it reaches the next chunk and blends in over one buffer length. The negative
    prompt ("" clears it) and NASA scale change from the next step; a field left out stays as it is."""

    type: Literal["update"]
    prompt: PromptField | None = None
    strength: float | None = Field(None, gt=0, le=1, description='"frames" streams: the input\'s new noise level')
    negative_prompt: str | None = None
    nasa_scale: float | None = Field(None, ge=0, le=NASA_MAX, description="switches to plain NASA at this alpha")
    nag_scale: NagScale = nag_field("nag_scale", "NAG's phi; the fields left out stay as they were")
    nag_tau: NagTau = nag_field("nag_tau", "NAG's tau")
    nag_alpha: NagAlpha = nag_field("nag_alpha", "NAG's alpha")

    def nag_fields(self) -> dict[str, float | None]:
        return {"nag_scale": self.nag_scale, "nag_tau": self.nag_tau, "nag_alpha": self.nag_alpha}

    def changes_guidance(self) -> bool:
        return (self.negative_prompt is not None or self.nasa_scale is not None
                or any(v is not None for v in self.nag_fields().values()))

    @model_validator(mode="after")
    def _something(self):
        if self.prompt is None and self.strength is None and not self.changes_guidance():
            raise ValueError("an update needs a prompt, a strength, a negative_prompt, a nasa_scale or a nag_* field")
        return self



class StopMessage(_Msg):
    """End the session (the socket stays open; a new ``start`` may follow)."""

    type: Literal["stop"]


ClientMessage = Annotated[Union[StartMessage, UpdateMessage, StopMessage], Field(discriminator="type")]
CLIENT_MESSAGE = TypeAdapter(ClientMessage)


# -- WS /v1/stream: server -> client -----------------------------------------------------------------------------
class StartedMessage(_Msg):
    type: Literal["started"] = "started"
    session_id: str = Field(..., description="unguessable; also the capability for GET /v1/stream/{id}.mjpeg")
    model: str
    width: int
    height: int
    seed: int
    fps: float = Field(..., description="the target; 0 = unpaced")
    chunk_frames: int = Field(..., description="frames per emitted chunk")
    first_chunk_frames: int | None = Field(None, description="frames of the session's first chunk where it "
                                           "differs (Wan's causal VAE: 1 + 4 (F - 1) instead of 4 F)")
    buffer_chunks: int
    format: str
    mjpeg_url: str
    frame_header_bytes: int = FRAME_HEADER.size


class InitMessage(_Msg):
    """fMP4 only, before the first binary piece: the MIME type for ``MediaSource.addSourceBuffer``."""

    type: Literal["init"] = "init"
    mime: str


class UpdatedMessage(_Msg):
    type: Literal["updated"] = "updated"
    prompt: str
    strength: float | None = None
    negative_prompt: str | None = None


class StatsMessage(_Msg):
    type: Literal["stats"] = "stats"
    frames_generated: int
    frames_sent: int
    frames_dropped: int
    fps: float = Field(..., description="frames sent per second over the last interval")
    ttff_ms: float | None = Field(None, description="stream start to its first frame sent")
    inter_frame_ms: float | None = Field(None, description="mean time per frame sent over the last interval")
    queued_chunks: int
    batch_size: int = Field(..., description="sessions in the session's last forward pass")
    step_ms: float
    prompt_version: int


class ErrorMessage(_Msg):
    type: Literal["error"] = "error"
    message: str
    code: str | None = None
    param: str | None = None
    request_id: str | None = None


class StoppedMessage(_Msg):
    type: Literal["stopped"] = "stopped"
    reason: str
    frames_sent: int
    frames_dropped: int


ServerMessage = Annotated[Union[StartedMessage, InitMessage, UpdatedMessage, StatsMessage, ErrorMessage,
                                StoppedMessage], Field(discriminator="type")]


# -- WS /v1/realtime ---------------------------------------------------------------------------------------------
class RealtimeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fal clients send extra keys

    type: Literal["generate"] = "generate"
    prompt: PromptField
    seed: int | None = Field(None, ge=0, le=2**62)
    request_id: str | None = Field(None, max_length=128, description="echoed in the answer; default: generated")
    size: SizeField = None
    steps: int | None = Field(None, ge=1, le=8)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    negative_prompt: str | None = Field(None, description="CFG's negative at guidance_scale > 1, else NASA's")
    nasa_scale: float | None = Field(None, ge=0, le=NASA_MAX, description="NASA's alpha (default 0.5)")
    nag_scale: NagScale = nag_field("nag_scale", "NAG's phi (default 3)")
    nag_tau: NagTau = nag_field("nag_tau", "NAG's tau (default 2.5)")
    nag_alpha: NagAlpha = nag_field("nag_alpha", "NAG's alpha (default 0.5)")
    format: Literal["jpeg", "png", "webp"] = "jpeg"
    model: str | None = None
    image: str | None = Field(None, description="image-to-image input: base64 or a data:image/...;base64, URL of a "
                              "PNG, JPEG or WebP (at most limits.max_image_bytes)")
    strength: float = Field(0.6, gt=0, le=1, description="with image: how far it is noised (1.0 ignores it)")



class RealtimeResult(_Msg):
    type: Literal["result"] = "result"
    request_id: str
    image: str = Field(..., description="base64 of the encoded image")
    format: str
    seed: int
    timings: dict[str, float]


class RealtimeDropped(_Msg):
    type: Literal["dropped"] = "dropped"
    request_id: str
    reason: Literal["superseded"] = "superseded"


RealtimeServerMessage = Annotated[Union[RealtimeResult, RealtimeDropped, ErrorMessage], Field(discriminator="type")]


# -- POST /v1/videos ---------------------------------------------------------------------------------------------
class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: PromptField
    model: str | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    num_frames: int = Field(16, ge=1, le=10_000)
    size: SizeField = None
    fps: float | None = Field(None, gt=0, le=240, description="playback rate written into the file")
    format: Literal["mp4"] = "mp4"



def schema() -> dict[str, Any]:
    """JSON schema of every message, plus the binary frame header (served at GET /v1/stream/schema)."""
    return {
        "stream": {
            "client": TypeAdapter(ClientMessage).json_schema(),
            "server": TypeAdapter(ServerMessage).json_schema(),
            "binary_frame": {
                "byte_order": "little-endian",
                "header_bytes": FRAME_HEADER.size,
                "struct": FRAME_HEADER.format,
                "fields": [
                    {"name": "magic", "offset": 0, "size": 4, "value": FRAME_MAGIC.decode()},
                    {"name": "version", "offset": 4, "size": 1, "value": FRAME_HEADER_VERSION},
                    {"name": "payload_type", "offset": 5, "size": 1, "values": PAYLOAD_TYPES},
                    {"name": "prompt_version", "offset": 6, "size": 2, "type": "uint16"},
                    {"name": "frame_index", "offset": 8, "size": 8, "type": "uint64"},
                    {"name": "timestamp_ms", "offset": 16, "size": 8, "type": "float64"},
                ],
            },
        },
        "realtime": {
            "client": RealtimeRequest.model_json_schema(),
            "server": TypeAdapter(RealtimeServerMessage).json_schema(),
        },
        "videos": {"request": VideoRequest.model_json_schema()},
    }
