"""Tiny random-weight checkpoints in diffusers format, written to a directory, for tests.

Each builder returns the directory. The architectures are the real diffusers/transformers classes with small
configs, so the load path, the samplers and the pipelines are exercised exactly as for full-size checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

def clip_tokenizer(folder: Path, max_length: int = 77):
    from fewstep.benchmarks.random_weights import byte_level_clip_tokenizer

    return byte_level_clip_tokenizer(folder, max_length)


def _clip_text(vocab_size: int, hidden: int = 32, projection: bool = False, max_pos: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=max_pos, projection_dim=hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=32).eval()


def _unet(cross_dim: int, **kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=(2, 4), norm_num_groups=8, **kw).eval()


# Tests ask tiny checkpoints for many sizes besides their native one, so each declares a range of served sizes
# (engines/sizes.py); a checkpoint without a declaration serves only its native size.
SIZE_RANGE = [8, 512]


def _save(pipe, path: Path) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    index = json.loads((path / "model_index.json").read_text())
    index.setdefault("fewstep", {})["size_range"] = SIZE_RANGE
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def sd_turbo(path: Path, seed: int = 0) -> Path:
    """SD-Turbo-style: SD 2.x UNet (epsilon), CLIP text encoder, VAE, Euler with trailing spacing."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    pipe = StableDiffusionPipeline(
        unet=_unet(32), vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok,
        scheduler=EulerDiscreteScheduler(timestep_spacing="trailing", beta_schedule="scaled_linear",
                                         beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, path)


def lcm(path: Path, seed: int = 0) -> Path:
    """LCM-style: UNet with a guidance-scale embedding (time_cond_proj_dim) and LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    pipe = LatentConsistencyModelPipeline(
        unet=_unet(32, time_cond_proj_dim=32), vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok,
        scheduler=LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, path)


def sdxl_turbo(path: Path, seed: int = 0) -> Path:
    """SDXL-Turbo-style: two text encoders, text_time added conditioning, Euler ancestral (trailing)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8).eval()
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), text_encoder=_clip_text(len(tok)), tokenizer=tok,
        text_encoder_2=_clip_text(len(tok), projection=True), tokenizer_2=tok,
        scheduler=EulerAncestralDiscreteScheduler(timestep_spacing="trailing", beta_schedule="scaled_linear",
                                                  beta_start=0.00085, beta_end=0.012))
    return _save(pipe, path)


def pixart(path: Path, seed: int = 0, scheduler: str = "lcm") -> Path:
    """PixArt-style DiT (T5 encoder, learned sigma) with LCMScheduler, as PixArt-LCM ships."""
    from diffusers import DDIMScheduler, LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 pad_token_id=len(tok) - 1)).eval()
    tr = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
                                  out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                  norm_eps=1e-6).eval()
    sched = (LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02) if scheduler == "lcm"
             else DDIMScheduler(timestep_spacing="trailing"))
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=_vae(), transformer=tr, scheduler=sched)
    return _save(pipe, path)


def pixel_dit(path: Path, seed: int = 0) -> Path:
    """The default-model format: a pixel-space PixArt DiT with a CLIP text encoder and a FlowMatch scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(path / "_tok", max_length=16)
    tok.save_pretrained(path / "tokenizer")
    _clip_text(len(tok), max_pos=16).save_pretrained(path / "text_encoder", safe_serialization=True)
    PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=2,
                             caption_channels=32, in_channels=3, out_channels=3, cross_attention_dim=16,
                             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                             use_additional_conditions=False).eval().save_pretrained(path / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "FewstepPixelPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "fewstep": {"default_steps": 2, "default_guidance_scale": 0.0, "default_size": 16, "size_range": SIZE_RANGE}}))
    return path


def stream_dit(path: Path, seed: int = 0, size: int = 32, chunk_frames: int = 2, buffer_chunks: int = 3,
               fps: float = 8) -> Path:
    """A video checkpoint: fewstep's StreamDiTModel (per-frame noise levels) + CLIP text encoder + FlowMatch."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.engines.models import StreamDiTModel

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(path / "_tok", max_length=16)
    tok.save_pretrained(path / "tokenizer")
    _clip_text(len(tok), max_pos=16).save_pretrained(path / "text_encoder", safe_serialization=True)
    model = StreamDiTModel(sample_size=size, patch_size=4, in_channels=3, num_layers=2, num_attention_heads=2,
                           attention_head_dim=16, caption_channels=32, max_frames=chunk_frames * buffer_chunks * 2)
    with torch.no_grad():  # DiT init zeroes modulation and output: make the random model react to its inputs
        for p in (model.time_mod[1].weight, model.proj_out.weight):
            p.normal_(0.0, 0.05)
    model.eval().save_pretrained(path / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "FewstepStreamPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["fewstep", "StreamDiTModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "fewstep": {"kind": "video", "chunk_frames": chunk_frames, "buffer_chunks": buffer_chunks,
                    "default_size": size, "fps": fps, "size_range": SIZE_RANGE}}))
    return path


def wan_stream(path: Path, seed: int = 0, size: int = 32, chunk_frames: int = 2, buffer_chunks: int = 3,
               fps: float = 8) -> Path:
    """A Wan2.1-architecture stream checkpoint in miniature: WanTransformer3DModel (per-token timesteps) +
    AutoencoderKLWan (4x spatial, 2x temporal) + a 1-layer UMT5 encoder + FlowMatch."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(path / "_tok", max_length=16)
    tok.save_pretrained(path / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)) \
        .eval().save_pretrained(path / "text_encoder", safe_serialization=True)
    z = 4
    AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                     latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0]) \
        .eval().save_pretrained(path / "vae")
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=z,
                          out_channels=z, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64) \
        .eval().save_pretrained(path / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "fewstep": {"kind": "video", "chunk_frames": chunk_frames, "buffer_chunks": buffer_chunks,
                    "default_size": size, "fps": fps, "max_sequence_length": 16, "size_range": SIZE_RANGE}}))
    return path


BUILDERS = {"sd_turbo": sd_turbo, "lcm": lcm, "sdxl_turbo": sdxl_turbo, "pixart": pixart, "pixel_dit": pixel_dit,
            "stream_dit": stream_dit, "wan_stream": wan_stream}

if __name__ == "__main__":  # python tests/tiny_models.py KIND DIR (used by e2e tests and by hand)
    import sys

    BUILDERS[sys.argv[1]](Path(sys.argv[2]))
