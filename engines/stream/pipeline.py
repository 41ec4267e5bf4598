"""The video model runner: one denoising step over a batch of frame buffers, and frame decoding.

``StreamPipeline`` reuses :class:`FewStepPipeline` for loading-time facts and ``encode_prompt`` (the text side is
the same as for our pixel-space image DiT) and adds the two stages a stream step needs:

* ``denoise_step(x, sigma, sigma_next, cond)``: ONE model call over ``x: [B, C, T, H, W]`` with per-frame
  noise levels, then a per-frame flow-matching Euler update (frames whose level does not change get
  ``sigma_next == sigma`` and stay exactly as they were);
* ``decode_frames(x)``: clean frames -> uint8 ``[B, F, H, W, 3]`` (through the VAE frame by frame for a latent
  model; directly for a pixel-space one).

The checkpoint's ``model_index.json`` says ``"fewstep": {"kind": "video", "chunk_frames": F, "buffer_chunks": K,
"default_size": S, "fps": ...}``; the denoiser predicts ``v = noise - x0`` from ``timestep = sigma * 1000``
(diffusers' FlowMatchEulerDiscreteScheduler convention).
"""

from __future__ import annotations

import torch

from ..loading import Checkpoint, CheckpointError
from ..pipeline import FewStepPipeline, PromptEmbeds


class StreamPipeline(FewStepPipeline):
    kind = "video"

    def __init__(self, ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 attention: str = "dense"):
        super().__init__(ckpt, device, dtype, attention)
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

    @property
    def buffer_frames(self) -> int:
        return self.chunk_frames * self.buffer_chunks

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
                     cond: PromptEmbeds) -> torch.Tensor:
        """x: [B, C, T, H, W] fp32; sigma, sigma_next: [B, T] fp32 on the device. Returns x after one Euler step."""
        v = self.denoiser(x.to(self.dtype), timestep=sigma * 1000.0, encoder_hidden_states=cond.embeds,
                          encoder_attention_mask=cond.mask, return_dict=False)[0].float()
        return x + (sigma_next - sigma)[:, None, :, None, None] * v

    @torch.no_grad()
    def decode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, F, H, W] clean samples -> uint8 [B, F, H, W, 3] on the device."""
        b, c, f, h, w = x.shape
        frames = self.decode(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))  # [B*F, H', W', 3]
        return frames.view(b, f, *frames.shape[1:])
