"""Pure parts of fewstep.clients.bench: percentiles, arrivals, config, report."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics

import numpy as np
import pytest

from fewstep.clients.bench import (
    DEFAULT_NUM_REQUESTS,
    SCHEMA,
    ImagesBenchConfig,
    RequestRecord,
    add_images_args,
    build_report,
    format_report,
    percentiles,
    poisson_arrivals,
    request_seed,
    resolve_endpoint,
    waterfall,
)

# ------------------------------------------------------------------ percentiles


def test_percentiles_known_values():
    assert percentiles([1, 2, 3, 4], [0, 50, 90, 100]) == pytest.approx([1.0, 2.5, 3.7, 4.0])
    assert percentiles([10], [0, 50, 99, 100]) == [10.0] * 4
    assert percentiles([3, 1, 2], [50]) == [2.0]  # unsorted input
    assert percentiles(range(101), [1, 25, 99.5]) == pytest.approx([1.0, 25.0, 99.5])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101, 1000])
def test_percentiles_match_numpy_linear(n):
    rng = random.Random(n)
    values = [rng.lognormvariate(3, 1) for _ in range(n)]
    qs = [0, 1, 5, 10, 33.3, 50, 66.7, 90, 95, 99, 99.9, 100]
    ref = np.percentile(np.array(values), qs)  # numpy default: method="linear"
    assert percentiles(values, qs) == pytest.approx(list(ref), rel=1e-12, abs=1e-12)


def test_percentiles_monotone_and_input_untouched():
    rng = random.Random(1)
    values = [rng.random() * 100 for _ in range(257)]
    before = list(values)
    qs = [0, 10, 50, 90, 99, 100]
    ps = percentiles(values, qs)
    assert all(a <= b for a, b in zip(ps, ps[1:]))
    assert ps[0] == min(values) and ps[-1] == max(values)
    assert values == before


def test_percentiles_rejects_bad_input():
    with pytest.raises(ValueError):
        percentiles([], [50])
    with pytest.raises(ValueError):
        percentiles([1, 2], [101])
    with pytest.raises(ValueError):
        percentiles([1, 2], [-1])
    with pytest.raises(ValueError):
        percentiles([1, float("nan")], [50])


# ---------------------------------------------------------------------- arrivals


def test_poisson_arrivals_seeded_reproducible():
    a = list(itertools.islice(poisson_arrivals(10.0, seed=42), 500))
    b = list(itertools.islice(poisson_arrivals(10.0, seed=42), 500))
    c = list(itertools.islice(poisson_arrivals(10.0, seed=43), 500))
    assert a == b
    assert a != c
    assert all(x < y for x, y in zip(a, a[1:]))  # strictly increasing
    assert a[0] > 0


@pytest.mark.parametrize("rate", [0.5, 20.0, 1000.0])
def test_poisson_arrivals_mean_rate(rate):
    n = 20_000
    times = list(itertools.islice(poisson_arrivals(rate, seed=7), n))
    # n events in times[-1] seconds: the rate estimate has ~1/sqrt(n) = 0.7% rel. std
    assert n / times[-1] == pytest.approx(rate, rel=0.04)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    # exponential gaps: coefficient of variation 1
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)


def test_poisson_arrivals_inf_and_invalid():
    assert list(itertools.islice(poisson_arrivals(math.inf, seed=1), 5)) == [0.0] * 5
    with pytest.raises(ValueError):
        next(poisson_arrivals(0.0))
    with pytest.raises(ValueError):
        next(poisson_arrivals(-1.0))


def test_request_seed_deterministic():
    seeds = [request_seed(0, i) for i in range(100)]
    assert seeds == [request_seed(0, i) for i in range(100)]
    assert len(set(seeds)) == 100
    assert all(0 <= s < 2**31 for s in seeds)
    assert seeds != [request_seed(1, i) for i in range(100)]
    assert request_seed(0, 0, "warmup") != request_seed(0, 0)


# ------------------------------------------------------------------ config / CLI


@pytest.mark.parametrize(
    "url,expected",
    [
        ("http://h:8000", "http://h:8000/v1/images/generations"),
        ("http://h:8000/", "http://h:8000/v1/images/generations"),
        ("http://h:8000/v1", "http://h:8000/v1/images/generations"),
        ("http://h:8000/v1/images/generations", "http://h:8000/v1/images/generations"),
        ("http://h/proxy/v1/images/generations/", "http://h/proxy/v1/images/generations"),
        ("h:8000", "http://h:8000/v1/images/generations"),
    ],
)
def test_resolve_endpoint(url, expected):
    assert resolve_endpoint(url) == expected


def test_config_defaults_and_validation():
    cfg = ImagesBenchConfig(url="http://x")
    assert cfg.mode == "closed" and cfg.concurrency == 1
    assert cfg.num_requests == DEFAULT_NUM_REQUESTS and cfg.duration is None
    cfg = ImagesBenchConfig(url="http://x", request_rate=5.0, duration=3.0)
    assert cfg.mode == "poisson" and cfg.num_requests is None and cfg.concurrency is None
    assert cfg.max_in_flight is None
    cfg = ImagesBenchConfig(url="http://x", request_rate=5.0, max_concurrency=3)
    assert cfg.max_in_flight == 3
    for bad in (
        dict(concurrency=2, request_rate=1.0),
        dict(max_concurrency=2),
        dict(request_rate=math.inf, duration=1.0),
        dict(concurrency=0),
        dict(num_requests=0),
        dict(prompts=[]),
        dict(size="512"),
    ):
        with pytest.raises(ValueError):
            ImagesBenchConfig(url="http://x", **bad)


def test_config_body_and_report_dict():
    cfg = ImagesBenchConfig(
        url="http://x:1", api_key="secret", prompts=["a", "b"], steps=4, n=2, size="256x256",
        request_rate=math.inf, num_requests=3,
    )
    b0, b1, b2 = cfg.body(0), cfg.body(1), cfg.body(2)
    assert [b0["prompt"], b1["prompt"], b2["prompt"]] == ["a", "b", "a"]
    assert b0["num_inference_steps"] == 4 and b0["n"] == 2 and b0["size"] == "256x256"
    assert b0["response_format"] == "b64_json" and b0["output_format"] == "png"
    assert "guidance_scale" not in b0 and "model" not in b0 and "negative_prompt" not in b0
    assert b0["seed"] != b2["seed"] and cfg.body(0) == b0
    d = cfg.to_report_dict()
    assert "secret" not in json.dumps(d) and d["api_key_set"] is True
    assert d["request_rate"] == "inf" and d["endpoint"] == "http://x:1/v1/images/generations"
    json.dumps(d, allow_nan=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_images_args(p)
    return p


def test_add_images_args_roundtrip(tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("one\n\ntwo\n")
    args = _parser().parse_args(
        ["http://h:1", "--request-rate", "inf", "--num-requests", "5", "--prompt", "zero",
         "--prompt-file", str(pf), "--steps", "2", "--size", "64x64", "--n", "3",
         "--output-format", "jpeg", "--guidance-scale", "1.5", "--model", "m", "--seed", "9",
         "--slo-ms", "250", "--api-key", "k", "--warmup", "0"]
    )
    cfg = ImagesBenchConfig.from_args(args)
    assert cfg.prompts == ["zero", "one", "two"]
    assert math.isinf(cfg.request_rate) and cfg.num_requests == 5
    assert (cfg.steps, cfg.size, cfg.n, cfg.output_format) == (2, "64x64", 3, "jpeg")
    assert (cfg.guidance_scale, cfg.model, cfg.seed, cfg.slo_ms, cfg.api_key) == (1.5, "m", 9, 250.0, "k")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    cfg = ImagesBenchConfig.from_args(_parser().parse_args(["u", "--prompt-file", str(jl)]))
    assert cfg.prompts == ["x", "y"] and cfg.concurrency == 1


def test_add_images_args_exclusive_modes():
    with pytest.raises(SystemExit):
        _parser().parse_args(["u", "--concurrency", "2", "--request-rate", "3"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["u", "--request-rate", "0"])


# ------------------------------------------------------------------------ report


def _records(with_timings: bool) -> list[RequestRecord]:
    recs = []
    for i, lat in enumerate([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]):
        t = {"queue_ms": 1.0 + i, "denoise_ms": 5.0, "total_ms": lat - 2.0, "batch_size": 2,
             "note": "ignored"} if with_timings else None
        recs.append(RequestRecord(i, 0.1 * i, lat, True, 200, images=2, timings=t))
    recs += [
        RequestRecord(8, 0.8, 3.0, False, 400, "400", "bad prompt"),
        RequestRecord(9, 0.9, 3.0, False, 400, "400", "bad prompt"),
        RequestRecord(10, 1.0, 9.0, False, 503, "503", "overloaded"),
        RequestRecord(11, 1.1, 1.0, False, None, "ConnectError", "refused"),
        RequestRecord(12, 1.2, 9.0, False, 200, "InvalidResponse", "KeyError: 'data'"),
    ]
    return recs


def test_build_report_fields():
    recs = _records(with_timings=True)
    rep = build_report(recs, duration_s=2.0, config={"url": "u"}, slo_ms=45.0, save_requests=True)
    assert rep["schema"] == SCHEMA
    assert rep["num_requests"] == 13 and rep["completed"] == 8 and rep["failed"] == 5
    assert rep["num_images"] == 16
    assert rep["request_throughput"] == pytest.approx(4.0)
    assert rep["image_throughput"] == pytest.approx(8.0)
    lat = rep["latency_ms"]
    ref = np.percentile([10, 20, 30, 40, 50, 60, 70, 80], [50, 90, 99])
    assert [lat["p50"], lat["p90"], lat["p99"]] == pytest.approx(list(ref))
    assert lat["mean"] == pytest.approx(45.0) and lat["min"] == 10.0 and lat["max"] == 80.0
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert rep["goodput"] == {
        "slo_ms": 45.0, "good_requests": 4, "request_throughput": pytest.approx(2.0),
        "fraction": pytest.approx(4 / 13),
    }
    errs = rep["errors"]
    assert errs["total"] == 5
    assert errs["by_status"] == {"400": 2, "503": 1}
    assert errs["by_exception"] == {"ConnectError": 1, "InvalidResponse": 1}
    assert len(errs["samples"]) == 5 and errs["samples"][0]["message"] == "bad prompt"
    st = rep["server_timings"]
    assert set(st) == {"queue_ms", "denoise_ms", "total_ms", "batch_size"}  # numeric keys only
    assert st["queue_ms"]["mean"] == pytest.approx(4.5) and st["queue_ms"]["count"] == 8
    assert st["batch_size"]["p50"] == 2.0
    for s in st.values():
        assert s["p50"] <= s["p99"]
    oh = rep["serving_overhead_ms"]
    assert oh["p50"] == pytest.approx(2.0) and oh["mean"] == pytest.approx(2.0) and oh["count"] == 8
    assert len(rep["requests"]) == 13 and rep["requests"][8]["status"] == 400
    assert "date_utc" in rep and "git_commit" in rep and rep["config"] == {"url": "u"}
    json.dumps(rep, allow_nan=False)
    text = format_report(rep)
    assert "Successful requests" in text and "HTTP 400" in text and "denoise_ms" in text


def test_build_report_without_timings_or_slo():
    rep = build_report(_records(with_timings=False), duration_s=1.0)
    assert rep["server_timings"] is None and rep["serving_overhead_ms"] is None
    assert rep["goodput"] is None and "requests" not in rep
    assert rep["latency_ms"]["p50"] <= rep["latency_ms"]["p90"] <= rep["latency_ms"]["p99"]
    format_report(rep)


def test_build_report_all_failed():
    recs = [RequestRecord(i, 0.0, 1.0, False, None, "ConnectError", "x") for i in range(3)]
    rep = build_report(recs, duration_s=0.5, slo_ms=10)
    assert rep["completed"] == 0 and rep["latency_ms"] is None
    assert rep["request_throughput"] == 0.0 and rep["goodput"]["fraction"] == 0.0
    assert rep["errors"]["by_exception"] == {"ConnectError": 3}
    json.dumps(rep, allow_nan=False)
    assert "no successful request" in format_report(rep)


def test_build_report_many_random_latencies_ordered():
    rng = random.Random(3)
    recs = [RequestRecord(i, 0.0, rng.expovariate(0.01), True, 200, images=1) for i in range(999)]
    lat = build_report(recs, duration_s=10.0)["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_waterfall_parts_add_up_to_the_latency():
    """Each part of a request's span from the server's timings, in order; the client's share is what the server did
    not time, and the means add up to the mean end-to-end latency."""
    t = {"receive_ms": 0.5, "queue_ms": 0.2, "encode_prompt_ms": 2.0, "denoise_ms": 5.0, "decode_ms": 7.0,
         "encode_image_ms": 0.8, "total_ms": 15.5, "handoff_ms": 0.3, "serialize_ms": 0.1, "batch_size": 1}
    recs = [RequestRecord(i, 0.1 * i, 20.0 + i, True, 200, images=1, timings=dict(t)) for i in range(3)]
    wf = waterfall(recs)
    names = [s["stage"] for s in wf["stages"]]
    assert names == ["client + HTTP", "receive", "queue", "encode_prompt", "denoise", "decode", "encode_image",
                     "engine other", "handoff", "serialize"]
    by = {s["stage"]: s for s in wf["stages"]}
    assert by["engine other"]["mean"] == pytest.approx(15.5 - 15.0)
    assert by["client + HTTP"]["p50"] == pytest.approx(21.0 - (0.5 + 15.5 + 0.3 + 0.1))
    assert sum(s["mean"] for s in wf["stages"]) == pytest.approx(statistics.fmean(r.latency_ms for r in recs))
    # a server that reports no span (not fewstep, or an older one): no waterfall
    assert waterfall([RequestRecord(0, 0.0, 5.0, True, 200, images=1, timings={"total_ms": 4.0})]) is None
    rep = build_report(recs, duration_s=1.0)
    assert rep["waterfall_ms"]["requests"] == 3
    assert "Where a request's time goes" in format_report(rep)
