"""Video-to-video streams and image-to-image over the WebSockets, against a real `fewstep serve`: the embedded default
video model stylises frames a Python client sends (``"input": "frames"``); bad binary frames get ``error`` and the
socket stays usable; /v1/realtime takes an ``image``. The frames stream runs in-process and with --engine-process."""

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect

from fewstep.clients.python import FewstepClient, FewstepError, pack_input_frame, ws_url

from tests.conftest import ServerProcess

SIZE = 32
PERIOD = 24  # input frames per left-to-right sweep


def square_frame(t: int) -> np.ndarray:
    """A bright square on black, moving left to right by ~1 px per frame and wrapping every PERIOD frames."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    x = round(2 + (t % PERIOD) * 22 / (PERIOD - 1))
    img[12:20, x: x + 8] = 255
    return img


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def bright_centroid_x(img: np.ndarray) -> float:
    """x of the centroid of the frame's brightest part (above the midpoint of its own range)."""
    g = img.astype(float).mean(-1)
    w = np.clip(g - (g.min() + g.max()) / 2, 0, None)
    return float((w.sum(0) * np.arange(g.shape[1])).sum() / max(w.sum(), 1e-9))


def follows(inputs: list[float], outputs: list[float], max_lag: int = 16) -> tuple[float, int, float]:
    """(best correlation of the output centroids with the input centroids some frames earlier, that lag, the
    output centroids' spread). A stream that ignores its input fails it: its centroid neither spans the sweep nor
    wraps back with it."""
    best = (-1.0, 0)
    out = np.array(outputs)
    for lag in range(max_lag + 1):
        lagged = np.array([inputs[max(i - lag, 0)] for i in range(len(out))])
        if out.std() > 0 and lagged.std() > 0:
            best = max(best, (float(np.corrcoef(out, lagged)[0, 1]), lag))
    return best[0], best[1], float(np.percentile(out, 90) - np.percentile(out, 10))


@pytest.fixture(scope="module")
def video_server():
    srv = ServerProcess(["--model", "default-video", "--device", "cpu", "--threads", "1"])
    yield srv
    srv.stop()


def stream_moving_square(url: str, frames: int = 64, strength: float = 0.6) -> tuple[list[float], list[float]]:
    """Stream the moving square (one new input frame per output frame received) and return the input centroid of
    every output frame's index and the output centroids."""
    ins, outs = [], []
    with FewstepClient(url) as client:
        with client.stream("a white square on a black background", seed=2, fps=0, input="frames",
                           strength=strength) as s:
            t = 0
            s.send_frame(jpeg(square_frame(t)))  # output starts with the first input frame
            for f in s:
                img = np.asarray(Image.open(io.BytesIO(f.data)).convert("RGB"))
                assert img.shape == (SIZE, SIZE, 3)
                outs.append(bright_centroid_x(img))
                ins.append(bright_centroid_x(square_frame(t)))
                t += 1
                s.send_frame(jpeg(square_frame(t)))
                if len(outs) >= frames:
                    s.stop()
    return ins, outs


@pytest.fixture(scope="module")
def split_video_server():
    """As ``video_server``, with --engine-process: input frames and output frames cross ZeroMQ as raw pixels."""
    srv = ServerProcess(["--model", "default-video", "--device", "cpu", "--threads", "1", "--engine-process"])
    yield srv
    srv.stop()


@pytest.mark.parametrize("placement", ["in-process", "engine-process"])
def test_output_frames_follow_the_input_frames(placement, request):
    srv = request.getfixturevalue("video_server" if placement == "in-process" else "split_video_server")
    ins, outs = stream_moving_square(srv.url)
    corr, lag, spread = follows(ins, outs)
    # the square sweeps ~22 px; the output's bright region moves with it, some frames later (the buffer's depth)
    assert corr > 0.7 and spread > 8, (corr, lag, spread, [round(o, 1) for o in outs])


def test_bad_binary_frames_get_an_error_and_the_socket_stays_usable(video_server):
    with connect(ws_url(video_server.url, "/v1/stream"), open_timeout=30) as ws:
        ws.send(jpeg(square_frame(0)))  # binary before any start
        assert "input" in recv(ws, "error")["message"]
        ws.send(json.dumps({"type": "start", "prompt": "a white square", "fps": 0}))  # a text stream
        recv(ws, "started")
        ws.send(pack_input_frame(jpeg(square_frame(0)), 0))
        assert '"input": "frames"' in recv(ws, "error")["message"]
        ws.send(json.dumps({"type": "stop"}))
        recv(ws, "stopped")

        ws.send(json.dumps({"type": "start", "prompt": "a white square", "fps": 0, "input": "frames",
                            "strength": 0.5}))
        recv(ws, "started")
        good = pack_input_frame(jpeg(square_frame(0)), 0)
        bad = [(b"short", "24-byte header"), (b"XXXX" + good[4:], "starts with"),
               (good[:5] + bytes([3]) + good[6:], "payload type"),
               (good[:24] + b"not a jpeg", "could not be read")]
        for data, message in bad:
            ws.send(data)
            err = recv(ws, "error")
            assert message in err["message"] and err["code"] == "invalid_frame", err
        ws.send(good)  # the socket still works: frames come once a good input arrived
        frame = recv_binary(ws)
        assert frame[:4] == b"FSTR"
        ws.send("x" * (65 << 10))  # past http.ws_max_bytes: uvicorn takes it (room for images), the route refuses
        assert recv(ws, "error")["code"] == "message_too_big"
        ws.send(json.dumps({"type": "update", "strength": 0.3}))
        assert recv(ws, "updated")["strength"] == 0.3
        ws.send(json.dumps({"type": "update", "strength": 0}))
        assert recv(ws, "error")["param"] == "strength"


def test_realtime_image_to_image():
    """/v1/realtime with an image on an image model: answered, and a bad image is an error for that input only."""
    srv = ServerProcess(["--model", "default", "--device", "cpu", "--threads", "1"])
    try:
        src = np.full((64, 64, 3), 255, np.uint8)
        src[16:48, 16:48] = (220, 30, 30)
        buf = io.BytesIO()
        Image.fromarray(src).save(buf, format="PNG")
        with FewstepClient(srv.url) as client:
            rt = client.realtime()
            low = rt.generate("a red square", image=buf.getvalue(), strength=0.2, seed=1, format="png")
            out = np.asarray(Image.open(io.BytesIO(low.image)).convert("RGB")).astype(int)
            t2i = rt.generate("a red square", seed=1, format="png")
            free = np.asarray(Image.open(io.BytesIO(t2i.image)).convert("RGB")).astype(int)
            # at strength 0.2 the answer keeps the input's picture far better than a text-to-image sample does
            assert np.abs(out - src).mean() < 0.5 * np.abs(free - src).mean()
            with pytest.raises(FewstepError, match="base64"):  # answered for that input; the socket stays open
                rt.generate("a red square", image_b64="%%% not base64")
            data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            again = rt.generate("a red square", image_b64=data_url, strength=0.2, seed=1, format="png")
            assert again.image == low.image  # a data URL is the same input; same seed, same answer
            rt.close()
    finally:
        srv.stop()


def recv(ws, type_: str, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg = ws.recv(timeout=max(deadline - time.time(), 0.01))
        if isinstance(msg, str) and json.loads(msg)["type"] == type_:
            return json.loads(msg)
    raise AssertionError(f"no {type_!r} message within {timeout}s")


def recv_binary(ws, timeout: float = 60.0) -> bytes:
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg = ws.recv(timeout=max(deadline - time.time(), 0.01))
        if isinstance(msg, bytes):
            return msg
    raise AssertionError(f"no binary frame within {timeout}s")
