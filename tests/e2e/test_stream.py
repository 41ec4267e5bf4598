"""Streaming surfaces of a real `fewstep serve` subprocess on the tiny StreamDiT checkpoint, driven by the real
Python client and raw WebSockets: WS /v1/stream, MJPEG, POST /v1/videos, WS /v1/realtime, metrics, bench. The tests
on ``placed_stream_server`` run twice: with the engine in-process and with --engine-process."""

import argparse
import io
import json
import re
import socket
import statistics
import time

import httpx
import pytest

from PIL import Image
from websockets.sync.client import connect

from fewstep.clients.python import FewstepClient, parse_frame, ws_url

from tests.conftest import FEWSTEP


def metric(url: str, pattern: str, default: float | None = None) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(pattern + r" ([0-9.e+-]+)", text)
    if m is None:
        if default is not None:
            return default
        raise AssertionError(f"{pattern} not in /metrics")
    return float(m.group(1))


def wait_for(cond, timeout=15.0, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def recv_json(ws, type_: str, timeout=30.0) -> dict:
    """Next JSON message of the given type (frames and other messages in between are skipped)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg = ws.recv(timeout=max(deadline - time.time(), 0.01))
        if isinstance(msg, str):
            m = json.loads(msg)
            if m["type"] == type_:
                return m
    raise AssertionError(f"no {type_!r} message within {timeout}s")


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def placed_stream_server(request):
    """The tiny video model's server, with the engine in the server's process, then in a process of its own
    (--engine-process: sessions, updates, input frames, viewers and raw frames cross ZeroMQ)."""
    return request.getfixturevalue("stream_server" if request.param == "in-process" else "split_stream_server")


# ------------------------------------------------------------------------------------------------------------------
def test_300_frames_through_the_python_client_no_gaps_flat_timing(stream_server):
    """A real-time stream at a 40 fps target (the tiny model makes ~4x that on one CPU thread): every frame arrives,
    in order, and the per-frame time over the last 100 frames matches the first 100 (no sag from leaks, growing
    queues or drift). Paced rather than unpaced so that the check measures the server, not the neighbours of a
    shared CI box; `fewstep bench stream --fps 0` measures the unpaced throughput."""
    fps = 40.0
    frames = []
    with FewstepClient(stream_server.url) as client:
        t0 = time.perf_counter()
        with client.stream("a calm sea under a slow sky", seed=1, fps=fps) as s:
            assert s.info["fps"] == fps and s.info["chunk_frames"] == 2
            for f in s:
                frames.append(f)
                if len(frames) == 300:
                    s.stop()
        assert s.stopped is not None and s.stopped["reason"] == "stopped"
    frames = frames[:300]
    assert [f.index for f in frames] == list(range(300))  # no gaps: nothing dropped, nothing reordered
    assert all(f.format == "jpeg" and f.data[:2] == b"\xff\xd8" for f in frames)
    assert Image.open(io.BytesIO(frames[-1].data)).size == (32, 32)
    ttff = frames[0].received_at - t0
    gaps = [b.received_at - a.received_at for a, b in zip(frames, frames[1:])]
    first, last = statistics.fmean(gaps[:100]), statistics.fmean(gaps[-100:])
    print(f"\n300 frames at {fps:g} fps: ttff {ttff * 1e3:.0f} ms, per frame first-100 {first * 1e3:.2f} ms, "
          f"last-100 {last * 1e3:.2f} ms, delivered {299 / sum(gaps):.1f} fps")
    assert abs(last - first) <= 0.2 * first, (first, last)
    assert abs(299 / sum(gaps) - fps) <= 0.2 * fps  # and the stream kept its target rate


def test_abandoned_streams_release_sessions_and_memory(placed_stream_server):
    url = ws_url(placed_stream_server.url, "/v1/stream")

    def abandon(i: int) -> None:
        ws = connect(url, open_timeout=30)
        ws.send(json.dumps({"type": "start", "prompt": f"abandoned {i % 7}", "seed": i, "fps": 0}))
        assert json.loads(ws.recv(timeout=30))["type"] == "started"
        got = 0
        while got < 1 + i % 3:  # leave mid-stream, after one to three frames
            if isinstance(ws.recv(timeout=30), bytes):
                got += 1
        if i % 2:  # abruptly: no close frame, the TCP connection just goes
            ws.socket.shutdown(socket.SHUT_RDWR)
            ws.socket.close()
        else:  # politely, but without 'stop'
            ws.close()

    gauge = r"fewstep_active_sessions"
    for i in range(10):  # warm the allocator and the code paths first
        abandon(i)
    assert wait_for(lambda: metric(placed_stream_server.url, gauge) == 0)
    before = rss_bytes(placed_stream_server.proc.pid)
    t0 = time.perf_counter()
    for i in range(50):
        abandon(i)
    took = time.perf_counter() - t0
    assert wait_for(lambda: metric(placed_stream_server.url, gauge) == 0), "sessions left open"
    # no work continues for the abandoned sessions: the frame counter stands still
    generated = metric(placed_stream_server.url, r'fewstep_frames_generated_total\{model="stream_dit"\}')
    time.sleep(0.5)
    assert metric(placed_stream_server.url, r'fewstep_frames_generated_total\{model="stream_dit"\}') == generated
    after = rss_bytes(placed_stream_server.proc.pid)
    print(f"\n50 abandoned streams in {took:.1f} s; server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert after - before < 32 * 2**20, (before, after)


def test_two_sessions_get_only_their_own_frames(placed_stream_server):
    with FewstepClient(placed_stream_server.url) as client:
        with client.stream("the same prompt", seed=1, fps=0) as a, client.stream("the same prompt", seed=2,
                                                                                 fps=0) as b:
            assert a.session_id != b.session_id
            ia, ib = iter(a), iter(b)
            fa = [next(ia) for _ in range(10)]
            fb = [next(ib) for _ in range(10)]
            assert {f.session_id for f in fa} == {a.session_id} and {f.session_id for f in fb} == {b.session_id}
            assert not {f.data for f in fa} & {f.data for f in fb}  # different seeds: no frame in common
            a.stop()
            list(ia)  # a's frames still in flight, up to its "stopped"
            assert a.stopped["reason"] == "stopped"
            more = [next(ib) for _ in range(6)]  # b keeps going after a stopped
            assert [f.index for f in more] == list(range(more[0].index, more[0].index + 6))


def test_ws_protocol_errors_keep_the_socket_usable(placed_stream_server):
    with connect(ws_url(placed_stream_server.url, "/v1/stream"), open_timeout=30) as ws:
        ws.send("{not json")
        assert recv_json(ws, "error")["message"] == "message is not valid JSON"
        ws.send(json.dumps({"type": "bogus"}))
        e = recv_json(ws, "error")
        assert e["param"] == "type" and "'start', 'update', 'stop'" in e["message"]
        ws.send(json.dumps({"type": "update", "prompt": "x"}))
        assert recv_json(ws, "error")["code"] == "not_started"
        ws.send(json.dumps({"type": "start", "prompt": "x", "size": "30x30"}))
        e = recv_json(ws, "error")
        assert e["code"] == "invalid_size" and "multiple of 4" in e["message"]
        ws.send(json.dumps({"type": "start", "prompt": "  "}))
        assert "non-empty" in recv_json(ws, "error")["message"]
        ws.send(json.dumps({"type": "start", "prompt": "x", "fps": 5000}))
        assert recv_json(ws, "error")["param"] == "fps"
        ws.send(json.dumps({"type": "start", "prompt": "x", "seed": 5, "fps": 0, "format": "webp"}))
        started = recv_json(ws, "started")
        assert started["seed"] == 5 and len(started["session_id"]) >= 22 and started["frame_header_bytes"] == 24
        ws.send(json.dumps({"type": "start", "prompt": "x"}))
        assert recv_json(ws, "error")["code"] == "already_started"
        while not isinstance(msg := ws.recv(timeout=30), bytes):
            pass
        head, payload = parse_frame(msg), msg[24:]
        assert head.format == "webp" and payload[:4] == b"RIFF" and head.prompt_version == 0
        ws.send(json.dumps({"type": "update", "prompt": "y"}))
        assert recv_json(ws, "updated")["prompt"] == "y"
        while True:  # the update reaches the frames: the header's prompt version moves to 1
            msg = ws.recv(timeout=30)
            if isinstance(msg, bytes) and parse_frame(msg).prompt_version == 1:
                break
        ws.send(json.dumps({"type": "stop"}))
        stopped = recv_json(ws, "stopped")
        assert stopped["reason"] == "stopped" and stopped["frames_sent"] > 0
        ws.send(json.dumps({"type": "start", "prompt": "again", "fps": 0}))  # the socket is reusable
        assert recv_json(ws, "started")["session_id"] != started["session_id"]
        while not isinstance(msg := ws.recv(timeout=30), bytes):
            pass
        assert parse_frame(msg).index == 0  # the new session's frames, counted from 0


def test_stats_messages(placed_stream_server):
    with connect(ws_url(placed_stream_server.url, "/v1/stream"), open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "stats please", "fps": 16}))
        recv_json(ws, "started")
        st = recv_json(ws, "stats", timeout=10)
        assert st["frames_sent"] > 0 and st["ttff_ms"] > 0 and st["fps"] > 0 and st["batch_size"] >= 1
        assert st["frames_generated"] >= st["frames_sent"]


def test_fmp4_over_the_websocket(placed_stream_server):
    av = pytest.importorskip("av")
    with FewstepClient(placed_stream_server.url) as client:
        with client.stream("fragments", seed=3, fps=0, format="fmp4") as s:
            pieces = []
            for f in s:
                assert f.format == "fmp4"
                pieces.append(f.data)
                if len(pieces) == 8:
                    s.stop()
            assert s.mime and s.mime.startswith('video/mp4; codecs="avc1.')
    data = b"".join(pieces)
    assert data[4:8] == b"ftyp"
    with av.open(io.BytesIO(data)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 8


def test_mjpeg_of_an_open_session(placed_stream_server):
    with FewstepClient(placed_stream_server.url) as client, client.stream("mjpeg", seed=4, fps=0) as s:
        with httpx.stream("GET", placed_stream_server.url + s.info["mjpeg_url"], timeout=30) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=")
            buf = b""
            for piece in r.iter_bytes():
                buf += piece
                if buf.count(b"Content-Type: image/jpeg") >= 3:
                    break
        part = buf.split(b"\r\n\r\n", 1)[1]
        assert part[:2] == b"\xff\xd8"
        assert Image.open(io.BytesIO(part[: part.index(b"\xff\xd9") + 2])).size == (32, 32)
    r = httpx.get(placed_stream_server.url + "/v1/stream/not-a-session.mjpeg")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_mjpeg_with_its_own_session(placed_stream_server):
    with httpx.stream("GET", placed_stream_server.url + "/v1/stream.mjpeg", params={"prompt": "img tag", "fps": 0},
                      timeout=30) as r:
        assert r.status_code == 200 and "X-Fewstep-Seed" in r.headers
        buf = b""
        for piece in r.iter_bytes():
            buf += piece
            if buf.count(b"\xff\xd9") >= 2:
                break
    assert wait_for(lambda: metric(placed_stream_server.url, "fewstep_active_sessions") == 0)


def test_videos_returns_an_mp4_streamed_while_it_is_made(placed_stream_server):
    av = pytest.importorskip("av")
    counter = r'fewstep_frames_generated_total\{model="stream_dit"\}'
    gen0 = metric(placed_stream_server.url, counter, 0)
    n = 120
    pieces, generated_at_first_bytes = [], None
    t0 = time.perf_counter()
    with httpx.stream("POST", placed_stream_server.url + "/v1/videos", timeout=120,
                      json={"prompt": "waves", "num_frames": n, "size": 64, "seed": 3}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "video/mp4" and r.headers["x-fewstep-seed"] == "3"
        assert r.headers.get("transfer-encoding") == "chunked"
        for piece in r.iter_bytes():
            if not pieces:
                t_first = time.perf_counter()
                generated_at_first_bytes = metric(placed_stream_server.url, counter, 0) - gen0
            pieces.append(piece)
    t_end = time.perf_counter()
    print(f"\n/v1/videos {n} frames: first bytes {1e3 * (t_first - t0):.0f} ms, all {1e3 * (t_end - t0):.0f} ms, "
          f"{generated_at_first_bytes:.0f} frames made when the first bytes arrived")
    assert generated_at_first_bytes < n  # the first bytes came before the last frame was generated
    data = b"".join(pieces)
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name in ("h264", "vp9")
        frames = list(c.decode(video=0))
    assert len(frames) == n and frames[0].width == 64
    bad = httpx.post(placed_stream_server.url + "/v1/videos", json={"prompt": "x", "num_frames": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_frames"


def test_video_model_refuses_image_surfaces(placed_stream_server):
    r = httpx.post(placed_stream_server.url + "/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "video_model"
    assert "/v1/stream" in r.json()["error"]["message"]
    with FewstepClient(placed_stream_server.url) as client, client.realtime() as rt:
        rid = rt.send("x", request_id="one")
        m = rt.recv(timeout=30)
        assert m.type == "error" and m.request_id == rid and m.code == "video_model"
    models = httpx.get(placed_stream_server.url + "/v1/models").json()["data"]
    assert models[0]["kind"] == "video" and models[0]["chunk_frames"] == 2


def test_image_model_refuses_streams(tiny_server):
    with connect(ws_url(tiny_server.url, "/v1/stream"), open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "x"}))
        e = recv_json(ws, "error")
        assert e["code"] == "image_model" and "/v1/images/generations" in e["message"]
    r = httpx.post(tiny_server.url + "/v1/videos", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_model"
    r = httpx.get(tiny_server.url + "/v1/stream/whatever.mjpeg")
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_model"


def test_realtime_newest_input_wins(tiny_server):
    with FewstepClient(tiny_server.url) as client, client.realtime() as rt:
        ids = [rt.send(f"a red circle {i}", seed=i, size=64, request_id=f"r{i}") for i in range(6)]
        answers = {}
        while len(answers) < len(ids):
            m = rt.recv(timeout=60)
            assert m.request_id in ids and m.request_id not in answers  # exactly one answer per input
            answers[m.request_id] = m
        kinds = {rid: answers[rid].type for rid in ids}
        assert kinds["r5"] == "result"  # the newest input always wins
        assert list(kinds.values()).count("dropped") >= 3  # stale inputs were dropped, never generated
        assert set(kinds.values()) <= {"result", "dropped"}
        for rid in ids:
            if kinds[rid] == "result":
                img = Image.open(io.BytesIO(answers[rid].image))
                assert img.format == "JPEG" and img.size == (64, 64) and answers[rid].seed == int(rid[1:])
        # a bad message is answered and the socket stays usable
        rt._conn.send("{nope")
        assert rt.recv(timeout=30).type == "error"
        assert rt.generate("after an error", seed=1, size=64).type == "result"


def test_schema_and_page(stream_server):
    s = httpx.get(stream_server.url + "/v1/stream/schema").json()
    client_types = json.dumps(s["stream"]["client"])
    for t in ("start", "update", "stop"):
        assert f'"const": "{t}"' in client_types
    server_types = json.dumps(s["stream"]["server"])
    for t in ("started", "stats", "error", "stopped", "updated"):
        assert f'"const": "{t}"' in server_types
    assert s["stream"]["binary_frame"]["header_bytes"] == 24
    page = httpx.get(stream_server.url + "/")
    assert page.status_code == 200 and 'id="canvas"' in page.text and "/web/app.js" in page.text
    assert httpx.get(stream_server.url + "/web/app.js").headers["content-type"].startswith("text/javascript")
    assert "/web/style.css" in page.text  # the page's one stylesheet, served from the package (no CDN)
    assert httpx.get(stream_server.url + "/web/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(stream_server.url + "/web/..%2Fpython.py").status_code == 404


def test_bench_stream_reports(stream_server, tmp_path):
    from fewstep.server.cli import build_parser

    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "stream", stream_server.url, "--sessions", "2", "--frames", "20",
                                      "--fps", "0", "--out", str(out)])
    assert args.func(args) == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == "fewstep.bench.stream/v1"
    assert rep["sessions_completed"] == 2 and rep["frames_delivered"] >= 40 and rep["frames_dropped"] == 0
    for key in ("ttff_ms", "fps_per_session", "inter_frame_ms"):
        assert rep[key]["p50"] >= 0 and "p99" in rep[key]
    assert rep["aggregate_fps"] > 0
    assert [m["kind"] for m in rep["server_models"]] == ["video"]
    assert isinstance(args, argparse.Namespace)


def test_stream_metrics(placed_stream_server):
    with FewstepClient(placed_stream_server.url) as client, client.stream("metrics", fps=0) as s:
        it = iter(s)
        for _ in range(6):
            next(it)
        assert metric(placed_stream_server.url, "fewstep_active_sessions") >= 1
    u = placed_stream_server.url
    assert metric(u, r'fewstep_time_to_first_frame_seconds_count\{model="stream_dit"\}') > 0
    assert metric(u, r'fewstep_inter_frame_latency_seconds_count\{model="stream_dit"\}') > 0
    assert metric(u, r'fewstep_frames_generated_total\{model="stream_dit"\}') > 0
    assert metric(u, r'fewstep_stream_batch_sessions_count\{model="stream_dit"\}') > 0
    assert "fewstep_frames_dropped_total" in httpx.get(u + "/metrics").text
    assert wait_for(lambda: metric(u, "fewstep_active_sessions") == 0)


def test_async_client_stream_videos_and_realtime(placed_stream_server, tiny_server):
    import asyncio

    from fewstep.clients.python import AsyncFewstepClient

    async def main():
        async with AsyncFewstepClient(placed_stream_server.url) as client:
            stream = await client.stream("async frames", seed=9, fps=0)
            got = []
            async with stream:
                async for f in stream:
                    got.append(f.index)
                    if len(got) == 10:
                        await stream.update("async frames, later")
                    if len(got) == 20:
                        await stream.stop()
            assert got[:20] == list(range(20)) and stream.stopped["reason"] == "stopped"
            pieces = [p async for p in client.videos.stream("async clip", num_frames=6, seed=1)]
            assert b"".join(pieces)[4:8] == b"ftyp"
        async with AsyncFewstepClient(tiny_server.url) as client:
            rt = await client.realtime()
            async with rt:
                m = await rt.generate("async realtime", seed=2, size=64)
                assert m.type == "result" and m.image[:2] == b"\xff\xd8" and m.seed == 2

    asyncio.run(main())


def test_generate_cli_points_video_models_to_the_stream_api(tiny_dir, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([*FEWSTEP, "generate", "x", "--model",
                        str(tiny_dir / "stream_dit"), "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "video model" in r.stderr and "/v1/stream" in r.stderr


def test_leaving_the_loop_early_closes_fast(placed_stream_server):
    """Breaking out of `for frame in stream` leaves a full receive queue; closing must still be quick and must end
    the session on the server."""
    with FewstepClient(placed_stream_server.url) as client:
        s = client.stream("break early", fps=0)
        for f in s:
            if f.index == 2:
                break
        time.sleep(0.5)  # let the unread frames pile up in the client's queue
        t0 = time.perf_counter()
        s.close()
        assert time.perf_counter() - t0 < 3.0
        assert s.stopped is not None and s.stopped["reason"] == "stopped"
    assert wait_for(lambda: metric(placed_stream_server.url, "fewstep_active_sessions") == 0)
