"""`fewstep bench reliability --quick`: every scenario against real servers, run as a user runs it, and the
pass/fail fields of the report it writes."""

import json
import subprocess

from tests.conftest import FEWSTEP, ROOT


def test_reliability_quick(tmp_path):
    out = tmp_path / "rel"
    proc = subprocess.run([*FEWSTEP, "bench", "reliability", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "reliability.json").read_text())
    md = (out / "report.md").read_text()
    scenarios = report["scenarios"]
    assert set(scenarios) == {"bad_inputs", "overload", "give_up", "stream_churn", "big_body", "sigterm", "keys"}
    for name, res in scenarios.items():
        assert "error" not in res, (name, res.get("error"), proc.stderr[-3000:])
        assert isinstance(res["pass"], bool) and res["goals"], name
        assert res["pass"] == all(res["goals"].values()), name
        assert f"## {name}: " in md
    assert report["pass"] == all(r["pass"] for r in scenarios.values())
    assert proc.returncode == (0 if report["pass"] else 1)
    env = report["env"]
    assert env["cpu"] and env["cores"] and env["versions"]["torch"] and env["command"].startswith(
        "fewstep bench reliability")

    # the goals every server must meet whatever the machine (the latency goals depend on the box: reported only)
    bad = scenarios["bad_inputs"]
    assert bad["distinct"] >= 200 and bad["responses_5xx"] == 0 and bad["server_tracebacks"] == 0, bad["failures"]
    assert bad["failed"] == 0, bad["failures"]
    assert bad["health_after"] == 200 and bad["good_request_after"] == 200
    give_up = scenarios["give_up"]
    assert give_up["goals"]["0 abandoned requests run on the engine (none started after its client left)"], give_up
    assert scenarios["stream_churn"]["active_sessions_after"] == 0
    assert scenarios["big_body"]["status"] == 413
    assert scenarios["keys"]["pass"], scenarios["keys"]["goals"]
    sig = scenarios["sigterm"]
    assert sig["goals"]["every stream got 'stopped' (shutdown) and close 1001"], sig["streams"]
    assert sig["exit_s"] <= sig["bound_s"]
