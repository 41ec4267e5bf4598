"""fewstep.clients.bench against a real (tiny, in-process) HTTP server. No speed asserts."""

from __future__ import annotations

import argparse
import asyncio
import json

from fewstep.clients.bench import (
    SCHEMA,
    ImagesBenchConfig,
    add_images_args,
    bench_images,
    run_images_bench,
)


def _ordered(lat: dict) -> bool:
    return lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_closed_loop_cli_report(server, tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    parser = argparse.ArgumentParser()
    add_images_args(parser)
    args = parser.parse_args(
        [server.url, "--num-requests", "20", "--concurrency", "4", "--n", "2", "--steps", "4",
         "--size", "64x64", "--prompt", "a cat", "--prompt", "a dog", "--prompt", "a fox",
         "--prompt", "error400 please", "--api-key", "sk-test", "--slo-ms", "60000",
         "--out", str(out)]
    )
    report = run_images_bench(args)
    printed = capsys.readouterr().out
    assert "Successful requests" in printed and "HTTP 400" in printed

    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(report))
    r = on_disk
    assert r["schema"] == SCHEMA
    assert r["num_requests"] == 20 and r["completed"] == 15 and r["failed"] == 5
    assert r["errors"]["by_status"] == {"400": 5} and r["errors"]["by_exception"] == {}
    assert "prompt rejected" in r["errors"]["samples"][0]["message"]
    assert r["num_images"] == 30
    assert r["request_throughput"] > 0 and r["image_throughput"] > 0
    assert _ordered(r["latency_ms"])
    assert r["goodput"]["good_requests"] == 15 and r["goodput"]["fraction"] == 0.75
    assert r["warmup"] == {"requests": 2, "completed": 2, "errors": {}}
    cfg = r["config"]
    assert cfg["mode"] == "closed" and cfg["concurrency"] == 4 and cfg["num_prompts"] == 4
    assert cfg["endpoint"] == server.url + "/v1/images/generations"
    assert cfg["api_key_set"] is True and "sk-test" not in out.read_text()
    st = r["server_timings"]
    assert {"queue_ms", "denoise_ms", "total_ms", "batch_size"} <= set(st)
    assert all(s["count"] == 15 and s["p50"] <= s["p99"] for s in st.values())
    assert r["serving_overhead_ms"]["count"] == 15

    # the results store renders a report as a table row (benchmarks/report.py reads results/http/<GPU>/*.json)
    from fewstep.benchmarks.report import http_table, load_reports

    store = tmp_path / "results" / "http" / "Some GPU"
    store.mkdir(parents=True)
    (store / "c4.json").write_text(out.read_text())
    table = http_table(load_reports("http", tmp_path / "results"))
    assert "| Some GPU |" in table and f"| {r['latency_ms']['p50']:.1f} |" in table

    # what the server saw: 2 warm-up + 20 measured requests, all authenticated
    assert len(server.bodies) == 22
    assert set(server.auth) == {"Bearer sk-test"}
    body = server.bodies[-1]
    assert body["num_inference_steps"] == 4 and body["n"] == 2 and body["size"] == "64x64"
    assert body["response_format"] == "b64_json" and isinstance(body["seed"], int)


def test_poisson_run_without_timings(server):
    cfg = ImagesBenchConfig(
        url=server.url + "/notimings/v1/images/generations/",
        request_rate=200.0,
        max_concurrency=4,
        num_requests=20,
        warmup=1,
        seed=5,
        save_requests=True,
    )
    r = asyncio.run(bench_images(cfg))
    json.dumps(r, allow_nan=False)
    assert r["config"]["mode"] == "poisson" and r["config"]["max_concurrency"] == 4
    assert r["num_requests"] == 20 and r["completed"] == 20 and r["failed"] == 0
    assert r["errors"] == {"total": 0, "by_status": {}, "by_exception": {}, "samples": []}
    assert r["server_timings"] is None and r["serving_overhead_ms"] is None
    assert _ordered(r["latency_ms"])
    reqs = r["requests"]
    assert [q["index"] for q in reqs] == list(range(20))
    sched = [q["scheduled_s"] for q in reqs]
    assert all(a < b for a, b in zip(sched, sched[1:]))
    assert all(q["start_s"] >= q["scheduled_s"] - 0.05 for q in reqs)


def test_duration_limited_run(server):
    cfg = ImagesBenchConfig(url=server.url, concurrency=2, duration=0.3, warmup=0)
    r = asyncio.run(bench_images(cfg))
    assert cfg.num_requests is None and r["config"]["duration_s"] == 0.3
    assert r["completed"] >= 1 and r["failed"] == 0
    assert r["num_requests"] == len(server.bodies)


def test_request_seeds_reproducible(server):
    def seeds(seed: int) -> list[int]:
        server.reset()
        asyncio.run(bench_images(ImagesBenchConfig(url=server.url, num_requests=5, warmup=0, seed=seed)))
        return [b["seed"] for b in server.bodies]

    a, b, c = seeds(11), seeds(11), seeds(12)
    assert a == b and a != c and len(set(a)) == 5


def test_connection_errors_are_reported(closed_port_url):
    cfg = ImagesBenchConfig(url=closed_port_url, num_requests=3, concurrency=2, warmup=1, timeout=5)
    r = asyncio.run(bench_images(cfg))
    json.dumps(r, allow_nan=False)
    assert r["completed"] == 0 and r["failed"] == 3
    assert r["errors"]["by_exception"] == {"ConnectError": 3} and r["errors"]["by_status"] == {}
    assert r["warmup"]["errors"] == {"ConnectError": 1}
    assert r["latency_ms"] is None and r["request_throughput"] == 0.0
