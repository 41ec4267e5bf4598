"""fewstep's pipeline against diffusers' own pipelines on the same tiny random checkpoints (fp32, CPU).

References: SD-Turbo-style -> StableDiffusionPipeline + EulerDiscreteScheduler(trailing); LCM-style ->
LatentConsistencyModelPipeline + LCMScheduler; SDXL-Turbo-style -> StableDiffusionXLPipeline +
EulerAncestralDiscreteScheduler(trailing); DiT -> PixArtAlphaPipeline + LCMScheduler (PixArt-LCM) and + DDIM.
"""

import numpy as np
import pytest
import torch

from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline

CASES = [
    # (checkpoint, diffusers pipeline, kwargs, steps, size)
    ("sd_turbo", "StableDiffusionPipeline", {"guidance_scale": 0.0}, 1, 64),
    ("sd_turbo", "StableDiffusionPipeline", {"guidance_scale": 0.0}, 2, 64),
    ("sd_turbo", "StableDiffusionPipeline", {"guidance_scale": 3.0, "negative_prompt": "blurry"}, 2, 64),
    ("lcm", "LatentConsistencyModelPipeline", {"guidance_scale": 8.5}, 1, 64),
    ("lcm", "LatentConsistencyModelPipeline", {"guidance_scale": 8.5}, 4, 64),
    ("sdxl_turbo", "StableDiffusionXLPipeline", {"guidance_scale": 0.0}, 1, 64),
    ("sdxl_turbo", "StableDiffusionXLPipeline", {"guidance_scale": 0.0}, 4, 64),
    ("pixart", "PixArtAlphaPipeline", {"guidance_scale": 0.0, "clean_caption": False,
                                       "use_resolution_binning": False}, 1, 32),
    ("pixart", "PixArtAlphaPipeline", {"guidance_scale": 0.0, "clean_caption": False,
                                       "use_resolution_binning": False}, 4, 32),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name,ref_cls,kw,steps,size", CASES, ids=[f"{c[0]}-{c[3]}step-g{c[2]['guidance_scale']}"
                                                                   for c in CASES])
def test_matches_diffusers(tiny_dir, name, ref_cls, kw, steps, size):
    import diffusers

    ref = getattr(diffusers, ref_cls).from_pretrained(tiny_dir / name, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    out = ref("a red circle", num_inference_steps=steps, height=size, width=size, output_type="np",
              generator=torch.Generator().manual_seed(1234), **kw).images
    expected = (out * 255).round().astype(np.uint8)

    pipe = FewStepPipeline(load_checkpoint(tiny_dir / name))
    ours = pipe(["a red circle"], [1234], size, size, steps, kw["guidance_scale"],
                [kw.get("negative_prompt", "")]).numpy()
    assert ours.shape == expected.shape
    assert expected.std() > 5, "reference image is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    assert psnr(ours, expected) >= 40 or diff <= 2, f"PSNR {psnr(ours, expected):.1f} dB, max |diff| {diff}"


def test_different_seeds_differ(tiny_dir):
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    a, b = pipe(["a red circle"] * 2, [1, 2], 64, 64, 1, 0.0)
    assert np.abs(a.numpy().astype(int) - b.numpy().astype(int)).max() > 10
