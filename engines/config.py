"""The engine's part of the one typed config tree (server/config.py composes it with the HTTP settings).

Plain pydantic models with no environment access: the environment is read in server/config.py only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator


class BatchingConfig(BaseModel):
    max_batch_size: int = Field(8, ge=1, le=256, description="most images in one forward pass")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long the first request of a batch waits "
                               "for compatible company before the batch runs")
    max_queue_images: int = Field(512, ge=1, description="waiting images beyond this are refused with 503, so a "
                                  "backlog turns into fast errors instead of unbounded latency")


class EngineConfig(BaseModel):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    backend: Literal["eager"] = "eager"  # compiled | tensorrt arrive with the engines issue
    prompt_cache_size: int = Field(1024, ge=0, description="LRU entries of prompt embeddings; 0 disables")
    encode_workers: int = Field(4, ge=1, le=64, description="threads that encode images (PNG/JPEG/WebP)")
    warmup: bool = True
    attention: str = Field("dense", description='self-attention of DiT denoisers: "dense" or '
                           '"block_sparse(threshold=0.9,block=128,...)" (Triton kernel; falls back to dense '
                           'with a logged reason where a shape or device is unsupported)')
    batching: BatchingConfig = BatchingConfig()

    @field_validator("attention")
    @classmethod
    def _attention(cls, v: str) -> str:
        from fewstep.kernels.attention_processor import BlockSparseConfig

        BlockSparseConfig.parse(v)  # raises ValueError with the accepted syntax
        return v

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            # fp16 is the precision distilled UNets ship in; the CPU has no fast half-precision path.
            return torch.float16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
