"""nvjpeg encoding of JPEG responses (CUDA only; skipped on CPU-only CI, run on the device)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.engines.config import EngineConfig
from fewstep.engines.core import EngineCore, GenerateRequest
from fewstep.engines.encode import encode_jpeg_gpu, gpu_jpeg_available

needs_cuda = pytest.mark.skipif(not gpu_jpeg_available(torch.device("cuda")) or not torch.cuda.is_available(),
                                reason="needs CUDA and torchvision's nvjpeg")


def test_gpu_jpeg_off_without_cuda():
    assert not gpu_jpeg_available(torch.device("cpu"))


def test_gpu_jpeg_on_refused_without_cuda(tiny_dir):
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline

    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", torch.device("cpu"), torch.float32),
                           torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="gpu_jpeg"):
        EngineCore({"m": pipe}, EngineConfig(gpu_jpeg="on"))


@pytest.mark.gpu
@needs_cuda
def test_encode_jpeg_gpu_roundtrip():
    y, x = np.mgrid[0:256, 0:256]
    img = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    (data,) = encode_jpeg_gpu(torch.from_numpy(img)[None].cuda())
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert data[:2] == b"\xff\xd8" and np.abs(back - img).mean() < 3


@pytest.mark.gpu
@needs_cuda
def test_engine_serves_jpeg_from_gpu(tiny_dir):
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline

    dev = torch.device("cuda")
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", dev, torch.float16), dev, torch.float16)
    outs = {}
    for mode, fmt in (("on", "jpeg"), ("off", "jpeg"), ("off", "raw")):
        core = EngineCore({"m": pipe}, EngineConfig(gpu_jpeg=mode))
        core.add_request(GenerateRequest(prompt="a cat", n=2, seed=3, output_format=fmt))
        (out,) = core.step()
        core.shutdown()
        assert out.error is None
        outs[mode, fmt] = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).astype(int) if fmt == "jpeg"
                           else d.astype(int) for d in out.images]
    # nvjpeg and libjpeg round differently; on noise-like tiny-model output both lose a lot, so compare each
    # with the raw pixels: the GPU encoder may not be much worse than PIL's
    for raw, gpu, cpu in zip(outs["off", "raw"], outs["on", "jpeg"], outs["off", "jpeg"]):
        assert gpu.shape == raw.shape
        assert np.abs(gpu - raw).mean() <= 1.5 * np.abs(cpu - raw).mean() + 2
