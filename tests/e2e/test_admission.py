"""Disconnects and deadlines against a real `fewstep serve`: work left behind by its client never runs. Both with the
engine in the server's process and in a process of its own (--engine-process: aborts cross ZeroMQ)."""

import re
import time

import httpx
import pytest

from tests.conftest import ServerProcess

IMAGES = "/v1/images/generations"


def _metric(text: str, pattern: str) -> float:
    m = re.search(pattern + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def server(tiny_dir, request):
    extra = ["--engine-process"] if request.param == "engine-process" else []
    srv = ServerProcess(["--model", str(tiny_dir / "sd_turbo"), "--device", "cpu", "--threads", "1",
                         "--max-batch-size", "16", "--max-wait-ms", "1", *extra])
    yield srv
    srv.stop()


def test_disconnected_and_late_requests_never_run(server):
    url = server.url
    with httpx.Client(base_url=url, timeout=120) as c:
        # a long batch occupies the engine thread: 16 images at 256², 2 steps (seconds on a CPU)
        import threading

        blocker: dict = {}
        t = threading.Thread(target=lambda: blocker.update(r=c.post(IMAGES, json={
            "prompt": "blocker", "size": "256x256", "n": 16, "num_inference_steps": 2, "output_format": "jpeg"},
            headers={"X-Fewstep-Deadline-Ms": "120000"})))
        t.start()
        deadline = time.time() + 30
        while _metric(c.get("/metrics").text, "fewstep_num_requests_running") < 16:
            assert time.time() < deadline, "the blocking batch never started"
            time.sleep(0.05)
        # four clients give up while their requests wait behind it (httpx closes the connection on timeout)
        for i in range(4):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + IMAGES, json={"prompt": f"left {i}", "size": "64x64"}, timeout=0.3)
        # one asks for a 300 ms deadline: 504 with a clear message, its work dropped unrun
        late = c.post(IMAGES, json={"prompt": "late", "size": "64x64"}, headers={"X-Fewstep-Deadline-Ms": "300"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
        t.join(120)
        assert blocker["r"].status_code == 200
        text = c.get("/metrics").text
        while _metric(text, r'fewstep_requests_cancelled_total\{model="sd_turbo",reason="disconnect",'
                            r'stage="queued"\}') < 4 and time.time() < deadline + 60:
            time.sleep(0.1)
            text = c.get("/metrics").text
    cancelled = r'fewstep_requests_cancelled_total\{model="sd_turbo",reason="%s",stage="queued"\}'
    assert _metric(text, cancelled % "disconnect") == 4
    assert _metric(text, cancelled % "deadline") == 1
    # only the blocker's 16 images were made, and only it was answered 200
    assert _metric(text, r'fewstep_images_generated_total\{model="sd_turbo"\}') == 16
    assert _metric(text, r'fewstep_requests_total\{model="sd_turbo",status="200"\}') == 1
    assert _metric(text, "fewstep_num_requests_waiting") == 0


def test_admission_errors_over_http(server):
    r = httpx.post(server.url + IMAGES, json={"prompt": "x", "size": "64x64"},
                   headers={"X-Fewstep-Deadline-Ms": "soon"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "deadline"
    r = httpx.post(server.url + IMAGES, json={"prompt": "x", "size": "1024x1024"}, timeout=30)
    assert r.status_code == 400 and "served sizes: any WxH with sides from 8 to 512" in r.json()["error"]["message"]
