"""Request limits come from the live config (LimitsConfig), not from constants in the request models."""

import pytest
from fastapi.testclient import TestClient

from fewstep.server.app import create_app
from fewstep.server.cli import _serve_config, build_parser
from fewstep.server.config import load_config

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def client(tiny_dir):
    """The tiny image model, loaded, with the limits raised above their defaults (16 images, 2000 characters)."""
    cfg = load_config({"model": str(tiny_dir / "sd_turbo"), "engine.device": "cpu", "limits.max_n": 32,
                       "limits.max_prompt_chars": 3000}, environ={})
    with TestClient(create_app(cfg, load_async=False)) as c:
        yield c


def _error(r, status: int, param: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    return err["message"]


def test_raised_max_n_is_accepted(client):
    r = client.post(GEN, json={"prompt": "a red circle", "n": 32, "seed": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 32


def test_above_the_configured_max_n_names_the_limit(client):
    assert "32" in _error(client.post(GEN, json={"prompt": "x", "n": 33}), 400, "n")


def test_raised_prompt_limit(client):
    assert client.post(GEN, json={"prompt": "x" * 2500}).status_code == 200
    assert "3000" in _error(client.post(GEN, json={"prompt": "x" * 3001}), 400, "prompt")
    assert "3000" in _error(client.post(GEN, json={"prompt": "x", "negative_prompt": "y" * 3001}), 400,
                            "negative_prompt")


@pytest.mark.parametrize("n", [True, 1.0, "2"])
def test_n_must_be_a_json_integer(client, n):
    message = _error(client.post(GEN, json={"prompt": "x", "n": n}), 400, "n")
    assert "integer" in message, message


def test_realtime_socket_uses_the_same_limits(client):
    with client.websocket_connect("/v1/realtime") as ws:
        ws.send_json({"prompt": "x" * 3001, "request_id": "r1"})
        msg = ws.receive_json()
    assert msg["type"] == "error" and msg["param"] == "prompt" and "3000" in msg["message"]


def test_openapi_schema_loads_and_states_the_live_limits(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    props = r.json()["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert props["n"]["maximum"] == 32 and props["prompt"]["maxLength"] == 3000


def test_default_limits_without_a_model():
    """Limits are checked before the engine: an app with nothing loaded answers 503 inside them, 400 outside."""
    c = TestClient(create_app(load_config({}, environ={})))  # no lifespan: nothing loads
    assert c.post(GEN, json={"prompt": "x", "n": 16}).status_code == 503
    assert "16" in _error(c.post(GEN, json={"prompt": "x", "n": 17}), 400, "n")
    assert "2048" in _error(c.post(GEN, json={"prompt": "x", "size": "2112x64"}), 400, "size")
    assert c.get("/openapi.json").status_code == 200


def test_max_n_from_environment_and_flag():
    assert load_config({}, environ={"FEWSTEP_MAX_N": "32"}).limits.max_n == 32
    args = build_parser().parse_args(["serve", "--max-n", "32", "--max-side", "1024", "--max-prompt-chars", "500"])
    limits = _serve_config(args).limits
    assert (limits.max_n, limits.max_side, limits.max_prompt_chars) == (32, 1024, 500)
