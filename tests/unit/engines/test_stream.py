"""Stream sessions driven through EngineCore directly (no HTTP): the moving-buffer policy, batching, fairness,
drops, prompt updates, disconnects and isolation."""

import gc
import time
import weakref

import numpy as np
import pytest
import torch

from fewstep.engines.config import EngineConfig, StreamConfig
from fewstep.engines.core import EngineCore, EngineError, GenerateOutput, GenerateRequest
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.engines.stream import StreamChunk, StreamPipeline, StreamStart


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))


@pytest.fixture
def calls(pipe):
    """Batch sizes of every denoiser forward."""
    seen = []
    h = pipe.denoiser.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"].shape[0]
                                                                                 if "hidden_states" in kw
                                                                                 else args[0].shape[0]),
                                                with_kwargs=True)
    yield seen
    h.remove()


def _core(pipe, **stream):
    return EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig(**stream)))


def _start(prompt="a red ball rolling", seed=1, **kw):
    kw.setdefault("fps", 0)
    kw.setdefault("format", "raw")
    return StreamStart(prompt=prompt, seed=seed, **kw)


def _run_until(core, session, frames, limit=100):
    for _ in range(limit):
        if session.frames_generated >= frames:
            return
        core.stream_step()
    raise AssertionError("stream made no progress")


def _drain(session):
    out = []
    while (c := session.owner.take()) is not None:
        out.append(c)
    return out


def test_buffer_shape_and_warm_up(pipe):
    core = _core(pipe)
    s = core.open_stream(_start())
    K, F = pipe.buffer_chunks, pipe.chunk_frames
    policy = core.streams["video"].policy
    assert s.buffer is None  # the engine thread starts the buffer
    chunks = core.stream_step()
    assert s.buffer.shape == (3, K * F, 32, 32) and s.buffer.dtype == torch.float32
    # ramp: chunk j advances until it sits at its steady level K-1-j; nothing is emitted yet
    assert chunks == [] and s.levels == [1] * (K - 1) + [0]
    for _ in range(K - 2):
        assert core.stream_step() == []
    assert s.levels == [K - 1 - j for j in range(K)] and policy.warm(s)
    sig = policy.frame_sigmas(s)
    assert sig.shape == (K * F,)
    assert torch.all(sig[:-1] <= sig[1:])  # noise grows from the front (oldest) to the back (freshest)
    assert sig[-1] == 1.0  # the back chunk is pure noise
    (chunk,) = core.stream_step()  # step K: the first emission
    assert isinstance(chunk, StreamChunk) and chunk.first_index == 0 and chunk.frames.shape == (F, 32, 32, 3)
    assert chunk.frames.dtype == np.uint8
    assert s.steps == K and s.levels == [K - 1 - j for j in range(K)]  # steady state again after the slide


def test_front_chunk_is_fully_denoised_when_emitted(pipe):
    core = _core(pipe)
    s = core.open_stream(_start())
    policy = core.streams["video"].policy
    sched = core.streams["video"]
    emitted = []
    for _ in range(3 * pipe.buffer_chunks):
        batch = sched.schedule()
        sched._prepare(batch)
        cond = s.step_cond()
        front_before = s.levels[0]
        for e in policy.step(batch, cond):
            if e is not None:
                emitted.append((front_before, e.sigma, e.frames.shape))
        for b in batch:
            b.in_step = False
    assert len(emitted) == 2 * pipe.buffer_chunks + 1
    # every chunk had sigma_{K-1} before its last step and sigma_K == 0 after it: fully denoised, never noisy
    assert all(f == pipe.buffer_chunks - 1 and sigma == 0.0 for f, sigma, _ in emitted)
    assert pipe.sigmas[-1] == 0.0 and pipe.sigmas[0] == 1.0


def test_one_model_call_per_step_for_all_sessions(pipe, calls):
    core = _core(pipe, max_batch_sessions=8)
    sessions = [core.open_stream(_start(seed=i)) for i in range(3)]
    for _ in range(2 * pipe.buffer_chunks):
        core.stream_step()
    assert calls == [3] * (2 * pipe.buffer_chunks)  # one batched forward per step, all three buffers in it
    assert all(s.frames_generated == (pipe.buffer_chunks + 1) * pipe.chunk_frames for s in sessions)


def test_round_robin_fairness(pipe, calls):
    core = _core(pipe, max_batch_sessions=2)
    sessions = [core.open_stream(_start(seed=i)) for i in range(5)]
    for _ in range(20):
        core.stream_step()
    steps = [s.steps for s in sessions]
    assert calls == [2] * 20
    assert max(steps) - min(steps) <= 1 and sum(steps) == 40  # 5 sessions share 20 steps of 2 buffers evenly


def test_a_greedy_client_cannot_starve_others(pipe):
    """An unpaced session next to paced ones: the paced ones still get every chunk on time."""
    core = _core(pipe, max_batch_sessions=1)
    greedy = core.open_stream(_start(seed=0, fps=0))
    paced = core.open_stream(_start(seed=1, fps=5))
    t = time.perf_counter()
    for _ in range(4 * pipe.buffer_chunks):
        core.stream_step(now=t)
    assert paced.frames_generated > 0  # ramped up despite a batch of one
    before = paced.frames_generated
    t += 10.0  # long after the paced session's next chunk was due
    for _ in range(2):
        core.stream_step(now=t)
    assert paced.frames_generated > before
    assert greedy.frames_generated > 0


def test_pacing_follows_the_fps_target(pipe):
    core = _core(pipe, coalesce_ms=0)
    s = core.open_stream(_start(fps=4))
    while s.frames_generated == 0:
        core.stream_step()
    period = pipe.chunk_frames / 4
    now = time.perf_counter()
    assert core.stream_step(now=now) == []  # not due yet
    assert core.streams["video"].next_wakeup(now) == pytest.approx(period, abs=0.1)
    assert len(core.stream_step(now=now + period + 0.01)) == 1


def test_latest_wins_drop_policy_counts_every_drop(pipe):
    class Obs:
        generated = dropped = 0

        def on_stream_step(self, model, sessions, frames):
            Obs.generated += frames

        def on_frames_dropped(self, model, frames, reason):
            Obs.dropped += frames
            assert reason in ("behind", "closed")

        def on_sessions(self, n):
            pass

    core = _core(pipe, outbox_chunks=2)
    core.observer = Obs()
    s = core.open_stream(_start())
    F = pipe.chunk_frames
    _run_until(core, s, 6 * F)  # the client reads nothing: 6 chunks into an outbox of 2
    assert len(s.owner) == 2
    assert s.frames_dropped == 4 * F and Obs.dropped == 4 * F and Obs.generated == 6 * F
    kept = _drain(s)
    assert [c.first_index for c in kept] == [4 * F, 5 * F]  # the newest survive: latest wins
    _run_until(core, s, 7 * F)
    assert [c.first_index for c in _drain(s)] == [6 * F]
    # chunks still queued when the client leaves are counted too ("closed")
    _run_until(core, s, 8 * F)
    core.close_stream(s.id)
    assert Obs.dropped == 5 * F


def test_pause_policy_never_drops(pipe):
    core = _core(pipe, outbox_chunks=2)
    s = core.open_stream(_start(on_full="pause", max_frames=10 * pipe.chunk_frames))
    for _ in range(20):
        core.stream_step()
    assert len(s.owner) == 2 and s.frames_dropped == 0  # paused while the outbox is full
    assert core.streams["video"].next_wakeup(time.perf_counter()) is None
    got = []
    while not s.owner.ended:
        got += [c.first_index for c in _drain(s)]
        core.stream_step()
    assert got == list(range(0, 10 * pipe.chunk_frames, pipe.chunk_frames))
    assert s.finished and core.num_sessions == 0  # a finite clip leaves the engine by itself


def test_finite_clip_is_trimmed_to_max_frames(pipe):
    core = _core(pipe)
    s = core.open_stream(_start(max_frames=pipe.chunk_frames + 1, on_full="pause"))
    chunks = []
    for _ in range(20):
        core.stream_step()
        chunks += _drain(s)
    assert sum(c.num_frames for c in chunks) == pipe.chunk_frames + 1
    assert chunks[-1].final and s.owner.ended and s.buffer is None


def test_prompt_update_reaches_the_next_chunk_and_blends(pipe):
    core = _core(pipe)
    a = core.open_stream(_start("a red ball rolling", seed=7))
    b = core.open_stream(_start("a red ball rolling", seed=7))
    for _ in range(pipe.buffer_chunks + 2):
        core.stream_step()
    ca, cb = _drain(a), _drain(b)
    assert [c.first_index for c in ca] == [c.first_index for c in cb]
    for x, y in zip(ca, cb):  # same seed and prompt, batched together: the same frames
        assert np.abs(x.frames.astype(int) - y.frames.astype(int)).max() <= 1
    core.update_prompt(a.id, "a green cube sliding")
    (na, nb) = sorted(core.stream_step(), key=lambda c: c.session_id != a.id)
    assert na.session_id == a.id and na.prompt_version == 1 and nb.prompt_version == 0
    assert na.first_index == nb.first_index

    def diff(x, y):
        return np.abs(x.frames.astype(int) - y.frames.astype(int))

    first = diff(na, nb)
    # the very next chunk already differs from its no-update twin, beyond the <= 1 level batching noise above
    assert first.max() >= 2
    # the transition blends over buffer_chunks steps, then runs on the new prompt alone; the change grows
    assert a.transition == (1, pipe.buffer_chunks) and a.cond_from is not None
    later = []
    for _ in range(pipe.buffer_chunks + 1):
        (xa, xb) = sorted(core.stream_step(), key=lambda c: c.session_id != a.id)
        later.append(diff(xa, xb).mean())
    assert a.cond_from is None and a.prompt == "a green cube sliding"
    assert later[-1] > 2 * first.mean()
    with pytest.raises(EngineError, match="no such stream"):
        core.update_prompt("not-a-session", "x")


def test_transition_is_a_linear_blend(pipe):
    core = _core(pipe, transition_steps=4)
    s = core.open_stream(_start("old prompt"))
    core.stream_step()
    old = s.cond.embeds.clone()
    core.update_prompt(s.id, "new prompt")
    core.streams["video"]._prepare([s])
    new = s.cond.embeds
    for k in range(1, 5):
        used = s.step_cond().embeds
        assert torch.allclose(used, old + (new - old) * k / 4, atol=1e-6)
    assert s.step_cond().embeds is s.cond.embeds


def test_disconnect_frees_the_session_before_the_next_step(pipe, calls):
    core = _core(pipe)
    keep = core.open_stream(_start(seed=1))
    gone = core.open_stream(_start(seed=2))
    for _ in range(pipe.buffer_chunks + 1):
        core.stream_step()
    buf = weakref.ref(gone.buffer)
    steps = gone.steps
    core.close_stream(gone.id)
    gc.collect()
    assert buf() is None and gone.buffer is None and gone.cond is None  # tensors released at once
    assert core.num_sessions == 1 and core.stream_session(gone.id) is None
    calls.clear()
    core.stream_step()
    assert calls == [1] and gone.steps == steps and keep.steps == pipe.buffer_chunks + 2
    assert gone.owner.closed and gone.owner.ended
    assert core.close_stream(gone.id) is False  # idempotent


def test_close_during_a_step_frees_after_that_step(pipe):
    core = _core(pipe)
    s = core.open_stream(_start())
    sched = core.streams["video"]
    batch = sched.schedule()
    core.close_stream(s.id)  # the transport closes while the engine holds the session in a step
    assert s.closed and s.in_step
    res = sched.step(batch)
    assert res.chunks == [] and s.buffer is None and core.num_sessions == 0


def test_sessions_are_isolated(pipe):
    core = _core(pipe)
    a = core.open_stream(_start(seed=11))
    b = core.open_stream(_start(seed=12))
    assert a.id != b.id and len(a.id) >= 22  # secrets.token_urlsafe(16): 128 random bits
    for _ in range(pipe.buffer_chunks + 3):
        core.stream_step()
    ca, cb = _drain(a), _drain(b)
    assert ca and cb
    assert all(c.session_id == a.id for c in ca) and all(c.session_id == b.id for c in cb)
    assert np.abs(ca[0].frames.astype(int) - cb[0].frames.astype(int)).max() > 10
    # batching does not change a stream: seed 11 alone gives the same frames
    solo_core = _core(pipe)
    solo = solo_core.open_stream(_start(seed=11))
    for _ in range(pipe.buffer_chunks + 3):
        solo_core.stream_step()
    for x, y in zip(ca, _drain(solo)):
        assert np.abs(x.frames.astype(int) - y.frames.astype(int)).max() <= 1


def test_capacity_and_validation(pipe):
    core = _core(pipe, max_sessions=2, max_fps=30)
    core.open_stream(_start())
    core.open_stream(_start())
    with pytest.raises(EngineError, match="capacity") as e:
        core.open_stream(_start())
    assert e.value.status == 503
    core2 = _core(pipe)
    for bad, param in ((dict(width=30, height=30), "size"), (dict(fps=1000), "fps"), (dict(format="gif"), "format"),
                       (dict(max_frames=0), "num_frames")):
        with pytest.raises(EngineError) as e:
            core2.open_stream(_start(**bad))
        assert e.value.param == param
    with pytest.raises(EngineError, match="non-empty"):
        core2.open_stream(_start(prompt="  "))


def test_memory_admission_charges_sessions_that_have_not_allocated_yet(pipe, monkeypatch):
    """On CUDA a new stream is refused unless free memory holds its estimated state, what open sessions still lack
    of theirs (they allocate lazily), and the reserve. The free-memory probe is the only part swapped here (no GPU
    in CI); the sessions and their states are real."""
    from fewstep.engines.stream.scheduler import session_state_bytes

    core = _core(pipe, reserve_gib=0.0)
    sched = core.streams["video"]
    free = {"bytes": 1}
    monkeypatch.setattr(sched, "free_memory", lambda: free["bytes"])
    with pytest.raises(EngineError, match="GPU memory") as e:
        core.open_stream(_start())
    assert e.value.status == 503 and core.num_sessions == 0
    est = pipe.session_state_estimate(pipe.default_size, pipe.default_size)
    free["bytes"] = est
    a = core.open_stream(_start())  # needs its own estimate: fits exactly
    with pytest.raises(EngineError, match="still to be allocated"):  # a has not allocated: 2 x est > est
        core.open_stream(_start())
    _run_until(core, a, 1)
    assert session_state_bytes(a) == a.buffer.nbytes == est  # the estimate is what a running session holds
    b = core.open_stream(_start())  # a owes nothing now
    core.close_stream(b.id)
    core.config.stream.reserve_gib = 1.0  # the reserve counts too
    with pytest.raises(EngineError, match="reserve"):
        core.open_stream(_start())


def test_encoding_runs_in_the_pool(pipe):
    core = _core(pipe)
    s = core.open_stream(_start(format="jpeg"))
    _run_until(core, s, 1)
    chunk = s.owner.take()
    fut = chunk.encoded("jpeg", 85, core.encode_submit)
    assert fut is chunk.encoded("jpeg", 85, core.encode_submit)  # pre-submitted at emission, computed once
    frames = fut.result(timeout=10)
    assert len(frames) == pipe.chunk_frames and all(f[:2] == b"\xff\xd8" for f in frames)


def test_image_and_stream_work_alternate_on_one_engine(tiny_dir, pipe):
    image = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    core = EngineCore({"video": pipe, "image": image})
    s = core.open_stream(_start())
    for _ in range(pipe.buffer_chunks):
        core.step()
    for i in range(3):
        core.add_request(GenerateRequest(prompt=f"p{i}", model="image", height=16, width=16, steps=i + 1,
                                         output_format="raw"))  # three keys: three batches
    kinds = []
    for _ in range(6):
        out = core.step()
        kinds.append("image" if out and isinstance(out[0], GenerateOutput) else "stream")
    assert kinds[:4] in (["image", "stream", "image", "stream"], ["stream", "image", "stream", "image"])
    assert s.frames_generated >= 2 * pipe.chunk_frames
    with pytest.raises(EngineError, match="video model") as e:
        core.add_request(GenerateRequest(prompt="x", model="video"))
    assert e.value.code == "video_model"
    with pytest.raises(EngineError, match="image model") as e:
        core.open_stream(_start(model="image"))
    assert e.value.code == "image_model"


def test_serving_loop_streams_and_shuts_down(pipe):
    core = _core(pipe)
    core.start()
    try:
        s = core.open_stream(_start(fps=0))
        deadline = time.time() + 30
        got = []
        while len(got) < 5 and time.time() < deadline:
            c = s.owner.take()
            if c is None:
                time.sleep(0.005)
            else:
                got.append(c.first_index)
        assert got == [i * pipe.chunk_frames for i in range(5)]
        core.close_stream(s.id)
    finally:
        core.shutdown()
    assert core.num_sessions == 0


def test_warmup_leaves_no_session(pipe):
    core = _core(pipe)
    core.warmup()
    assert core.num_sessions == 0


def test_fmp4_muxer_writes_a_decodable_fragmented_mp4():
    av = pytest.importorskip("av")
    import io

    from fewstep.engines.stream.fmp4 import FMP4Muxer

    m = FMP4Muxer(32, 32, 8, gop=2)
    pieces = [m.add(np.random.default_rng(i).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), 2 * i)
              for i in range(4)]
    assert pieces[0][4:8] == b"ftyp" and b"moov" in pieces[0]  # the init segment comes with the first chunk
    assert all(b"moof" in p for p in pieces[1:])  # then fragments as frames arrive
    assert m.mime and m.mime.startswith("video/mp4; codecs=")
    data = b"".join(pieces) + m.close()
    with av.open(io.BytesIO(data)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 8


# -- warm-up ramps (StreamConfig.ramp) -------------------------------------------------------------------------------

@pytest.fixture
def frames_in(pipe):
    """Frames (batch x buffer length) of every denoiser forward."""
    seen = []

    def hook(m, args, kw):
        x = kw["hidden_states"] if "hidden_states" in kw else args[0]
        seen.append(x.shape[0] * x.shape[2])
    h = pipe.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    h.remove()


def _first_chunk_work(pipe, ramp, frames_in):
    core = _core(pipe, ramp=ramp)
    s = core.open_stream(_start())
    while not core.stream_step():
        assert s.steps < 10
    return len(frames_in), sum(frames_in), s


def test_cheap_ramps_emit_the_first_chunk_after_less_denoiser_work(pipe, frames_in):
    K, F = pipe.buffer_chunks, pipe.chunk_frames
    work = {}
    for ramp in ("full", "trim", "jump"):
        frames_in.clear()
        calls, frames, s = _first_chunk_work(pipe, ramp, frames_in)
        work[ramp] = calls, frames
        assert (s.forwards, s.denoised_frames) == (calls, frames)  # the session's own counters agree
        assert s.levels == [K - 1 - j for j in range(K)]  # every ramp ends in the steady state
    assert work["full"] == (K, K * K * F)
    assert work["trim"] == (K, K * (K + 1) // 2 * F)  # K-1, ..., 1 moving chunks, then the whole buffer
    assert work["jump"] == (2, (2 * K - 1) * F)  # K-1 chunks to their levels at once, then the whole buffer
    assert work["trim"][1] < work["full"][1] and work["jump"][1] < work["trim"][1] and work["jump"][0] < K


def test_after_the_ramp_steps_are_those_of_the_full_ramp(pipe):
    """A warm buffer steps the same whichever ramp filled it: copy a trimmed-ramp session's state into a full-ramp
    session and both emit identical frames from then on."""
    cheap, full = _core(pipe, ramp="trim"), _core(pipe, ramp="full")
    a, b = cheap.open_stream(_start(seed=5)), full.open_stream(_start(seed=5))
    _run_until(cheap, a, pipe.chunk_frames)
    full.stream_step()  # prepares b (prompt, buffer)
    assert cheap.streams["video"].policy.warm(a)
    b.buffer, b.levels, b.scales = a.buffer.clone(), list(a.levels), list(a.scales)
    b.generator.set_state(a.generator.get_state())
    _drain(a), _drain(b)
    ca, cb = [], []
    for _ in range(pipe.buffer_chunks + 2):  # read every step: the outbox keeps the newest two
        cheap.stream_step(), full.stream_step()
        ca += _drain(a)
        cb += _drain(b)
    assert len(ca) == len(cb) == pipe.buffer_chunks + 2
    for x, y in zip(ca, cb):
        assert np.array_equal(x.frames, y.frames)


@pytest.mark.parametrize("ramp", ["full", "trim", "jump"])
def test_sessions_at_different_ramp_stages_batch_like_alone(pipe, ramp, frames_in):
    """A session that joins while another runs starts at once (the next step) and gets the frames it gets alone;
    so does the running one. Trimmed ramp steps run the joining buffer in a forward of its own."""
    K, F = pipe.buffer_chunks, pipe.chunk_frames

    def alone(seed, steps):
        c = _core(pipe, ramp=ramp)
        s = c.open_stream(_start(seed=seed))
        out = []
        for _ in range(steps):
            c.stream_step()
            out += _drain(s)
        return out

    core = _core(pipe, ramp=ramp)
    a = core.open_stream(_start(seed=21))
    got = {a.id: []}
    for _ in range(K + 1):  # a is warm and emitting
        core.stream_step()
        got[a.id] += _drain(a)
    b = core.open_stream(_start(seed=22))
    got[b.id] = []
    frames_in.clear()
    core.stream_step()
    got[a.id] += _drain(a)
    assert b.steps == 1  # joined the very next step
    if ramp == "full":
        assert frames_in == [2 * K * F]  # one forward, both buffers
    else:
        assert frames_in == [K * F, (K - 1) * F]  # the running buffer, then b's moving chunks alone
    for _ in range(K + 2):
        core.stream_step()
        got[a.id] += _drain(a)
        got[b.id] += _drain(b)
    for s, seed, steps in ((a, 21, 2 * K + 4), (b, 22, K + 3)):
        got_s, ref = got[s.id], alone(seed, steps)
        assert got_s and len(got_s) == len(ref)
        for x, y in zip(got_s, ref):
            assert np.abs(x.frames.astype(int) - y.frames.astype(int)).max() <= 1


def test_ramp_comes_from_the_config_else_the_checkpoint(pipe, tmp_path):
    assert _core(pipe).streams["video"].policy.ramp == "full"  # neither says: the full ramp
    assert _core(pipe, ramp="jump").streams["video"].policy.ramp == "jump"
    with pytest.raises(ValueError, match="ramp"):
        StreamConfig(ramp="half")
    import json
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(pipe.ckpt.path, d)
    idx = json.loads((d / "model_index.json").read_text())
    idx["fewstep"]["ramp"] = "trim"
    (d / "model_index.json").write_text(json.dumps(idx))
    p2 = StreamPipeline(load_checkpoint(d))
    assert _core(p2).streams["video"].policy.ramp == "trim"
    assert _core(p2, ramp="full").streams["video"].policy.ramp == "full"  # the config wins
    idx["fewstep"]["ramp"] = "half"
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(Exception, match="fewstep.ramp 'half'"):
        _core(StreamPipeline(load_checkpoint(d)))
