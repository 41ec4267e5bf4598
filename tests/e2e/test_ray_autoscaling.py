"""Ray Serve's autoscaler on the app (server/ray.py), observed live on a real local Ray cluster: `fewstep bench ray
autoscaling` deploys the embedded image model with 1 to 2 replicas (target 1 ongoing request, short delays), four
clients drive load until a second replica serves, then stop; the replica count comes from serve.status() polls."""

import json
import subprocess

import pytest

from tests.conftest import FEWSTEP

pytestmark = pytest.mark.slow


def test_autoscaling_one_two_one(ray_cluster, tmp_path):
    p = subprocess.run([*FEWSTEP, "bench", "ray", "autoscaling", "--ray-address", ray_cluster.address, "--out",
                        str(tmp_path), "--hold", "3", "--max-load", "150", "--max-idle", "90"],
                       capture_output=True, text=True, timeout=420)
    report = json.loads((tmp_path / "autoscaling.json").read_text())
    print(p.stdout[-2000:], p.stderr[-2000:])
    print({k: report[k] for k in ("events_s", "statuses", "requests_per_replica")})
    running = [s.get("RUNNING", 0) for s in report["timeline"]]
    # the count over time, with repeats removed: 0 (loading) -> 1 -> 2 under load -> 1 after
    steps = [n for i, n in enumerate(running) if i == 0 or n != running[i - 1]]
    assert steps[-3:] == [1, 2, 1], steps
    assert report["statuses"] == {"200": len(report["requests"])}, report["statuses"]
    first, new = set(report["first_replica"]), set(report["new_replicas"])
    assert len(first) == 1 and len(new) == 1 and not first & new
    # while the status still showed the second replica starting (its constructor loading and warming the model),
    # no response came from it: every one of its responses completed after the last such poll began
    starting = [s["t"] for s in report["timeline"] if s.get("RUNNING", 0) == 1 and s.get("STARTING", 0) >= 1
                and s["t"] > report["events_s"]["load_start"]]
    assert starting, "the scale-up was not seen starting"
    from_new = [r["done"] for r in report["requests"] if r["replica"] in new]
    assert from_new and min(from_new) > max(starting)
    assert p.returncode == 0, p.stderr[-3000:]
