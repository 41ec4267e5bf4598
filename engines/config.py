"""The engine's part of the one typed config tree (server/config.py composes it with the HTTP settings).

Plain pydantic models with no environment access: the environment is read in server/config.py only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator


class BatchingConfig(BaseModel):
    max_batch_size: int = Field(8, ge=1, le=256, description="most images in one forward pass")
    # Zero-wait continuous batching by default: an idle engine starts a lone request at once (waiting 5 ms for company
    # that never comes was a third of a 15 ms request); requests that arrive while the GPU is busy queue up and form
    # the next batch anyway. A positive wait trades latency for fuller batches.
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="how long the first request of a batch waits "
                               "for compatible company before the batch runs (0: never)")
    # The queue is bounded by estimated work, not by request count: a 1024² image is 256 native 64² images of work.
    # Work unit: one native-size image at one step without CFG (cost = pixels/native pixels x steps x n, x2 with CFG).
    max_queue_seconds: float | None = Field(5.0, ge=0, description="queued work beyond this many seconds is refused "
                                            "with 503 + Retry-After. Seconds come from the cost of a native image "
                                            "measured at warm-up; without warm-up (or None) max_queue_work applies. 0: no "
                                            "queue: a request is admitted only while the engine is idle")
    max_queue_work: float = Field(512.0, gt=0, description="queued work, in native-size 1-step images, beyond "
                                  "which requests are refused with 503 when no warm-up measurement exists")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="default deadline of an image request from "
                                     "its arrival; queued work past it is dropped unrun and answered 504. Clients "
                                     "may ask for another with the X-Fewstep-Deadline-Ms header")
    max_request_timeout_s: float = Field(300.0, gt=0, le=86_400, description="longest deadline a client may ask for")

    @model_validator(mode="after")
    def _default_deadline_within_max(self) -> "BatchingConfig":
        # a default past the maximum failed every request, warm-up first ("model failed to load"), not the config
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s:g}) must be at most max_request_timeout_s "
                             f"({self.max_request_timeout_s:g})")
        return self


class CompileConfig(BaseModel):
    """Settings of the `compiled` backend (torch.compile + CUDA graphs per declared shape bucket)."""

    compile: bool = Field(True, description="torch.compile each stage (False: CUDA graphs of eager code only)")
    # "default", not "max-autotune-no-cudagraphs": autotuning every GEMM/conv of a UNet adds minutes per shape bucket
    # to start-up; we capture CUDA graphs ourselves, so Inductor's own cudagraph modes are never wanted here.
    mode: str = Field("default", description="Inductor mode, e.g. 'default' or 'max-autotune-no-cudagraphs'")
    cuda_graphs: bool = True
    batch_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16],
                                     description="a batch is padded up to the next bucket")
    split_batches: bool = Field(True, description="run a waiting batch as the cheapest sequence of captured buckets, "
                                "by costs timed at warm-up (GPU only), instead of padding it to one bucket: with "
                                "buckets 1,4,16, two images run as 1+1, not as 4 with two thrown away")
    sizes: list[tuple[int, int]] = Field(default_factory=list, description="(height, width) buckets; "
                                         "empty = the model's default size")
    steps: list[int] = Field(default_factory=list, description="step counts to capture; empty = model default")
    stream_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4], description="video models: sessions per "
                                      "stream step to capture (a step of 3 sessions runs padded to 4); steps with "
                                      "more sessions than the largest bucket run eager")
    dynamic_batch: bool = Field(False, description="compile the batch dimension symbolically: one Inductor "
                                "compile serves every bucket > 1 (batch 1 stays specialised); CUDA graphs are still "
                                "captured per bucket. Cuts start-up by ~the number of buckets")
    # Both measured on the H200 (docs/benchmarks.md, 2026-11-29, 5573441; SD-Turbo 512², batch 1, same warm machine):
    # channels-last UNet + VAE 15.6 ms against 16.9 ms (UNet 5.0 against 5.9 ms), so it is on; fused QKV 16.4
    # against 16.6 ms (UNet 5.6 against 5.7), inside run-to-run noise, so it stays off (it rewrites the model's
    # attention modules for no measured gain). bf16 measured no faster than fp16 (16.7 ms): dtype stays "auto".
    fuse_qkv: bool = Field(False, description="fuse each attention's Q, K, V projections into one matmul")
    cudnn_benchmark: bool = Field(False, description="let cuDNN time its convolution algorithms per shape at warm-up "
                                  "(torch.backends.cudnn.benchmark, process-wide) instead of its heuristics; the "
                                  "shapes are fixed per bucket, so the timing happens once, before capture")
    fp8: bool = Field(False, description="the denoiser's linear layers in float8 (torchao: dynamic per-row activation "
                      "and weight scales), compiled; NVIDIA compute capability 8.9+ (Ada, Hopper) and the fp8 extra; "
                      "convolutions stay fp16 (torchao has no fp8 convolution for inference)")
    channels_last: bool = Field(True, description="NHWC weights for the 2-D convolutions of the denoiser and VAE")
    cache_dir: str | None = Field("~/.cache/fewstep/inductor", description="persistent compiler cache")


class TensorRTConfig(BaseModel):
    """Settings of the `tensorrt` backend (engines/backends/tensorrt.py; engines built ahead with `fewstep build`)."""

    profile: str | None = Field(None, description="optimization profile 'batch=MIN:OPT:MAX,size=MIN:OPT:MAX' "
                                "(size in pixels); None: batch 1..max_batch_size at the model's native size")
    cache_dir: str | None = Field(None, description="engine cache; None: ~/.cache/fewstep/engines")
    targets: list[str] = Field(default_factory=list, description="TensorRT-RTX build targets, e.g. ['sm86']; "
                               "empty: the visible GPU (RTX's default set when building on a CPU)")
    cuda_graph: bool = Field(False, description="replay engine launches as CUDA graphs (RTX: built-in capture)")


class StreamConfig(BaseModel):
    """Video stream sessions (engines/stream/). Times in seconds unless the name says otherwise."""

    max_sessions: int = Field(32, ge=1, le=4096, description="open stream sessions beyond this are refused "
                              "with 503 (code 'overloaded')")
    max_batch_sessions: int = Field(8, ge=1, le=256, description="most session buffers in one forward pass; "
                                    "sessions beyond it take turns (round-robin)")
    # "off" until measured on a GPU (docs/benchmarks.md, 2026-12-08)
    overlap_decode: Literal["auto", "on", "off"] = Field(
        "off", description="decode each step's emitted chunks (and copy them to pinned host memory) on a CUDA stream "
        "of their own, so the next step's forward pass starts at once; the frames are waited for where they are "
        "read (encoding, the socket); auto: on CUDA only. off: the engine thread waits for each decode")
    outbox_chunks: int = Field(2, ge=1, le=64, description="undelivered chunks kept per viewer; when a client "
                               "falls behind, the oldest is dropped (latest wins) and its frames are counted")
    max_fps: float = Field(60.0, gt=0, le=1000, description="highest fps target a client may ask for")
    min_fps: float = Field(1.0, gt=0, le=1000, description="lowest non-zero fps target (0 = unpaced); below it a "
                           "frame interval is minutes and the MP4 time base degenerates")
    coalesce_ms: float = Field(15.0, ge=0, le=1000, description="a paced session due within this long joins "
                               "the current step, so sessions share forward passes instead of drifting apart")
    transition_steps: int | None = Field(None, ge=1, le=64, description="steps over which a prompt update "
                                         "blends old into new embeddings; None: one per buffer chunk")
    ramp: Literal["full", "trim", "jump"] | None = Field(
        None, description="how a new session's buffer fills before its first frame (engines/stream/scheduler.py): "
        "full: K forward passes over the whole buffer; trim: the same K steps over only the chunks that move "
        "(K(K+1)/2 chunks of work instead of K*K); jump: every chunk to its level in one step, first frame after 2 "
        "passes (the first chunks get fewer, larger steps). None: the checkpoint's fewstep.ramp, else full")
    stats_interval_s: float = Field(1.0, gt=0, le=60, description="how often a stream socket gets a stats message")
    max_video_frames: int = Field(600, ge=1, description="most frames of one POST /v1/videos clip")
    max_viewers: int = Field(4, ge=0, le=64, description="extra MJPEG viewers per session")
    reserve_gib: float = Field(2.0, ge=0, description="CUDA only: a new session is refused (503) unless the GPU's "
                               "free memory covers the state the open sessions have yet to allocate, plus this; "
                               "a Wan session's causal-VAE cache is 1.76 GiB at 832x480 bf16")
    session_id_prefix: str = Field("", pattern=r"^[A-Za-z0-9]*$", max_length=64,
                                   description="written before every session id with a '.' (a Ray Serve replica "
                                   "sets its own id, so that MJPEG viewers of a session are routed to the replica "
                                   "that holds its buffer: server/ray_routing.py); empty: no prefix")


class EngineConfig(BaseModel):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    backend: Literal["eager", "compiled", "tensorrt", "auto"] = Field(
        "eager", description="auto: compiled on CUDA, eager on the CPU (where compilation costs minutes and "
        "CUDA graphs do not exist)")
    compiled: CompileConfig = CompileConfig()
    tensorrt: TensorRTConfig = TensorRTConfig()
    prompt_cache_size: int = Field(1024, ge=0, description="LRU entries of prompt embeddings; 0 disables")
    gpu_jpeg: Literal["auto", "on", "off"] = Field("auto", description="encode JPEG responses with nvjpeg on the "
                                                  "GPU (torchvision); auto: on where CUDA and torchvision have it")
    encode_workers: int = Field(4, ge=1, le=64, description="threads that encode images (PNG/JPEG/WebP)")
    # "off" until measured on a GPU (docs/benchmarks.md, 2026-12-08): the stage times of overlapped batches come
    # from CUDA events and no longer add up to the wall time, which the in-sequence default keeps exact.
    overlap_stages: Literal["auto", "on", "off"] = Field(
        "off", description="image batches: enqueue text encoding, denoising, decoding and the copy to the host "
        "without syncing the device, and start the next batch while a landing thread waits for this one "
        "(auto: on CUDA only); off: stages in sequence, each timed after a device sync")
    threads: int | None = Field(None, ge=1, le=1024, description="intra-op CPU threads (torch.set_num_threads); "
                                "None: torch's default. On a small shared CPU box 1 avoids OpenMP contention")
    warmup: bool = True
    vae: str | None = Field(None, description="a diffusers VAE directory (AutoencoderKL, or AutoencoderTiny: TAESD's "
                            "format) that replaces the image model's own decoder")
    adapters: str | None = Field(None, description="a guidance-adapters folder (engines/adapters.py) loaded onto the "
                                 "image model: guidance_scale > 1 in one pass; None: an adapters/ folder beside the "
                                 "checkpoint's components, if any")
    sizes: list[tuple[int, int]] | None = Field(None, description="(height, width) sizes every served model accepts, "
                                                "replacing the checkpoint's fewstep.sizes / size_range; None: the "
                                                "checkpoint's declaration, else its native size (engines/sizes.py)")
    attention: str = Field("dense", description='self-attention: "dense" (PyTorch SDPA), "xformers" (xformers\' '
                           'memory-efficient kernels on the denoiser\'s and VAE\'s self-attention; CUDA, optional '
                           'install) or, on DiT denoisers, "block_sparse(threshold=0.9,block=128,...)" (our Triton '
                           'kernel; falls back to dense with a logged reason where a shape or device is unsupported); '
                           '"block_sparse(mode=static,window=3x3x3,tile_3d=2x8x8,...)" is a fixed sliding-tile window '
                           '(STA), table=FILE a per-layer JSON table (kernels/attention_processor.py)')
    batching: BatchingConfig = BatchingConfig()
    stream: StreamConfig = StreamConfig()

    @field_validator("attention")
    @classmethod
    def _attention(cls, v: str) -> str:
        from fewstep.kernels.attention_processor import BlockSparseConfig

        if v.strip().lower() == "xformers":
            return "xformers"
        try:
            cfg = BlockSparseConfig.parse(v)
            if cfg is not None and cfg.table is not None:
                from fewstep.kernels.attention_processor import load_layer_table

                load_layer_table(cfg.table)  # readable and well-formed now; layer names are checked at load
        except ValueError as e:
            raise ValueError(f"{e} (or 'xformers')") from None
        return v

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
        return torch.device(self.device)

    def resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "compiled" if device.type == "cuda" else "eager"
        return self.backend

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            # fp16 is the precision distilled UNets ship in; the CPU has no fast half-precision path.
            return torch.float16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
