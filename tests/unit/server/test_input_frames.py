"""Client input for image-to-image: binary input frames (header checks), base64 images, and image decoding."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from fewstep.clients.python import pack_input_frame
from fewstep.engines.init_image import InputImageError, decode_image, fit_image
from fewstep.server.stream_protocol import b64_image, unpack_input_frame


def png(size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_client_frames_round_trip_through_the_server_parser():
    data = pack_input_frame(b"JPEGDATA", 7, "webp", timestamp_ms=12.5)
    header, payload = unpack_input_frame(data, 1 << 20)
    assert payload == b"JPEGDATA"
    assert header == {"version": 1, "payload_type": "webp", "index": 7, "timestamp_ms": 12.5}


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d[:10], "24-byte header"),
    (lambda d: b"ABCD" + d[4:], "starts with"),
    (lambda d: d[:4] + bytes([2]) + d[5:], "version"),
    (lambda d: d[:5] + bytes([4]) + d[6:], "payload type"),
    (lambda d: d[:24], "no image"),
    (lambda d: d + b"x" * 100, "more than the limit"),
])
def test_bad_input_frames(mutate, needle):
    with pytest.raises(ValueError, match=needle):
        unpack_input_frame(mutate(pack_input_frame(b"JPEGDATA", 0)), 64)


def test_b64_images():
    raw = png()
    assert b64_image(base64.b64encode(raw).decode(), 1 << 20) == raw
    assert b64_image("data:image/png;base64," + base64.b64encode(raw).decode(), 1 << 20) == raw
    with pytest.raises(ValueError, match="base64"):
        b64_image("not base64 !!", 1 << 20)
    with pytest.raises(ValueError, match="larger than the limit"):
        b64_image(base64.b64encode(b"x" * 1000).decode(), 100)


def test_decode_image_modes_and_limits():
    assert decode_image(png((8, 6)), 1000).shape == (6, 8, 3)
    rgba = decode_image(png((4, 4), "RGBA"), 1000)  # fully transparent black -> white
    assert (rgba == 255).all()
    assert decode_image(png((4, 4), "L"), 1000).shape == (4, 4, 3)
    with pytest.raises(InputImageError, match="more than the limit"):
        decode_image(png((50, 50)), 1000)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(buf, format="PNG")  # I;16
    with pytest.raises(InputImageError, match="mode"):
        decode_image(buf.getvalue(), 1000)
    with pytest.raises(InputImageError, match="could not be read"):
        decode_image(b"GIF89a garbage", 1000)


def test_fit_image_center_crops_to_the_aspect():
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # the middle third is white
    out = fit_image(img, 10, 10)
    assert out.shape == (10, 10, 3) and out.min() > 200  # the sides were cropped away
    same = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert fit_image(same, 4, 4) is same
