"""EngineCore driven directly, without HTTP: add requests, step, check outputs."""

import threading

import numpy as np
import pytest

from fewstep.engines.config import BatchingConfig, EngineConfig
from fewstep.engines.core import EngineCore, EngineError, GenerateRequest
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline


@pytest.fixture(scope="module")
def pipes(tiny_dir):
    return {"sd": FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo")),
            "lcm": FewStepPipeline(load_checkpoint(tiny_dir / "lcm")),
            "dit": FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))}


def _req(prompt="a red circle", **kw):
    kw.setdefault("output_format", "raw")
    kw.setdefault("model", "sd")
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    return GenerateRequest(prompt=prompt, **kw)


def _maxdiff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("model", ["sd", "lcm", "dit"])
def test_batch_invariance(pipes, model):
    core = EngineCore(pipes, EngineConfig(batching=BatchingConfig(max_batch_size=8)))
    size = 16 if model == "dit" else 64
    reqs = lambda: [_req(f"prompt {i}", seed=100 + i, model=model, height=size, width=size) for i in range(4)]
    futs = [core.add_request(r) for r in reqs()]
    together = core.step()
    assert [o.timings["batch_size"] for o in together] == [4] * 4
    assert all(f.done() for f in futs)
    alone = []
    for r in reqs():
        core.add_request(r)
        alone += core.step()
    assert [o.timings["batch_size"] for o in alone] == [1] * 4
    for a, b in zip(together, alone):
        # CPU GEMMs may block differently per batch size: allow one uint8 level, nothing more.
        assert _maxdiff(a.images[0], b.images[0]) <= 1
    assert _maxdiff(together[0].images[0], together[1].images[0]) > 10  # the images are not all the same


def test_n_images_use_consecutive_seeds(pipes):
    core = EngineCore(pipes)
    core.add_request(_req(n=3, seed=7))
    (multi,) = core.step()
    assert multi.seeds == [7, 8, 9]
    for i in range(3):
        core.add_request(_req(seed=7 + i))
        (single,) = core.step()
        assert _maxdiff(multi.images[i], single.images[0]) <= 1


def test_incompatible_requests_are_not_mixed(pipes):
    core = EngineCore(pipes)
    core.add_request(_req(seed=1))
    core.add_request(_req(seed=2, steps=2))
    core.add_request(_req(seed=3))
    first = core.step()
    assert len(first) == 2 and all(o.timings["batch_size"] == 2 for o in first)
    second = core.step()
    assert len(second) == 1 and core.step() == []


def test_max_batch_size_is_respected(pipes):
    core = EngineCore(pipes, EngineConfig(batching=BatchingConfig(max_batch_size=2)))
    for i in range(5):
        core.add_request(_req(seed=i))
    sizes = []
    while out := core.step():
        sizes.append(out[0].timings["batch_size"])
    assert sizes == [2, 2, 1]


def test_prompt_cache_skips_the_text_encoder(pipes):
    core = EngineCore(pipes)
    core.add_request(_req("cached prompt", seed=1))
    core.step()
    calls = []
    pipe = pipes["sd"]
    orig = pipe.encode_prompt
    pipe.encode_prompt = lambda p: calls.append(p) or orig(p)
    try:
        core.add_request(_req("cached prompt", seed=2))
        core.add_request(_req("new prompt", seed=3))
        core.step()
    finally:
        del pipe.encode_prompt
    assert calls == [["new prompt"]]
    assert core.cache.hits == 1


def test_stage_timings_are_reported(pipes):
    core = EngineCore(pipes)
    core.add_request(_req(seed=1, output_format="png"))
    (out,) = core.step()
    for k in ("queue_ms", "encode_prompt_ms", "denoise_ms", "decode_ms", "encode_image_ms", "total_ms"):
        assert out.timings[k] >= 0
    assert out.timings["total_ms"] >= out.timings["denoise_ms"] + out.timings["decode_ms"]
    assert out.images[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_requests_raise_engine_errors(pipes):
    core = EngineCore(pipes)
    with pytest.raises(EngineError, match="model 'nope' is not served") as e:
        core.add_request(_req(model="nope"))
    assert e.value.status == 404
    with pytest.raises(EngineError, match="multiple of") as e:
        core.add_request(_req(height=62))
    assert e.value.param == "size"


def test_queue_is_bounded(pipes):
    core = EngineCore(pipes, EngineConfig(batching=BatchingConfig(max_queue_work=3)))
    core.add_request(_req(n=2, steps=1))
    with pytest.raises(EngineError, match="at capacity") as e:
        core.add_request(_req(n=2, steps=1))
    assert e.value.status == 503 and e.value.retry_after >= 1


def test_a_failing_batch_does_not_stop_the_engine(pipes):
    core = EngineCore(pipes)
    pipe = pipes["sd"]
    pipe.decode = lambda latents: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        core.add_request(_req(seed=1))
        (out,) = core.step()
        assert isinstance(out.error, RuntimeError)
    finally:
        del pipe.decode
    core.add_request(_req(seed=1))
    (out,) = core.step()
    assert out.error is None and len(out.images) == 1


def test_serving_loop_batches_concurrent_requests(pipes):
    core = EngineCore(pipes, EngineConfig(batching=BatchingConfig(max_batch_size=4, max_wait_ms=2000)))
    core.start()
    try:
        start = threading.Barrier(4)
        outs = [None] * 4

        def client(i):
            start.wait()
            outs[i] = core.add_request(_req(f"p{i}", seed=i)).result(timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        core.shutdown()
    # max_wait is long and the batch fills to 4 well before it: one shared forward pass
    assert [o.timings["batch_size"] for o in outs] == [4, 4, 4, 4]


@pytest.mark.parametrize("max_wait_ms", [None, 300.0])
def test_a_lone_request_runs_at_once_with_zero_wait(pipes, max_wait_ms):
    """Zero-wait batching (the default): a request that finds the engine idle starts at once, its recorded queue time a
    small fraction of its own GPU work; with a 300 ms wait it waits the 300 ms (so the test can fail)."""
    cfg = EngineConfig() if max_wait_ms is None else EngineConfig(batching=BatchingConfig(max_wait_ms=max_wait_ms))
    core = EngineCore(pipes, cfg)
    core.start()
    try:
        core.add_request(_req(seed=0)).result(timeout=60)  # lazy initialisation out of the way
        outs = [core.add_request(_req(f"lone {i}", seed=i)).result(timeout=60) for i in range(3)]
    finally:
        core.shutdown()
    for out in outs:
        t = out.timings
        work = t["encode_prompt_ms"] + t["denoise_ms"] + t["decode_ms"]
        if max_wait_ms is None:
            assert cfg.batching.max_wait_ms == 0
            assert t["queue_ms"] < 0.25 * work, t
        else:
            assert t["queue_ms"] >= max_wait_ms * 0.95, t


def test_overlapped_stages_answer_as_in_sequence(pipes):
    """overlap_stages "on": the engine thread enqueues a batch and moves on while the landing thread answers it.
    Same images as in sequence, every request answered once with its stage times, and a batch that fails on the way
    (here in decoding) fails only its own requests."""
    reqs = [dict(prompt=f"p{i % 3}", seed=i, n=1 + i % 2, output_format=("raw", "png")[i % 2]) for i in range(8)]
    results = {}
    for overlap in ("off", "on"):
        core = EngineCore(pipes, EngineConfig(overlap_stages=overlap,
                                              batching=BatchingConfig(max_batch_size=2)))
        core.start()
        try:
            futs = [core.add_request(_req(**r)) for r in reqs]
            results[overlap] = [f.result(timeout=120) for f in futs]
        finally:
            core.shutdown()
    for a, b in zip(results["off"], results["on"]):
        assert a.error is None and b.error is None
        assert a.seeds == b.seeds and len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            assert (x == y).all() if isinstance(x, np.ndarray) else x == y
        for k in ("queue_ms", "encode_prompt_ms", "denoise_ms", "decode_ms", "encode_image_ms", "total_ms"):
            assert b.timings[k] >= 0, (k, b.timings)

    core = EngineCore(pipes, EngineConfig(overlap_stages="on"))
    pipe = pipes["sd"]
    pipe.decode = lambda latents: (_ for _ in ()).throw(RuntimeError("boom"))
    core.start()
    try:
        bad = core.add_request(_req(seed=1)).result(timeout=60)
        del pipe.decode
        good = core.add_request(_req(seed=1)).result(timeout=60)
    finally:
        pipe.__dict__.pop("decode", None)
        core.shutdown()
    assert isinstance(bad.error, RuntimeError)
    assert good.error is None and len(good.images) == 1
