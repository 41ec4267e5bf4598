"""fewstep on Ray Serve, measured on this machine: ``fewstep bench ray autoscaling`` and ``fewstep bench ray scaling``.

autoscaling
    The app (server/ray.py, the embedded image model on the CPU) deployed with an autoscaler of 1 to 2 replicas, a
    small target of ongoing requests and short delays; clients drive load until a second replica serves, then stop.
    ``serve.status()`` is polled all along: the report holds the replica count over time (running, starting,
    stopping), every request (sent, done, status, the replica that answered), and the checks: the count went 1 -> 2
    under load and back to 1 after, no request was lost, and the new replica answered nothing before Ray counted it
    running (its constructor loads and warms the model: a response from it that completed while the status still
    showed it starting would be traffic during loading). JSON report and a plot (matplotlib).

scaling
    CPU throughput of 1 and then 2 replicas: for each count, ``fewstep serve --replicas N --model default --device
    cpu --threads 1`` (a Ray cluster of this machine; one intra-op thread per replica, so 2 replicas use 2 cores),
    then ``fewstep bench images`` against it at the same concurrency; one row per count (the bench's full report
    beside it) and a summary with the speed-up.

Both start Ray drivers from the temporary directory: Ray puts a driver's working directory on its workers' sys.path,
and a checkout's kernels/ folder would shadow PyPI's ``kernels`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from fewstep.clients.bench_util import git_commit

from .processes import cpu_model, fewstep_command, free_port

ROOT = Path(__file__).resolve().parent.parent


def _env(argv: list[str]) -> dict:
    import datetime as dt

    cpu = cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(where=ROOT), "cpu": cpu, "cores": os.cpu_count(),
            "load_average_at_start": load and [round(x, 2) for x in load],
            "command": shlex.join(["fewstep", "bench", "ray", *argv])}


# -- autoscaling ------------------------------------------------------------------------------------------------
def _replica_states() -> dict[str, int]:
    from ray import serve

    from fewstep.server.ray import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {}
    dep = app.deployments.get("FewstepReplica")
    return {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}


def autoscaling(args, argv: list[str]) -> dict:
    import ray
    from ray import serve

    from fewstep.server.ray import APP_NAME, build_app
    from fewstep.server.ray_routing import PROXY_CALLBACK

    env = _env(argv)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    cwd = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        ray.init(address=args.ray_address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    finally:
        os.chdir(cwd)
    options = {"server": {"model": "default", "engine": {"device": "cpu", "threads": args.threads}},
               "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": args.target,
                               "upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay,
                               "look_back_period_s": args.look_back},
               "graceful_shutdown_wait_loop_s": 0.2}
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    timeline: list[dict] = []
    requests: list[dict] = []
    t0 = time.perf_counter()
    stop_polling, stop_load = threading.Event(), threading.Event()
    lock = threading.Lock()

    def poll():
        while not stop_polling.is_set():
            t = time.perf_counter() - t0
            try:
                states = _replica_states()
            except Exception as e:  # noqa: BLE001 - a slow controller: the gap shows in the timeline
                states = {"error": repr(e)}
            timeline.append({"t": round(t, 3), **states})
            time.sleep(args.poll)

    def client(k: int):
        i = 0
        with httpx.Client(timeout=120) as c:
            while not stop_load.is_set():
                i += 1
                sent = time.perf_counter() - t0
                try:
                    r = c.post(url + "/v1/images/generations", json={"prompt": "a red circle", "seed": 1000 * k + i})
                    rec = {"status": r.status_code, "replica": r.headers.get("x-fewstep-replica")}
                except httpx.HTTPError as e:
                    rec = {"status": None, "error": repr(e), "replica": None}
                with lock:
                    requests.append({"sent": round(sent, 3), "done": round(time.perf_counter() - t0, 3), **rec})

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)  # returns once 1 runs
        deployed = time.perf_counter() - t0
        first = {httpx.get(url + "/health", timeout=30).headers.get("x-fewstep-replica")}
        load_start = time.perf_counter() - t0
        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        for c in clients:
            c.start()
        up_at = None
        while time.perf_counter() - t0 - load_start < args.max_load:
            if timeline and timeline[-1].get("RUNNING", 0) >= 2:
                up_at = up_at or time.perf_counter()
                if time.perf_counter() - up_at >= args.hold:
                    break
            time.sleep(0.1)
        stop_load.set()
        for c in clients:
            c.join(150)
        load_end = time.perf_counter() - t0
        down_at = None
        while time.perf_counter() - t0 - load_end < args.max_idle:
            last = timeline[-1] if timeline else {}
            if up_at and last.get("RUNNING", 0) == 1 and not any(last.get(s) for s in ("STARTING", "STOPPING")):
                down_at = time.perf_counter() - t0
                break
            time.sleep(0.1)
        stop_polling.set()
        poller.join(10)
    finally:
        try:
            serve.shutdown()  # the app, the controller and the proxies: the cluster is left as it was found
        finally:
            ray.shutdown()

    # the checks
    running = [p.get("RUNNING", 0) for p in timeline]
    new_ids = sorted({r["replica"] for r in requests if r["replica"]} - first)
    # polls during the scale-up (one running, one starting): a response from a new replica completed before one of
    # these polls began came from a replica still in its constructor
    starting_polls = [p["t"] for p in timeline if p.get("RUNNING", 0) == 1 and p.get("STARTING", 0) >= 1
                      and p["t"] > load_start]
    last_starting = max(starting_polls) if starting_polls else None
    early = [r for r in requests if r["replica"] in new_ids and last_starting is not None and r["done"] < last_starting]
    statuses: dict[str, int] = {}
    for r in requests:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    checks = {
        "one replica before the load": bool(running) and running[0] <= 1 and len(first) == 1,
        "two replicas under load": max(running, default=0) == 2,
        "one replica after the load": down_at is not None,
        "a new replica served": len(new_ids) >= 1,
        "no response from a replica before Ray counted it running": last_starting is not None and not early,
        "no request lost": all(r["status"] == 200 for r in requests),
    }
    report = {"env": env, "options": options, "clients": args.clients,
              "events_s": {"deployed": round(deployed, 2), "load_start": round(load_start, 2),
                           "two_running": up_at and round(up_at - t0, 2), "load_end": round(load_end, 2),
                           "one_running_again": down_at and round(down_at, 2),
                           "last_poll_with_a_replica_starting": last_starting},
              "first_replica": sorted(first), "new_replicas": new_ids, "statuses": statuses,
              "requests_per_replica": {rid: sum(r["replica"] == rid for r in requests)
                                       for rid in sorted({r["replica"] for r in requests if r["replica"]})},
              "early_responses": early, "checks": checks, "pass": all(checks.values()),
              "timeline": timeline, "requests": requests}
    return report


def plot_autoscaling(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    t = [p["t"] for p in tl]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for state, style in (("RUNNING", "-"), ("STARTING", "--"), ("STOPPING", ":")):
        ax.step(t, [p.get(state, 0) for p in tl], style, where="post", label=state.lower())
    ev = report["events_s"]
    for name in ("load_start", "load_end"):
        if ev.get(name) is not None:
            ax.axvline(ev[name], color="grey", lw=0.8)
            bx.axvline(ev[name], color="grey", lw=0.8)
    ax.set_ylabel("replicas")
    ax.set_yticks([0, 1, 2])
    ax.legend(loc="upper right")
    ax.set_title(f"fewstep on Ray Serve, autoscaling 1-2 replicas (CPU, {report['env']['git_commit']}, "
                 f"{report['env']['date_utc'][:10]})", fontsize=9)
    for rid in sorted(report["requests_per_replica"]):
        done = [r["done"] for r in report["requests"] if r["replica"] == rid]
        bx.plot(done, range(1, len(done) + 1), label=f"replica {rid}")
    bx.set_ylabel("images completed")
    bx.set_xlabel("seconds")
    bx.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- scaling -----------------------------------------------------------------------------------------------------
def _serve(n: int, port: int, threads: int, log: Path) -> subprocess.Popen:
    """``n`` Ray replicas behind Ray's proxy, or (``n`` 0) the single-process server without Ray: the baseline of
    what Ray adds."""
    replicas = ["--replicas", str(n)] if n else []
    cmd = [*fewstep_command(), "serve", *replicas, "--model", "default", "--device", "cpu", "--threads",
           str(threads), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    deadline, seen = time.time() + 600, set()
    while time.time() < deadline and len(seen) < max(n, 1):
        if proc.poll() is not None:
            raise RuntimeError(f"`{shlex.join(cmd)}` exited with {proc.returncode}; see {log}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
            if r.status_code == 200 and (n == 0 or "x-fewstep-replica" in r.headers):
                seen.add(r.headers.get("x-fewstep-replica", "single process"))
                continue
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    if len(seen) < max(n, 1):
        proc.terminate()
        raise TimeoutError(f"{len(seen)} of {n} replicas answered within 600 s; see {log}")
    return proc


def scaling(args, argv: list[str]) -> dict:
    out = Path(args.out)
    rows = []
    for n in args.replicas:
        port = free_port()
        proc = _serve(n, port, args.threads, out / f"serve_r{n}.log")
        try:
            report_path = out / f"images_r{n}.json"
            bench = [*fewstep_command(), "bench", "images", f"http://127.0.0.1:{port}", "--concurrency",
                     str(args.concurrency), "--num-requests", str(args.num_requests), "--warmup", str(args.warmup),
                     "--no-progress", "--out", str(report_path)]
            load = os.getloadavg()
            subprocess.run(bench, check=True, cwd=tempfile.gettempdir(), timeout=args.timeout)
        finally:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        rep = json.loads(report_path.read_text())
        rows.append({"replicas": n, "threads_per_replica": args.threads, "concurrency": args.concurrency,
                     "num_requests": rep.get("num_requests"), "completed": rep.get("completed"),
                     "failed": rep.get("failed"), "image_throughput": rep.get("image_throughput"),
                     "request_throughput": rep.get("request_throughput"), "latency_ms": rep.get("latency_ms"),
                     "load_average_before": [round(x, 2) for x in load], "report": report_path.name})
        print(f"[ray scaling] {n} replica(s): {rep.get('image_throughput')} images/s, "
              f"p50 {(rep.get('latency_ms') or {}).get('p50')} ms, {rep.get('failed')} failed", file=sys.stderr)
    base = rows[0]["image_throughput"] or 0
    summary = {"env": _env(argv), "model": "fewstep-default (embedded image model)", "rows": rows,
               "speedup_vs_first": [round((r["image_throughput"] or 0) / base, 3) if base else None for r in rows]}
    return summary


def plot_scaling(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(r["replicas"]) if r["replicas"] else "no Ray" for r in rows], [r["image_throughput"] or 0 for r in rows])
    ax.set_xlabel("replicas (1 intra-op thread each)")
    ax.set_ylabel("images/s")
    ax.set_title(f"Ray Serve on the CPU ({summary['env']['cores']} cores, {summary['env']['git_commit']}, "
                 f"{summary['env']['date_utc'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep bench ray", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = sub.add_parser("autoscaling", help="replica count over time under load, 1 -> 2 -> 1 (JSON report + plot)")
    a.add_argument("--out", required=True, help="folder for autoscaling.json and autoscaling.png")
    a.add_argument("--ray-address", default=None, help="a running Ray cluster with no Serve on it: the run starts "
                   "Serve there and shuts it down after (default: a Ray cluster of this machine for the run)")
    a.add_argument("--port", type=int, default=None, help="HTTP port of Ray's proxy (default: a free one)")
    a.add_argument("--clients", type=int, default=4, help="concurrent clients sending image requests (default 4)")
    a.add_argument("--target", type=float, default=1.0, help="target_ongoing_requests (default 1)")
    a.add_argument("--upscale-delay", type=float, default=1.0, help="upscale_delay_s (default 1)")
    a.add_argument("--downscale-delay", type=float, default=3.0, help="downscale_delay_s (default 3)")
    a.add_argument("--look-back", type=float, default=12.0, help="look_back_period_s: the window Ray averages "
                   "ongoing requests over (default 12; Ray's own: 30; Ray warns below its metrics interval, 10 s)")
    a.add_argument("--threads", type=int, default=1, help="intra-op threads per replica (default 1)")
    a.add_argument("--hold", type=float, default=5.0, help="seconds of load kept on once two replicas run (default 5)")
    a.add_argument("--max-load", type=float, default=240.0, help="give up on the scale-up after this many seconds "
                   "of load (default 240)")
    a.add_argument("--max-idle", type=float, default=120.0, help="give up on the scale-in after this many idle "
                   "seconds (default 120)")
    a.add_argument("--poll", type=float, default=0.25, help="seconds between serve.status() polls (default 0.25)")
    s = sub.add_parser("scaling", help="CPU throughput of 1 then 2 replicas (rows + plot)")
    s.add_argument("--out", required=True, help="folder for scaling.json, scaling.png, the bench reports and logs")
    s.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts, in order (default 1 2); 0: "
                   "the single-process server without Ray, the baseline of Ray's own overhead")
    s.add_argument("--threads", type=int, default=1, help="intra-op threads per replica (default 1)")
    s.add_argument("--concurrency", type=int, default=4, help="requests in flight, the same for every count "
                   "(default 4)")
    s.add_argument("--num-requests", type=int, default=200, help="measured requests per count (default 200)")
    s.add_argument("--warmup", type=int, default=8, help="uncounted warm-up requests per count (default 8)")
    s.add_argument("--timeout", type=float, default=3600, help="seconds one bench run may take (default 3600)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "autoscaling":
        report = autoscaling(args, argv)
        (out / "autoscaling.json").write_text(json.dumps(report, indent=1))
        plot_autoscaling(report, out / "autoscaling.png")
        print(json.dumps({k: report[k] for k in ("events_s", "statuses", "requests_per_replica", "checks", "pass")},
                         indent=1))
        return 0 if report["pass"] else 1
    summary = scaling(args, argv)
    (out / "scaling.json").write_text(json.dumps(summary, indent=1))
    plot_scaling(summary, out / "scaling.png")
    print(json.dumps({"rows": [{k: r[k] for k in ("replicas", "image_throughput", "completed", "failed")}
                               for r in summary["rows"]], "speedup_vs_first": summary["speedup_vs_first"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
