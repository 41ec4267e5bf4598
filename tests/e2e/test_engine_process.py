"""`fewstep serve --engine-process`: the engine in a process of its own (engines/process.py), against a real server.
What crosses the ZeroMQ bridge (requests, input images, results, metrics, aborts, stream sessions and their frames)
gives the same answers as the in-process engine; the two processes start and stop together; a dead engine process is
reported, not hidden, and ends its streams with an error. Disconnects and deadlines through the bridge:
tests/e2e/test_admission.py; the stream surfaces (updates, MJPEG viewers, fMP4, videos, closing): tests/e2e/
test_stream.py (both parametrised over the two placements)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fewstep.clients.python import FewstepClient, ws_url

from tests.conftest import FEWSTEP, ROOT, ServerProcess
from tests.e2e.test_stream import metric, recv_json, wait_for

IMAGES = "/v1/images/generations"


def engine_children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` and whose command line runs the engine process module."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "fewstep.engines.process" in cmd:
            found.append(int(d.name))
    return found


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped


@pytest.fixture(scope="module")
def split_server(tiny_dir):
    srv = ServerProcess(["--model", str(tiny_dir / "sd_turbo"), "--device", "cpu", "--engine-process",
                         "--max-wait-ms", "20", "--max-queue-seconds", "120"])
    yield srv
    srv.stop()


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_the_engine_runs_in_its_own_process_and_answers_as_in_process(split_server, tiny_server):
    children = engine_children(split_server.proc.pid)
    assert len(children) == 1, children
    assert engine_children(tiny_server.proc.pid) == []  # the default: one process
    body = {"prompt": "a red circle", "n": 2, "size": "64x64", "seed": 7, "num_inference_steps": 2}
    with httpx.Client(timeout=120) as c:
        split = c.post(split_server.url + IMAGES, json=body)
        alone = c.post(tiny_server.url + IMAGES, json=body)
        assert split.status_code == 200, split.text
        assert [d["seed"] for d in split.json()["data"]] == [d["seed"] for d in alone.json()["data"]]
        # bit-identical images: the bridge moves bytes, it does not touch them
        assert [d["b64_json"] for d in split.json()["data"]] == [d["b64_json"] for d in alone.json()["data"]]
        t = split.json()["timings"]
        assert t["total_ms"] > 0 and "handoff_ms" in t and "queue_ms" in t
        # the raw answer (Accept: image/png) is the first image of the same request at n=1
        raw = c.post(split_server.url + IMAGES, json={**body, "n": 1}, headers={"Accept": "image/png"})
        assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
        assert raw.content == _png(split.json()["data"][0]["b64_json"])
        assert "denoise;dur=" in raw.headers["server-timing"]
        # image-to-image: the input picture crosses as raw pixels
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
        files = {"image": ("in.png", buf.getvalue(), "image/png")}
        form = {"prompt": "a red circle", "size": "64x64", "seed": "3", "strength": "0.5"}
        e1 = c.post(split_server.url + "/v1/images/edits", data=form, files=files)
        e2 = c.post(tiny_server.url + "/v1/images/edits", data=form, files=files)
        assert e1.status_code == 200, e1.text
        assert e1.json()["data"][0]["b64_json"] == e2.json()["data"][0]["b64_json"]
        # refusals made in the engine process keep their status, code and parameter
        bad = c.post(split_server.url + IMAGES, json={"prompt": "x", "size": "1024x1024"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
        models = c.get(split_server.url + "/v1/models").json()["data"]
        assert models[0]["id"] == "sd_turbo" and models[0]["sizes"] == \
            c.get(tiny_server.url + "/v1/models").json()["data"][0]["sizes"]
        metrics = c.get(split_server.url + "/metrics").text
    # the engine's own counters come back over the bridge into the server's /metrics
    assert float(re.search(r'fewstep_images_generated_total\{model="sd_turbo"\} ([0-9.]+)', metrics).group(1)) >= 4
    assert re.search(r'fewstep_batch_size_count\{model="sd_turbo"\} [1-9]', metrics), metrics[:2000]


def test_realtime_through_the_bridge(split_server):
    from websockets.sync.client import connect

    with connect(split_server.url.replace("http", "ws") + "/v1/realtime", open_timeout=30) as ws:
        for i in range(2):
            ws.send(json.dumps({"prompt": "a blue square", "seed": i, "request_id": str(i)}))
            msg = json.loads(ws.recv(timeout=60))
            assert msg["request_id"] == str(i) and msg.get("type") != "error", msg


def test_a_dead_engine_process_is_reported_and_sigterm_stops_the_server(tiny_dir):
    srv = ServerProcess(["--model", str(tiny_dir / "sd_turbo"), "--device", "cpu", "--engine-process"])
    try:
        (child,) = engine_children(srv.proc.pid)
        os.kill(child, signal.SIGKILL)
        deadline = time.time() + 10
        while httpx.get(srv.url + "/health", timeout=10).status_code == 200:
            assert time.time() < deadline, "/health stayed 200 with the engine process dead"
            time.sleep(0.1)
        h = httpx.get(srv.url + "/health", timeout=10)
        assert h.status_code == 503 and "engine process has stopped" in h.json()["error"]
        r = httpx.post(srv.url + IMAGES, json={"prompt": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
    finally:
        srv.stop()
    assert srv.proc.returncode is not None


def test_sigterm_stops_both_processes(tiny_dir):
    srv = ServerProcess(["--model", str(tiny_dir / "sd_turbo"), "--device", "cpu", "--engine-process"])
    (child,) = engine_children(srv.proc.pid)
    r = httpx.post(srv.url + IMAGES, json={"prompt": "x", "size": "64x64"}, timeout=60)
    assert r.status_code == 200
    srv.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal it handled once it has shut down gracefully: -15, after its last log line
    assert srv.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Finished server process" in srv.output()
    deadline = time.time() + 10
    while not gone(child):
        assert time.time() < deadline, "the engine process outlived the server"
        time.sleep(0.1)
    assert "engine process" in srv.output()


def test_what_engine_process_refuses_at_start():
    p = subprocess.run([*FEWSTEP, "serve", "--device", "cpu", "--engine-process", "--model", "default", "--replicas",
                        "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "--engine-process and --replicas do not combine" in p.stderr, p.stderr


# -- streams ---------------------------------------------------------------------------------------------------------
def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def stream_frames(url: str, n: int, still: bytes | None = None, **start) -> dict[int, bytes]:
    """The first ``n`` frames of a stream (index -> bytes), then 'stop'. ``still``: a frames-input stream of that one
    input frame (so that every chunk starts from the same picture, whatever the timing)."""
    got = {}
    with FewstepClient(url) as client, client.stream(**start, **({"input": "frames"} if still else {})) as s:
        if still:
            s.send_frame(still)
        for f in s:
            got[f.index] = f.data
            if len(got) == n:
                s.stop()
    return dict(list(got.items())[:n])


def test_streams_through_the_bridge_give_the_in_process_frames(split_stream_server, stream_server):
    """Same seed and prompt: the same frames, byte for byte (the engine process ships raw pixels; both servers
    encode them with the same encoder), for text and frames input; and the same clip from POST /v1/videos."""
    av = pytest.importorskip("av")
    assert len(engine_children(split_stream_server.proc.pid)) == 1
    square = np.zeros((32, 32, 3), np.uint8)
    square[12:20, 4:12] = 255
    for start in ({"prompt": "a calm sea", "seed": 11, "fps": 16},
                  {"prompt": "a calm sea", "seed": 12, "fps": 16, "format": "webp"},
                  {"prompt": "a white square", "seed": 2, "fps": 16, "still": _jpeg(square), "strength": 0.5}):
        split = stream_frames(split_stream_server.url, 12, **start)
        alone = stream_frames(stream_server.url, 12, **start)
        both = sorted(split.keys() & alone.keys())
        assert both == list(range(12)), (sorted(split), sorted(alone))  # paced: nothing dropped
        assert [split[i] for i in both] == [alone[i] for i in both], start
        assert len({split[i] for i in both}) > 1  # a moving stream, not one frame repeated
    clip = {"prompt": "waves", "num_frames": 10, "size": 32, "seed": 3}
    with httpx.Client(timeout=120) as c:
        a = c.post(split_stream_server.url + "/v1/videos", json=clip)
        b = c.post(stream_server.url + "/v1/videos", json=clip)
    assert a.status_code == 200 and a.headers["x-fewstep-seed"] == "3", a.text[:200]

    def decoded(data: bytes) -> list[np.ndarray]:
        with av.open(io.BytesIO(data)) as f:
            return [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]

    fa, fb = decoded(a.content), decoded(b.content)
    assert len(fa) == 10 and all(np.array_equal(x, y) for x, y in zip(fa, fb))


def test_closing_a_stream_frees_its_session_in_the_engine_process(split_stream_server):
    url = split_stream_server.url
    gauge = "fewstep_active_sessions"
    with connect(ws_url(url, "/v1/stream"), open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "closing", "fps": 8}))
        recv_json(ws, "started")
        while not isinstance(ws.recv(timeout=30), bytes):
            pass
        assert metric(url, gauge) == 1  # the engine process's count, over the bridge
    assert wait_for(lambda: metric(url, gauge) == 0), "the session outlived its socket"
    # nothing runs for it any more: the engine's frame counter stands still
    generated = metric(url, r'fewstep_frames_generated_total\{model="stream_dit"\}')
    time.sleep(0.5)
    assert metric(url, r'fewstep_frames_generated_total\{model="stream_dit"\}') == generated


def test_a_dead_engine_process_ends_its_streams_with_an_error(tiny_dir):
    srv = ServerProcess(["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1",
                         "--engine-process"])
    try:
        with connect(ws_url(srv.url, "/v1/stream"), open_timeout=30) as ws:
            ws.send(json.dumps({"type": "start", "prompt": "doomed", "fps": 8}))
            recv_json(ws, "started")
            while not isinstance(ws.recv(timeout=30), bytes):
                pass
            (child,) = engine_children(srv.proc.pid)
            os.kill(child, signal.SIGKILL)
            err = recv_json(ws, "error")
            assert err["code"] == "engine_stopped" and "reconnect" in err["message"], err
            assert recv_json(ws, "stopped")["reason"] == "error"
            ws.send(json.dumps({"type": "start", "prompt": "again"}))  # the socket still answers: no new streams
            assert recv_json(ws, "error")["code"] == "engine_stopped"
        h = httpx.get(srv.url + "/health", timeout=10)
        assert h.status_code == 503 and "engine process has stopped" in h.json()["error"]
        r = httpx.post(srv.url + "/v1/videos", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
    finally:
        srv.stop()


def test_sigterm_ends_open_streams_and_stops_both_processes(tiny_dir):
    srv = ServerProcess(["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1",
                         "--engine-process"])
    try:
        (child,) = engine_children(srv.proc.pid)
        with connect(ws_url(srv.url, "/v1/stream"), open_timeout=30) as ws:
            ws.send(json.dumps({"type": "start", "prompt": "until the end", "fps": 8}))
            recv_json(ws, "started")
            while not isinstance(ws.recv(timeout=30), bytes):
                pass
            srv.proc.send_signal(signal.SIGTERM)
            messages = []
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    m = ws.recv(timeout=30)
                    if isinstance(m, str):
                        messages.append(json.loads(m))
            assert {"type": "stopped", "reason": "shutdown"}.items() <= messages[-1].items(), messages
            assert e.value.rcvd.code == 1001
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        assert wait_for(lambda: gone(child), timeout=10), "the engine process outlived the server"
    finally:
        srv.stop()

