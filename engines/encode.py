"""Image encoding (uint8 HWC arrays -> PNG / JPEG / WebP bytes). Runs in the engine's worker pool, never on the
event loop."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(img: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    # img: [H, W, 3] uint8
    if fmt not in FORMATS:
        raise ValueError(f"output_format must be one of {sorted(FORMATS)}, got {fmt!r}")
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 1}
    # compress_level 1 vs the default 6 on a noisy 512x512 image (2-core CPU): 59 ms vs 93 ms, 9% larger.
    Image.fromarray(img).save(buf, format=FORMATS[fmt], **kw)
    return buf.getvalue()


def gpu_jpeg_available(device) -> bool:
    """nvjpeg through torchvision: needs a CUDA device and a torchvision built with it (>= 0.19 takes batches)."""
    if getattr(device, "type", device) != "cuda":
        return False
    try:
        from torchvision.io import encode_jpeg  # noqa: F401
    except (ImportError, RuntimeError):  # not installed, or built for another torch (its operators fail to register)
        return False
    return True


def encode_jpeg_gpu(images, quality: int = 90) -> list[bytes]:
    """[B, H, W, 3] uint8 CUDA tensor -> JPEG bytes per image, encoded by nvjpeg on the GPU. Only the compressed
    bytes cross PCIe (tens of KB instead of 786 KB per 512x512 image), and no CPU thread is spent on the codec."""
    from torchvision.io import encode_jpeg

    out = encode_jpeg([im.permute(2, 0, 1).contiguous() for im in images], quality=quality)
    return [t.cpu().numpy().tobytes() for t in out]
