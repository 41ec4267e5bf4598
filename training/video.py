"""Streaming text-to-video in the spirit of StreamDiT: a video denoiser with per-frame noise levels
(``StreamUNetModel`` by default since 2026-11-30 (648c1e1), ``StreamDiTModel`` with ``--preset small``) trained on
``training.data`` videos with per-frame noise levels and mixed partitioning, distilled to the
serving engine's moving buffer (K levels, one model call per engine step), a reference sampler that
mirrors the engine, and an evaluation over long (300-frame) streams.

``fewstep train video-teacher --out DIR`` / ``video-distill --teacher DIR/video_teacher --out DIR``
/ ``video-eval --model DIR/video_student [--teacher DIR/video_teacher]`` (training/README.md).

Shapes and conventions
* frames: 32x32 pixels in [-1, 1]; buffer = K chunks of F frames, ``x: [B, C, K*F, H, W]``
  (the model's layout; the data side keeps ``[B, T, C, H, W]``), chunk 0 (front) the least noisy;
* flow matching per frame: ``x_s = (1 - s) x0 + s n``, ``v = n - x0``, timestep ``s * 1000`` per
  frame (``[B, T]``);
* the engine's ladder (``engines/stream/pipeline.StreamPipeline.noise_levels``): K + 1 sigmas
  ``1, 1 - 1/K, ..., 1/K, 0`` (the checkpoint's FlowMatch scheduler, shift 1). In the steady state
  chunk j sits at level K-1-j; one engine step = ONE model call over the buffer, every chunk moves
  one level down (Euler), the front chunk leaves clean and fresh noise enters at the back. Warm-up:
  all chunks start at level 0 and chunk j advances only while short of K-1-j (K-1 ramp steps).

Teacher (``video-teacher``): a training sample is a window of K*F consecutive frames of a random
video (its start frame random; windows that the engine meets at stream start - all-noise and ramp
states - start at frame 0), noised per frame with a noise pattern drawn by :func:`mixed_sigmas`
(StreamDiT's mixed training): the window is partitioned into chunks of c frames (c from the
divisors of K*F, the engine's F most often) and the chunks get a random MONOTONE assignment of
noise levels (sorted draws, increasing front to back); a fraction of the samples has one level for
all frames (uniform), and a fraction sits exactly on the engine's ladder (ramp and steady states).
Caption dropout (CFG), left-right mirroring with left/right swapped in the caption, shape-aware
(outline-weighted) loss as in the image teacher.

Student (``video-distill``): a copy of the teacher trained so that ONE Euler step per ladder level
(what the engine does) lands where the teacher lands with ``substeps`` Euler steps and CFG over the
same interval, on buffer states visited by the student's own streams (on-policy rollouts of the
engine's policy, restarted at random, so warm-up states are covered). The teacher's targets are made
one rollout (an engine step of all streams) at a time into a FIFO replay buffer, and the student
takes several optimizer steps per rollout on batches drawn from it. Guidance-distilled: ships
``default_guidance_scale: 0``. Calls per emitted chunk: 1 (each chunk is denoised K = 4 times
while it slides through the buffer).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.training.common import (
    Stage,
    UsageError,
    bf16_autocast,
    guarded_train_step,
    count_params,
    log,
    pick_device,
    read_json,
    setup_torch,
    step_seed,
    write_json,
)
from fewstep.training.model import (
    FewstepModel,
    ModelConfig,
    build_text_encoder,
    build_tokenizer,
    fast_tokenize,
    required_max_length,
    tokenize,
    unet_block_types,
)

STREAM_PIPELINE_CLASS = "FewstepStreamPipeline"


# ----------------------------------------------------------------------------------------------
# Config and model
# ----------------------------------------------------------------------------------------------

@dataclass
class VideoConfig:
    size: int = 32
    # denoiser: "dit" = StreamDiTModel (patch/dim/heads/layers), "unet" = StreamUNetModel (channels/level_heads/
    # joint_tokens): the image UNet per frame, with attention across the buffer's frames
    arch: str = "dit"
    patch: int = 2
    dim: int = 192
    heads: int = 3
    layers: int = 5
    channels: tuple = (32, 64, 96)
    level_heads: tuple = (1, 2, 3)
    joint_tokens: int = 64     # UNet levels with <= this many cells per frame attend over the whole buffer
    chunk_frames: int = 2      # F
    buffer_chunks: int = 4     # K (= the engine's number of noise levels)
    max_frames: int = 16       # positional capacity of the model (>= K*F)
    fps: float = 8.0
    text_hidden: int = 128
    text_layers: int = 2       # 2 x 128 CLIP (0.41M): keeps the export < 8 MB
    text_heads: int = 4
    text_ff: int = 512
    max_length: int = 32

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def frames(self) -> int:
        return self.chunk_frames * self.buffer_chunks

    def text_cfg(self) -> ModelConfig:
        return ModelConfig(text_hidden=self.text_hidden, text_layers=self.text_layers, text_heads=self.text_heads,
                           text_ff=self.text_ff, max_length=self.max_length)

    def to_dict(self) -> dict:
        # JSON-native (lists, not tuples): checkpoints compare it with the config they stored
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> VideoConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                      if k in cls.__dataclass_fields__})


VIDEO_PRESETS: dict[str, VideoConfig] = {
    # CPU tests: 4x4 tokens per frame, 3 chunks of 2 frames
    "tiny": VideoConfig(patch=8, dim=32, heads=2, layers=1, chunk_frames=2, buffer_chunks=3, max_frames=12,
                        text_hidden=32, text_layers=1, text_heads=2, text_ff=64),
    # the 2026-11-29 stream model (359ae9a): 16x16 tokens per 32x32 frame, 8-frame buffer (2048 tokens), 7.5 MB fp16;
    # its teacher drew ragged blobs (5% of held-out frames right)
    "small": VideoConfig(),
    # StreamUNetModel (2026-11-30): 32/16/8 px levels at 32/64/96 channels, spatial attention at 16 and 8 px, frame
    # attention per cell at 16 px and over the whole buffer (8 x 64 cells) at 8 px; 3.07M + 0.41M params (7.0 MB
    # fp16). Why: the image models' DiT -> positional UNet switch. 5 + 3 min on the H200: frame strict adherence
    # 0.575 (256 held-out streams), motion 0.604
    "unet": VideoConfig(arch="unet"),
    # the default since 2026-11-30 (648c1e1): the same with whole-buffer attention at 16 px too (8 x 256 = 2048 cells,
    # StreamDiT's token count), same parameters: frame strict adherence 0.853 (256 streams; 0.862 on 512), motion 0.408
    "unetj": VideoConfig(arch="unet", joint_tokens=256),
    # CPU tests: two levels (32 and 16 px, 16/32 channels), spatial attention at both, frame attention per cell at 32
    # px and over the whole buffer at 16 px, so both frame-attention paths train
    "tiny_unet": VideoConfig(arch="unet", channels=(16, 32), level_heads=(1, 2), joint_tokens=256, chunk_frames=2,
                             buffer_chunks=3, max_frames=12, text_hidden=32, text_layers=1, text_heads=2, text_ff=64),
}
DEFAULT_VIDEO_PRESET = "unetj"


def tiny_preset_for(preset: str) -> str:
    """The CPU-test preset of ``preset``'s architecture."""
    return "tiny_unet" if VIDEO_PRESETS[preset].arch == "unet" else "tiny"


class VideoModel(FewstepModel):
    """text encoder + StreamDiT; ``forward(x [B,C,T,H,W], sigma [B,T], ids, mask) -> v [B,C,T,H,W]``. Only the
    denoiser call differs from the image model: per-frame sigmas, no PixArt resolution conditioning."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # exactly the engine's call (engines/stream/pipeline.StreamPipeline.denoise_step)
        return self.transformer(hidden_states=x, timestep=sigma.float() * 1000.0, encoder_hidden_states=emb,
                                encoder_attention_mask=mask, return_dict=False)[0]


def video_model_class(name: str):
    """A video denoiser class of the installed package (fewstep.engines.models)."""
    from fewstep.engines import models

    return getattr(models, name)


def build_video_model(cfg: VideoConfig, vocab_size: int) -> VideoModel:
    if cfg.frames > cfg.max_frames:
        raise ValueError(f"buffer of {cfg.frames} frames > max_frames {cfg.max_frames}")
    if cfg.arch == "unet":
        tr = video_model_class("StreamUNetModel")(
            sample_size=cfg.size, in_channels=3, out_channels=3, block_out_channels=tuple(cfg.channels),
            **unet_block_types(len(cfg.channels), min(2, len(cfg.channels))),
            attention_head_dim=tuple(cfg.level_heads), cross_attention_dim=cfg.text_hidden,
            norm_num_groups=min(16, min(cfg.channels)), max_frames=cfg.max_frames, joint_tokens=cfg.joint_tokens)
        with torch.no_grad():  # start as v = 0, as the DiT does (zero output projection)
            tr.conv_out.weight.zero_()
            tr.conv_out.bias.zero_()
    elif cfg.arch == "dit":
        tr = video_model_class("StreamDiTModel")(sample_size=cfg.size, patch_size=cfg.patch, in_channels=3, num_layers=cfg.layers,
                                num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                                caption_channels=cfg.text_hidden, max_frames=cfg.max_frames)
    else:
        raise ValueError(f"video arch {cfg.arch!r}: expected 'dit' or 'unet'")
    return VideoModel(build_text_encoder(cfg.text_cfg(), vocab_size), tr)


@torch.no_grad()
def warm_position_cache(model: VideoModel, cfg: VideoConfig, autocast: bool) -> None:
    """One eager batch-1 forward in the training context (same frames, size, device and autocast dtype).

    ``StreamDiTModel`` keeps its sin-cos position table in a dict on the module, filled by the first
    forward. ``torch.compile`` guards on that dict, so a compiled step whose first call fills it is
    compiled a second time on the second call (Dynamo: ``not ___dict_contains(... _pos_cache)``; on the
    H200 that second compile took ~35-40 s of each video stage). Filling it before the first compiled
    call leaves one compilation."""
    dev = next(model.transformer.parameters()).device
    T, S = cfg.frames, cfg.size
    ctx = bf16_autocast(autocast)
    with ctx:
        model.denoise(torch.zeros(1, 3, T, S, S, device=dev), torch.zeros(1, T, device=dev),
                      torch.zeros(1, 1, model.text_encoder.config.hidden_size, device=dev),
                      torch.ones(1, 1, dtype=torch.long, device=dev))


def engine_ladder(K: int, shift: float = 1.0) -> list[float]:
    """The K + 1 noise levels of the engine's moving buffer, computed as the engine does
    (``StreamPipeline.noise_levels``): FlowMatchEulerDiscreteScheduler(shift).set_timesteps(
    sigmas=[1 - i/K for i < K]) -> ``1, 1 - 1/K, ..., 1/K, 0`` for shift 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(sigmas=[1.0 - i / K for i in range(K)], device="cpu")
    return [float(v) for v in s.sigmas]


# ----------------------------------------------------------------------------------------------
# Mixed partitioning: per-frame noise patterns
# ----------------------------------------------------------------------------------------------

KIND_PARTITION, KIND_UNIFORM, KIND_RAMP, KIND_STEADY = 0, 1, 2, 3


@dataclass
class SigmaSpec:
    p_uniform: float = 0.15     # one level for every frame of the window
    p_ladder: float = 0.2       # exactly an engine state (ramp or steady) on the K-level ladder
    p_engine_chunk: float = 0.5  # among partitions: chunks of F frames (the engine's); else other divisors
    loc: float = 0.5            # per-chunk levels: (1-uniform_frac) logit-normal(loc, 1) + uniform
    uniform_frac: float = 0.25
    min_sigma: float = 0.01
    ladder: tuple | None = None  # the engine's K+1 levels (set by the stage; workers need no diffusers)

    def to_dict(self) -> dict:
        return asdict(self)


def _draw_levels_np(rng: np.random.Generator, shape, spec: SigmaSpec) -> np.ndarray:
    z = rng.standard_normal(shape)
    u = rng.random(shape)
    pick = rng.random(shape) < spec.uniform_frac
    s = np.where(pick, u, 1.0 / (1.0 + np.exp(-(spec.loc + z))))
    return np.clip(s, spec.min_sigma, 1.0)


def ladder_state_levels(K: int, r: int) -> list[int]:
    """Ladder level of each chunk after r steps of the engine's warm-up (r >= K-1: steady state)."""
    return [min(r, K - 1 - j) for j in range(K)]


def mixed_sigmas(rng: np.random.Generator, B: int, K: int, F: int, spec: SigmaSpec,
                 ladder: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame noise levels ``[B, K*F]`` (float32, non-decreasing from front to back) and the kind
    of each pattern (KIND_*). See the module docstring."""
    T = K * F
    ladder = list(ladder or spec.ladder or engine_ladder(K))
    sizes = [c for c in range(1, T) if T % c == 0 and c != F]
    sig = np.empty((B, T), dtype=np.float64)
    kinds = np.empty(B, dtype=np.int64)
    u = rng.random(B)
    for b in range(B):
        if u[b] < spec.p_uniform:
            kinds[b] = KIND_UNIFORM
            sig[b] = _draw_levels_np(rng, 1, spec)[0]
        elif u[b] < spec.p_uniform + spec.p_ladder:
            r = int(rng.integers(0, K))          # r = K-1: steady state
            kinds[b] = KIND_STEADY if r >= K - 1 else KIND_RAMP
            lv = ladder_state_levels(K, r)
            sig[b] = np.repeat([ladder[lv_j] for lv_j in lv], F)
        else:
            kinds[b] = KIND_PARTITION
            c = F if (not sizes or rng.random() < spec.p_engine_chunk) else sizes[int(rng.integers(len(sizes)))]
            lv = np.sort(_draw_levels_np(rng, T // c, spec))
            sig[b] = np.repeat(lv, c)
    return sig.astype(np.float32), kinds


# ----------------------------------------------------------------------------------------------
# Data: video windows, described by CPU workers, rendered on the training device
# ----------------------------------------------------------------------------------------------

@dataclass
class DataSpec:
    max_start: int = 96         # window start frames up to this (bounces happen every ~35 frames)
    p_start0: float = 0.1       # windows starting at frame 0 (other kinds)
    p_start0_warm: float = 0.8  # ... for the all-noise / ramp patterns (what the engine meets at stream start)
    drop_prob: float = 0.1      # caption dropout (CFG)
    flip: bool = True


def _swap_lr(caption: str) -> str:
    sw = {"left": "right", "right": "left"}
    return " ".join(sw.get(w, w) for w in caption.split())


def video_work(seed: int, j: int, batch: int, K: int, F: int, split: str, spec: SigmaSpec, dspec: DataSpec,
               vocab: dict, max_length: int) -> dict:
    """Batch ``j``: everything but the pixels, a pure function of (seed, j) (numpy only)."""
    from fewstep.training import data as D

    T = K * F
    rng = np.random.default_rng([seed, j, 77])
    sig, kinds = mixed_sigmas(rng, batch, K, F, spec)
    warm = (kinds == KIND_UNIFORM) | (kinds == KIND_RAMP)
    p0 = np.where(warm, dspec.p_start0_warm, dspec.p_start0)
    start = np.where(rng.random(batch) < p0, 0, rng.integers(1, max(2, dspec.max_start + 1), batch))
    flip = (rng.random(batch) < 0.5) if dspec.flip else np.zeros(batch, bool)
    scenes = [D.sample_video_scene(rng, split) for _ in range(batch)]
    kmax = max(len(v.objects) for v in scenes)
    cx = np.zeros((batch, T, kmax))
    cy = np.zeros((batch, T, kmax))
    rgb = np.zeros((batch, T, kmax, 3))
    rad = np.zeros((batch, kmax))
    bg = np.zeros((batch, 3), dtype=np.float32)
    grad = np.zeros((batch, 2), dtype=np.float32)
    shapes, caps = [], []
    for b, vs in enumerate(scenes):
        x_, y_, c_ = D.video_frame_objects(vs, np.arange(start[b], start[b] + T))
        n = len(vs.objects)
        cx[b, :, :n], cy[b, :, :n], rgb[b, :, :n] = x_, y_, c_
        rad[b, :n] = [o.radius for o in vs.objects]
        bg[b] = D.BACKGROUNDS[vs.background]
        grad[b] = vs.gradient
        shapes.append([o.shape for o in vs.objects])
        cap = vs.caption
        if flip[b]:   # exact: every shape is left-right symmetric, motions and captions mirror
            cx[b, :, :n] = 1.0 - cx[b, :, :n]
            grad[b, 0] = -grad[b, 0]
            cap = _swap_lr(cap)
        caps.append(cap)
    drop = rng.random(batch) < dspec.drop_prob
    caps_in = ["" if d else c for d, c in zip(drop, caps)]
    ids, mask = fast_tokenize(caps_in, vocab, max_length)
    return {"j": j, "sigma": sig, "kinds": kinds, "start": start, "cx": cx, "cy": cy, "rgb": rgb, "r": rad,
            "bg": bg, "grad": grad, "shapes": shapes, "captions": caps_in, "ids": ids, "mask": mask}


def render_work(w: dict, size: int, device) -> torch.Tensor:
    """Pixels of a :func:`video_work` batch: ``[B, T, 3, size, size]`` in [-1, 1], identical to
    ``training.data.render_video`` of the same scenes and frames."""
    from fewstep.training import data as D

    B, T, kmax = w["cx"].shape
    shape_lists = [w["shapes"][b] for b in range(B) for _ in range(T)]
    img = D._render_flat(shape_lists, w["cx"].reshape(B * T, kmax), w["cy"].reshape(B * T, kmax),
                         np.repeat(w["r"], T, axis=0), w["rgb"].reshape(B * T, kmax, 3),
                         np.repeat(w["bg"], T, axis=0), np.repeat(w["grad"], T, axis=0), size, device)
    return img.reshape(B, T, 3, size, size)


def _video_work_job(args):
    return video_work(*args)


class VideoStream:
    """``next(stream) -> (j, x0 [B,T,3,H,W], ids, mask, sigma [B,T])``; batch j = f(seed, j). On CUDA
    the descriptions come from a pool of CPU worker processes (kept ``window`` batches ahead)."""

    def __init__(self, *, seed: int, batch: int, cfg: VideoConfig, split: str, device, start: int, vocab: dict,
                 max_length: int, spec: SigmaSpec, dspec: DataSpec, workers: int | None = None):
        import dataclasses
        import os
        self.seed, self.batch, self.cfg, self.split, self.device = seed, batch, cfg, split, torch.device(device)
        spec = dataclasses.replace(spec, ladder=tuple(engine_ladder(cfg.buffer_chunks)))
        self.next_j = start
        self.args = (batch, cfg.buffer_chunks, cfg.chunk_frames, split, spec, dspec, dict(vocab), max_length)
        if workers is None:
            workers = max(0, min(14, (os.cpu_count() or 1) - 2)) if self.device.type == "cuda" else 0
        self.pool = None
        self.pending: list = []
        if workers > 0:
            import multiprocessing as mp
            self.pool = mp.get_context("spawn").Pool(workers)
            self.window = 2 * workers + 2
            self.submit = start
        self.workers = workers

    def __iter__(self):
        return self

    def __next__(self):
        j = self.next_j
        if self.pool is None:
            w = video_work(self.seed, j, *self.args)
        else:
            while len(self.pending) < self.window:
                self.pending.append(self.pool.apply_async(_video_work_job, ((self.seed, self.submit, *self.args),)))
                self.submit += 1
            w = self.pending.pop(0).get()
        assert w["j"] == j
        self.next_j += 1
        x = render_work(w, self.cfg.size, self.device)
        ids, mask = torch.from_numpy(w["ids"]), torch.from_numpy(w["mask"])
        sig = torch.from_numpy(w["sigma"])
        if self.device.type == "cuda":
            ids, mask, sig = (t.pin_memory().to(self.device, non_blocking=True) for t in (ids, mask, sig))
        return j, x.float(), ids, mask, sig

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def video_flow_loss(model, x0, ids, mask, noise, sigma, autocast: bool, edge_weight: float = 0.0,
                    low_sigma: float = 0.0):
    """x0, noise: [B, T, C, H, W]; sigma: [B, T] per frame."""
    from fewstep.training.teacher import weighted_mse
    s = sigma[:, :, None, None, None]
    xt = (1.0 - s) * x0 + s * noise
    ctx = bf16_autocast(autocast)
    with ctx:
        v = model(xt.transpose(1, 2), sigma, ids, mask)
    return weighted_mse(v.float().transpose(1, 2), noise - x0, x0, edge_weight, sigma, low_sigma)


# ----------------------------------------------------------------------------------------------
# Export / load
# ----------------------------------------------------------------------------------------------

def export_video(model: VideoModel, tokenizer, out_dir, cfg: VideoConfig, fewstep: dict) -> Path:
    from fewstep.training.export import export_model
    K, F = cfg.buffer_chunks, cfg.chunk_frames
    meta = {"kind": "video", "policy": "moving_buffer", "chunk_frames": F, "buffer_chunks": K,
            "default_size": cfg.size, "sizes": [cfg.size], "fps": cfg.fps,
            # what the engine computes from the scheduler config (StreamPipeline.noise_levels); written
            # here so that a mismatch is visible: the model was trained/distilled on exactly this ladder
            "sigma_ladder": [round(s, 6) for s in engine_ladder(K)],
            "calls_per_chunk": 1, "denoising_steps_per_chunk": K, **fewstep}
    # the denoiser's model_index entry (["fewstep", class name]) comes from export_model
    return export_model(model, tokenizer, out_dir, meta, pipeline_class=STREAM_PIPELINE_CLASS)


def load_video_export(d, device="cpu", dtype: torch.dtype | None = None):
    """-> (VideoModel, tokenizer, model_index)."""
    from fewstep.training.export import load_export

    return load_export(d, device, dtype, wrapper=VideoModel)   # the class named in its model_index.json


def config_of_export(index: dict, model: VideoModel) -> VideoConfig:
    fs = index.get("fewstep", {})
    c = model.transformer.config
    tc = model.text_encoder.config
    common = {"size": int(fs.get("default_size", c.sample_size)), "chunk_frames": int(fs["chunk_frames"]),
              "buffer_chunks": int(fs["buffer_chunks"]), "max_frames": c.max_frames, "fps": float(fs.get("fps", 8.0)),
              "text_hidden": tc.hidden_size, "text_layers": tc.num_hidden_layers, "text_heads": tc.num_attention_heads,
              "text_ff": tc.intermediate_size, "max_length": tc.max_position_embeddings}
    if "block_out_channels" in c:
        heads = c.attention_head_dim
        return VideoConfig(arch="unet", channels=tuple(c.block_out_channels),
                           level_heads=tuple(heads) if isinstance(heads, (list, tuple)) else
                           (heads,) * len(c.block_out_channels), joint_tokens=c.joint_tokens, **common)
    return VideoConfig(arch="dit", patch=c.patch_size, dim=c.num_attention_heads * c.attention_head_dim,
                       heads=c.num_attention_heads, layers=c.num_layers, **common)


# ----------------------------------------------------------------------------------------------
# Moving buffer: the engine's policy, vectorised over streams (reference sampler)
# ----------------------------------------------------------------------------------------------

class MovingBuffer:
    """Mirror of ``engines/stream/scheduler.MovingBufferPolicy`` for B streams at once, each with its
    own phase, its own CPU generator (noise drawn exactly as the engine draws it: ``randn((C, K*F, H,
    W))`` at start, ``randn((C, F, H, W))`` per emission) and its own levels.

    ``step(update)`` runs ``update(x, sigma, sigma_next) -> x_next`` once (the engine: one model call
    + Euler; the teacher: several CFG sub-steps) and returns the emitted front chunks.
    """

    def __init__(self, K: int, F: int, size: int, device, ladder: list[float] | None = None, channels: int = 3):
        self.K, self.F, self.size, self.C = K, F, size, channels
        self.device = torch.device(device)
        self.ladder = ladder or engine_ladder(K)
        assert len(self.ladder) == K + 1 and self.ladder[-1] == 0.0
        self.table = torch.tensor(self.ladder, dtype=torch.float32)
        self.x: torch.Tensor | None = None
        self.levels: torch.Tensor | None = None      # [B, K] long (CPU)
        self.gens: list[torch.Generator] = []

    def _noise(self, gen: torch.Generator | None, frames: int, g_dev: torch.Generator | None = None) -> torch.Tensor:
        shape = (self.C, frames, self.size, self.size)
        if gen is not None:
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
        return torch.randn(shape, generator=g_dev, device=self.device, dtype=torch.float32)

    def start(self, seeds: list[int]) -> None:
        self.gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.x = torch.stack([self._noise(g, self.K * self.F) for g in self.gens])
        self.levels = torch.zeros(len(seeds), self.K, dtype=torch.long)

    def restart(self, b: int, seed: int | None = None, g_dev: torch.Generator | None = None) -> None:
        """Start stream b again from pure noise (its own CPU generator if ``seed`` is given)."""
        if seed is not None:
            self.gens[b] = torch.Generator("cpu").manual_seed(int(seed))
            self.x[b] = self._noise(self.gens[b], self.K * self.F)
        else:
            self.x[b] = self._noise(None, self.K * self.F, g_dev)
        self.levels[b] = 0

    def target_levels(self) -> torch.Tensor:
        return self.K - 1 - torch.arange(self.K)

    def warm(self) -> torch.Tensor:
        return (self.levels == self.target_levels()).all(1)

    def plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma [B, K*F], sigma_next [B, K*F], advance [B, K]) for the next step (CPU)."""
        adv = torch.where(self.warm()[:, None], torch.ones_like(self.levels, dtype=torch.bool),
                          self.levels < self.target_levels())
        sig = self.table[self.levels].repeat_interleave(self.F, dim=1)
        nxt = self.table[self.levels + adv.long()].repeat_interleave(self.F, dim=1)
        return sig, nxt, adv

    def commit(self, x_next: torch.Tensor, adv: torch.Tensor, g_dev: torch.Generator | None = None) -> list:
        """Apply a step's result; returns per stream the emitted chunk [C, F, H, W] or None."""
        self.levels = self.levels + adv.long()
        out = []
        x = x_next
        for b in range(x.shape[0]):
            if int(self.levels[b, 0]) == self.K:
                out.append(x[b, :, : self.F].clone())
                fresh = self._noise(self.gens[b] if self.gens and self.gens[b] is not None else None, self.F, g_dev)
                x[b] = torch.cat([x[b, :, self.F:], fresh], dim=1)
                self.levels[b] = torch.cat([self.levels[b, 1:], torch.zeros(1, dtype=torch.long)])
            else:
                out.append(None)
        self.x = x
        return out

    def step(self, update) -> list:
        sig, nxt, adv = self.plan()
        x_next = update(self.x, sig.to(self.device), nxt.to(self.device))
        return self.commit(x_next, adv)


def euler_update(model: VideoModel, emb, mask, substeps: int = 1, guidance: float = 0.0, u_emb=None, u_mask=None,
                 autocast_dtype=None):
    """``update(x, sigma, sigma_next)`` for :class:`MovingBuffer`: ``substeps`` Euler steps from
    sigma to sigma_next per frame (1 = the engine's step), CFG when guidance > 1."""
    dtype = next(model.transformer.parameters()).dtype

    @torch.no_grad()
    def update(x, sig, nxt):
        x = x.float()
        B = x.shape[0]
        ac = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
              else contextlib.nullcontext())
        for i in range(substeps):
            s0 = sig + (nxt - sig) * (i / substeps)
            s1 = sig + (nxt - sig) * ((i + 1) / substeps)
            with ac:
                if guidance > 1.0:
                    v = model.denoise(torch.cat([x, x]).to(dtype), torch.cat([s0, s0]), torch.cat([emb, u_emb]),
                                      torch.cat([mask, u_mask])).float()
                    v = v[B:] + guidance * (v[:B] - v[B:])
                else:
                    v = model.denoise(x.to(dtype), s0, emb, mask).float()
            x = x + (s1 - s0)[:, None, :, None, None] * v
        return x
    return update


@torch.no_grad()
def generate_streams(model: VideoModel, tokenizer, prompts: list[str], seeds: list[int], frames: int,
                     K: int, F: int, size: int, substeps: int = 1, guidance: float = 0.0,
                     progress: bool = False, autocast_dtype=None) -> tuple[torch.Tensor, dict]:
    """Reference sampler: ``frames`` frames of each stream (uint8 ``[B, frames, H, W, 3]``) made by the
    engine's moving-buffer policy, plus timing (ms per buffer step over the run)."""
    dev = next(model.parameters()).device
    ids, mask = tokenize(tokenizer, prompts, dev)
    emb = model.encode(ids, mask).to(next(model.transformer.parameters()).dtype)
    u_emb = u_mask = None
    if guidance > 1.0:
        u_ids, u_mask = tokenize(tokenizer, [""] * len(prompts), dev)
        u_emb = model.encode(u_ids, u_mask).to(emb.dtype)
    mb = MovingBuffer(K, F, size, dev)
    mb.start(seeds)
    upd = euler_update(model, emb, mask, substeps, guidance, u_emb, u_mask, autocast_dtype)
    chunks: list[list[torch.Tensor]] = [[] for _ in prompts]
    n_chunks = -(-frames // F)
    step_ms = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_chunks, desc="stream", unit="chunk", dynamic_ncols=True, mininterval=2.0)
    while len(chunks[0]) < n_chunks:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = mb.step(upd)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step_ms.append(1000.0 * (time.perf_counter() - t0))
        for b, c in enumerate(out):
            if c is not None:
                chunks[b].append(c)
        if bar is not None and out[0] is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    x = torch.stack([torch.cat(c, dim=1)[:, :frames] for c in chunks])         # [B, C, frames, H, W]
    u8 = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
    n = len(step_ms)
    tail = step_ms[K:] or step_ms
    q = max(1, len(tail) // 10)
    timing = {"buffer_steps": n, "ramp_steps": K - 1, "model_calls_per_step": substeps * (2 if guidance > 1 else 1),
              "ms_per_step_first10pct": round(float(np.mean(tail[:q])), 3),
              "ms_per_step_last10pct": round(float(np.mean(tail[-q:])), 3),
              "ms_per_frame": round(float(np.mean(tail)) / F / max(1, len(prompts)), 4)}
    return u8, timing


# ----------------------------------------------------------------------------------------------
# Stage: video teacher
# ----------------------------------------------------------------------------------------------

@dataclass
class VideoTeacherArgs:
    out: str
    minutes: float = 5.0
    resume: bool = False
    tiny: bool = False
    preset: str = DEFAULT_VIDEO_PRESET
    batch: int | None = None       # windows per step (each K*F frames); default 128
    lr: float | None = None
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    edge_weight: float = 4.0
    low_sigma: float = 0.2      # per-frame loss weight min(1, (sigma / low_sigma)^2), as the image teacher's
    guidance: float = 3.0          # written into the export as the teacher's CFG scale
    seed: int = 0
    compile: bool = True
    # on CUDA the step is recorded as one CUDA graph after its first (eager) step, instead of compiled (training.graphs;
    # --no-cuda-graphs: compiled, or eager with --no-compile): first step at 29 s of the 5-minute
    # stage, against 45 s with the single compilation of 2026-11-29 (the DiT preset's recording: a smoke run on the
    # H200, training/results/2026-11-30_h200_video_unet/run_dit_graph_smoke.log)
    cuda_graphs: bool = True
    max_steps: int | None = None
    ckpt_every: float = 60.0
    workers: int | None = None
    device: str = "auto"
    sigma: SigmaSpec = field(default_factory=SigmaSpec)
    data: DataSpec = field(default_factory=DataSpec)
    budget_start: float | None = None


def _video_tokenizer(cfg: VideoConfig, seed: int, tiny: bool):
    from fewstep.training import data as D
    n = 200 if tiny else 900
    rng = np.random.default_rng(seed + 31)
    prompts = [D.sample_video_scene(rng, "train").caption for _ in range(n)]
    prompts += [D.sample_video_scene(rng, "heldout").caption for _ in range(n // 3)]
    cfg.max_length = required_max_length([prompts, D.train_prompts(n // 3, seed=seed)])
    return build_tokenizer(D.vocabulary(), cfg.max_length)


def train_video_teacher(args: VideoTeacherArgs) -> Path:
    from fewstep.training.loop import Trainer

    stage = Stage(args, "video_teacher_log.jsonl")
    budget, device, out, jsonl = stage.budget, stage.device, stage.out, stage.jsonl
    if args.preset not in VIDEO_PRESETS:
        raise UsageError(f"video preset {args.preset!r}: expected one of {', '.join(sorted(VIDEO_PRESETS))}")
    preset = tiny_preset_for(args.preset) if args.tiny else args.preset
    cfg = VideoConfig.from_dict(VIDEO_PRESETS[preset].to_dict())
    tokenizer = _video_tokenizer(cfg, args.seed, args.tiny)
    model = build_video_model(cfg, len(tokenizer)).to(device).train()
    batch = args.batch or (4 if args.tiny else 128)
    graphs = args.cuda_graphs and device.type == "cuda"
    lr = args.lr or (1e-3 if args.tiny else 5e-4)
    T = cfg.frames
    n_tr, n_te = count_params(model.transformer), count_params(model.text_encoder)
    log(f"[video-teacher] device {device}, preset {preset}: {type(model.transformer).__name__} {n_tr / 1e6:.3f}M "
        f"+ text {n_te / 1e6:.3f}M params (~{2 * (n_tr + n_te) / 1e6:.1f} MB fp16); {cfg.size}x{cfg.size} frames, "
        f"buffer K={cfg.buffer_chunks} x F={cfg.chunk_frames}; batch {batch} windows ({batch * T} frames), lr {lr}")
    jsonl.write(event="start", stage="video_teacher", config=cfg.to_dict(), batch=batch, lr=lr,
                params={"transformer": n_tr, "text_encoder": n_te}, sigma=args.sigma.to_dict(),
                data=asdict(args.data), device=str(device), torch=torch.__version__)
    reserve = 6.0 if args.tiny or device.type != "cuda" else 20.0
    trainer = Trainer(name="video_teacher", out=out, model=model, device=device, budget=budget, lr=lr,
                      warmup=(3 if args.tiny else args.warmup), weight_decay=args.weight_decay,
                      ema_decay=args.ema_decay, batch=batch * T, reserve_s=reserve,
                      max_steps=(args.max_steps if args.max_steps is not None else (4 if args.tiny else None)),
                      ckpt_every_s=args.ckpt_every, jsonl=jsonl, log_every=(1 if args.tiny else 25),
                      estimate_after=(10**9 if args.tiny else 40), rate_skip=(0 if args.tiny else 5),
                      capturable=graphs)
    if args.resume:
        # a checkpoint written before a config key existed (the 2026-11-29 one lacks arch/channels/...) gets defaults
        trainer.resume(model_config=cfg.to_dict(), config_defaults=VideoConfig().to_dict())

    def state():
        return {"stage": "video_teacher", "seed": args.seed, "model_config": cfg.to_dict(), "batch": batch, "lr": lr,
                "vocab": tokenizer.get_vocab(), "total_steps": trainer.total_steps,
                "data_rng": "batch j = video_work(seed, j) at step j; noise from (seed, step)"}

    use_ac = device.type == "cuda"
    compile_ = args.compile and not args.tiny and not graphs
    if compile_:
        warm_position_cache(model, cfg, use_ac)   # else the compiled step compiles twice

    def loss_fn(x0, ids, mask, noise, sigma):
        return video_flow_loss(model, x0, ids, mask, noise, sigma, use_ac, args.edge_weight, args.low_sigma)

    step_fn = guarded_train_step(video_flow_loss, lambda f, *a: f(model, *a, use_ac, args.edge_weight, args.low_sigma),
                                 compile_, device, "video teacher step",
                                 on_fail=lambda: trainer.opt.zero_grad(set_to_none=True))
    stream = VideoStream(seed=args.seed, batch=batch, cfg=cfg, split="train", device=device, start=trainer.step,
                         vocab=tokenizer.get_vocab(), max_length=cfg.max_length, spec=args.sigma, dspec=args.data,
                         workers=args.workers)
    log(f"[video-teacher] data: {stream.workers} worker processes, rendering on {device}")
    g = torch.Generator(device=device)
    try:
        while not trainer.should_stop():
            j, x0, ids, mask, sigma = next(stream)
            assert j == trainer.step
            g.manual_seed(step_seed(args.seed, trainer.step, 41))
            noise = torch.randn(x0.shape, generator=g, device=device)
            trainer.begin_step()
            if graphs:   # the first step is the recording's warm-up (a real step); later ones replay it
                loss, gn = trainer.recorded_step(loss_fn, (x0, ids, mask, noise, sigma))
                graphs = trainer.captured is not None   # a failed recording: eager steps from here
                trainer.end_step(loss, state, grad_norm=gn, stepped=True)
                continue
            loss = step_fn(x0, ids, mask, noise, sigma)
            trainer.end_step(loss, state)
    finally:
        stream.close()
    trainer.finish(state())
    fs = {"default_guidance_scale": float(args.guidance), "teacher_substeps": 4,
          "distillation": "none (per-frame-noise flow-matching teacher; sample with CFG and sub-steps)",
          "train_steps": trainer.step, "seed": args.seed, "preset": preset,
          "training": {"mixed_partitioning": args.sigma.to_dict(), "data": asdict(args.data), "batch": batch}}
    return stage.exported("video-teacher", "EMA weights",
                          export_video(trainer.ema, tokenizer, out / "video_teacher", cfg, fs), trainer.step)


# ----------------------------------------------------------------------------------------------
# Stage: video distillation (engine ladder, one call per level)
# ----------------------------------------------------------------------------------------------

@dataclass
class VideoDistillArgs:
    teacher: str
    out: str
    minutes: float = 3.5
    resume: bool = False
    tiny: bool = False
    batch: int | None = None       # training samples (buffer states) per optimizer step; default 96
    streams: int | None = None     # rollout streams, advanced together by one teacher rollout; default 192
    steps_per_rollout: int | None = None  # optimizer steps per teacher rollout; default 8 (each target used
    #                                       steps_per_rollout * batch / streams = 4 times on average)
    replay: int = 4                # replay buffer (FIFO) capacity, in rollouts of `streams` samples
    lr: float | None = None
    warmup: int = 50
    ema_decay: float = 0.995
    substeps: int = 4              # teacher Euler steps per ladder interval (K*substeps per chunk)
    guidance: float | None = None  # teacher CFG (default: searched over guidance_grid)
    guidance_grid: tuple = (2.0, 3.0, 4.5)
    search_n: int = 16             # streams x frames of the CFG search (train-split captions)
    search_frames: int = 16
    p_teacher_advance: float = 0.5  # rollouts advance with the teacher's result (else the student's)
    life: tuple = (1.0, 6.0)       # a rollout stream lives U[life0*K, life1*K] rollout steps, then restarts
    seed: int = 0
    compile: bool | None = None    # None: compile the student step only if minutes >= compile_min_minutes
    compile_min_minutes: float = 7.0
    max_steps: int | None = None
    ckpt_every: float = 60.0
    device: str = "auto"
    budget_start: float | None = None


def _warm_job(_):
    """Imports what the scoring workers need (torch, the detector) ahead of the first real job."""
    from fewstep.benchmarks import quality  # noqa: F401
    return 0


def start_score_pool(workers: int | None = None):
    """A spawn pool for :func:`score_stream`, its imports started in the background (they overlap with
    loading the teacher and generating the streams); ``None`` when fewer than 2 workers."""
    import multiprocessing as mp
    import os
    if workers is None:
        workers = max(0, min(14, (os.cpu_count() or 1) - 2))
    if workers < 2:
        return None
    pool = mp.get_context("spawn").Pool(workers)
    pool.map_async(_warm_job, range(workers))
    return pool


@torch.no_grad()
def search_video_guidance(teacher, tokenizer, cfg: VideoConfig, grid, n: int, frames: int, substeps: int, seed: int,
                          autocast_dtype=None, workers: int | None = None, pool=None) -> tuple[float, list[dict]]:
    """Teacher streams (engine policy, ``substeps`` CFG sub-steps per level) on train-split captions at
    each CFG scale of ``grid``; keeps the smallest scale within 0.01 of the best per-frame strict
    adherence (as the image distill stage does). The streams of all scales are generated first (GPU),
    then scored in one map over the CPU pool (``pool``, or one made here)."""
    from fewstep.training import data as D
    rng = np.random.default_rng([seed, 4321])
    prompts = [D.sample_video_scene(rng, "train").caption for _ in range(n)]
    seeds = [int(step_seed(seed, i, 71) % (2**31)) for i in range(n)]
    own_pool = pool is None
    if own_pool:
        pool = start_score_pool(min(n, workers) if workers is not None else None)
    jobs, gen_s = [], []
    try:
        for g in grid:
            t0 = time.time()
            vids, _ = generate_streams(teacher, tokenizer, prompts, seeds, frames, cfg.buffer_chunks,
                                       cfg.chunk_frames, cfg.size, substeps, float(g), autocast_dtype=autocast_dtype)
            jobs += [(vids[i].numpy(), prompts[i], cfg.chunk_frames) for i in range(n)]
            gen_s.append(time.time() - t0)
        t0 = time.time()
        scores = pool.map(_score_job, jobs) if pool is not None else [_score_job(j) for j in jobs]
        score_s = time.time() - t0
    finally:
        if own_pool and pool is not None:
            pool.terminate()
            pool.join()
    rows = []
    for i, g in enumerate(grid):
        agg = aggregate(scores[i * n:(i + 1) * n])
        rows.append({"guidance": float(g), "streams": n, "frames": frames,
                     "frame_strict_adherence": agg["frame_strict_adherence"],
                     "chunk_adherence": agg["chunk_adherence"], "frame_adherence": agg["frame_adherence"],
                     "seconds": round(gen_s[i] + score_s / len(grid), 1)})
        log(f"[video-distill] teacher CFG {g:g}: frame strict adherence {agg['frame_strict_adherence']} "
            f"chunk adherence {agg['chunk_adherence']} ({n} train-split streams x {frames} frames)")
    best = max(r["frame_strict_adherence"] or 0.0 for r in rows)
    choice = min(r["guidance"] for r in rows if (r["frame_strict_adherence"] or 0.0) >= best - 0.01)
    return float(choice), rows


def distill_loss(student, x, sig, nxt, emb, mask, v_target, frame_w, autocast: bool):
    ctx = bf16_autocast(autocast)
    with ctx:
        v = student.denoise(x, sig, emb, mask)
    err = ((v.float() - v_target) ** 2).mean(dim=(1, 3, 4))          # [B, T]
    return (err * frame_w).sum() / frame_w.sum().clamp(min=1.0), v


class ReplayBuffer:
    """FIFO ring of training samples on the training device: ``add(**tensors)`` appends a batch (leading
    dim = samples; the oldest are overwritten once ``capacity`` is reached), ``sample(n, generator)``
    draws ``n`` distinct stored samples uniformly (a pure function of the generator's seed)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.data: dict[str, torch.Tensor] = {}
        self.size = 0
        self.pos = 0
        self.added = 0

    def add(self, **tensors: torch.Tensor) -> None:
        n = next(iter(tensors.values())).shape[0]
        if n > self.capacity:
            raise ValueError(f"adding {n} samples to a replay buffer of {self.capacity}")
        if not self.data:
            self.data = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
                         for k, v in tensors.items()}
        idx = (self.pos + torch.arange(n)) % self.capacity
        same = self.pos + n <= self.capacity
        for k, v in tensors.items():
            if same:
                self.data[k][self.pos:self.pos + n] = v
            else:
                self.data[k][idx.to(v.device)] = v
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.added += n

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if n > self.size:
            raise ValueError(f"sampling {n} of {self.size} stored samples")
        dev = next(iter(self.data.values())).device
        idx = torch.randperm(self.size, generator=generator, device=generator.device)[:n].to(dev)
        return {k: v.index_select(0, idx) for k, v in self.data.items()}


def distill_video(args: VideoDistillArgs) -> Path:
    """Moving-buffer distillation with a replay buffer of teacher targets.

    A *rollout* advances ``streams`` engine-policy streams by one ladder step: the teacher (``substeps``
    CFG sub-steps, fp16 on CUDA as in the engine) gives the target for every stream's current buffer
    state, (state, target) pairs go into a FIFO replay buffer of ``replay`` rollouts, and each stream
    moves on with the teacher's result or (on-policy) the student's own one-call step. Between two
    rollouts the student takes ``steps_per_rollout`` optimizer steps on ``batch`` states drawn from the
    replay buffer, so the 8 teacher forwards per state are paid once per ~4 uses instead of once per use.
    """
    stage = Stage(args, "video_distill_log.jsonl")
    # the CFG search scores on CPU workers: start them (and their imports) now, behind the teacher's loading
    pool = [start_score_pool() if (args.guidance is None and not args.tiny) else None]
    try:
        return _distill_video(args, stage, pool)
    finally:
        _close_pool(pool)


def _close_pool(holder: list) -> None:
    if holder[0] is not None:
        holder[0].terminate()
        holder[0].join()
        holder[0] = None


def _distill_video(args: VideoDistillArgs, stage: Stage, pool: list) -> Path:
    from fewstep.training import data as D
    from fewstep.training.loop import Trainer

    budget, device, out, jsonl = stage.budget, stage.device, stage.out, stage.jsonl
    # teacher in the engine's precision (fp16 on CUDA, no autocast: what video-eval and the server run;
    # the export is fp16, so the fp32 student copy below has exactly the exported weights)
    teacher, tokenizer, index = load_video_export(args.teacher, device)
    teacher.requires_grad_(False).eval()
    cfg = config_of_export(index, teacher)
    K, F, T = cfg.buffer_chunks, cfg.chunk_frames, cfg.frames
    B = args.batch or (3 if args.tiny else 96)
    R = args.streams or (4 if args.tiny else 192)
    N = args.steps_per_rollout or (2 if args.tiny else 8)
    capacity = max(1, args.replay) * R
    if B > capacity:
        raise ValueError(f"batch {B} > replay capacity {capacity} ({args.replay} rollouts x {R} streams)")
    lr = args.lr or (1e-3 if args.tiny else 1e-4)
    substeps = 1 if args.tiny and args.substeps == 4 else args.substeps
    student = copy.deepcopy(teacher).float().train().requires_grad_(True)
    use_ac = device.type == "cuda"
    compile_ = args.compile if args.compile is not None else args.minutes >= args.compile_min_minutes
    compile_ = bool(compile_) and not args.tiny and device.type == "cuda"
    how = "compiled" if compile_ else "eager"
    if not compile_ and args.compile is None and device.type == "cuda" and not args.tiny:
        how += f" (a {args.minutes:g}-min budget does not repay a compile; --compile forces one)"
    log(f"[video-distill] teacher {args.teacher}: K={K} levels {engine_ladder(K)}, F={F}; {R} rollout streams, "
        f"replay {args.replay} rollouts, batch {B}, {N} steps per rollout (each target used ~{N * B / R:.1f}x); "
        f"teacher {substeps} sub-steps/level ({next(teacher.parameters()).dtype}); lr {lr}; student step {how}")
    jsonl.write(event="start", stage="video_distill", args={k: v for k, v in vars(args).items()}, K=K, F=F,
                ladder=engine_ladder(K), substeps=substeps, device=str(device), streams=R, batch=B,
                steps_per_rollout=N, replay=args.replay, compile=compile_)
    reserve = 6.0 if args.tiny or device.type != "cuda" else 12.0   # checkpoint + export: < 1 s on the H200
    trainer = Trainer(name="video_distill", out=out, model=student, device=device, budget=budget, lr=lr,
                      warmup=(2 if args.tiny else args.warmup), weight_decay=0.0, ema_decay=args.ema_decay,
                      batch=B * T, reserve_s=reserve,
                      max_steps=(args.max_steps if args.max_steps is not None else (3 if args.tiny else None)),
                      ckpt_every_s=args.ckpt_every, jsonl=jsonl, log_every=(1 if args.tiny else 25),
                      estimate_after=(10**9 if args.tiny else 5 * N), rate_skip=(0 if args.tiny else N),
                      cooldown_frac=0.2)
    resumed = trainer.resume() if args.resume else None
    guidance = args.guidance
    if guidance is None and resumed is not None:
        guidance = trainer.extra_state.get("guidance")
    if guidance is None:
        grid = (1.0, 3.0) if args.tiny else tuple(args.guidance_grid)
        n, frames = (2, 4) if args.tiny else (args.search_n, args.search_frames)
        t0 = time.time()
        guidance, rows = search_video_guidance(teacher, tokenizer, cfg, grid, n, frames, substeps, args.seed,
                                               workers=(0 if args.tiny else None), pool=pool[0])
        for r in rows:
            jsonl.write(event="guidance_search", **r)
        trainer.extra_state["guidance_search"] = rows
        log(f"[video-distill] CFG search took {time.time() - t0:.1f}s")
    _close_pool(pool)
    guidance = float(guidance)
    cfg_calls = 2 if guidance > 1.0 else 1
    trainer.extra_state["guidance"] = guidance
    log(f"[video-distill] teacher CFG {guidance:g}")
    jsonl.write(event="guidance", guidance=guidance)

    # rollout streams: the engine's policy over R buffers, each with its own prompt and lifetime
    mb = MovingBuffer(K, F, cfg.size, device)
    g_dev = torch.Generator(device=device)
    g_dev.manual_seed(step_seed(args.seed, trainer.step, 51))
    mb.gens = [None] * R
    mb.x = torch.randn((R, 3, T, cfg.size, cfg.size), generator=g_dev, device=device)
    mb.levels = torch.zeros(R, K, dtype=torch.long)
    ids = torch.zeros((R, tokenizer.model_max_length), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    life = np.zeros(R, dtype=np.int64)
    resets = [int(trainer.extra_state.get("resets", 0))]
    rollouts = [int(trainer.extra_state.get("rollouts", 0))]
    u_ids, u_mask = tokenize(tokenizer, [""], device)

    def reset(b: int) -> None:
        rng = np.random.default_rng([args.seed, resets[0], 91])
        resets[0] += 1
        cap = D.sample_video_scene(rng, "train").caption
        if rng.random() < 0.5:
            cap = _swap_lr(cap)
        i, m = tokenize(tokenizer, [cap], device)
        ids[b], mask[b] = i[0], m[0]
        life[b] = int(rng.integers(int(args.life[0] * K), int(args.life[1] * K) + 1))
        mb.restart(b, None, g_dev)

    for b in range(R):
        reset(b)
        # stagger the phases so that the first batches are not all warm-up states
        life[b] = max(1, life[b] - int(np.random.default_rng([args.seed, b, 92]).integers(0, K)))

    with torch.no_grad():
        u_emb = teacher.encode(u_ids.expand(R, -1), u_mask.expand(R, -1))
    replay = ReplayBuffer(capacity)
    g_mix = torch.Generator(device="cpu")
    ac = bf16_autocast(use_ac)
    roll_s = [0.0]

    @torch.no_grad()
    def rollout() -> None:
        """Teacher targets for the R current states into the replay buffer; every stream advances one step."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.time()
        sig_c, nxt_c, adv = mb.plan()
        sig, nxt = sig_c.to(device), nxt_c.to(device)
        x = mb.x
        emb_t = teacher.encode(ids, mask)
        x_t = euler_update(teacher, emb_t, mask, substeps, guidance, u_emb, u_mask.expand(R, -1))(x, sig, nxt)
        d = (nxt - sig)[:, None, :, None, None]
        moving = nxt != sig
        v_target = torch.where(moving[:, None, :, None, None], (x_t - x) / torch.where(d == 0, 1.0, d), 0.0)
        replay.add(x=x, sig=sig, nxt=nxt, ids=ids, mask=mask, v=v_target, w=moving.float())
        # advance: the teacher's result for some streams, the student's own one-call step for the others
        g_mix.manual_seed(step_seed(args.seed, rollouts[0], 53))
        own = torch.nonzero(torch.rand(R, generator=g_mix) >= args.p_teacher_advance).flatten()
        x_next = x_t
        if own.numel():
            o = own.to(device)
            e = student.encode(ids[o], mask[o])      # as in the training step: text encoder outside autocast
            with ac:
                v_s = student.denoise(x[o], sig[o], e, mask[o])
            x_next[o] = x[o] + d[o] * v_s.float()
        mb.commit(x_next, adv, g_dev)
        rollouts[0] += 1
        life[:] -= 1
        for b in np.nonzero(life <= 0)[0]:
            reset(int(b))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.time() - t0
        roll_s[0] += dt
        jsonl.write(event="rollout", rollout=rollouts[0], step=trainer.step, streams=R, replay=replay.size,
                    teacher_forwards=R * substeps * cfg_calls, own=int(own.numel()), seconds=round(dt, 4))

    if compile_:
        warm_position_cache(student, cfg, use_ac)   # else the compiled step compiles twice
    step_fn = guarded_train_step(distill_loss, lambda f, *a: f(student, *a, use_ac), compile_,
                                 device, "video distill step", on_fail=lambda: trainer.opt.zero_grad(set_to_none=True))

    def state():
        trainer.extra_state["resets"] = resets[0]
        trainer.extra_state["rollouts"] = rollouts[0]
        return {"stage": "video_distill", "seed": args.seed, "teacher": str(args.teacher), "batch": B, "streams": R,
                "steps_per_rollout": N, "replay": args.replay, "lr": lr, "guidance": guidance, "substeps": substeps,
                "total_steps": trainer.total_steps,
                "note": "rollout streams and the replay buffer are restarted on resume (a cache of recent "
                        "states and targets, not training state)"}

    g_samp = torch.Generator(device=device)
    since = N   # a rollout before the first step
    while not trainer.should_stop():
        if since >= N:
            rollout()
            since = 0
        while replay.size < B:
            rollout()
        g_samp.manual_seed(step_seed(args.seed, trainer.step, 57))
        s = replay.sample(B, g_samp)
        trainer.begin_step()
        emb_s = student.encode(s["ids"], s["mask"])
        loss, _ = step_fn(s["x"], s["sig"], s["nxt"], emb_s, s["mask"], s["v"], s["w"])
        trainer.end_step(loss, state)
        since += 1
    trainer.finish(state())
    log(f"[video-distill] {rollouts[0]} rollouts ({replay.added} teacher targets, {roll_s[0]:.1f}s in rollouts)")
    jsonl.write(event="rollouts", rollouts=rollouts[0], targets=replay.added, seconds=round(roll_s[0], 2))
    fs = {"default_guidance_scale": 0.0, "teacher_guidance_scale": guidance, "teacher_substeps": substeps,
          "distillation": (f"moving-buffer step distillation: one Euler step per ladder level matches the teacher's "
                           f"{substeps} CFG sub-steps (on-policy rollouts, replayed targets)"),
          "train_steps": trainer.step, "seed": args.seed}
    return stage.exported("video-distill", "EMA student",
                          export_video(trainer.ema, tokenizer, out / "video_student", cfg, fs), trainer.step)


# ----------------------------------------------------------------------------------------------
# Stage: video evaluation
# ----------------------------------------------------------------------------------------------

@dataclass
class VideoEvalArgs:
    model: str
    teacher: str | None = None
    teacher_substeps: int | None = None
    teacher_guidance: float | None = None
    n: int = 16
    frames: int = 300
    split: str = "heldout"
    out: str | None = None
    seed: int = 0
    tiny: bool = False
    device: str = "auto"
    workers: int | None = None
    div_prompts: int = 4     # diversity: this many prompts x div_seeds seeds, each a full stream of `frames`
    div_seeds: int = 4


def score_stream(frames_u8: np.ndarray, caption: str, F: int) -> dict:
    """video_metrics over the stream (chunk boundaries every F frames) + per-chunk strict adherence
    (``benchmarks.quality.score`` on every frame; a chunk passes if all its frames pass)."""
    from fewstep.benchmarks import quality as Q
    T = len(frames_u8)
    m = Q.video_metrics(frames_u8, caption, list(range(F, T, F)))
    ok = np.array([Q.score(f, caption)["correct"] for f in frames_u8], dtype=bool)
    n_chunks = T // F
    chunk_ok = ok[: n_chunks * F].reshape(n_chunks, F).all(1) if n_chunks else np.zeros(0, bool)
    m["frame_strict_adherence"] = float(ok.mean()) if T else 0.0
    m["chunk_adherence"] = float(chunk_ok.mean()) if n_chunks else 0.0
    half = n_chunks // 2
    m["chunk_adherence_first_half"] = float(chunk_ok[:half].mean()) if half else m["chunk_adherence"]
    m["chunk_adherence_second_half"] = float(chunk_ok[half:].mean()) if half else m["chunk_adherence"]
    return m


def _score_job(a):
    return score_stream(*a)


def chunk_diversity(vids: np.ndarray, F: int) -> dict:
    """Per-chunk diversity across seeds for one prompt: ``vids`` uint8 ``[S, T, H, W, 3]`` (S seeds of one
    caption). For every chunk position c, ``benchmarks.quality.diversity`` of the S chunks c (their F frames side
    by side), then the mean over chunks, and over each half of the stream (does the spread collapse as it runs?)."""
    from fewstep.benchmarks import quality as Q
    S, T = vids.shape[:2]
    n_chunks = T // F
    per = []
    for c in range(n_chunks):
        chunk = vids[:, c * F:(c + 1) * F]                              # [S, F, H, W, 3]
        per.append(Q.diversity(list(np.concatenate(list(chunk.transpose(1, 0, 2, 3, 4)), axis=2))))
    half = n_chunks // 2
    first, second = (per[:half], per[half:]) if half else (per, per)
    return {k: round(float(np.mean(v)), 4) if v else None
            for k, v in (("diversity", per), ("diversity_first_half", first), ("diversity_second_half", second))}


def aggregate(rows: list[dict]) -> dict:
    keys = ["identity_consistency", "frame_adherence", "motion_accuracy", "color_change_accuracy",
            "frame_strict_adherence", "chunk_adherence", "chunk_adherence_first_half", "chunk_adherence_second_half"]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(float(np.mean(vals)), 4) if vals else None
    out["streams"] = len(rows)
    return out


def video_evaluate(args: VideoEvalArgs) -> dict:
    import os

    from fewstep.training import data as D
    device = pick_device(args.device)
    setup_torch(device)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    n, frames = (2, 12) if args.tiny else (args.n, args.frames)
    rng = np.random.default_rng([args.seed, 1234])
    scenes = [D.sample_video_scene(rng, args.split) for _ in range(n)]
    prompts = [s.caption for s in scenes]
    seeds = [int(step_seed(args.seed, i, 61) % (2**31)) for i in range(n)]
    n_div = 2 if args.tiny else args.div_prompts
    div_prompts = prompts[:n_div] if args.div_seeds >= 2 else []
    div_seeds = [int(step_seed(args.seed, 1000 + i, 62) % (2**31)) for i in range(len(div_prompts) * args.div_seeds)]
    configs = [("student", args.model, 1, None)]
    if args.teacher:
        # the teacher at the CFG scale the student was distilled from (unless given)
        s_fs = read_json(Path(args.model) / "model_index.json").get("fewstep", {})
        t_g = args.teacher_guidance if args.teacher_guidance is not None else s_fs.get("teacher_guidance_scale")
        t_sub = args.teacher_substeps if args.teacher_substeps is not None else s_fs.get("teacher_substeps")
        configs.append(("teacher", args.teacher, t_sub, t_g))
    workers = args.workers if args.workers is not None else (0 if args.tiny else max(0, min(14, (os.cpu_count() or 1) - 2)))
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(workers)
    results, strips = [], []
    try:
        for label, path, substeps, guidance in configs:
            model, tok, index = load_video_export(path, device)
            fs = index.get("fewstep", {})
            K, F = int(fs["buffer_chunks"]), int(fs["chunk_frames"])
            size = int(fs.get("default_size", 32))
            if substeps is None:
                substeps = int(fs.get("teacher_substeps", 1))
            if guidance is None:
                guidance = float(fs.get("default_guidance_scale", 0.0))
            t0 = time.time()
            vids, timing = generate_streams(model, tok, prompts, seeds, frames, K, F, size, substeps, guidance,
                                            progress=not args.tiny)
            gen_s = time.time() - t0
            jobs = [(vids[i].numpy(), prompts[i], F) for i in range(n)]
            t1 = time.time()
            rows = pool.map(_score_job, jobs) if pool is not None else [_score_job(j) for j in jobs]
            agg = aggregate(rows)
            if div_prompts:
                # diversity: the same prompt from div_seeds seeds, compared chunk by chunk
                dvids, _ = generate_streams(model, tok, [p for p in div_prompts for _ in range(args.div_seeds)],
                                            div_seeds, frames, K, F, size, substeps, guidance)
                S = args.div_seeds
                dv = [chunk_diversity(dvids[i * S:(i + 1) * S].numpy(), F) for i in range(len(div_prompts))]
                agg.update({k: round(float(np.mean([d[k] for d in dv])), 4) for k in dv[0]})
            res = {"model": label, "path": str(path), "K": K, "F": F, "ladder": engine_ladder(K), "substeps": substeps,
                   "guidance": guidance, "model_calls_per_emitted_chunk": timing["model_calls_per_step"],
                   "frames": frames, "prompts": args.split, **agg, "timing": timing,
                   "generate_seconds": round(gen_s, 1), "score_seconds": round(time.time() - t1, 1),
                   "per_stream": [{"caption": p, **r} for p, r in zip(prompts, rows)]}
            results.append(res)
            strips.append((label, vids[: min(4, n)].numpy()))
            log(f"[video-eval] {label}: " + " ".join(f"{k} {agg[k]}" for k in agg) +
                f" | {timing['ms_per_step_first10pct']} -> {timing['ms_per_step_last10pct']} ms/step")
            del model
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    result = {"n": n, "frames": frames, "split": args.split, "seed": args.seed, "device": str(device), "rows": results,
              "diversity_protocol": (f"first {len(div_prompts)} prompts x {args.div_seeds} seeds, per chunk"
                                     if div_prompts else "not measured")}
    write_json(out / "video_eval.json", result)
    (out / "video_eval.md").write_text(video_markdown(result), encoding="utf-8")
    draw_strips(prompts[:4], strips, out / "video_strip.png")
    log(f"[video-eval] wrote {out / 'video_eval.json'}, {out / 'video_eval.md'}, {out / 'video_strip.png'}")
    return result


def video_markdown(result: dict) -> str:
    keys = ["chunk_adherence", "frame_strict_adherence", "identity_consistency", "frame_adherence",
            "motion_accuracy", "color_change_accuracy", "chunk_adherence_first_half", "chunk_adherence_second_half",
            "diversity", "diversity_first_half", "diversity_second_half"]
    head = ["model", "K", "F", "calls/step", "cfg"] + keys + ["ms/step first->last 10%"]
    lines = [(f"Streams: {result['n']} {result['split']} prompts x {result['frames']} frames (moving buffer, "
              f"engine policy), device {result['device']}; diversity: {result.get('diversity_protocol', 'not measured')}."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        t = r["timing"]
        cells = [r["model"], str(r["K"]), str(r["F"]), str(r["model_calls_per_emitted_chunk"]), f"{r['guidance']:g}"]
        cells += ["-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys]
        cells.append(f"{t['ms_per_step_first10pct']} -> {t['ms_per_step_last10pct']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_strips(prompts: list[str], strips: list[tuple[str, np.ndarray]], path: Path, cols: int = 24,
                cell: int = 48) -> None:
    """Rows: (model, stream); columns: every ``T // cols``-th frame."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    rows = [(label, i, v[i]) for label, v in strips for i in range(len(v))]
    if not rows:
        return
    T = rows[0][2].shape[0]
    stride = max(1, T // cols)
    idx = list(range(0, T, stride))[:cols]
    W = 260 + len(idx) * (cell + 2)
    H = len(rows) * (cell + 4) + 4
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    dr = ImageDraw.Draw(canvas)
    for r, (label, i, v) in enumerate(rows):
        y = 4 + r * (cell + 4)
        dr.text((4, y + 2), f"{label}: {prompts[i][:40]}", fill=(0, 0, 0), font=font)
        dr.text((4, y + 16), f"frames 0..{T - 1} every {stride}", fill=(90, 90, 90), font=font)
        for c, t in enumerate(idx):
            canvas.paste(Image.fromarray(v[t]).resize((cell, cell), Image.NEAREST), (260 + c * (cell + 2), y))
    canvas.save(path)
