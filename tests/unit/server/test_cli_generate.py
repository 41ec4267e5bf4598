"""`fewstep generate -o`: numbered file names for -n > 1, and the format taken from the extension."""

import subprocess
from pathlib import Path

import pytest

from fewstep.server.cli import _output_paths
from tests.conftest import FEWSTEP


@pytest.mark.parametrize("output, expected", [
    ("./x.png", ["x-0.png", "x-1.png"]),
    ("out", ["out-0", "out-1"]),
    ("./a.b/x.png", ["a.b/x-0.png", "a.b/x-1.png"]),
    ("dir/x.tar.webp", ["dir/x.tar-0.webp", "dir/x.tar-1.webp"]),
])
def test_numbered_output_paths_keep_the_suffix_last(output, expected):
    assert _output_paths(output, 2) == [Path(e) for e in expected]
    assert _output_paths(output, 1) == [Path(output)]


def test_unsupported_extension_is_refused_before_loading(tmp_path):
    # a model directory that does not exist: the extension check must answer first
    r = subprocess.run([*FEWSTEP, "generate", "x", "-o", str(tmp_path / "x.gif"), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "'.gif'" in r.stderr and ".png, .jpg, .jpeg, .webp" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.gif").exists()


def test_generate_two_images_into_a_dotted_folder(tiny_dir, tmp_path):
    out = tmp_path / "a.b"
    out.mkdir()
    r = subprocess.run([*FEWSTEP, "generate", "x", "-n", "2", "-o", str(out / "x.jpg"), "--model",
                        str(tiny_dir / "sd_turbo"), "--device", "cpu", "--seed", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x-0.jpg", "x-1.jpg"]
    assert (out / "x-0.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, as the extension asked
