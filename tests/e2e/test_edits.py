"""POST /v1/images/edits (image-to-image, OpenAI's multipart form) against a real `fewstep serve`, through the
official openai SDK and raw HTTP."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw


def png(size=(64, 64), mode="RGB", color=(220, 30, 30)) -> bytes:
    img = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=color)
    buf = io.BytesIO()
    (img if mode == "RGB" else img.convert(mode)).save(buf, format="PNG")
    return buf.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def test_openai_sdk_edit(tiny_server, tmp_path):
    from openai import OpenAI

    path = tmp_path / "in.png"
    path.write_bytes(png())
    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    with open(path, "rb") as f:
        res = client.images.edit(image=f, prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                                 extra_body={"seed": 3, "strength": 0.5, "num_inference_steps": 2})
    assert len(res.data) == 2
    a, b = (pixels(d.b64_json) for d in res.data)
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() > 0  # seeds 3 and 4
    lone = []
    for _ in range(2):  # the same request twice: the same bytes
        with open(path, "rb") as f:
            lone.append(client.images.edit(image=f, prompt="a red circle", size="64x64",
                                           extra_body={"seed": 3, "strength": 0.5, "num_inference_steps": 2}))
    assert lone[0].data[0].b64_json == lone[1].data[0].b64_json
    # alone or in a batch of two: CPU convolutions round differently by batch size, within 1-2 levels of 255
    assert np.abs(pixels(lone[0].data[0].b64_json) - a).max() <= 2


def test_edit_follows_the_input_image(tiny_server):
    """Same seed and prompt, two input pictures: at low strength the outputs differ where the inputs differ; at
    strength 1 (the input noised to sigma_max, as diffusers does) it barely shows."""
    red, blue = png(color=(220, 30, 30)), png(color=(30, 30, 220))

    def edit(image: bytes, strength: float) -> np.ndarray:
        r = httpx.post(tiny_server.url + "/v1/images/edits", files={"image": ("in.png", image, "image/png")},
                       data={"prompt": "a circle", "seed": "9", "strength": str(strength), "num_inference_steps": "4"},
                       timeout=60)
        assert r.status_code == 200, r.text
        return pixels(r.json()["data"][0]["b64_json"])

    # random tiny weights: the picture moves the output by a few levels only
    low = np.abs(edit(red, 0.25) - edit(blue, 0.25)).mean()
    full = np.abs(edit(red, 1.0) - edit(blue, 1.0)).mean()
    assert low > 1 and full < 0.2 * low, (low, full)


def _garbage_16bit() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


BAD = [
    ({"image": ("x.png", b"not an image at all", "image/png")}, {"prompt": "x"}, 400, "image", "could not be read"),
    ({"image": ("x.png", png()[:60], "image/png")}, {"prompt": "x"}, 400, "image", "truncated or corrupt"),
    ({"image": ("x.png", png((5000, 4000)), "image/png")}, {"prompt": "x"}, 400, "image", "more than the limit"),
    ({"image": ("x.png", _garbage_16bit(), "image/png")}, {"prompt": "x"}, 400, "image", "mode"),
    ({"image": ("x.png", png(), "image/png")}, {"prompt": "x", "strength": "0"}, 400, "strength", "(0, 1]"),
    ({"image": ("x.png", png(), "image/png")}, {"prompt": "x", "strength": "0.2", "num_inference_steps": "2"}, 400,
     "strength", "runs no step"),
    ({"image": ("x.png", png(), "image/png")}, {"prompt": "x", "size": "abc"}, 400, "size", "512x512"),
    ({"image": ("x.png", png(), "image/png")}, {"prompt": "  "}, 400, "prompt", "non-empty"),
    ({"image": ("x.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")}, {"prompt": "x"}, 400, "mask",
     "not supported"),
    ({}, {"prompt": "x"}, 400, "image", "Field required"),
]


@pytest.mark.parametrize("files,data,status,param,message", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_edits_get_a_clear_4xx(tiny_server, files, data, status, param, message):
    r = httpx.post(tiny_server.url + "/v1/images/edits", files=files or {"x": ("x", b"", "text/plain")}, data=data,
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err
    ok = httpx.post(tiny_server.url + "/v1/images/edits", files={"image": ("in.png", png(), "image/png")},
                    data={"prompt": "ok"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_upload_limit_is_its_own(tiny_server):
    """A 3 MiB upload passes the guard (the JSON limit is 1 MiB); one above max_image_bytes is a 413."""
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=0)
    big = buf.getvalue()
    assert 3 << 20 <= len(big) <= 8 << 20
    r = httpx.post(tiny_server.url + "/v1/images/edits", files={"image": ("in.png", big, "image/png")},
                   data={"prompt": "noise", "size": "64x64"}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(tiny_server.url + "/v1/images/edits", files={"image": ("in.png", big * 3, "image/png")},
                   data={"prompt": "noise"}, timeout=60)
    assert r.status_code == 413
    assert httpx.get(tiny_server.url + "/v1/models", timeout=10).status_code == 200
