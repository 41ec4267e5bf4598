"""fewstep.clients.python (the SDK) against a real in-process HTTP server."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from fewstep.clients.python import (
    AsyncFewstepClient,
    FewstepClient,
    FewstepConnectionError,
    FewstepError,
    build_images_body,
    normalize_base_url,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(data: bytes) -> None:
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (8, 8)


def test_sync_generate_decodes_png(server):
    with FewstepClient(server.url, timeout=10, api_key="k") as c:
        res = c.images.generate("a cat", n=2, size=(64, 32), seed=3, steps=4, guidance_scale=0.0)
    assert len(res) == 2
    for img in res.images:
        _check_png(img)
    assert isinstance(res.created, int)
    assert res.timings is not None and "total_ms" in res.timings
    body = server.bodies[-1]
    assert body == {
        "prompt": "a cat", "n": 2, "size": "64x32", "response_format": "b64_json",
        "output_format": "png", "seed": 3, "num_inference_steps": 4, "guidance_scale": 0.0,
    }
    assert server.auth[-1] == "Bearer k"


def test_sync_without_timings_and_v1_base_url(server):
    with FewstepClient(server.url + "/notimings/v1/") as c:
        res = c.images.generate("a dog")
    assert len(res.images) == 1 and res.timings is None
    _check_png(res.images[0])


def test_sync_error_400_raises_fewstep_error(server):
    with FewstepClient(server.url) as c:
        with pytest.raises(FewstepError) as ei:
            c.images.generate("error400 here")
        err = ei.value
        assert err.status == 400
        assert err.message == server.error_400_message
        assert (err.type, err.param, err.code) == ("invalid_request_error", "prompt", "prompt_rejected")
        assert server.error_400_message in str(err) and not isinstance(err, FewstepConnectionError)
        with pytest.raises(FewstepError) as ei:
            c.images.generate("error500 here")
        assert ei.value.status == 500 and ei.value.message == "boom"


def test_sync_models_health_ready(server):
    with FewstepClient(server.url) as c:
        models = c.models()
        assert [m["id"] for m in models] == ["fake-model"]
        assert c.health() is True and c.ready() is True


def test_connection_error(closed_port_url):
    with FewstepClient(closed_port_url, timeout=5) as c:
        assert c.health() is False and c.ready() is False
        with pytest.raises(FewstepConnectionError) as ei:
            c.images.generate("x")
    assert ei.value.status is None and ei.value.type == "connection_error"
    assert isinstance(ei.value, FewstepError)


def test_async_client(server, closed_port_url):
    async def go():
        async with AsyncFewstepClient(server.url, timeout=10) as c:
            res, res2 = await asyncio.gather(
                c.images.generate("a fox", output_format="png"),
                c.images.generate("a owl", n=3),
            )
            with pytest.raises(FewstepError) as ei:
                await c.images.generate("error400")
            models = await c.models()
            ok = (await c.health(), await c.ready())
        async with AsyncFewstepClient(closed_port_url, timeout=5) as bad:
            with pytest.raises(FewstepConnectionError):
                await bad.images.generate("x")
            down = await bad.health()
        return res, res2, ei.value, models, ok, down

    res, res2, err, models, ok, down = asyncio.run(go())
    _check_png(res.images[0])
    assert len(res2.images) == 3 and res.timings is not None
    assert err.status == 400 and err.message == server.error_400_message
    assert models[0]["id"] == "fake-model" and ok == (True, True) and down is False


def test_error_from_odd_bodies():
    req = httpx.Request("POST", "http://x/v1/images/generations")
    e = FewstepError.from_response(httpx.Response(422, json={"detail": "bad size"}, request=req))
    assert e.status == 422 and e.message == "bad size"
    e = FewstepError.from_response(httpx.Response(502, text="Bad Gateway\n", request=req))
    assert e.status == 502 and e.message == "Bad Gateway" and e.type is None
    e = FewstepError.from_response(httpx.Response(503, request=req))
    assert e.status == 503 and e.message


def test_build_body_and_base_url():
    assert build_images_body("p") == {
        "prompt": "p", "n": 1, "size": "512x512", "response_format": "b64_json", "output_format": "png",
    }
    b = build_images_body("p", negative_prompt="blurry", model="m", extra_body={"foo": 1})
    assert b["negative_prompt"] == "blurry" and b["model"] == "m" and b["foo"] == 1 and "nasa_scale" not in b
    assert build_images_body("p", negative_prompt="red", nasa_scale=1)["nasa_scale"] == 1.0
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url("h:1") == "http://h:1"


def test_clients_package_does_not_import_torch():
    code = (
        "import sys; import fewstep.clients, fewstep.clients.python, fewstep.clients.bench; "
        "assert 'torch' not in sys.modules; assert 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
