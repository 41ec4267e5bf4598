"""The WebSocket paths tell a client that something failed and which request id to quote, never the exception's text
(paths, tensor shapes, allocator messages): that goes to the server log, as for HTTP 500s (server/app.py on_crash)."""

import logging

import pytest
from fastapi.testclient import TestClient

from fewstep.engines.config import EngineConfig
from fewstep.server.app import create_app
from fewstep.server.config import ServerConfig
from fewstep.server.routes import realtime

SECRET = "/secret/weights/path.safetensors: CUDA allocator said no"


@pytest.fixture(scope="module")
def client(tiny_dir):
    cfg = ServerConfig(model=str(tiny_dir / "stream_dit"), engine=EngineConfig(device="cpu", sizes=[(32, 32)]))
    with TestClient(create_app(cfg, load_async=False)) as c:
        yield c


def _leaks(msg: dict) -> bool:
    text = str(msg)
    return "secret" in text or "RuntimeError" in text or "allocator" in text


def _until_stopped(ws) -> list[dict]:
    msgs = []
    while not msgs or msgs[-1]["type"] != "stopped":
        msg = ws.receive_json()
        if msg["type"] != "stats":
            msgs.append(msg)
    return msgs


def test_stream_message_failure_sends_an_id_not_the_exception(client, monkeypatch, caplog):
    def broken(start):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(client.app.state.fewstep.engine, "open_stream", broken)
    with caplog.at_level(logging.ERROR, "fewstep.server"):
        with client.websocket_connect("/v1/stream", headers={"X-Request-Id": "ws-rid-1"}) as ws:
            ws.send_json({"type": "start", "prompt": "x"})
            err = ws.receive_json()
            assert err["type"] == "error" and err["code"] == "internal", err
            assert "ws-rid-1" in err["message"] and not _leaks(err), err
            monkeypatch.undo()  # the socket stays usable
            ws.send_json({"type": "start", "prompt": "x", "fps": 0})
            assert ws.receive_json()["type"] == "started"
            ws.send_json({"type": "stop"})
            _until_stopped(ws)
    assert SECRET in caplog.text and "ws-rid-1" in caplog.text  # the details are in the log, under the id


def test_stream_engine_failure_sends_an_id_not_the_exception(client, monkeypatch, caplog):
    core = client.app.state.fewstep.core
    (pipe,) = core.pipelines.values()

    def broken(*a, **kw):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(pipe, "decode_frames", broken)  # the engine thread's step fails: "error: RuntimeError: ..."
    with caplog.at_level(logging.ERROR, "fewstep.server"):
        with client.websocket_connect("/v1/stream", headers={"X-Request-Id": "ws-rid-2"}) as ws:
            ws.send_json({"type": "start", "prompt": "x", "fps": 0})
            assert ws.receive_json()["type"] == "started"
            msgs = _until_stopped(ws)
    err, stopped = msgs[0], msgs[-1]
    assert err["type"] == "error" and err["code"] == "stream_failed", msgs
    assert "ws-rid-2" in err["message"], err
    assert stopped["reason"] == "error", stopped
    assert not any(_leaks(m) for m in msgs), msgs
    assert SECRET in caplog.text and "ws-rid-2" in caplog.text
    assert core.num_sessions == 0


def test_realtime_failure_sends_an_id_not_the_exception(client, monkeypatch, caplog):
    async def broken(self, req):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(realtime.RealtimeConnection, "generate", broken)
    with caplog.at_level(logging.ERROR, "fewstep.server"):
        with client.websocket_connect("/v1/realtime", headers={"X-Request-Id": "ws-rid-3"}) as ws:
            ws.send_json({"prompt": "x", "request_id": "input-7"})
            err = ws.receive_json()
    assert err["type"] == "error" and err["code"] == "internal" and err["request_id"] == "input-7", err
    assert "ws-rid-3" in err["message"] and not _leaks(err), err
    assert SECRET in caplog.text and "ws-rid-3" in caplog.text


def test_realtime_engine_errors_keep_their_message(client):
    """EngineError text tells the user what to change: it is sent as it is (here: the model serves no images)."""
    with client.websocket_connect("/v1/realtime") as ws:
        ws.send_json({"prompt": "x", "request_id": "input-8"})
        err = ws.receive_json()
    assert err["type"] == "error" and err["request_id"] == "input-8" and err["code"] != "internal", err
    assert "video model" in err["message"], err
