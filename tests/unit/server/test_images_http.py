"""The image route's HTTP path: JSON serialised once (orjson, no response_model pass) in the documented schema,
raw image bytes for n=1 by Accept, 406 for n>1 with an image-only Accept; and `fewstep serve`'s uvicorn stack
(uvloop, httptools with the request-head limit)."""

import base64
import io
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from fewstep.server.app import create_app
from fewstep.server.cli import server_stack, uvicorn_config
from fewstep.server.config import load_config
from fewstep.server.protocol import ImageGenerationResponse
from fewstep.server.routes import images
from fewstep.server.routes.images import negotiate

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def client(tiny_dir):
    cfg = load_config({"model": str(tiny_dir / "sd_turbo"), "engine.device": "cpu"}, environ={})
    with TestClient(create_app(cfg, load_async=False)) as c:
        yield c


def test_json_is_the_default_and_matches_the_schema(client):
    r = client.post(GEN, json={"prompt": "a red circle", "n": 2, "seed": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = ImageGenerationResponse.model_validate_json(r.content)  # the documented schema, field for field
    assert [d.seed for d in body.data] == [5, 6] and body.timings["batch_size"] == 2
    assert Image.open(io.BytesIO(base64.b64decode(body.data[0].b64_json))).format == "PNG"
    assert "denoise;dur=" in r.headers["server-timing"] and r.headers["vary"] == "Accept"


@pytest.mark.parametrize("accept,fmt", [("image/jpeg", "JPEG"), ("image/webp", "WEBP"), ("image/png", "PNG"),
                                        ("image/png, application/json;q=0.5", "PNG")])
def test_accept_image_returns_the_bytes(client, accept, fmt):
    r = client.post(GEN, json={"prompt": "a red circle", "seed": 7}, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == f"image/{fmt.lower()}" and Image.open(io.BytesIO(r.content)).format == fmt
    assert r.headers["x-fewstep-seed"] == "7" and r.headers["x-fewstep-batch-size"] == "1"
    stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert {"queue", "encode_prompt", "denoise", "decode", "encode_image", "total"} <= set(stages)
    assert all(float(v) >= 0 for v in stages.values())


def test_raw_and_json_give_the_same_image(client):
    raw = client.post(GEN, json={"prompt": "a blue square", "seed": 3}, headers={"Accept": "image/png"}).content
    js = client.post(GEN, json={"prompt": "a blue square", "seed": 3}).json()
    assert base64.b64decode(js["data"][0]["b64_json"]) == raw


def test_n_above_1_with_an_image_only_accept_is_406(client):
    r = client.post(GEN, json={"prompt": "x", "n": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 406 and r.json()["error"]["code"] == "not_acceptable"
    assert "application/json" in r.json()["error"]["message"]
    r = client.post(GEN, json={"prompt": "x", "n": 2}, headers={"Accept": "image/png, application/json;q=0.1"})
    assert r.status_code == 200 and len(r.json()["data"]) == 2  # JSON is acceptable too: JSON


def test_negotiation_rules():
    assert negotiate(None, 1, "png") is None
    assert negotiate("*/*", 1, "png") is None  # curl's default
    assert negotiate("application/json", 1, "png") is None
    assert negotiate("text/html", 1, "png") is None  # names neither: ignored, JSON as before
    assert negotiate("image/*", 1, "webp") == "webp"  # the body's output_format
    assert negotiate("image/png, */*", 1, "png") == "png"  # named beats the wildcard
    assert negotiate("image/*, application/json", 1, "png") is None  # equal q: the more specific match
    assert negotiate("image/jpeg;q=0.4, image/webp;q=0.9", 1, "png") == "webp"
    assert negotiate("image/png;q=0", 1, "png") is None


def test_large_answers_serialise_in_the_encode_pool(client, monkeypatch):
    calls = []
    real = client.app.state.fewstep.core.encode_submit

    def submit(fn, *args):
        calls.append(fn.__name__)
        return real(fn, *args)

    monkeypatch.setattr(client.app.state.fewstep.core, "encode_submit", submit)
    client.post(GEN, json={"prompt": "x", "seed": 1})
    assert "render_json" not in calls  # a small answer: inline
    monkeypatch.setattr(images, "POOL_BYTES", 0)
    r = client.post(GEN, json={"prompt": "x", "seed": 1, "n": 2})
    assert r.status_code == 200 and calls.count("render_json") == 1
    ImageGenerationResponse.model_validate_json(r.content)


def test_openapi_documents_both_answers(client):
    spec = client.get("/openapi.json").json()
    ok = spec["paths"][GEN]["post"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ImageGenerationResponse")
    assert {"image/png", "image/jpeg", "image/webp"} <= set(ok["200"]["content"]) and "406" in ok


# -- the uvicorn stack ------------------------------------------------------------------------------------------
def test_serve_runs_uvloop_and_httptools_where_installed():
    pytest.importorskip("uvloop")
    pytest.importorskip("httptools")
    cfg = uvicorn_config(FastAPI(), load_config({}, environ={}).http)
    assert server_stack(cfg) == ("uvloop", "httptools")


def test_httptools_keeps_the_request_head_limit():
    """uvicorn bounds the head only under h11; our httptools protocol bounds it too (16 KiB by default)."""
    pytest.importorskip("httptools")
    app = FastAPI()

    @app.get("/")
    async def root():
        return {"ok": True}

    @app.post("/echo")
    async def echo(body: dict):
        return {"chars": len(body["x"])}

    http = load_config({"http.port": 0}, environ={}).http
    cfg = uvicorn_config(app, http)
    cfg.port, cfg.log_level = _free_port(), "warning"
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        assert server_stack(cfg)[1] == "httptools"
        assert httpx.get(url, headers={"X-Pad": "a" * (15 << 10)}).status_code == 200
        for size in (17 << 10, 1 << 20):
            try:
                assert httpx.get(url, headers={"X-Pad": "a" * size}, timeout=30).status_code == 400
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                pass  # closed with the rest of the head unread
        with httpx.Client() as c:  # keep-alive, with bodies far over the head limit: bodies are not heads
            for _ in range(2):
                assert c.post(url + "/echo", json={"x": "b" * (200 << 10)}).json() == {"chars": 200 << 10}
                assert c.get(url).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ignored_openai_fields_are_named_in_a_header(client, caplog):
    """OpenAI's SDK sends fields that fewstep does not use: the request still succeeds, and the answer names them
    (a name that could smuggle characters into a header is counted, not echoed); a clean request has no header."""
    import logging

    with caplog.at_level(logging.INFO, logger="fewstep.server"):
        r = client.post(GEN, json={"prompt": "a red circle", "seed": 1, "quality": "hd", "style": "vivid",
                                   "user": "u-1", "bad\r\nname": 1})
    assert r.status_code == 200, r.text
    assert r.headers["x-fewstep-ignored-fields"] == "quality, style, user, (1 more with unusual names)"
    assert "quality, style, user" in caplog.text
    r = client.post(GEN, json={"prompt": "a red circle", "seed": 1})
    assert r.status_code == 200 and "x-fewstep-ignored-fields" not in r.headers
