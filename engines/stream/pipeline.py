"""The video model runner: one denoising step over a batch of frame buffers, and frame decoding.

``StreamPipeline`` reuses :class:`FewStepPipeline` for loading-time facts and ``encode_prompt`` (the text side is
the same as for our pixel-space image DiT) and adds the two stages a stream step needs:

* ``denoise_step(x, sigma, sigma_next, cond)``: ONE model call over ``x: [B, C, T, H, W]`` with per-frame
  noise levels, then a per-frame flow-matching Euler update (frames whose level does not change get
  ``sigma_next == sigma`` and stay exactly as they were);
* ``decode_frames(x)``: clean frames -> uint8 ``[B, F, H, W, 3]`` (through the VAE frame by frame for a latent
  image-VAE model; directly for a pixel-space one).

Wan2.1-architecture checkpoints (``WanTransformer3DModel`` + ``AutoencoderKLWan``) run the same moving buffer in
Wan's latent space: per-frame noise levels become per-token timesteps (the transformer's Wan 2.2 interface,
``timestep: [B, tokens]``), and each emitted chunk of F latent frames decodes through the causal video VAE with
the session's decoder cache carried over from its previous chunk (``wan_vae.decode_continuing``): a session's
first chunk gives 1 + 4 (F - 1) frames, every later one 4 F, and the concatenation equals one ``vae.decode`` of
all the latents (tested), so chunks join without seams.

The checkpoint's ``model_index.json`` says ``"fewstep": {"kind": "video", "chunk_frames": F, "buffer_chunks": K,
"default_size": S, "fps": ...}``; the denoiser predicts ``v = noise - x0`` from ``timestep = sigma * 1000``
(diffusers' FlowMatchEulerDiscreteScheduler convention).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..loading import Checkpoint, CheckpointError
from ..pipeline import FewStepPipeline, NasaInput, PromptEmbeds
from ..runner import Capabilities


class StreamPipeline(FewStepPipeline):
    kind = "video"

    def __init__(self, ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 attention: str = "dense", adapters: str | None = None):
        super().__init__(ckpt, device, dtype, attention, adapters)
        meta = ckpt.meta
        if self.sampler != "flow":
            raise CheckpointError(f"{ckpt.path}: a video (stream) model needs a flow-matching scheduler "
                                  f"(FlowMatchEulerDiscreteScheduler), got {ckpt.scheduler_class}")
        self.chunk_frames = int(meta.get("chunk_frames", 1))
        self.buffer_chunks = int(meta.get("buffer_chunks", 4))
        self.fps = float(meta.get("fps", 8))
        if self.chunk_frames < 1 or self.buffer_chunks < 1:
            raise CheckpointError(f"{ckpt.path / 'model_index.json'}: fewstep.chunk_frames and "
                                  "fewstep.buffer_chunks must be >= 1")
        max_frames = self.denoiser.config.get("max_frames")
        if max_frames is not None and self.buffer_frames > max_frames:
            raise CheckpointError(f"{ckpt.path / 'model_index.json'}: the buffer holds chunk_frames x buffer_chunks"
                                  f" = {self.buffer_frames} frames, more than the model's max_frames={max_frames}")
        self.sigmas = self.noise_levels(self.buffer_chunks)
        self._wan_cache_per_px: float | None = None  # measured on the first session_state_estimate (Wan)
        # the compiled backend's captured steps (engines/backends/compiled_stream.py); None: every step eager
        self.compiled_steps = None
        # frames a client receives per emitted chunk: F, or through Wan's causal VAE (4x in time) 4 F, except a
        # session's first chunk: 1 + 4 (F - 1)
        self.frames_per_chunk = self.first_chunk_frames = self.chunk_frames
        if self.family == "wan":
            if self.chunk_frames < 2:
                # with one latent frame per chunk the VAE's causal cache holds 1 frame after a session's first
                # chunk and 2 after later ones, so sessions could not share a decode batch
                raise CheckpointError(f"{ckpt.path / 'model_index.json'}: Wan streams need fewstep.chunk_frames >= 2")
            t = 2 ** sum(bool(d) for d in self.vae.config.temperal_downsample)
            self.frames_per_chunk, self.first_chunk_frames = t * self.chunk_frames, 1 + t * (self.chunk_frames - 1)

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, frames_per_chunk=self.frames_per_chunk, fps=self.fps,
                                   backend="eager" if self.compiled_steps is None else "compiled")

    @property
    def compile_seconds(self) -> float:
        return 0.0 if self.compiled_steps is None else self.compiled_steps.report.total

    @property
    def buffer_frames(self) -> int:
        return self.chunk_frames * self.buffer_chunks

    def session_state_estimate(self, height: int, width: int) -> int:
        """Bytes of device state one session of this size will hold once running: its fp32 latent buffer and,
        for Wan, the causal VAE's cache. The cache is measured once, on a small latent with this VAE, device and
        dtype, and scaled by area (it is proportional to the latent area: 1.76 GiB at 832x480 in bf16)."""
        c, h, w = self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor
        total = 4 * c * self.buffer_frames * h * w
        if self.family == "wan":
            if self._wan_cache_per_px is None:
                from .wan_vae import decode_continuing

                z = torch.zeros(1, c, self.chunk_frames, 8, 8, device=self.device,
                                dtype=next(self.vae.parameters()).dtype)
                with torch.no_grad():
                    _, states = decode_continuing(self.vae, z, [None])
                    _, states = decode_continuing(self.vae, z, states)  # the steady-state cache (2 frames)
                self._wan_cache_per_px = tensor_bytes(states[0]) / 64
            total += int(self._wan_cache_per_px * h * w)
        return total

    def noise_levels(self, n: int) -> list[float]:
        """n + 1 flow sigmas from 1 (noise) to 0 (clean): n uniform steps in t (1, 1 - 1/n, ..., 1/n, then 0) mapped
        through the checkpoint's own scheduler config (its ``shift``).

        Not diffusers' default spacing: that ends at sigma_min = 1/1000, which would make every chunk's final step
        (sigma 0.001 -> 0) a no-op, so a buffer of K chunks would denoise only K-1 times and a prompt update would
        first show two chunks later instead of in the next one.
        """
        import diffusers

        cfg = {k: v for k, v in self.ckpt.scheduler_config.items() if not k.startswith("_")}
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
        if getattr(sched.config, "use_dynamic_shifting", False):
            raise CheckpointError(f"{self.ckpt.path}: use_dynamic_shifting needs an image-size shift; not supported")
        sched.set_timesteps(sigmas=[1.0 - i / n for i in range(n)], device="cpu")
        return [float(s) for s in sched.sigmas]

    @torch.no_grad()
    def denoise_step(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                     cond: PromptEmbeds, nasa: NasaInput | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] fp32; sigma, sigma_next: [B, T] fp32 on the device. Returns x after one Euler step.
        ``nasa``: per-session negative prompts steered away from in the cross-attention (guidance mode nasa)."""
        if self.compiled_steps is not None:
            out = self.compiled_steps(x, sigma, sigma_next, cond, nasa)
            if out is not None:
                return out
        with contextlib.ExitStack() as stack:
            if nasa is not None:
                c = self.nasa_consts(nasa, x.shape[0], False)
                stack.enter_context(self.nasa.active(c["nasa_neg_embeds"], c["nasa_alpha"], c.get("nasa_neg_mask"),
                                                     cond.mask, c.get("nasa_nag")))
            v = self._stream_call(x, sigma, cond)
        return x + (sigma_next - sigma)[:, None, :, None, None] * v

    @property
    def guidance_modes(self) -> tuple[str, ...]:
        """Streams run one pass per step: no CFG; NASA where the denoiser's cross-attention takes it."""
        return ("none", "nasa") if self.nasa is not None else ("none",)

    def _stream_call(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        if self.family == "wan":
            return self.denoiser(x.to(self.dtype), timestep=self.wan_timesteps(sigma, x.shape),
                                 encoder_hidden_states=cond.embeds, return_dict=False)[0].float()
        return self.denoiser(x.to(self.dtype), timestep=sigma * 1000.0, encoder_hidden_states=cond.embeds,
                             encoder_attention_mask=cond.mask, return_dict=False)[0].float()

    def wan_timesteps(self, sigma: torch.Tensor, shape) -> torch.Tensor:
        """[B, T] per-frame sigmas -> [B, T * h/p * w/p] per-token timesteps, in the transformer's token order
        (frame-major: patch_embedding(...).flatten(2) walks t, then h, then w)."""
        _, _, t, h, w = shape
        pt, ph, pw = self.denoiser.config.patch_size
        per_frame = (h // ph) * (w // pw)
        if pt != 1:
            raise CheckpointError("per-frame timesteps need a temporal patch size of 1")
        return (sigma * 1000.0).repeat_interleave(per_frame, dim=1)

    @torch.no_grad()
    def decode_frames(self, x: torch.Tensor, sessions: list | None = None) -> torch.Tensor | list[torch.Tensor]:
        """x: [B, C, F, H, W] clean samples -> uint8 [B, F, H, W, 3] on the device. Wan: with ``sessions`` (one per
        row), each row continues its session's causal decode and the result is a list of [F', H, W, 3] (F' differs
        between a session's first chunk and later ones); without, the rows decode as self-contained clips."""
        if self.family == "wan":
            return self._decode_wan(x) if sessions is None else self._decode_wan_sessions(x, sessions)
        b, c, f, h, w = x.shape
        frames = self.decode(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))  # [B*F, H', W', 3]
        return frames.view(b, f, *frames.shape[1:])

    def _wan_latents(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = x.to(next(self.vae.parameters()).dtype)
        if cfg.get("latents_mean") is not None:  # WanPipeline's de-normalisation
            mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
            z = z * std + mean
        return z

    @staticmethod
    def _to_uint8(video: torch.Tensor) -> torch.Tensor:  # [B, 3, F, H, W] in [-1, 1] -> [B, F, H, W, 3]
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)

    def _decode_wan(self, x: torch.Tensor) -> torch.Tensor:
        return self._to_uint8(self.vae.decode(self._wan_latents(x), return_dict=False)[0])

    def _decode_wan_sessions(self, x: torch.Tensor, sessions: list) -> list[torch.Tensor]:
        from .wan_vae import decode_continuing

        z = self._wan_latents(x)
        out: list[torch.Tensor | None] = [None] * len(sessions)
        # a first chunk and a later one cannot share the decoder's batch; group before any state changes
        first = [s.decoder_state is None for s in sessions]
        for phase in (True, False):
            rows = [i for i, f in enumerate(first) if f == phase]
            if not rows:
                continue
            previous = [sessions[i].decoder_state for i in rows]
            for i in rows:  # drop the sessions' references now: only the batch's stacked copy stays alive
                sessions[i].decoder_state = None
            video, states = decode_continuing(self.vae, z[rows], previous)
            del previous
            frames = self._to_uint8(video)
            for j, i in enumerate(rows):
                sessions[i].decoder_state = states[j]
                out[i] = frames[j]
        return out


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nest of lists, tuples and dicts."""
    total, stack = 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.nbytes
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return total
