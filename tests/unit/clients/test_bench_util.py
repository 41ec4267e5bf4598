"""fewstep.clients.bench_util: sizes from model cards, when the progress bar draws, the plot without matplotlib."""

from __future__ import annotations

import argparse
import io
import sys

import pytest
from PIL import Image

from fewstep.clients import bench_util
from fewstep.clients.bench import RequestRecord, add_images_args, run_images_bench
from fewstep.clients.bench_util import pick_card, progress_enabled, resolve_size, served_sizes, size_served

IMG = {"id": "img", "kind": "image", "default_size": 64, "sizes": "64x64", "default_steps": 1}
VID = {"id": "vid", "kind": "video", "default_size": 32, "sizes": "32x32, 48x32", "fps": 8.0}
RANGE = {"id": "r", "kind": "image", "default_size": 500,
         "sizes": "96x64, any WxH with sides from 256 to 1024 px in steps of 64"}


def test_served_sizes_parses_describe_text():
    assert served_sizes("64x64") == ([(64, 64)], None)
    assert served_sizes(RANGE["sizes"]) == ([(96, 64)], (256, 1024, 64))
    assert served_sizes("any WxH with sides from 16 to 32 px") == ([], (16, 32, 1))
    assert size_served(RANGE["sizes"], 512, 768) and not size_served(RANGE["sizes"], 500, 512)
    assert size_served(None, 1, 1) is None   # a card that says nothing: no refusal


def test_pick_card_and_resolve_size():
    assert pick_card([IMG, VID], None, "image") is IMG and pick_card([IMG, VID], None, "video") is VID
    assert pick_card([VID, IMG], "img", "video") is IMG and pick_card([IMG], "nope", "image") is None
    assert pick_card(None, None, "image") is None
    assert resolve_size(IMG, None, fallback="512x512") == ("64x64", "native size of img")
    assert resolve_size(VID, "48x32", fallback=None) == ("48x32", "--size")
    assert resolve_size(VID, "32", fallback=None) == ("32x32", "--size")
    # native 500 is not served: the first listed size, as the server's own default
    assert resolve_size(RANGE, None, fallback=None)[0] == "96x64"
    assert resolve_size(None, None, fallback="512x512")[0] == "512x512"
    assert resolve_size({"id": "x"}, "640x480", fallback=None) == ("640x480", "--size")
    with pytest.raises(ValueError, match=r"--size 512x512 is not served by model 'img'; served sizes: 64x64"):
        resolve_size(IMG, "512x512", fallback=None)
    with pytest.raises(ValueError, match="WxH"):
        resolve_size(IMG, "big", fallback=None)


def test_progress_on_only_when_forced_or_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_enabled(None, Tty()) and not progress_enabled(None, io.StringIO())
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, Tty())


def _args(url, *extra):
    p = argparse.ArgumentParser()
    add_images_args(p)
    return p.parse_args([url, "--num-requests", "4", "--warmup", "0", *extra])


def test_images_progress_on_stderr_only(server, tmp_path, capsys):
    run_images_bench(_args(server.url, "--progress"))
    cap = capsys.readouterr()
    assert "requests: 100%" in cap.err and "4/4" in cap.err and "p50 " in cap.err
    assert "%|" not in cap.out and "\r" not in cap.out and "Successful requests" in cap.out
    # the fake server lists no sizes: the OpenAI-compatible fallback, said where it came from
    assert server.bodies[-1]["size"] == "512x512" and "not listed by the server" in cap.err
    run_images_bench(_args(server.url))   # stderr is not a terminal here: no bar
    assert "%|" not in capsys.readouterr().err


def test_plot_written_and_missing_matplotlib_is_said(server, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    run_images_bench(_args(server.url, "--out", str(out), "--no-progress"))
    with Image.open(tmp_path / "r.png") as im:
        im.load()
    (tmp_path / "r.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # import fails as if not installed
    run_images_bench(_args(server.url, "--out", str(out), "--no-progress"))
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert out.exists() and not (tmp_path / "r.png").exists()


def test_images_figure_draws_failures_only_run():
    recs = [RequestRecord(0, 0.0, 5.0, False, 503, "503", "busy")]
    rep = {"config": {"size": "64x64"}, "completed": 0, "failed": 1, "request_throughput": 0.0, "latency_ms": None}
    assert bench_util.images_figure(rep, recs) is not None


def test_git_commit_prefers_the_commit_a_copied_tree_is_given(monkeypatch, tmp_path):
    from fewstep.clients.bench_util import git_commit

    monkeypatch.setenv("FEWSTEP_COMMIT", "0123abc")
    assert git_commit(where=tmp_path) == "0123abc"
    monkeypatch.delenv("FEWSTEP_COMMIT")
    assert git_commit(where=tmp_path) is None  # not a checkout
