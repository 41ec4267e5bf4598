"""The compiled backend for video models (engines/backends/compiled_stream.py) against eager streams.

CUDA graphs need a GPU: on the CPU these tests cover the buckets, padding and fallbacks with compile=False, and one
real Inductor compile of the tiny StreamDiT; `test_cuda_graphs_match_eager_on_gpu` runs on the device."""

import numpy as np
import pytest
import torch

from fewstep.engines.backends.compiled_stream import CompiledStreamSteps
from fewstep.engines.backends.factory import make_runner
from fewstep.engines.config import CompileConfig, EngineConfig, StreamConfig
from fewstep.engines.core import EngineCore
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.stream import StreamPipeline, StreamStart
from tests.unit.engines.test_parity import psnr


def _frames(pipe, seeds, frames=12, negative=None):
    """Frames of one stream per seed, all sessions in one engine (so they share steps, batched)."""
    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig(max_batch_sessions=4), warmup=False))
    sessions = [core.open_stream(StreamStart(prompt=f"a red ball rolling {i}", seed=s, fps=0, format="raw",
                                             negative_prompt=negative))
                for i, s in enumerate(seeds)]
    got = {s.id: [] for s in sessions}
    for _ in range(200):
        if all(len(v) >= frames for v in got.values()):
            break
        core.stream_step()
        for s in sessions:
            while (c := s.owner.take()) is not None:
                got[s.id].extend(np.asarray(f) for f in c.frames)
    core.shutdown()
    return [np.stack(got[s.id][:frames]) for s in sessions]


@pytest.mark.parametrize("name", ["stream_dit", "wan_stream"])
def test_buckets_and_padding_match_eager(tiny_dir, name, caplog):
    eager = StreamPipeline(load_checkpoint(tiny_dir / name))
    comp = StreamPipeline(load_checkpoint(tiny_dir / name))
    comp.compiled_steps = CompiledStreamSteps(comp, CompileConfig(compile=False, stream_buckets=[1, 4]), 4)
    comp.compiled_steps.warmup(progress=False)
    assert comp.capabilities.backend == "compiled"
    graphs = set(comp.compiled_steps._graphs)
    assert len(graphs) == 2 and all(g is not None for g in comp.compiled_steps._graphs.values())
    # 3 sessions run padded in the bucket of 4 (the ramp's first steps alone in the bucket of 1); the padded
    # row's output is dropped
    with caplog.at_level("WARNING", logger="fewstep.engines"):
        got = _frames(comp, [1, 2, 3])
    assert "eagerly" not in caplog.text, "every step must have run through a captured bucket"
    for a, b in zip(_frames(eager, [1, 2, 3]), got):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert set(comp.compiled_steps._graphs) == graphs, "a declared shape must not capture new graphs"


def test_undeclared_shapes_and_negative_prompts_run_eager(tiny_dir, caplog):
    comp = StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))
    comp.compiled_steps = CompiledStreamSteps(comp, CompileConfig(compile=False, stream_buckets=[1]), 4)
    comp.compiled_steps.warmup(progress=False)
    eager = StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))
    with caplog.at_level("WARNING", logger="fewstep.engines"):
        two = _frames(comp, [5, 6], frames=4)  # 2 sessions: above the largest bucket
    assert "no captured bucket" in caplog.text
    for a, b in zip(_frames(eager, [5, 6], frames=4), two):
        assert np.array_equal(a, b)
    if "nasa" in comp.capabilities.guidance_modes:
        caplog.clear()
        with caplog.at_level("WARNING", logger="fewstep.engines"):
            neg = _frames(comp, [7], frames=4, negative="blue")
        assert "negative prompt" in caplog.text
        assert np.array_equal(neg[0], _frames(eager, [7], frames=4, negative="blue")[0])


def test_inductor_compile_matches_eager_through_the_factory(tiny_dir):
    """One real Inductor compile on the CPU, built as `fewstep serve --engine compiled` builds it."""
    cfg = EngineConfig(backend="compiled", device="cpu",
                       compiled=CompileConfig(stream_buckets=[1], cache_dir=None),
                       stream=StreamConfig(max_batch_sessions=1))
    runner = make_runner(tiny_dir / "stream_dit", cfg, torch.device("cpu"), torch.float32, progress=False)
    assert runner.capabilities.backend == "compiled" and runner.compile_seconds > 0
    eager = StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))
    (a,), (b,) = _frames(eager, [3], frames=6), _frames(runner, [3], frames=6)
    assert psnr(a, b) >= 35, psnr(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["stream_dit", "wan_stream"])
def test_cuda_graphs_match_eager_on_gpu(tiny_dir, name):
    dev = torch.device("cuda")
    eager = StreamPipeline(load_checkpoint(tiny_dir / name, dev, torch.float16), dev, torch.float16)
    comp = StreamPipeline(load_checkpoint(tiny_dir / name, dev, torch.float16), dev, torch.float16)
    comp.compiled_steps = CompiledStreamSteps(comp, CompileConfig(stream_buckets=[1, 2, 4]), 4)
    comp.compiled_steps.warmup(progress=False)
    assert all(g is not None for g in comp.compiled_steps._graphs.values())
    for a, b in zip(_frames(eager, [1, 2, 3]), _frames(comp, [1, 2, 3])):
        p = psnr(a, b)
        print(f"PSNR compiled stream {name}: {p:.1f} dB")
        assert p >= 35, p


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlapped decode runs on a CUDA stream")
@pytest.mark.parametrize("name", ["stream_dit", "wan_stream"])
def test_overlapped_decode_matches_on_gpu(tiny_dir, name):
    """StreamConfig.overlap_decode: the same frames, in the same order, as the engine thread's own decode; a Wan
    session's decoder cache still joins its chunks (the first chunk shorter, then full ones)."""
    dev = torch.device("cuda")
    pipe = StreamPipeline(load_checkpoint(tiny_dir / name, dev, torch.float16), dev, torch.float16)
    got = {}
    for overlap in ("off", "on"):
        core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig(max_batch_sessions=4,
                                                                            overlap_decode=overlap), warmup=False))
        assert (core.streams["video"]._decode_stream is not None) == (overlap == "on")
        sessions = [core.open_stream(StreamStart(prompt=f"a red ball {i}", seed=i, fps=0, format="raw"))
                    for i in range(3)]
        frames = {s.id: [] for s in sessions}
        for _ in range(40):
            core.stream_step()
            for s in sessions:
                while (c := s.owner.take()) is not None:
                    frames[s.id].append(c.wait().frames.copy())
        core.shutdown()
        got[overlap] = [np.concatenate(frames[s.id]) for s in sessions]
    for a, b in zip(got["off"], got["on"]):
        assert a.shape == b.shape and np.array_equal(a, b)
