"""`fewstep bench images` / `fewstep bench stream` as a new user runs them: against the embedded models with no
--size (the model's native size, from GET /v1/models), a live progress bar on stderr, a PNG plot next to the JSON,
and a report that names what ran. Few requests and frames: the point is the tool, not the numbers."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from tests.conftest import FEWSTEP, ServerProcess


@pytest.fixture(scope="module")
def embedded_server():
    """`fewstep serve` with no --model: both embedded models (64 px images, 32 px video). One intra-op thread: the
    bench client shares the cores."""
    srv = ServerProcess(["--device", "cpu", "--threads", "1"])
    yield srv
    srv.stop()


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*FEWSTEP, "bench", *args], capture_output=True, text=True, timeout=timeout)


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # decodes the whole image, not only the header
        assert im.format == "PNG"
        return im.size


def test_bench_images_native_size_progress_and_plot(embedded_server, tmp_path):
    out = tmp_path / "bench.json"
    p = _bench("images", embedded_server.url, "--num-requests", "3", "--warmup", "1", "--progress",
               "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())  # stdout/stderr never interleave with the JSON
    assert rep["completed"] == 3
    cfg = rep["config"]
    assert (cfg["size"], cfg["served_model"], cfg["model_default_steps"]) == ("64x64", "fewstep-default", 1)
    assert cfg["size_source"] == "native size of fewstep-default"
    # the live bar went to stderr: warm-up, then requests done / total with p50 so far
    assert "warm-up: 100%" in p.stderr and "3/3" in p.stderr and "p50 " in p.stderr
    assert "%|" not in p.stdout and "\r" not in p.stdout
    # the report says what ran
    for text in ("fewstep-default (server default)", "64x64 (native)", "1 (model default)", "1 / png",
                 "closed loop, concurrency 1", "1 (1 ok)"):
        assert text in p.stdout, (text, p.stdout)
    w, h = _png(tmp_path / "bench.png")
    assert w > 300 and h > 200
    assert "plot written to" in p.stderr


def test_bench_images_raw_image_answers(embedded_server, tmp_path):
    """--raw-image: Accept: image/jpeg, the body is the image, the server's timings come from Server-Timing."""
    out = tmp_path / "raw.json"
    p = _bench("images", embedded_server.url, "--num-requests", "3", "--warmup", "1", "--raw-image",
               "--output-format", "jpeg", "--no-progress", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())
    assert rep["completed"] == 3 and rep["failed"] == 0
    st = rep["server_timings"]
    assert {"queue_ms", "decode_ms", "total_ms"} <= set(st), st
    assert "serialize_ms" not in st  # no base64 on this path
    assert st["total_ms"]["mean"] > 0
    p = _bench("images", embedded_server.url, "--num-requests", "1", "--raw-image", "--n", "2", timeout=60)
    assert p.returncode == 2 and "--raw-image answers hold one image" in p.stderr


def test_bench_images_refuses_a_size_the_model_does_not_serve(embedded_server, tmp_path):
    p = _bench("images", embedded_server.url, "--size", "512x512", "--num-requests", "1", "--out",
               str(tmp_path / "x.json"), timeout=60)
    assert p.returncode == 2
    assert "--size 512x512 is not served by model 'fewstep-default'; served sizes: 64x64" in p.stderr
    assert not (tmp_path / "x.json").exists()   # refused before the run


def test_bench_stream_native_size_progress_and_plot(embedded_server, tmp_path):
    out = tmp_path / "stream.json"
    p = _bench("stream", embedded_server.url, "--sessions", "2", "--frames", "3", "--fps", "0", "--progress",
               "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())
    assert rep["sessions_completed"] == 2
    cfg = rep["config"]
    assert (cfg["model"], cfg["size"], cfg["fps"], cfg["fps_requested"]) == ("fewstep-default-video", "32x32", 0, 0)
    assert "6/6" in p.stderr and " fps, sessions " in p.stderr
    assert "default / model" not in p.stdout
    for text in ("fewstep-default-video", "32x32 (native)", "unpaced (0)", "2 x 3"):
        assert text in p.stdout, (text, p.stdout)
    _png(tmp_path / "stream.png")


def test_bench_stream_refuses_a_size_the_model_does_not_serve(embedded_server):
    p = _bench("stream", embedded_server.url, "--size", "64", "--frames", "1", timeout=60)
    assert p.returncode == 2
    assert "--size 64x64 is not served by model 'fewstep-default-video'; served sizes: 32x32" in p.stderr
