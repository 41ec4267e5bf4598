"""Schemathesis against a live `fewstep serve --device cpu` (both embedded models): every HTTP operation of
/openapi.json gets generated requests, valid and invalid, and every answer must be no server error (5xx), a status
the schema documents, and a body that matches the schema's model for that status.

Bounded for CI (2 cores, two full runs in 90 minutes): MAX_EXAMPLES per operation and generation mode, derandomized
(the same cases every run), no shrinking, and BUDGET_S for the whole test; operations the budget does not reach fail
the test rather than pass untested. The fuzz server runs with small live limits (one image per request, clips of at
most MAX_VIDEO_FRAMES frames), which /openapi.json states, and a long default deadline (a loaded CI box must not turn
slow requests into 504s), and positive image cases are held to MAX_STEPS_FUZZED steps: on CPU one step of the
embedded image model costs seconds.

Not fuzzed here: ``/`` and ``/web/{name}`` (the browser page and its assets, left out of the schema: no API), and the
WebSockets (not in OpenAPI; their messages are pydantic-checked in tests/unit/server and tests/e2e/test_stream.py).
``GET /v1/stream.mjpeg`` answers 200 with an endless multipart stream: its 200s are checked on the status and
Content-Type and then closed; its other answers get the full checks.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance  # noqa: E402

from tests.conftest import ServerProcess  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
MAX_EXAMPLES = 25
BUDGET_S = 420.0
MAX_VIDEO_FRAMES = 4
MAX_STEPS_FUZZED = 2
ENDLESS = {"GET /v1/stream.mjpeg"}  # 200: an endless stream, checked on its headers and closed


@pytest.fixture(scope="module")
def fuzz_server():
    srv = ServerProcess(["--device", "cpu", "--max-n", "1"], timeout=300,
                        env={"FEWSTEP_MAX_VIDEO_FRAMES": str(MAX_VIDEO_FRAMES), "FEWSTEP_REQUEST_TIMEOUT": "300"})
    yield srv
    srv.stop()


def _cheap(case):
    """Positive image cases at most MAX_STEPS_FUZZED steps (every other field as generated)."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("num_inference_steps"), int) \
            and not isinstance(body["num_inference_steps"], bool) and body["num_inference_steps"] > MAX_STEPS_FUZZED:
        body["num_inference_steps"] = MAX_STEPS_FUZZED
    return case


def _documented(case, status: int) -> bool:
    responses = case.operation.definition.raw.get("responses", {})
    return str(status) in responses or f"{str(status)[0]}XX" in responses or "default" in responses


def _run(case, url: str) -> None:
    """One case: the request, then the checks (raises on a failure)."""
    label = f"{case.method.upper()} {case.path}"
    if label in ENDLESS:  # requests itself, streaming: case.call reads the whole body, which never ends
        import requests

        response = requests.request(**case.as_transport_kwargs(base_url=url), stream=True, timeout=120)
        try:
            if response.status_code == 200:
                assert response.headers["content-type"].startswith("multipart/x-mixed-replace"), response.headers
                assert _documented(case, 200)
                return
            response.content  # noqa: B018 - a finite error body: read it for the checks
        finally:
            response.close()
        case.validate_response(response, checks=CHECKS)
        return
    response = case.call(base_url=url, timeout=600)
    case.validate_response(response, checks=CHECKS)


def test_every_operation_answers_as_documented(fuzz_server, capsys):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(f"{op.method.upper()} {op.path}" for op in ops)
    assert "POST /v1/images/generations" in labels and "POST /v1/videos" in labels, labels
    spec = schema.raw_schema
    assert all("422" not in op["responses"] for ops_ in spec["paths"].values() for op in ops_.values()), \
        "validation errors are 400s"
    assert spec["components"]["schemas"]["VideoRequest"]["properties"]["num_frames"]["maximum"] == MAX_VIDEO_FRAMES

    t0 = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    unreached: list[str] = []
    for op in sorted(ops, key=lambda o: (o.path, o.method)):
        label = f"{op.method.upper()} {op.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{label} [{mode.value}]"
            if time.perf_counter() - t0 > BUDGET_S:
                unreached.append(key)
                continue
            tally = counts.setdefault(key, {"cases": 0, "failures": 0})
            strategy = op.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE:
                strategy = strategy.map(_cheap)

            @given(case=strategy)
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def fuzz(case):
                if time.perf_counter() - t0 > BUDGET_S:
                    return
                tally["cases"] += 1
                try:
                    _run(case, fuzz_server.url)
                except Exception as e:  # noqa: BLE001 - every failure is collected; the test fails on them at the end
                    tally["failures"] += 1
                    if len(failures) < 20:
                        failures.append(f"{key}: {type(e).__name__}: {e}"[:3000])

            try:
                fuzz()
            except Unsatisfiable:  # nothing to get wrong: an operation without parameters or body has no negative cases
                if mode != GenerationMode.NEGATIVE:
                    raise

    elapsed = time.perf_counter() - t0
    total = sum(t["cases"] for t in counts.values())
    failed = sum(t["failures"] for t in counts.values())
    with capsys.disabled():
        print(f"\nschemathesis {schemathesis.__version__}: {len(ops)} operations, {total} cases, {failed} failures, "
              f"{elapsed:.0f} s")
        for key, t in counts.items():
            print(f"  {key}: {t['cases']} cases, {t['failures']} failures")
    assert not failures, "\n\n".join(failures) + "\n\nserver log tail:\n" + fuzz_server.output()[-4000:]
    assert not unreached, f"the {BUDGET_S:.0f} s budget ran out before {unreached}"
    assert total >= len(ops), counts
