"""Admission, deadlines, cancellation, fairness and faults, on EngineCore driven directly (no HTTP)."""

import asyncio
import time

import pytest
import torch

from fewstep.engines.config import BatchingConfig, EngineConfig, StreamConfig
from fewstep.engines.core import AsyncEngine, EngineCore, EngineError, GenerateRequest
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.engines.sizes import ServedSizes
from fewstep.engines.stream import StreamPipeline, StreamStart
from fewstep.server.config import DEFAULT_MODEL_DIR

# tiny sd_turbo: native 32 px (sample_size 16 x VAE factor 2); one 64² 1-step image is 4 units of work


@pytest.fixture(scope="module")
def sd(tiny_dir):
    return FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))


@pytest.fixture(scope="module")
def video(tiny_dir):
    return StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))


class Recorder:
    """An EngineObserver that keeps every event in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def on_batch(self, model, images):
        self.events.append(("batch", model, images))

    def on_queue(self, waiting, running):
        pass

    def on_output(self, out):
        self.events.append(("output", out.request_id))

    def on_stream_step(self, model, sessions, frames):
        self.events.append(("stream", model, frames))

    def on_frames_dropped(self, model, frames, reason):
        pass

    def on_sessions(self, active):
        pass

    def on_cancelled(self, model, reason, stage):
        self.events.append(("cancelled", model, reason, stage))

    def of(self, kind):
        return [e for e in self.events if e[0] == kind]


def _req(size=64, **kw):
    kw.setdefault("output_format", "raw")
    kw.setdefault("model", "sd")
    kw.setdefault("steps", 1)
    return GenerateRequest(prompt=kw.pop("prompt", "a red circle"), height=size, width=size, **kw)


def _core(sd, obs=None, **batching):
    core = EngineCore({"sd": sd}, EngineConfig(batching=BatchingConfig(**batching)))
    core.observer = obs
    return core


# -- sizes ------------------------------------------------------------------------------------------------------
def test_served_sizes_from_checkpoint_meta():
    assert ServedSizes.from_meta({}, 64, 8, "m").describe() == "64x64"  # no declaration: native only
    listed = ServedSizes.from_meta({"sizes": [64, "96x64"]}, 64, 8, "m")
    assert listed.allows(64, 64) and listed.allows(64, 96) and not listed.allows(96, 64)
    rng = ServedSizes.from_meta({"size_range": [32, 128], "size_step": 16}, 64, 8, "m")
    assert rng.allows(32, 128) and rng.allows(48, 64) and not rng.allows(40, 64) and not rng.allows(144, 64)
    assert "from 32 to 128 px in steps of 16" in rng.describe()
    for bad in ({"sizes": []}, {"sizes": ["big"]}, {"size_range": [128, 32]}, {"size_range": 64}):
        with pytest.raises(ValueError, match="model_index.json"):
            ServedSizes.from_meta(bad, 64, 8, "x/model_index.json")


def test_embedded_model_serves_only_its_declared_size():
    """The hostile-client finding: 1024² and 2048² were accepted for a 64 px student. Now a 400 naming 64x64."""
    pipe = FewStepPipeline(load_checkpoint(DEFAULT_MODEL_DIR))
    core = EngineCore({"default": pipe})
    for size in (1024, 2048, 128):
        with pytest.raises(EngineError, match=r"size \d+x\d+ is not served by this model; served sizes: 64x64") as e:
            core.add_request(GenerateRequest(prompt="x", height=size, width=size))
        assert e.value.status == 400 and e.value.param == "size"
    assert core.num_waiting == 0
    core.add_request(GenerateRequest(prompt="x", output_format="raw"))  # native: admitted
    assert core.num_waiting == 1


def test_config_sizes_replace_the_checkpoint_declaration(sd, video):
    core = EngineCore({"sd": sd, "video": video}, EngineConfig(sizes=[(32, 32), (32, 64)]))
    core.add_request(_req(size=32))
    core.add_request(GenerateRequest(prompt="x", model="sd", height=32, width=64, output_format="raw"))
    with pytest.raises(EngineError, match="served sizes: 32x32, 64x32"):
        core.add_request(_req(size=64))  # inside the checkpoint's range, outside the config's list
    for bad in (dict(height=64, width=64), dict(height=0, width=0)):  # size 0 is refused, not "default"
        with pytest.raises(EngineError, match="not served") as e:
            core.open_stream(StreamStart(prompt="x", model="video", fps=0, **bad))
        assert e.value.param == "size"
    assert core.open_stream(StreamStart(prompt="x", model="video", fps=0)).width == 32


# -- queue bounded by work --------------------------------------------------------------------------------------
def test_queue_bound_counts_work_not_images(sd):
    core = _core(sd, max_queue_work=10, max_queue_seconds=None)
    assert core.cost("sd", 64, 64, 1, 0.0, 1) == 4 and core.cost("sd", 64, 64, 2, 0.0, 3) == 24
    core.add_request(_req(size=64, n=2))  # 8 units: an empty queue admits any valid request
    with pytest.raises(EngineError, match="at capacity") as e:
        core.add_request(_req(size=64))  # +4 > 10, though it is only the 3rd image
    assert e.value.status == 503 and e.value.code == "overloaded" and e.value.retry_after >= 1
    core.add_request(_req(size=32, n=2))  # +2 = 10 fits: small images still get in
    assert core.num_waiting == 2


def test_queue_bound_in_seconds_after_calibration_and_retry_after(sd):
    core = _core(sd, max_queue_seconds=5.0, max_queue_work=1e9, max_batch_size=1)  # floor: 1 native image
    core.calibrated_unit_s["sd"] = 0.5  # as warm-up would measure: 0.5 s per native 1-step image
    core.add_request(_req(size=64, n=2))  # 8 units = 4 s
    core.add_request(_req(size=32))  # 4.5 s
    with pytest.raises(EngineError) as e:
        core.add_request(_req(size=64))  # +2 s > 5 s
    assert e.value.status == 503 and e.value.retry_after == 5  # ceil(4.5 s of queued work)


def test_a_slow_calibration_still_queues_a_full_batch(sd):
    """One warm-up timing on a loaded host can be 100x too slow; the queue still holds max_batch_size native
    images, so a handful of concurrent clients is never refused and batches still fill."""
    core = _core(sd, max_queue_seconds=5.0, max_queue_work=1e9, max_batch_size=4)
    core.calibrated_unit_s["sd"] = 10.0  # 10 s per native image: the seconds bound alone would admit none
    native = sd.default_size
    for _ in range(4):  # one batch of 4 native images
        core.add_request(_req(size=native))
    with pytest.raises(EngineError) as e:
        core.add_request(_req(size=native))
    assert e.value.status == 503


def test_warmup_calibrates_seconds_per_unit(sd):
    core = _core(sd)
    core.warmup()
    assert core.calibrated_unit_s["sd"] > 0 and core.num_waiting == 0


# -- deadlines and cancellation ---------------------------------------------------------------------------------
def _count_denoise(monkeypatch, pipe, during=None):
    calls = []
    real = pipe.denoise

    def denoise(cond, gens, *a, **kw):
        calls.append(len(gens))
        if during:
            during()
        return real(cond, gens, *a, **kw)

    monkeypatch.setattr(pipe, "denoise", denoise)
    return calls


def test_queued_work_past_its_deadline_never_runs(sd, monkeypatch):
    obs = Recorder()
    core = _core(sd, obs)
    calls = _count_denoise(monkeypatch, sd)
    late = core.add_request(_req(seed=1, timeout_s=1e-6))
    ok = core.add_request(_req(seed=2))
    while not (late.done() and ok.done()):
        core.step()
    out = late.result()
    assert isinstance(out.error, EngineError) and out.error.status == 504 and "nothing ran" in str(out.error)
    assert ok.result().error is None and calls == [1]  # only the live request reached the denoiser
    assert obs.of("cancelled") == [("cancelled", "sd", "deadline", "queued")]


def test_abort_removes_queued_work(sd, monkeypatch):
    obs = Recorder()
    core = _core(sd, obs)
    calls = _count_denoise(monkeypatch, sd)
    gone = core.add_request(_req(seed=1, request_id="gone"))
    core.add_request(_req(seed=2))
    assert core.abort("gone") and not core.abort("never-existed")
    assert gone.result().error.code == "cancelled" and core.num_waiting == 1
    (out,) = core.step()
    assert out.error is None and calls == [1]
    assert obs.of("cancelled") == [("cancelled", "sd", "disconnect", "queued")]
    assert [e for e in obs.of("output")] == [("output", out.request_id)]


def test_abort_during_the_batch_discards_the_result(sd, monkeypatch):
    obs = Recorder()
    core = _core(sd, obs)
    _count_denoise(monkeypatch, sd, during=lambda: core.abort("mid"))
    fut = core.add_request(_req(request_id="mid"))
    core.step()
    out = fut.result()
    assert out.error.code == "cancelled" and not out.images
    assert obs.of("output") == [] and obs.of("cancelled") == [("cancelled", "sd", "disconnect", "running")]
    assert core.images.num_running == 0 and not core.images._inflight and not core.images._aborted


def test_async_generate_aborts_when_its_task_is_cancelled(sd):
    obs = Recorder()
    core = _core(sd, obs)  # no engine thread: the request stays queued until aborted

    async def main():
        task = asyncio.create_task(AsyncEngine(core).generate(_req()))
        await asyncio.sleep(0.01)
        assert core.num_waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert core.num_waiting == 0 and obs.of("cancelled") == [("cancelled", "sd", "disconnect", "queued")]


def test_async_generate_answers_504_at_the_deadline(sd):
    obs = Recorder()
    core = _core(sd, obs)  # no engine thread: nothing will run it

    async def main():
        with pytest.raises(EngineError) as e:
            await AsyncEngine(core).generate(_req(timeout_s=0.05))
        return e.value

    err = asyncio.run(main())
    assert err.status == 504 and err.code == "deadline_exceeded"
    assert core.num_waiting == 0 and obs.of("cancelled") == [("cancelled", "sd", "deadline", "queued")]


def test_deadline_is_validated(sd):
    core = _core(sd, max_request_timeout_s=60)
    for bad in (0, -1, 61):
        with pytest.raises(EngineError, match="deadline") as e:
            core.add_request(_req(timeout_s=bad))
        assert e.value.status == 400


# -- fairness ---------------------------------------------------------------------------------------------------
def test_image_request_completes_beside_an_unpaced_stream(sd, video):
    obs = Recorder()
    core = EngineCore({"sd": sd, "video": video}, EngineConfig(stream=StreamConfig(outbox_chunks=64)))
    core.observer = obs
    s = core.open_stream(StreamStart(prompt="x", model="video", fps=0, format="raw"))
    for _ in range(3):
        core.step()  # the stream is always due (unpaced)
    fut = core.add_request(_req())
    for steps in range(1, 10):
        core.step()
        if fut.done():
            break
    assert fut.result().error is None and steps <= 2
    core.close_stream(s.id)


def test_stream_keeps_stepping_under_an_image_flood(sd, video):
    obs = Recorder()
    core = EngineCore({"sd": sd, "video": video},
                      EngineConfig(batching=BatchingConfig(max_batch_size=1), stream=StreamConfig(outbox_chunks=64)))
    core.observer = obs
    for i in range(12):
        core.add_request(_req(seed=i))
    s = core.open_stream(StreamStart(prompt="x", model="video", fps=0, format="raw"))
    for _ in range(12):
        core.step()
    kinds = [e[0] for e in obs.events if e[0] in ("batch", "stream")]
    assert kinds.count("stream") == 6 and kinds.count("batch") == 6  # strict alternation while both are ready
    assert all(a != b for a, b in zip(kinds, kinds[1:]))
    assert core.num_waiting == 6 and s.frames_generated > 0
    core.close_stream(s.id)


# -- faults -----------------------------------------------------------------------------------------------------
def test_out_of_memory_fails_the_batch_with_503_and_the_next_batch_runs(sd, monkeypatch):
    core = _core(sd)
    real = sd.denoise

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (GPU 0; 79.1 GiB total; "
                                     "reserved in total by PyTorch) If reserved but unallocated memory is large ...")

    monkeypatch.setattr(sd, "denoise", oom)
    fut = core.add_request(_req(n=2))
    core.step()
    err = fut.result().error
    assert isinstance(err, EngineError) and err.status == 503 and err.code == "out_of_memory"
    assert "Tried to allocate" not in str(err) and "out of device memory" in str(err)
    assert core.images.num_running == 0 and not core.images._inflight
    monkeypatch.setattr(sd, "denoise", real)
    fut = core.add_request(_req())
    core.step()
    assert fut.result().error is None and len(fut.result().images) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_oom_is_a_503_and_memory_is_freed(tiny_dir):
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", "cuda", torch.float16), "cuda", torch.float16)
    core = EngineCore({"sd": pipe}, EngineConfig(sizes=[(32, 32), (4096, 4096)],
                                                 batching=BatchingConfig(max_batch_size=64)))
    fut = core.add_request(GenerateRequest(prompt="x", model="sd", n=64, height=4096, width=4096, steps=1,
                                           output_format="raw"))
    core.step()
    err = fut.result().error
    assert isinstance(err, EngineError) and err.code == "out_of_memory"
    fut = core.add_request(GenerateRequest(prompt="x", model="sd", height=32, width=32, output_format="raw"))
    core.step()
    assert fut.result().error is None


# -- fps --------------------------------------------------------------------------------------------------------
def test_fps_must_be_unpaced_or_sane(video):
    core = EngineCore({"video": video})
    for bad in (0.0001, 0.5, 1000, -1):
        with pytest.raises(EngineError, match=r"fps must be 0 \(unpaced\) or from 1 to 60") as e:
            core.open_stream(StreamStart(prompt="x", fps=bad))
        assert e.value.param == "fps"
    with pytest.raises(EngineError, match="fps must be from 1 to 60"):
        core.check_fps(0, allow_unpaced=False)  # a file's playback rate
    assert core.open_stream(StreamStart(prompt="x", fps=0)).fps == 0


def test_fmp4_muxer_refuses_a_degenerate_rate():
    from fewstep.engines.stream.fmp4 import FMP4Muxer

    with pytest.raises(ValueError, match="fps >= 1"):  # was a ZeroDivisionError deep in the muxer
        FMP4Muxer(32, 32, 0.0001, 2)


def test_no_queue_admits_only_an_idle_engine(sd):
    """max_queue_seconds 0: the first request is admitted; while it waits (or runs), the next is a 503 at once."""
    core = _core(sd, max_queue_seconds=0.0, max_batch_size=1)
    core.add_request(_req(size=sd.default_size))
    with pytest.raises(EngineError) as e:
        core.add_request(_req(size=sd.default_size))
    assert e.value.status == 503 and e.value.retry_after >= 1 and "does not queue" in str(e.value)
    core.step()  # the admitted one runs; the engine is idle again
    core.add_request(_req(size=sd.default_size))
