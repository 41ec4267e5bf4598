"""The guard and the error surface in process (starlette's TestClient, no model loaded)."""

import threading
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request, WebSocket
from starlette.testclient import TestClient, WebSocketDenialResponse

from fewstep.server.config import load_config
from fewstep.server.security import Guard


def guarded_app(environ: dict, seen: list | None = None) -> TestClient:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        if seen is not None:
            seen.append(request.scope["query_string"])
        return {"data": []}

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await ws.accept()
        await ws.send_text("hi")
        await ws.close()

    app.add_middleware(Guard.Middleware, guard=Guard(load_config({}, environ=environ)))
    return TestClient(app)


def test_keys_from_the_environment_are_secret_in_the_config():
    cfg = load_config({}, environ={"FEWSTEP_API_KEYS": "alpha, beta", "FEWSTEP_PROTECT_METRICS": "1"})
    assert [k.get_secret_value() for k in cfg.security.api_keys] == ["alpha", "beta"]
    assert cfg.security.protect_metrics
    assert "alpha" not in repr(cfg) and "alpha" not in cfg.model_dump_json()


def test_health_is_open_unless_protected():
    assert guarded_app({"FEWSTEP_API_KEYS": "k"}).get("/health").status_code == 200
    client = guarded_app({"FEWSTEP_API_KEYS": "k", "FEWSTEP_PROTECT_METRICS": "true"})
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer k"}).status_code == 200


def test_token_is_checked_then_removed_from_the_query():
    seen = []
    client = guarded_app({"FEWSTEP_API_KEYS": "k1,k2"}, seen)
    assert client.get("/v1/models?token=k2&x=1").status_code == 200
    assert seen == [b"x=1"]
    assert client.get("/v1/models?token=k3").status_code == 401
    assert client.get("/v1/models?token=").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer "}).status_code == 401


def test_websocket_refusals_and_origins():
    client = guarded_app({"FEWSTEP_API_KEYS": "k", "FEWSTEP_ALLOW_ORIGINS": "https://ok.example"})
    with pytest.raises(WebSocketDenialResponse) as e:  # an HTTP answer instead of the handshake
        with client.websocket_connect("/v1/realtime"):
            pass
    assert e.value.status_code == 401 and e.value.json()["error"]["code"] == "invalid_api_key"
    with client.websocket_connect("/v1/realtime?token=k", headers={"origin": "https://ok.example"}) as ws:
        assert ws.receive_text() == "hi"
    with client.websocket_connect("/v1/realtime?token=k", headers={"origin": "http://testserver"}) as ws:
        assert ws.receive_text() == "hi"  # the same origin as Host
    with pytest.raises(WebSocketDenialResponse) as e:
        with client.websocket_connect("/v1/realtime?token=k", headers={"origin": "https://evil.example"}):
            pass
    assert e.value.status_code == 403


def test_health_answers_503_when_the_engine_thread_died_or_the_load_failed():
    from fewstep.server.routes import health

    app = FastAPI()
    app.include_router(health.router)
    from fewstep.engines.core import EngineCore

    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    core = object.__new__(EngineCore)  # only what dead_reason reads: a thread that died, not stopped on purpose
    core._thread, core._stop = dead, False
    app.state.fewstep = SimpleNamespace(load_error=None, core=core, model_name="m", ready=threading.Event())
    client = TestClient(app)
    assert client.get("/health").status_code == 503
    app.state.fewstep.core = None
    assert client.get("/health").status_code == 200  # still loading
    app.state.fewstep.load_error = "the model failed to load; see the server log"
    assert client.get("/health").status_code == 503


def test_a_crash_answers_with_the_request_id_and_no_details(caplog):
    from fewstep.server.app import create_app

    app = create_app(load_config({"model": "default"}, environ={}))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("CUDA out of memory at /home/someone/models/secret.safetensors")

    r = TestClient(app, raise_server_exceptions=False).get("/boom", headers={"X-Request-Id": "req-42"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "internal" and "req-42" in err["message"]
    assert "secret" not in r.text and "CUDA" not in r.text
    assert "req-42" in caplog.text and "secret.safetensors" in caplog.text
