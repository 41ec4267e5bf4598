"""The routes' side of admission, in-process (FastAPI TestClient over the real app on the tiny video model)."""

import pytest
from fastapi.testclient import TestClient

from fewstep.engines.config import EngineConfig
from fewstep.engines.core import EngineError
from fewstep.server.app import create_app
from fewstep.server.config import ServerConfig


@pytest.fixture(scope="module")
def client(tiny_dir):
    cfg = ServerConfig(model=str(tiny_dir / "stream_dit"), engine=EngineConfig(device="cpu", sizes=[(32, 32)]))
    app = create_app(cfg, load_async=False)

    async def overloaded():
        raise EngineError("server is at capacity", 503, None, "overloaded", retry_after=2.4)

    app.add_api_route("/test/overloaded", overloaded)
    with TestClient(app) as c:
        yield c


def test_503_carries_retry_after(client):
    r = client.get("/test/overloaded")
    assert r.status_code == 503 and r.headers["retry-after"] == "2"


def test_models_list_their_sizes(client):
    (card,) = client.get("/v1/models").json()["data"]
    assert card["sizes"] == "32x32"


def test_videos_refuse_degenerate_fps_and_unserved_sizes(client):
    r = client.post("/v1/videos", json={"prompt": "x", "num_frames": 4, "fps": 0.0001})
    assert r.status_code == 400 and "fps must be from 1 to 60" in r.json()["error"]["message"]
    r = client.post("/v1/videos", json={"prompt": "x", "num_frames": 4, "size": 64})
    assert r.status_code == 400 and "served sizes: 32x32" in r.json()["error"]["message"]
    r = client.post("/v1/videos", json={"prompt": "x", "num_frames": 4, "fps": 8})
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"


def test_mjpeg_size_zero_is_refused(client):
    r = client.get("/v1/stream.mjpeg", params={"prompt": "x", "size": "0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"


def test_stream_frame_encoder_failure_ends_the_session_with_an_error(client, monkeypatch):
    import fewstep.engines.encode as encode

    def broken(*a, **kw):
        raise OSError("encoder broke")

    monkeypatch.setattr(encode, "encode_image", broken)
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "start", "prompt": "x", "fps": 0, "format": "jpeg"})
        assert ws.receive_json()["type"] == "started"
        msgs = []
        while not msgs or msgs[-1]["type"] != "stopped":
            msg = ws.receive_json()
            if msg["type"] != "stats":
                msgs.append(msg)
    assert msgs[0]["type"] == "error" and msgs[0]["code"] == "stream_failed"
    assert "frame encoding failed" in msgs[0]["message"] and msgs[-1]["reason"].startswith("error")
    assert client.app.state.fewstep.core.num_sessions == 0
