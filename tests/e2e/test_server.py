"""`fewstep serve` as a real subprocess, driven through the official openai SDK and raw HTTP.

The API tests taking ``server`` run twice: against the single-process server (``tiny_server``) and against the Ray
Serve app with 2 replicas of the same model (``fewstep serve --replicas 2``, server/ray.py), so that a client cannot
tell them apart. The metrics, batching and default-model tests use the single-process server only (the Ray app's
metrics are per replica: tests/e2e/test_ray.py)."""

import base64
import io
import re

import httpx
import numpy as np
import pytest

from PIL import Image

from tests.conftest import FEWSTEP, RayServeProcess


@pytest.fixture(scope="module")
def ray_tiny_server(tiny_dir, ray_cluster):
    """The tiny_server's model and flags, as 2 Ray Serve replicas (stopped with this module, so that another module
    can run its own app on the session's cluster)."""
    srv = RayServeProcess(ray_cluster, 2, ["--model", str(tiny_dir / "sd_turbo"), "--device", "cpu",
                                           "--max-wait-ms", "20", "--threads", "1"])
    yield srv
    srv.stop()


@pytest.fixture(params=["single", pytest.param("ray", marks=pytest.mark.slow)])
def server(request):
    return request.getfixturevalue("tiny_server" if request.param == "single" else "ray_tiny_server")


def test_openai_sdk_gets_a_png(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.images.generate(prompt="a red circle above a blue square", size="64x64", n=2,
                                 response_format="b64_json", extra_body={"seed": 5, "num_inference_steps": 1})
    assert len(res.data) == 2
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert all(i.format == "PNG" and i.size == (64, 64) for i in imgs)
    assert imgs[0].tobytes() != imgs[1].tobytes()  # seeds 5 and 6
    # same seed -> same image, through the whole HTTP path
    again = client.images.generate(prompt="a red circle above a blue square", size="64x64",
                                   response_format="b64_json", extra_body={"seed": 5, "num_inference_steps": 1})
    assert again.data[0].b64_json == res.data[0].b64_json


def test_timings_and_formats(server):
    r = httpx.post(server.url + "/v1/images/generations",
                   json={"prompt": "a green star", "size": "64x64", "output_format": "jpeg", "seed": 1}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["created"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).format == "JPEG"
    t = body["timings"]
    for k in ("queue_ms", "encode_prompt_ms", "denoise_ms", "decode_ms", "encode_image_ms", "total_ms"):
        assert k in t and t[k] >= 0
    assert t["batch_size"] >= 1


BAD = [
    ({"prompt": "x", "size": "abcxdef"}, "size", 'size must look like "512x512"'),
    ({"prompt": "x", "size": "64x64", "num_inference_steps": 0}, "num_inference_steps", "from 1 to 8"),
    ({"prompt": "x", "size": "64x64", "num_inference_steps": 1000}, "num_inference_steps", "from 1 to 8"),
    ({"prompt": "x", "size": "64x64", "n": 0}, "n", "from 1 to 16"),
    ({"prompt": "x", "size": "64x64", "n": 10**6}, "n", "from 1 to 16"),
    ({"prompt": "", "size": "64x64"}, "prompt", "non-empty"),
    ({"prompt": "   ", "size": "64x64"}, "prompt", "non-empty"),
    ({"prompt": "a" * 100_000, "size": "64x64"}, "prompt", "at most 2000 characters"),
    ({"prompt": "x", "size": "64x64", "model": "no-such-model"}, "model", "not served here"),
    ({"prompt": "x", "size": "66x66"}, "size", "multiple of"),
    ({"prompt": "x", "size": "64x64", "response_format": "url"}, "response_format", "b64_json"),
    ({"size": "64x64"}, "prompt", "Field required"),
]


@pytest.mark.parametrize("body,param,message", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_input_gets_a_helpful_4xx_and_the_server_keeps_serving(server, body, param, message):
    r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and message in err["message"], err
    ok = httpx.post(server.url + "/v1/images/generations", json={"prompt": "ok", "size": "64x64"}, timeout=60)
    assert ok.status_code == 200


def test_malformed_json(server):
    r = httpx.post(server.url + "/v1/images/generations", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_openai_sdk_raises_with_the_message(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    with pytest.raises(BadRequestError, match="num_inference_steps"):
        client.images.generate(prompt="x", size="64x64", extra_body={"num_inference_steps": 99})


def test_models_health_ready(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "sd_turbo"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["ready"] is True
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def test_metrics_have_nonzero_histograms(tiny_server):
    httpx.post(tiny_server.url + "/v1/images/generations", json={"prompt": "m", "size": "64x64"}, timeout=60)
    httpx.post(tiny_server.url + "/v1/images/generations", json={"prompt": "", "size": "64x64"}, timeout=60)
    text = httpx.get(tiny_server.url + "/metrics").text

    def value(pattern):
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        assert m, f"{pattern} not in /metrics"
        return float(m.group(1))

    assert value(r'fewstep_request_queue_time_seconds_count\{model="sd_turbo"\}') > 0
    assert value(r'fewstep_e2e_request_latency_seconds_count\{model="sd_turbo"\}') > 0
    for stage in ("queue", "encode_prompt", "denoise", "decode", "encode_image"):
        assert value(rf'fewstep_stage_latency_seconds_count\{{model="sd_turbo",stage="{stage}"\}}') > 0
    assert value(r'fewstep_batch_size_count\{model="sd_turbo"\}') > 0
    assert value(r'fewstep_requests_total\{model="sd_turbo",status="200"\}') > 0
    assert value(r'fewstep_request_errors_total\{code="invalid_prompt",model="sd_turbo"\}') > 0
    assert "fewstep_num_requests_running" in text and "fewstep_num_requests_waiting" in text


def test_concurrent_requests_share_batches(tiny_server):
    import concurrent.futures as cf

    def one(i):
        return httpx.post(tiny_server.url + "/v1/images/generations",
                          json={"prompt": f"p{i}", "size": "64x64", "seed": i}, timeout=120).json()

    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(one, range(8)))
    assert all("data" in r for r in res)
    assert max(r["timings"]["batch_size"] for r in res) > 1


def test_bench_images_smoke(server, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    p = subprocess.run([*FEWSTEP, "bench", "images", server.url,
                        "--num-requests", "20", "--concurrency", "4", "--size", "64x64", "--steps", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())
    assert rep["completed"] == 20
    # the report names what it measured (GET /v1/models), so a result copied off another machine still says so
    listed = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in rep["server_models"]] == [m["id"] for m in listed]
    lat = rep["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # the waterfall: the server timed its own span (receive, hand-off, base64) beside the engine's stages, so the
    # client's share is what is left; every part is non-negative but the client's (clock noise), and they add up
    wf = {s["stage"]: s for s in rep["waterfall_ms"]["stages"]}
    assert rep["waterfall_ms"]["requests"] == 20
    assert all(wf[k]["mean"] >= 0 for k in wf if k != "client + HTTP")
    assert wf["denoise"]["mean"] > 0 and wf["receive"]["mean"] > 0 and wf["serialize"]["mean"] > 0
    assert sum(s["mean"] for s in wf.values()) == pytest.approx(lat["mean"], rel=1e-6)
    assert "Where a request's time goes" in p.stdout


def test_serve_with_no_arguments_serves_both_default_models():
    """README's main command: `fewstep serve` with no --model serves both embedded models, images and streams, with
    no model named in the requests. The README's example prompt names no background, and the image model's prompt
    completion (listed in /v1/models) gives it the white one every training caption would have named."""
    from fewstep.clients.python import FewstepClient
    from tests.conftest import ServerProcess

    srv = ServerProcess(["--device", "cpu"])
    try:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [(m["id"], m["kind"]) for m in models] == [("fewstep-default", "image"),
                                                          ("fewstep-default-video", "video")]
        assert models[0]["default_size"] == 64
        assert models[0]["prompt_completion"] == {"unless": r"\bbackground\b", "append": " on a white background"}
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a red circle above a blue square",
                                                                 "seed": 0}, timeout=60)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert img.size == (64, 64)
        assert np.asarray(img.convert("RGB")).reshape(-1, 3).mean(0).min() > 150   # a white background
        frames = []
        with FewstepClient(srv.url) as client:   # a stream, naming no model, goes to the video model
            with client.stream("a red circle moving right", seed=3, fps=0) as s:
                for f in s:
                    frames.append(f)
                    if len(frames) == 4:
                        s.stop()
        img = np.asarray(Image.open(io.BytesIO(frames[-1].data)).convert("RGB"))
        assert img.shape == (32, 32, 3) and img.reshape(-1, 3).mean(0).min() > 150   # completed: white background
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a red circle", "model":
                                                                 "fewstep-default-video"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "video_model"
        ready = httpx.get(srv.url + "/ready").json()  # every served model, with its state
        assert ready["models"] == [{"id": "fewstep-default", "state": "ready"},
                                   {"id": "fewstep-default-video", "state": "ready"}]
    finally:
        srv.stop()


def test_serve_default_video_streams_the_embedded_video_model():
    """`fewstep serve --model default-video` serves the embedded streaming student over WS /v1/stream."""
    from fewstep.clients.python import FewstepClient
    from tests.conftest import ServerProcess

    srv = ServerProcess(["--model", "default-video", "--device", "cpu"])
    try:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert models[0]["id"] == "fewstep-default-video"
        frames = []
        with FewstepClient(srv.url) as client:
            with client.stream("a red circle moving right on a white background", seed=3, fps=0) as s:
                assert s.info["chunk_frames"] == 2
                for f in s:
                    frames.append(f)
                    if len(frames) == 6:
                        s.stop()
        assert [f.index for f in frames[:6]] == list(range(6))
        img = np.asarray(Image.open(io.BytesIO(frames[-1].data)).convert("RGB"))
        assert img.shape == (32, 32, 3)
        assert img.reshape(-1, 3).mean(0).min() > 150  # the white background the caption asks for
    finally:
        srv.stop()
