"""--vae DIR: a diffusers VAE from its own directory replaces the image model's decoder (AutoencoderKL, or
AutoencoderTiny in TAESD's format). Parity is against diffusers' own AutoencoderTiny decode (random weights)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from fewstep.engines.loading import CheckpointError, load_checkpoint, load_vae
from fewstep.engines.pipeline import FewStepPipeline
from tests.conftest import FEWSTEP


def tiny_taesd(path, latent_channels: int = 4, seed: int = 0):
    """An AutoencoderTiny shaped like the tiny sd_turbo's VAE (2x upsampling, 4 latent channels), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=latent_channels)
    with torch.no_grad():  # diffusers initialises some layers to zero; fresh random data exercises every weight
        for p in vae.parameters():
            p.normal_(0, 0.2)
    vae.save_pretrained(path, safe_serialization=True)
    return path


def test_tiny_vae_decodes_like_diffusers(tiny_dir, tmp_path):
    from diffusers import AutoencoderTiny

    taesd = tiny_taesd(tmp_path / "taesd")
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", "cpu", torch.float32, vae=taesd), "cpu")
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.vae_scale_factor == 2
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = pipe.decode(latents)  # [B, H, W, 3] uint8

    ref_vae = AutoencoderTiny.from_pretrained(taesd).eval()
    with torch.no_grad():
        ref = ref_vae.decode(latents / ref_vae.config.scaling_factor).sample
    ref = ((ref / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert ours.shape == ref.shape == (2, 32, 32, 3)
    assert (ours.int() - ref.int()).abs().max() <= 1
    assert ours.float().std() > 5  # not a constant image: the comparison means something

    own = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", "cpu", torch.float32), "cpu")
    assert (own.decode(latents).int() - ours.int()).abs().max() > 10  # the swap really changed the decoder


def test_vae_errors_name_what_to_change(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_vae(tmp_path / "empty")
    unet = tiny_dir / "sd_turbo" / "unet"
    with pytest.raises(CheckpointError, match="AutoencoderKL or AutoencoderTiny"):
        load_vae(unet)
    wrong = tiny_taesd(tmp_path / "taesd8", latent_channels=8)
    with pytest.raises(CheckpointError, match="8 latent channels"):
        load_checkpoint(tiny_dir / "sd_turbo", "cpu", torch.float32, vae=wrong)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((wrong / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickled weight file"):
        load_vae(pickled)


def test_generate_with_a_tiny_vae(tiny_dir, tmp_path):
    taesd = tiny_taesd(tmp_path / "taesd")
    out = tmp_path / "x.png"
    p = subprocess.run([*FEWSTEP, "generate", "a red ball", "--model", str(tiny_dir / "sd_turbo"), "--vae", str(taesd),
                        "--device", "cpu", "--seed", "0", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.stat().st_size > 0


def test_pipeline_bench_times_each_decoder(tiny_dir, tmp_path):
    """`fewstep bench pipeline --vae own CONFIG`: one run of the backends per decoder; a config-only VAE folder gets
    random weights (as benchmarks/configs/taesd does for the full-size TAESD)."""
    import json

    cfg_only = tmp_path / "tinytaesd"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((tiny_taesd(tmp_path / "w") / "config.json").read_text())
    rows = tmp_path / "rows.jsonl"
    p = subprocess.run([*FEWSTEP, "bench", "pipeline", "--model", str(tiny_dir / "sd_turbo"), "--vae", "own",
                        str(cfg_only), "--size", "32", "--batch", "1", "--iters", "1", "--warmup", "0", "--device",
                        "cpu", "--work", str(tmp_path / "work"), "--out", str(rows)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    systems = {json.loads(line)["system"] for line in rows.read_text().splitlines()}
    assert systems == {"fewstep-eager", "fewstep-eager+vae:tinytaesd"}


def test_the_taesd_config_is_the_published_architecture():
    """benchmarks/configs/taesd: TAESD for SD 1.x/2.x latents (4 channels, 8x), ~2.4M parameters."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderTiny

    cfg = json.loads((Path(__file__).resolve().parents[3] / "benchmarks/configs/taesd/config.json").read_text())
    vae = AutoencoderTiny.from_config(cfg)
    n = sum(p.numel() for p in vae.parameters()) / 1e6
    assert 2.3 < n < 2.6 and cfg["latent_channels"] == 4


def test_img2img_encodes_through_a_tiny_vae(tiny_dir, tmp_path):
    """--vae TAESD: image-to-image encodes with its encoder (deterministic latents, as diffusers takes them)."""
    from diffusers import AutoencoderTiny

    taesd = tiny_taesd(tmp_path / "taesd")
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", "cpu", torch.float32, vae=taesd), "cpu")
    img = torch.randint(0, 256, (1, 32, 32, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    z = pipe.encode_image(img, [torch.Generator().manual_seed(0)])
    with torch.no_grad():
        ref = AutoencoderTiny.from_pretrained(taesd).eval().encode(img.permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    assert z.shape == (1, 4, 16, 16) and torch.allclose(z, ref.latents, atol=1e-5)
    out = pipe(["a red ball"], [0], steps=2, guidance_scale=0.0, init=img, strength=0.5)
    assert out.shape == (1, 32, 32, 3)
