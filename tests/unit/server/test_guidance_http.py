"""Guidance fields over HTTP: guidance_modes in GET /v1/models, negative prompts through NASA, and the 400s that name
what a model supports."""

import base64

import pytest
from fastapi.testclient import TestClient

from fewstep.server.app import create_app
from fewstep.server.config import load_config

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def client(tiny_dir):
    cfg = load_config({"model": str(tiny_dir / "sd_turbo"), "engine.device": "cpu"}, environ={})
    with TestClient(create_app(cfg, load_async=False)) as c:
        yield c


def _image(r) -> bytes:
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def _error(r, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    return err["message"]


def test_models_list_guidance_modes(client):
    cards = client.get("/v1/models").json()["data"]
    assert cards[0]["guidance_modes"] == ["none", "cfg", "nasa"]


def test_negative_prompt_runs_nasa_at_guidance_zero(client):
    body = {"prompt": "a red circle", "seed": 3, "size": "64x64", "guidance_scale": 0.0}
    plain = _image(client.post(GEN, json=body))
    steered = _image(client.post(GEN, json={**body, "negative_prompt": "red", "nasa_scale": 1.0}))
    zero = _image(client.post(GEN, json={**body, "negative_prompt": "red", "nasa_scale": 0.0}))
    assert steered != plain
    assert zero == plain  # alpha 0 subtracts exactly nothing


def test_nasa_scale_without_a_negative_prompt_is_a_400(client):
    assert "needs a negative_prompt" in _error(client.post(GEN, json={"prompt": "x", "nasa_scale": 0.5}),
                                               "nasa_scale")


def test_nasa_scale_under_cfg_is_a_400_naming_the_modes(client):
    msg = _error(client.post(GEN, json={"prompt": "x", "negative_prompt": "red", "guidance_scale": 3.0,
                                        "nasa_scale": 0.5}), "nasa_scale")
    assert "guidance_scale <= 1" in msg and "none, cfg, nasa" in msg


def test_nasa_scale_out_of_range_is_a_400(client):
    r = client.post(GEN, json={"prompt": "x", "negative_prompt": "red", "nasa_scale": 50})
    assert r.status_code == 400 and "nasa_scale" in r.text


def test_nag_fields_select_the_renormalised_form(client):
    body = {"prompt": "a red circle", "seed": 3, "size": "64x64", "guidance_scale": 0.0, "negative_prompt": "red"}
    plain_nasa = _image(client.post(GEN, json={**body, "nasa_scale": 1.0}))
    nag = _image(client.post(GEN, json={**body, "nag_scale": 4.0, "nag_tau": 2.0, "nag_alpha": 0.5}))
    nag_defaults = _image(client.post(GEN, json={**body, "nag_alpha": 0.5}))  # phi and tau default
    assert nag != plain_nasa and nag_defaults not in (nag, plain_nasa)


@pytest.mark.parametrize("field,value", [("nag_scale", 0.5), ("nag_tau", 20.0), ("nag_alpha", 1.5)])
def test_nag_field_out_of_range_is_a_400_naming_the_range(client, field, value):
    from fewstep.engines.pipeline import NAG_RANGES

    lo, hi = NAG_RANGES[field]
    msg = _error(client.post(GEN, json={"prompt": "x", "negative_prompt": "red", field: value}), field)
    assert f"{field} must be from {lo:g} to {hi:g}, got {value:g}" in msg


def test_nag_beside_nasa_scale_or_without_a_negative_prompt_is_a_400(client):
    msg = _error(client.post(GEN, json={"prompt": "x", "negative_prompt": "red", "nasa_scale": 0.5,
                                        "nag_scale": 3.0}), "nasa_scale")
    assert "do not combine" in msg
    assert "needs a negative_prompt" in _error(client.post(GEN, json={"prompt": "x", "nag_tau": 2.0}), "nag_tau")


def test_realtime_takes_nag_fields_and_names_their_range(client):
    msg = {"prompt": "a red circle", "seed": 3, "size": "64x64", "guidance_scale": 0.0, "negative_prompt": "red",
           "format": "png"}
    with client.websocket_connect("/v1/realtime") as ws:
        ws.send_json({**msg, "request_id": "nasa", "nasa_scale": 1.0})
        nasa = ws.receive_json()
        ws.send_json({**msg, "request_id": "nag", "nag_scale": 4.0, "nag_tau": 2.0})
        nag = ws.receive_json()
        ws.send_json({**msg, "request_id": "bad", "nag_tau": 0.5})
        bad = ws.receive_json()
    assert nasa["type"] == nag["type"] == "result", (nasa, nag)
    assert nag["image"] != nasa["image"]
    # the same image as over HTTP with the same fields
    http = client.post(GEN, json={"prompt": "a red circle", "seed": 3, "size": "64x64", "guidance_scale": 0.0,
                                  "negative_prompt": "red", "nag_scale": 4.0, "nag_tau": 2.0})
    assert base64.b64decode(nag["image"]) == _image(http)
    assert bad["type"] == "error" and bad["param"] == "nag_tau" and "from 1 to 10" in bad["message"], bad


@pytest.fixture(scope="module")
def video_client(tiny_dir):
    from fewstep.engines.config import EngineConfig
    from fewstep.server.config import ServerConfig

    cfg = ServerConfig(model=str(tiny_dir / "stream_dit"), engine=EngineConfig(device="cpu", sizes=[(32, 32)]))
    with TestClient(create_app(cfg, load_async=False)) as c:
        yield c


def _next(ws) -> dict:
    """The next answer to a client message (started, updated, error), past binary frames and stats."""
    import json

    while True:
        m = ws.receive()
        if m.get("text") is not None and (msg := json.loads(m["text"]))["type"] in ("started", "updated", "error"):
            return msg


def test_stream_start_and_update_take_nag_fields(video_client):
    from fewstep.engines.pipeline import NagParams

    core = video_client.app.state.fewstep.core
    with video_client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "start", "prompt": "a red ball", "fps": 0, "negative_prompt": "red", "nag_scale": 4.0})
        started = _next(ws)
        assert started["type"] == "started", started
        session = core.stream_session(started["session_id"])
        assert session.nag == NagParams(scale=4.0)
        ws.send_json({"type": "update", "nag_alpha": 0.9})
        assert _next(ws)["type"] == "updated"
        assert session.nag == NagParams(4.0, alpha=0.9)
        ws.send_json({"type": "update", "nag_alpha": 2})
        err = _next(ws)
        assert err["type"] == "error" and err["param"] == "nag_alpha" and "from 0 to 1" in err["message"], err
        ws.send_json({"type": "update", "nasa_scale": 1.0})
        assert _next(ws)["type"] == "updated"
        assert session.nag is None and session.nasa_scale == 1.0
        ws.send_json({"type": "stop"})
