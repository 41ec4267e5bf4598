"""The Runner protocol (engines/runner.py), the backend factory (engines/backends/factory.py), the image scheduler
(engines/scheduler.py) and the errors module: each backend says what it serves through ``capabilities`` and
implements the stages itself; nothing forwards unknown attributes or patches the pipeline it wraps."""

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fewstep.engines.backends.compiled import CompiledPipeline
from fewstep.engines.backends.factory import make_runner
from fewstep.engines.config import BatchingConfig, CompileConfig, EngineConfig
from fewstep.engines.core import EngineCore, GenerateRequest
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.engines.runner import Runner
from fewstep.engines.scheduler import ImageScheduler
from fewstep.engines.stream import StreamPipeline

CPU = torch.device("cpu")


def test_every_backend_is_a_runner(tiny_dir):
    from fewstep.engines.backends.tensorrt import Profile, TensorRTRunner

    eager = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    compiled = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo")),
                                CompileConfig(compile=False, batch_buckets=[1], sizes=[(64, 64)], steps=[1]))
    trt = TensorRTRunner(FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo")), Profile.parse("batch=1:1:8,size=64"),
                         8)
    video = StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))
    for runner, backend in ((eager, "eager"), (compiled, "compiled"), (trt, "tensorrt"), (video, "eager")):
        assert isinstance(runner, Runner)
        caps = runner.capabilities
        assert caps.backend == backend and caps.default_size > 0 and caps.default_steps >= 1
    assert eager.capabilities.kind == "image" and eager.capabilities.max_images_per_batch is None
    assert compiled.capabilities.sizes == eager.capabilities.sizes and compiled.compile_seconds >= 0
    assert trt.capabilities.max_images_per_batch == 8 and eager.compile_seconds == 0.0
    v = video.capabilities
    assert v.kind == "video" and v.frames_per_chunk == video.frames_per_chunk and v.fps == video.fps
    # no __getattr__ delegation: the compiled runner has what the protocol names, not the eager pipeline's insides
    assert not hasattr(compiled, "tokenize") and not hasattr(compiled, "default_size")


def test_factory_picks_the_backend(tiny_dir):
    eager = make_runner(tiny_dir / "sd_turbo", EngineConfig(backend="eager"), CPU, torch.float32, "sd")
    assert type(eager) is FewStepPipeline and eager.capabilities.backend == "eager"
    cfg = EngineConfig(backend="compiled", compiled=CompileConfig(compile=False, batch_buckets=[1], sizes=[(64, 64)]))
    compiled = make_runner(tiny_dir / "sd_turbo", cfg, CPU, torch.float32, "sd", progress=False)
    assert isinstance(compiled, CompiledPipeline) and compiled.compile_seconds > 0  # warmed up: graphs built
    video = make_runner(tiny_dir / "stream_dit", cfg, CPU, torch.float32, "video")  # compiled covers images only
    assert type(video) is StreamPipeline and video.capabilities.kind == "video"


def test_compiled_reads_prompts_as_eager_does(tiny_dir):
    """The checkpoint's prompt completion applies on every backend (the compiled path tokenised raw prompts)."""
    spec = (re.compile("background"), " on a white background")
    eager = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")),
                          CompileConfig(compile=False, batch_buckets=[2], sizes=[(16, 16)], steps=[1]))
    eager.prompt_completion = cp.pipe.prompt_completion = spec
    a = eager.encode_prompt(["a red circle", "a cat on a background"]).embeds
    b = cp.encode_prompt(["a red circle", "a cat on a background"]).embeds
    assert torch.allclose(a, b, atol=1e-5)
    eager.prompt_completion = None
    assert not torch.allclose(eager.encode_prompt(["a red circle"]).embeds, b[:1], atol=1e-3)


def test_engine_core_takes_any_runner(tiny_dir):
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")),
                          CompileConfig(compile=False, batch_buckets=[1, 2], sizes=[(16, 16)], steps=[2]))
    eager = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    outs = []
    for runner in (cp, eager):
        core = EngineCore({"m": runner})
        core.add_request(GenerateRequest(prompt="x", seed=3, steps=2, n=2, height=16, width=16, output_format="raw"))
        (out,) = core.step()
        assert out.error is None
        outs.append(out.images)
        core.shutdown()
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(*outs))


# -- the image scheduler ------------------------------------------------------------------------------------------
def test_readiness_is_decided_once(tiny_dir):
    """``ImageScheduler.ready``: with a batching wait, a lone request waits for company until its head's wait ends
    or the batch is full; without one (``EngineCore.step``), anything queued is ready."""
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    core = EngineCore({"m": pipe}, EngineConfig(batching=BatchingConfig(max_batch_size=2, max_wait_ms=300)))
    sched: ImageScheduler = core.images
    now = time.perf_counter()
    assert sched.ready(now, 0.3) == (False, None)
    core.add_request(GenerateRequest(prompt="x", height=16, width=16, output_format="raw"))
    ready, wait = sched.ready(time.perf_counter(), 0.3)
    assert not ready and 0 < wait <= 0.3
    assert sched.ready(time.perf_counter(), 0.0)[0]  # step(): no wait
    assert sched.ready(time.perf_counter() + 0.31, 0.3)[0]  # the head waited long enough
    core.add_request(GenerateRequest(prompt="y", height=16, width=16, output_format="raw"))
    assert sched.ready(time.perf_counter(), 0.3)[0]  # full batch
    with core._cv:
        batch, stream, _ = core._next(time.perf_counter(), 0.3)
    assert [w.req.prompt for w in batch] == ["x", "y"] and not stream and sched.num_waiting == 0
    core.shutdown()


def test_no_import_cycle_between_core_and_stream_scheduler():
    code = ("import sys; import fewstep.engines.stream.scheduler as s; import fewstep.engines.scheduler; "
            "assert 'fewstep.engines.core' not in sys.modules, 'core imported'; "
            "from fewstep.engines.errors import EngineError; import fewstep.engines.core as c; "
            "assert c.EngineError is EngineError and s.EngineError is EngineError")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
