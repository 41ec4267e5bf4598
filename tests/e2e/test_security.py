"""A hostile client against a real `fewstep serve`: body, header and WebSocket limits, API keys, Origin, CORS,
per-client limits, idle sockets, a bounded shutdown and an honest /health."""

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from fewstep.benchmarks.reliability import rss_bytes

from tests.conftest import FEWSTEP, ROOT, ServerProcess, free_port

KEYS = ["k-body", "k-auth", "k-ws", "k-streams", "k-rate", "k-idle", "k-misc"]
# Longer than the refusals of test_streams_per_key_are_limited take (a stream over the limit waits up to
# STREAM_SLOT_WAIT_S = 2 s for a slot, twice): its two open streams must not be closed as idle meanwhile.
IDLE_S = 10


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def ws(server, path: str, token: str | None = None, **kw):
    url = server.url.replace("http://", "ws://") + path + (f"?token={token}" if token else "")
    return connect(url, open_timeout=30, **kw)


@pytest.fixture(scope="module")
def guarded(tiny_dir):
    """The tiny video model behind keys, with small limits so that the tests reach them."""
    args = ["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1",
            "--max-streams-per-client", "2", "--rate-limit", "5", "--idle-timeout", str(IDLE_S),
            "--allow-origin", "http://friend.example", "--cors-origin", "http://app.example"]
    for k in KEYS:
        args += ["--api-key", k]
    srv = ServerProcess(args)
    yield srv
    srv.stop()


def test_chunked_body_is_cut_at_the_limit_and_memory_stays_flat(guarded):
    def body():  # 50 MiB with no Content-Length: chunked transfer encoding
        block = b"x" * (1 << 16)
        for _ in range(800):
            yield block

    before = rss_bytes(guarded.proc.pid)
    r = httpx.post(guarded.url + "/v1/images/generations", content=body(), timeout=60,
                   headers={**bearer("k-body"), "content-type": "application/json"})
    after = rss_bytes(guarded.proc.pid)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "body_too_large" and str(1 << 20) in err["message"]
    assert after - before < 10 * 2**20, (before, after)
    assert httpx.get(guarded.url + "/v1/models", headers=bearer("k-body")).status_code == 200


def test_long_urls_and_big_websocket_messages_are_refused(guarded):
    # h11 (through uvicorn's h11_max_incomplete_event_size) refuses request heads that outgrow the limit: a 400,
    # or a reset when the server closes with the rest of the head unread
    try:
        r = httpx.get(guarded.url + "/v1/models", headers={**bearer("k-misc"), "X-Pad": "a" * (256 << 10)},
                      timeout=30)
        assert r.status_code in (400, 431)
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        pass
    assert httpx.get(guarded.url + "/v1/models", headers=bearer("k-misc")).status_code == 200
    from fewstep.server.cli import ws_max_size
    from fewstep.server.config import HTTPConfig, LimitsConfig

    with ws(guarded, "/v1/stream", "k-misc") as sock:
        sock.send("x" * (ws_max_size(HTTPConfig(), LimitsConfig()) + 1))  # a control message plus an input image
        with pytest.raises(ConnectionClosed) as e:
            sock.recv(timeout=30)
    assert e.value.rcvd.code == 1009  # message too big (uvicorn ws_max_size)


def test_http_needs_a_key_health_does_not(guarded):
    for headers in ({}, bearer("wrong"), {"Authorization": "k-auth"}):
        r = httpx.get(guarded.url + "/v1/models", headers=headers)
        assert r.status_code == 401, headers
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(guarded.url + "/v1/models", headers=bearer("k-auth")).status_code == 200
    assert httpx.get(guarded.url + "/v1/models?token=k-auth").status_code == 200  # <img src> and the like
    assert "k-auth" not in guarded.output()  # the access log prints the query without the key
    for path in ("/health", "/ready", "/metrics", "/"):
        assert httpx.get(guarded.url + path).status_code == 200, path
    bad = httpx.post(guarded.url + "/v1/videos", content=b"{not json", headers={
        **bearer("k-auth"), "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_request_ids(guarded):
    r = httpx.get(guarded.url + "/v1/models", headers={**bearer("k-auth"), "X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(guarded.url + "/v1/models", headers={**bearer("k-auth"), "X-Request-Id": "bad id; x"})
    assert len(r.headers["x-request-id"]) == 32  # not echoed: a fresh one


def test_websockets_need_a_key_and_a_known_origin(guarded):
    with pytest.raises(InvalidStatus) as e:
        ws(guarded, "/v1/stream")
    assert e.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as e:
        ws(guarded, "/v1/stream", "k-ws", additional_headers={"Origin": "http://evil.example"})
    assert e.value.response.status_code == 403
    assert json.loads(e.value.response.body)["error"]["code"] == "origin_not_allowed"
    own = guarded.url  # the page's own origin (same as Host), a listed one, and header auth all get in
    for token, headers in (("k-ws", {"Origin": own}), ("k-ws", {"Origin": "http://friend.example"}),
                           (None, bearer("k-ws"))):
        with ws(guarded, "/v1/stream", token, additional_headers=headers) as sock:
            sock.send(json.dumps({"type": "stop"}))
            assert json.loads(sock.recv(timeout=30))["code"] == "not_started"


def test_cors_only_for_the_configured_origin(guarded):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(guarded.url + "/v1/images/generations", headers={"Origin": "http://app.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    no = httpx.options(guarded.url + "/v1/images/generations", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in no.headers
    r = httpx.get(guarded.url + "/v1/models", headers={"Origin": "http://evil.example", **bearer("k-auth")})
    assert r.status_code == 403


def test_streams_per_key_are_limited(guarded):
    a, b = ws(guarded, "/v1/stream", "k-streams"), ws(guarded, "/v1/stream", "k-streams")
    try:
        with pytest.raises(InvalidStatus) as e:
            ws(guarded, "/v1/stream", "k-streams")
        assert e.value.response.status_code == 429 and int(e.value.response.headers["retry-after"]) > 0
        with httpx.stream("GET", guarded.url + "/v1/stream.mjpeg?prompt=x", headers=bearer("k-streams")) as r:
            assert r.status_code == 429  # (a 200 would be an endless body: never read it whole)
            assert json.loads(r.read())["error"]["code"] == "too_many_streams"
        with ws(guarded, "/v1/stream", "k-misc"):  # another key is not affected
            pass
    finally:
        a.close()
        b.close()
    deadline = time.time() + 30
    while True:  # the slot comes back once the server saw the close
        try:
            ws(guarded, "/v1/stream", "k-streams").close()
            break
        except InvalidStatus:
            assert time.time() < deadline
            time.sleep(0.2)


def test_requests_per_second_per_key(guarded):
    codes = [httpx.get(guarded.url + "/v1/models", headers=bearer("k-rate")) for _ in range(30)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert limited[0].json()["error"]["code"] == "rate_limited" and int(limited[0].headers["retry-after"]) >= 1
    assert httpx.get(guarded.url + "/v1/models", headers=bearer("k-misc")).status_code == 200


def test_idle_websocket_is_closed(guarded):
    with ws(guarded, "/v1/stream", "k-idle") as sock:
        with pytest.raises(ConnectionClosed) as e:
            sock.recv(timeout=IDLE_S + 30)
    assert e.value.rcvd.code == 4408


def test_sigterm_stops_streams_and_exits_within_the_grace(tiny_dir):
    grace = 3
    srv = ServerProcess(["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1",
                         "--shutdown-grace", str(grace)])
    try:
        sock = ws(srv, "/v1/stream")
        sock.send(json.dumps({"type": "start", "prompt": "a red circle", "fps": 4}))
        started = json.loads(sock.recv(timeout=30))
        assert started["type"] == "started"
        mjpeg = {"bytes": 0, "ended": False}

        def view():
            with httpx.stream("GET", srv.url + started["mjpeg_url"], timeout=60) as r:
                for chunk in r.iter_bytes():
                    mjpeg["bytes"] += len(chunk)
            mjpeg["ended"] = True

        viewer = threading.Thread(target=view, daemon=True)
        viewer.start()
        while not isinstance(sock.recv(timeout=30), bytes):
            pass
        while mjpeg["bytes"] == 0:
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        messages = []
        with pytest.raises(ConnectionClosed) as e:
            while True:
                m = sock.recv(timeout=30)
                if isinstance(m, str):
                    messages.append(json.loads(m))
        assert {"type": "stopped", "reason": "shutdown"}.items() <= messages[-1].items(), messages
        assert e.value.rcvd.code == 1001
        srv.proc.wait(timeout=grace + 5 + 5)  # the process bound is grace + 5 s; 5 s more for a loaded box
        viewer.join(10)
        assert mjpeg["ended"]
    finally:
        srv.stop()


def test_failed_load_makes_health_503_without_paths(tmp_path):
    bad = tmp_path / "secret-dir-name" / "m"
    bad.mkdir(parents=True)
    (bad / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([*FEWSTEP, "serve", "--port", str(port), "--model", str(bad), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 503:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]
        gen = httpx.post(url + "/v1/videos", json={"prompt": "x"})
        assert gen.status_code == 503
        for text in (r.text, ready.text, gen.text):
            assert "secret-dir-name" not in text and str(tmp_path) not in text
        log.seek(0)
        assert "secret-dir-name" in log.read()  # the details are in the log
    finally:
        proc.terminate()
        proc.wait(20)
