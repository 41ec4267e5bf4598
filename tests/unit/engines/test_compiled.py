"""The compiled backend against the eager pipeline: buckets, padding and CFG change nothing but speed.

CUDA graphs need a GPU; on the CPU these tests cover the bucket/padding/static-input logic (compile=False) and one
real Inductor compile of the smallest model."""

import numpy as np
import pytest
import torch

from fewstep.engines.backends.compiled import CompiledPipeline
from fewstep.engines.config import CompileConfig, EngineConfig
from fewstep.engines.core import EngineCore, GenerateRequest
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from tests.unit.engines.test_parity import psnr

CASES = [("sd_turbo", 64, 1, 0.0), ("sd_turbo", 64, 2, 3.0), ("lcm", 64, 4, 8.5), ("sdxl_turbo", 64, 2, 0.0),
         ("pixart", 32, 2, 0.0), ("pixel_dit", 16, 2, 0.0)]


def _run(pipe, prompts, seeds, size, steps, g):
    cond = pipe.encode_prompt(prompts)
    uncond = pipe.negative_embeds([""] * len(prompts)) if pipe.uses_cfg(g) else None
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe.decode(pipe.denoise(cond, gens, size, size, steps, g, uncond)).numpy()


@pytest.mark.parametrize("name,size,steps,g", CASES, ids=[f"{c[0]}-{c[2]}step-g{c[3]}" for c in CASES])
def test_buckets_and_padding_match_eager(tiny_dir, name, size, steps, g):
    eager = FewStepPipeline(load_checkpoint(tiny_dir / name))
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / name)),
                          CompileConfig(compile=False, batch_buckets=[1, 4], sizes=[(size, size)], steps=[steps]))
    cp.warmup(progress=False)
    n_graphs = len(cp._graphs)
    # 3 images run in the padded bucket of 4
    a = _run(eager, ["a", "b", "c"], [1, 2, 3], size, steps, g)
    b = _run(cp, ["a", "b", "c"], [1, 2, 3], size, steps, g)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert len(cp._graphs) == n_graphs + (1 if cp.uses_cfg(g) else 0), "a declared shape must not build new graphs"
    # prompt cache rows must survive the next replay (outputs are cloned out of the static buffers)
    first = cp.encode_prompt(["x"]).embeds.clone()
    kept = cp.encode_prompt(["x"]).embeds
    cp.encode_prompt(["something else entirely"])
    assert torch.equal(kept, first)


def test_guidance_adapters_get_graphs_of_their_own(tiny_dir):
    """With guidance adapters, a scale above 1 adds the adapters' scale input: warm-up captures that pass too, and the
    plain pass's graphs never serve it (they have no such input)."""
    from fewstep.engines.adapters import random_adapters

    def with_adapters():
        pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
        pipe.adapters = random_adapters(pipe.denoiser, rank=4, seed=0, std=0.3)
        return pipe

    eager = with_adapters()
    cp = CompiledPipeline(with_adapters(), CompileConfig(compile=False, batch_buckets=[2], sizes=[(64, 64)], steps=[1]))
    cp.warmup(progress=False)
    n_graphs = len(cp._graphs)
    for g in (0.0, 4.0):
        a = _run(eager, ["a", "b"], [1, 2], 64, 1, g)
        b = _run(cp, ["a", "b"], [1, 2], 64, 1, g)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, g
    assert not np.array_equal(_run(cp, ["a"], [1], 64, 1, 0.0), _run(cp, ["a"], [1], 64, 1, 4.0))
    assert len(cp._graphs) == n_graphs, "both guidance modes were captured at warm-up"


def test_undeclared_shape_falls_back_to_eager(tiny_dir, caplog):
    eager = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")),
                          CompileConfig(compile=False, batch_buckets=[1], sizes=[(16, 16)], steps=[2]))
    with caplog.at_level("WARNING", logger="fewstep.engines"):
        b = _run(cp, ["a", "b"], [5, 6], 32, 2, 0.0)  # batch 2 and 32x32 were not declared
    assert "no bucket" in caplog.text
    assert np.array_equal(b, _run(eager, ["a", "b"], [5, 6], 32, 2, 0.0))


def test_inductor_compile_matches_eager_in_the_engine(tiny_dir):
    """A real torch.compile of every stage of the default-model format, driven through EngineCore."""
    eager = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")),
                          CompileConfig(compile=True, mode="default", batch_buckets=[2], sizes=[(16, 16)], steps=[2],
                                        cache_dir=None))
    report = cp.warmup(progress=False)
    assert report.total > 0 and len(report.seconds) == 3  # encode, denoise, decode
    outs = {}
    for label, pipe in (("eager", eager), ("compiled", cp)):
        core = EngineCore({"m": pipe}, EngineConfig())
        core.add_request(GenerateRequest(prompt="a red circle", n=2, seed=11, output_format="raw"))
        (outs[label],) = core.step()
    for a, b in zip(outs["eager"].images, outs["compiled"].images):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name,size,steps,g", CASES, ids=[f"{c[0]}-{c[2]}step-g{c[3]}" for c in CASES])
@pytest.mark.parametrize("compile_", [False, True], ids=["graphs", "inductor+graphs"])
def test_cuda_graphs_match_eager_on_gpu(tiny_dir, name, size, steps, g, compile_):
    """CUDA-graph capture and replay (with and without Inductor) against eager on the GPU, padded bucket included."""
    dev, dt = torch.device("cuda"), torch.float16
    eager = FewStepPipeline(load_checkpoint(tiny_dir / name, dev, dt), dev, dt)
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / name, dev, dt), dev, dt),
                          CompileConfig(compile=compile_, batch_buckets=[1, 4], sizes=[(size, size)], steps=[steps],
                                        cache_dir=None))
    cp.warmup(progress=False)
    costs = cp.batch_costs[(size, size, steps)]  # warm-up timed both buckets for batch_plan
    assert set(costs) == {1, 4} and all(c > 0 for c in costs.values())
    assert sum(cp.batch_plan(3, size, size, steps)) == 3
    a = _run_gpu(eager, ["a", "b", "c"], [1, 2, 3], size, steps, g)
    b = _run_gpu(cp, ["a", "b", "c"], [1, 2, 3], size, steps, g)
    b2 = _run_gpu(cp, ["a", "b", "c"], [1, 2, 3], size, steps, g)  # a second replay of the same graphs
    assert np.array_equal(b, b2)
    # fp16: Inductor's fused kernels round differently from eager's. A bound on the mean or the largest pixel error
    # can hide a wrong image region; PSNR over the whole batch cannot (35 dB: RMS error under 4.5 levels of 255).
    quality = psnr(a, b)
    print(f"compiled={compile_} {name} {size}px {steps} step(s) g={g}: PSNR {quality:.1f} dB against eager")
    assert quality >= 35.0, f"PSNR {quality:.1f} dB against eager"
    if not compile_:  # graphs replay eager's own kernels: only the capture can differ
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def _run_gpu(pipe, prompts, seeds, size, steps, g):
    cond = pipe.encode_prompt(prompts)
    uncond = pipe.negative_embeds([""] * len(prompts)) if pipe.uses_cfg(g) else None
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe.decode(pipe.denoise(cond, gens, size, size, steps, g, uncond)).cpu().numpy()


def test_fused_qkv_and_channels_last_match_eager(tiny_dir):
    """The layout options the NOTES measure change speed, never the output."""
    eager = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo")),
                          CompileConfig(compile=False, fuse_qkv=True, channels_last=True, batch_buckets=[2],
                                        sizes=[(64, 64)], steps=[1]))
    convs = [m for mod in (cp.pipe.denoiser, cp.pipe.vae) for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
                         if c.weight.shape[-1] > 1 or c.weight.shape[-2] > 1)  # 1x1 kernels are both layouts at once
    cp.warmup(progress=False)
    a = _run(eager, ["a", "b"], [1, 2], 64, 1, 0.0)
    b = _run(cp, ["a", "b"], [1, 2], 64, 1, 0.0)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_channels_last_is_the_default_and_can_be_turned_off(tiny_dir):
    """On by default (measured faster on the H200, docs/benchmarks.md); `--no-compile-channels-last` keeps NCHW."""
    assert CompileConfig().channels_last and not CompileConfig().fuse_qkv
    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo")),
                          CompileConfig(compile=False, channels_last=False, batch_buckets=[1]))
    w = next(m.weight for m in cp.pipe.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)


def test_dynamic_batch_compiles_once_for_all_buckets(tiny_dir):
    """dynamic_batch: one Inductor compile per stage serves buckets 2 and 4 (static: one per bucket), and the
    outputs still match eager."""
    from torch._dynamo.utils import counters

    eager = FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit"))
    graphs = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")),
                              CompileConfig(compile=True, mode="default", dynamic_batch=dynamic, batch_buckets=[2, 4],
                                            sizes=[(16, 16)], steps=[2], cache_dir=None))
        cp.warmup(progress=False)
        graphs[dynamic] = counters["stats"]["unique_graphs"]
        a = _run(eager, ["a", "b", "c"], [1, 2, 3], 16, 2, 0.0)
        b = _run(cp, ["a", "b", "c"], [1, 2, 3], 16, 2, 0.0)  # padded into bucket 4
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert graphs[False] == 6  # 3 stages x 2 buckets
    assert graphs[True] == 3


def test_cheapest_split_against_measured_costs():
    from fewstep.engines.backends.compiled import cheapest_split

    h200 = {1: 16.0, 4: 48.6, 16: 142.0}  # SD-Turbo 512², compiled, in-process ms (benchmarks/results, 2026-11-29)
    assert cheapest_split(1, h200) == [1]
    assert cheapest_split(2, h200) == [1, 1]  # padded to 4: 48.6 ms for 2 images
    assert cheapest_split(9, h200) == [1, 4, 4]  # 113 ms, against 142 for one padded 16
    assert cheapest_split(12, h200) == [12]  # 4+4+4 would be 145.8
    assert cheapest_split(16, h200) == [16]
    assert cheapest_split(20, h200) == [4, 16]  # more than the largest bucket
    # no per-launch overhead: ties go to fewer, larger launches
    assert cheapest_split(4, {1: 1.0, 2: 2.0, 4: 4.0}) == [4]
    assert sum(cheapest_split(7, {1: 1.0, 2: 1.5, 4: 2.5})) == 7


def test_engine_runs_a_batch_as_the_cheapest_sub_batches(tiny_dir):
    """Nine waiting requests over buckets 1/4/16 with the H200's cost ratios run as 1, 4, 4 (three steps, oldest
    first), and every image equals the eager engine's for its seed."""
    from fewstep.engines.config import BatchingConfig

    def core_for(pipe):
        return EngineCore({"m": pipe}, EngineConfig(batching=BatchingConfig(max_batch_size=16)))

    def submit(core):
        return [core.add_request(GenerateRequest(prompt=f"shape {i}", seed=i, output_format="raw"))
                for i in range(9)]

    cp = CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")),
                          CompileConfig(compile=False, batch_buckets=[1, 4, 16], sizes=[(16, 16)], steps=[2]))
    cp.warmup(progress=False)
    assert cp.batch_costs == {}  # timed only where CUDA graphs run; here it is given
    cp.batch_costs[(16, 16, 2)] = {1: 16.0, 4: 48.6, 16: 142.0}
    core = core_for(cp)
    futs = submit(core)
    sizes = [len(core.step()) for _ in range(3)]
    assert sizes == [1, 4, 4] and core.num_waiting == 0
    assert [f.result().images[0].shape for f in futs] == [(16, 16, 3)] * 9
    assert all(f.result().timings["batch_size"] == n for f, n in zip(futs, [1] + [4] * 8))

    eager = core_for(FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")))
    ref = submit(eager)
    assert len(eager.step()) == 9  # eager: one batch of 9
    for a, b in zip(futs, ref):
        assert np.abs(a.result().images[0].astype(int) - b.result().images[0].astype(int)).max() <= 1

    cp.cfg = cp.cfg.model_copy(update={"split_batches": False})  # padding to one bucket, as before
    core = core_for(cp)
    submit(core)
    assert len(core.step()) == 9


def test_fp8_on_the_cpu_says_what_to_do(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("the CPU's refusal")
    with pytest.raises(ValueError, match="compute capability 8.9.*the CPU.*leave fp8 off"):
        CompiledPipeline(FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo")),
                         CompileConfig(compile=False, fp8=True, batch_buckets=[1], sizes=[(64, 64)]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 GEMMs need compute capability 8.9+")
def test_fp8_runs_and_stays_near_fp16_on_gpu(tiny_dir):
    """fp8 changes the numerics, so this is a sanity floor (20 dB: not noise), with the figure printed for the notes;
    the tiny model's layers are below fp8's minimum width, so the width floor is lowered to reach them."""
    from fewstep.engines.backends.compiled import quantize_fp8

    pytest.importorskip("torchao")
    dev = torch.device("cuda")
    eager = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", dev, torch.float16), dev, torch.float16)
    fp8 = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo", dev, torch.float16), dev, torch.float16)
    assert quantize_fp8(fp8.denoiser, dev, min_features=32) > 0
    a = _run(eager, ["a", "b"], [1, 2], 64, 1, 0.0)
    b = _run(fp8, ["a", "b"], [1, 2], 64, 1, 0.0)
    print(f"PSNR fp8 against fp16 (tiny sd_turbo): {psnr(a, b):.1f} dB")
    assert psnr(a, b) >= 20
