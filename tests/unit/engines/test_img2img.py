"""Image-to-image (SDEdit): our pipeline against diffusers' StableDiffusionImg2ImgPipeline on the tiny SD-Turbo-style
checkpoint (fp32, CPU, same seed: the VAE's posterior sample and the noise come from the same generator in the same
order), the flow-matching start level, batching and reproducibility through the engine core."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fewstep.engines.config import EngineConfig
from fewstep.engines.core import EngineCore, EngineError, GenerateRequest
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def circle(size: int, color=(220, 30, 30)) -> np.ndarray:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    return np.array(img)


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.3), (4, 0.75), (2, 1.0)])
def test_matches_diffusers_img2img(tiny_dir, steps, strength):
    import diffusers

    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_dir / "sd_turbo", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    src = circle(64)
    out = ref("a red circle", image=Image.fromarray(src), strength=strength, num_inference_steps=steps,
              guidance_scale=0.0, output_type="np", generator=torch.Generator().manual_seed(7)).images
    expected = (out * 255).round().astype(np.uint8)

    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    ours = pipe(["a red circle"], [7], steps=steps, guidance_scale=0.0, init=torch.from_numpy(src[None]),
                strength=strength).numpy()
    assert ours.shape == expected.shape
    assert expected.std() > 5, "reference image is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    assert psnr(ours, expected) >= 40 or diff <= 2, f"PSNR {psnr(ours, expected):.1f} dB, max |diff| {diff}"


def test_parity_would_catch_a_wrong_start(tiny_dir):
    """The comparison above can fail: the same request at another strength differs from diffusers' by far more."""
    import diffusers

    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_dir / "sd_turbo", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    src = circle(64)
    out = ref("a red circle", image=Image.fromarray(src), strength=0.5, num_inference_steps=4, guidance_scale=0.0,
              output_type="np", generator=torch.Generator().manual_seed(7)).images
    expected = (out * 255).round().astype(np.uint8)
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    ours = pipe(["a red circle"], [7], steps=4, guidance_scale=0.0, init=torch.from_numpy(src[None]),
                strength=0.75).numpy()
    assert psnr(ours, expected) < 30


def test_too_few_steps_for_the_strength_is_refused(tiny_dir):
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    with pytest.raises(ValueError, match="num_inference_steps >= 4"):
        pipe.img2img_schedule(1, 0.3)
    assert pipe.img2img_default_steps(0.3) == 4  # int(4 x 0.3) = 1 step runs
    assert pipe.img2img_default_steps(1.0) == 1


def test_flow_starts_at_the_strength(tiny_dir):
    """Pixel-space flow model: x_s = (1 - s) x0 + s noise, then the schedule scaled to start at sigma s."""
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    sched, start = pipe.img2img_schedule(2, 0.4)
    assert start == 0 and sched.sigmas[0] == pytest.approx(0.4) and sched.sigmas[-1] == 0.0
    assert sched.timesteps[0] == pytest.approx(400.0)
    src = torch.from_numpy(circle(16)[None])
    x0 = pipe.encode_image(src, [torch.Generator().manual_seed(0)])
    assert torch.allclose(x0, src.permute(0, 3, 1, 2).float() / 255 * 2 - 1)  # no VAE: the pixels in [-1, 1]
    # a small strength keeps the picture: the output is nearer the input than a text-to-image sample is
    low = pipe(["a red circle"], [3], init=src, strength=0.05).numpy().astype(int)
    t2i = pipe(["a red circle"], [3], 16, 16).numpy().astype(int)
    d_low = np.abs(low - src.numpy()).mean()
    d_t2i = np.abs(t2i - src.numpy()).mean()
    assert d_low < 0.5 * d_t2i, (d_low, d_t2i)


def _core(tiny_dir, name="sd_turbo"):
    return EngineCore({"m": FewStepPipeline(load_checkpoint(tiny_dir / name))}, EngineConfig())


def _run(core, req):
    fut = core.add_request(req)
    while not fut.done():
        core.step()
    out = fut.result()
    assert out.error is None, out.error
    return out


def test_core_batches_img2img_and_keeps_seeds(tiny_dir):
    """Two image requests at one strength run as one batch and give what each gives alone; a text request at the
    same shape runs in its own batch."""
    core = _core(tiny_dir)
    a_img, b_img = circle(64), circle(80, (30, 30, 220))  # the second is resized to 64x64
    alone = [_run(core, GenerateRequest("a circle", seed=s, image=im, strength=0.5, steps=2, output_format="raw"))
             .images[0] for s, im in ((1, a_img), (2, b_img))]
    futs = [core.add_request(GenerateRequest("a circle", seed=s, image=im, strength=0.5, steps=2,
                                             output_format="raw"))
            for s, im in ((1, a_img), (2, b_img))]
    text = core.add_request(GenerateRequest("a circle", seed=1, steps=2, output_format="raw"))
    core.step()
    outs = [f.result() for f in futs]
    assert all(o.timings["batch_size"] == 2 for o in outs)
    assert not text.done()
    core.step()
    assert text.result().timings["batch_size"] == 1
    for o, ref in zip(outs, alone):
        np.testing.assert_array_equal(o.images[0], ref)
    assert np.abs(text.result().images[0].astype(int) - alone[0].astype(int)).max() > 10


def test_core_refuses_bad_strength_with_400(tiny_dir):
    core = _core(tiny_dir)
    for kw, match in (({"strength": 0.0}, "strength must be in"), ({"strength": 0.2, "steps": 2}, "runs no step")):
        with pytest.raises(EngineError, match=match) as e:
            core.add_request(GenerateRequest("a circle", image=circle(64), **kw))
        assert e.value.status == 400
