"""The paired request and output types of image generation (``GenerateRequest`` / ``GenerateOutput``). The stream
counterparts (``StreamStart`` / ``StreamChunk``) live in engines/stream/session.py."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerateRequest:
    prompt: str
    model: str | None = None
    n: int = 1
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    nasa_scale: float | None = None  # NASA's alpha (guidance modes "nasa"); None: DEFAULT_NASA_SCALE
    # NAG's renormalised form of NASA instead of plain subtraction: any of them given selects it, the others take
    # DEFAULT_NAG_* (engines/pipeline.py)
    nag_scale: float | None = None
    nag_tau: float | None = None
    nag_alpha: float | None = None
    seed: int | None = None
    # image-to-image: the input picture ([H, W, 3] uint8, any size: center-cropped and resized to the output's) and
    # how far it is noised before denoising (1.0: to pure noise, the input ignored)
    image: np.ndarray | None = None
    strength: float = 0.6
    output_format: str = "png"  # png | jpeg | webp | raw (uint8 arrays, no encoding)
    timeout_s: float | None = None  # deadline from arrival; None: batching.request_timeout_s
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class GenerateOutput:
    request_id: str
    images: list[bytes | np.ndarray]
    seeds: list[int]
    timings: dict[str, float]  # <stage>_ms for every stage, total_ms, batch_size
    model: str = ""
    error: Exception | None = None
    # perf_counter stamps of the request's arrival at the engine and of its encoded images (0: not run), from
    # which the route times its own parts of the request's span (server/routes/images.py, waterfall)
    arrival: float = 0.0
    done: float = 0.0
