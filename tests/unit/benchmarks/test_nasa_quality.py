"""`fewstep bench nasa-quality --video`: the embedded video model's streams with and without the negative prompt,
scored per frame (a tiny run: the tool, not its figures)."""

import json
import subprocess

from PIL import Image

from tests.conftest import FEWSTEP


def test_video_run_writes_rows_and_grid(tmp_path):
    out, grid = tmp_path / "nasa_video.json", tmp_path / "grid.png"
    r = subprocess.run([*FEWSTEP, "bench", "nasa-quality", "--video", "--n", "2", "--frames", "2", "--alphas", "2",
                        "--nag", "3:2.5:0.5", "--threads", "1", "--grid-rows", "2", "--out", str(out), "--grid", str(grid)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["video"] is True and data["meta"]["frames"] == 2
    assert [row["setting"] for row in data["rows"]] == ["none", "nasa 2", "nag 3/2.5/0.5"]
    assert data["rows"][2]["nag"] == [3.0, 2.5, 0.5] and data["rows"][2]["nasa_scale"] is None
    for row in data["rows"]:
        assert 0.0 <= row["red_object_share"] <= 1.0 and 0.0 <= row["adherence"]["accuracy"] <= 1.0
        assert row["objects_per_frame"] > 0  # the detector found the streamed objects
    with Image.open(grid) as im:
        assert im.size[0] == 3 * 32 * 4  # three settings, 32 px frames at 4x


def test_bad_nag_setting_is_refused():
    r = subprocess.run([*FEWSTEP, "bench", "nasa-quality", "--nag", "3:2.5"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "phi:tau:alpha" in r.stdout + r.stderr
