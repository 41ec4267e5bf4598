"""The one typed config tree. This is the only module that reads the environment (FEWSTEP_* variables).

Precedence: defaults < environment < CLI flags (the CLI passes its overrides to ``load_config``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr

from fewstep.engines.config import BatchingConfig, EngineConfig, StreamConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "engines" / "default" / "image"
DEFAULT_VIDEO_MODEL_DIR = DEFAULT_MODEL_DIR.parent / "video"
# --model accepts these names besides a directory: the embedded students (training/README.md)
EMBEDDED = {"default": DEFAULT_MODEL_DIR, "default-video": DEFAULT_VIDEO_MODEL_DIR}


class LimitsConfig(BaseModel):
    """Request limits: the one source for every route (AppState.check_limits), the 400 hints and the OpenAPI
    schema."""

    max_prompt_chars: int = Field(2000, ge=1, description="longer prompts are refused (tokenizers truncate anyway)")
    max_n: int = Field(16, ge=1, le=256)
    max_side: int = Field(2048, ge=64, description="largest width or height in pixels")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # input images (image-to-image): a JSON body stays small; an upload's limit is its own
    max_image_bytes: int = Field(8 << 20, ge=1024, description="largest input image file: the upload of POST "
                                 "/v1/images/edits (its body may be max_body_bytes larger), a /v1/realtime message's "
                                 "image before base64, a /v1/stream input frame")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="largest input image in pixels (width x "
                                  "height), checked from the file's header before any pixel is decoded")


class HTTPConfig(BaseModel):
    host: str = Field("127.0.0.1", description="bind address; on 0.0.0.0 pass API keys (SecurityConfig.api_keys)")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    # uvicorn's own limits (server/cli.py passes them to uvicorn.Config)
    ws_max_bytes: int = Field(64 << 10, ge=1024, description="largest WebSocket message from a client besides its "
                              "input image; control messages are small JSON. uvicorn's ws_max_size is this plus the "
                              "base64 size of limits.max_image_bytes (bigger messages close the socket, 1009)")
    max_header_bytes: int = Field(16 << 10, ge=1024, description="request line + headers (uvicorn "
                                  "h11_max_incomplete_event_size, and the guard on the parsed head); longer URLs or "
                                  "headers get 431 (400 or a reset from h11 beyond 64 KiB)")
    max_connections: int | None = Field(1024, ge=1, description="open connections and tasks before uvicorn answers "
                                        "503 (limit_concurrency)")
    shutdown_grace_s: float = Field(10.0, ge=0, description="after SIGTERM: time for in-flight work before it is "
                                    "cancelled; the process exits within this plus 5 s (a second signal: at once)")


class SecurityConfig(BaseModel):
    api_keys: list[SecretStr] = Field(default_factory=list, description="accepted API keys (Authorization: Bearer "
                                      "KEY, or ?token=KEY for browser WebSockets and <img>); empty: no keys")
    allow_origins: list[str] = Field(default_factory=list, description="Origins allowed besides the server's own "
                                     "(the Host header); '*' allows any. Requests with another Origin get 403")
    cors_origins: list[str] = Field(default_factory=list, description="origins given CORS headers (starlette's "
                                    "CORSMiddleware); empty: CORS off. They are allowed Origins too")
    protect_metrics: bool = Field(False, description="/health, /ready and /metrics need a key too")
    max_streams_per_client: int = Field(8, ge=0, description="open WebSocket and MJPEG streams per key (per client "
                                        "address without keys); 0: no limit")
    # Off by default: one client legitimately sends hundreds of images a second to a real-time server (a front end, a
    # load test), and the queue's own admission already bounds the work it can cause; set it where keys are shared.
    requests_per_second: float = Field(0.0, ge=0, description="requests a second per key or client address "
                                       "(a token bucket holding two seconds' worth; health and the page not counted, "
                                       "nor messages on an open WebSocket); 0: no limit")
    idle_timeout_s: float = Field(60.0, gt=0, description="a WebSocket that neither side used for this long is "
                                  "closed (4408)")


class ServerConfig(BaseModel):
    model: str | None = Field(None, description="diffusers-format directory, or 'default' / 'default-video' for the "
                              "embedded image / streaming-video model; None = both embedded models")
    model_name: str | None = Field(None, description="id served in /v1/models; default: the directory name (with "
                                   "no model, it names the embedded image model, served alone)")
    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    http: HTTPConfig = HTTPConfig()
    security: SecurityConfig = SecurityConfig()
    engine_process: bool = Field(False, description="run the engine in a process of its own, beside the HTTP process "
                                 "(engines/process.py; images and streams): HTTP parsing, JSON and base64 never wait "
                                 "for the engine's Python thread")

    def model_dir(self) -> Path:
        """The directory of ``model`` (the embedded image model when unset)."""
        return _model_dir(self.model or "default")

    def served_models(self) -> list[tuple[str, Path]]:
        """(id, directory) of every model this server loads. With no ``model`` (``fewstep serve`` alone) both
        embedded models: the image one first, so image requests without a ``model`` go to it, and streams to the
        video one. ``model`` (or ``model_name`` alone) serves that one model."""
        if self.model is None and self.model_name is None:
            return [(f"fewstep-{name}", _model_dir(name)) for name in EMBEDDED]
        return [(self.served_name(), self.model_dir())]

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        name = self.model or "default"
        return f"fewstep-{name}" if name in EMBEDDED else Path(name).resolve().name


def _model_dir(name: str) -> Path:
    if name not in EMBEDDED:
        return Path(name)
    if not (EMBEDDED[name] / "model_index.json").is_file():
        raise SystemExit(f"fewstep: the embedded model {name!r} is missing from this install; pass --model DIR "
                         "(a diffusers-format directory)")
    return EMBEDDED[name]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


_ENV = {  # variable -> (path in the tree, type)
    "FEWSTEP_MODEL": ("model", str),
    "FEWSTEP_MODEL_NAME": ("model_name", str),
    "FEWSTEP_DEVICE": ("engine.device", str),
    "FEWSTEP_DTYPE": ("engine.dtype", str),
    "FEWSTEP_VAE": ("engine.vae", str),
    "FEWSTEP_ADAPTERS": ("engine.adapters", str),
    "FEWSTEP_MAX_BATCH_SIZE": ("engine.batching.max_batch_size", int),
    "FEWSTEP_MAX_WAIT_MS": ("engine.batching.max_wait_ms", float),
    "FEWSTEP_MAX_QUEUE_SECONDS": ("engine.batching.max_queue_seconds", float),
    "FEWSTEP_THREADS": ("engine.threads", int),
    "FEWSTEP_ENGINE_PROCESS": ("engine_process", _flag),
    "FEWSTEP_OVERLAP_STAGES": ("engine.overlap_stages", str),
    "FEWSTEP_OVERLAP_DECODE": ("engine.stream.overlap_decode", str),
    "FEWSTEP_MAX_SESSIONS": ("engine.stream.max_sessions", int),
    "FEWSTEP_MAX_BATCH_SESSIONS": ("engine.stream.max_batch_sessions", int),
    "FEWSTEP_OUTBOX_CHUNKS": ("engine.stream.outbox_chunks", int),
    "FEWSTEP_STREAM_RAMP": ("engine.stream.ramp", str),
    "FEWSTEP_MAX_VIDEO_FRAMES": ("engine.stream.max_video_frames", int),
    "FEWSTEP_REQUEST_TIMEOUT": ("engine.batching.request_timeout_s", float),
    "FEWSTEP_MAX_N": ("limits.max_n", int),
    "FEWSTEP_MAX_SIDE": ("limits.max_side", int),
    "FEWSTEP_MAX_PROMPT_CHARS": ("limits.max_prompt_chars", int),
    "FEWSTEP_HOST": ("http.host", str),
    "FEWSTEP_PORT": ("http.port", int),
    "FEWSTEP_SHUTDOWN_GRACE": ("http.shutdown_grace_s", float),
    "FEWSTEP_API_KEYS": ("security.api_keys", _csv),
    "FEWSTEP_ALLOW_ORIGINS": ("security.allow_origins", _csv),
    "FEWSTEP_CORS_ORIGINS": ("security.cors_origins", _csv),
    "FEWSTEP_PROTECT_METRICS": ("security.protect_metrics", _flag),
    "FEWSTEP_MAX_STREAMS_PER_CLIENT": ("security.max_streams_per_client", int),
    "FEWSTEP_RATE_LIMIT": ("security.requests_per_second", float),
    "FEWSTEP_IDLE_TIMEOUT": ("security.idle_timeout_s", float),
}


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def load_config(overrides: dict | None = None, environ: dict | None = None) -> ServerConfig:
    """Build the config from the environment plus ``overrides`` ({"engine.device": "cpu", ...}; None = unset)."""
    environ = os.environ if environ is None else environ
    tree: dict = {}
    for var, (path, typ) in _ENV.items():
        if var in environ:
            _set(tree, path, typ(environ[var]))
    for path, value in (overrides or {}).items():
        if value is not None:
            _set(tree, path, value)
    return ServerConfig.model_validate(tree)


__all__ = ["ServerConfig", "EngineConfig", "BatchingConfig", "StreamConfig", "LimitsConfig", "HTTPConfig",
           "SecurityConfig", "load_config"]
