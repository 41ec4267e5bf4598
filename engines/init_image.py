"""Input images for image-to-image (``POST /v1/images/edits``, ``/v1/realtime``'s ``image``, camera frames of
``/v1/stream``): bytes -> a checked uint8 RGB array, and that array fitted to the output size.

``decode_image`` runs off the event loop (the routes call it in a thread or the engine's pool): decoding a large
PNG takes tens of milliseconds. It refuses, with a message that says what to send instead: bytes that are no image
PIL can read, images above ``max_pixels`` (checked from the header, before any pixel is decoded, so a small file
that claims a huge canvas costs nothing), and modes without an 8-bit RGB reading (16-bit or float greyscale).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes PIL converts to RGB without losing what the picture shows; 16-bit ("I;16") and 32-bit ("I", "F") greyscale
# would be clipped, so they are refused rather than silently saturated.
_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La", "RGBa"}


class InputImageError(ValueError):
    """An input image the server cannot use; the message says why and what to send."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 RGB. Raises InputImageError."""
    if not data:
        raise InputImageError("the image is empty; send a PNG, JPEG or WebP file")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputImageError("the image could not be read; send a PNG, JPEG or WebP file") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputImageError(f"the image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}; "
                              "send a smaller image")
    if w < 1 or h < 1:
        raise InputImageError(f"the image is {w}x{h}; send an image with pixels")
    if img.mode not in _MODES:
        raise InputImageError(f"image mode {img.mode!r} is not supported; send an 8-bit RGB, RGBA or greyscale "
                              "image")
    try:
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
            # transparent pixels become white, the background our default models draw on
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        rgb = img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError):  # truncated or corrupt pixel data
        raise InputImageError("the image data is truncated or corrupt; send a complete PNG, JPEG or WebP file") \
            from None


def fit_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center-crop ``img`` [H, W, 3] to the aspect of ``width`` x ``height``, then resize to it (bicubic). An image
    already of that size is returned as it is (no resampling: image-to-image at the native size is exact)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    target = width / height
    if w / h > target:  # too wide: crop the sides
        cw = max(1, round(h * target))
        x0 = (w - cw) // 2
        img = img[:, x0: x0 + cw]
    elif w / h < target:  # too tall: crop top and bottom
        ch = max(1, round(w / target))
        y0 = (h - ch) // 2
        img = img[y0: y0 + ch]
    out = Image.fromarray(np.ascontiguousarray(img)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)
