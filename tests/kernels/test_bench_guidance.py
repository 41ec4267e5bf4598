"""`fewstep bench guidance --cpu-smoke`: every code path of the GPU benchmark runs (Triton interpreter, tiny shapes),
checks its kernels against the references and writes its JSON rows."""

import json
import subprocess

from tests.conftest import FEWSTEP


def test_cpu_smoke_writes_rows(tmp_path):
    r = subprocess.run([*FEWSTEP, "bench", "guidance", "--cpu-smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "bench_guidance.json").read_text())
    assert data["failures"] == []
    providers = {(row["section"], row["provider"]) for row in data["rows"]}
    assert providers == {("cfg", "torch"), ("cfg", "fused"), ("adapter", "torch"), ("adapter", "fused"),
                         ("adapter", "linear_only"), ("nasa", "torch"), ("nasa", "fused"),
                         ("nasa", "sdpa_positive_only"), ("nag", "torch"), ("nag", "fused"),
                         ("nag", "fused_plain_nasa")}
    assert all(row["ok"] for row in data["rows"])
