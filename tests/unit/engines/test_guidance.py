"""Guidance modes end to end on real checkpoints: NASA (negative prompts in the cross-attention) on the tiny SD-Turbo
UNet, a tiny PixArt-style DiT and the embedded default student; guidance adapters (AGD-style) attached, saved and
loaded; the fused CFG step against the torch path inside the pipeline (Triton interpreter on CPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402

from fewstep.engines.adapters import (  # noqa: E402
    AdapterError,
    AdapterLinear,
    load_adapters,
    random_adapters,
    save_adapters,
)
from fewstep.engines.core import EngineCore, EngineError, GenerateRequest  # noqa: E402
from fewstep.engines.loading import load_checkpoint  # noqa: E402
from fewstep.engines.pipeline import FewStepPipeline, NagParams, NasaInput  # noqa: E402
from fewstep.server.config import DEFAULT_MODEL_DIR  # noqa: E402

SIZES = {"sd_turbo": 64, "pixart": 64}


@pytest.fixture(scope="module")
def sd(tiny_dir):
    return FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))


@pytest.fixture(scope="module")
def pixart(tiny_dir):
    return FewStepPipeline(load_checkpoint(tiny_dir / "pixart"))


@pytest.fixture(scope="module")
def student():
    return FewStepPipeline(load_checkpoint(DEFAULT_MODEL_DIR))


def _nasa_checks(pipe, prompt="a red circle above a blue square", size=None):
    size = size or pipe.default_size
    plain = pipe([prompt], [3], size, size)
    zero = pipe([prompt], [3], size, size, negative_prompts=["red"], nasa_scale=0.0)
    calls = pipe.nasa.calls
    steered = pipe([prompt], [3], size, size, negative_prompts=["red"], nasa_scale=1.0)
    assert pipe.nasa.calls > calls  # the NASA processors ran
    # alpha 0 runs the NASA path and subtracts exactly nothing
    assert torch.equal(plain, zero)
    assert (plain.float() - steered.float()).abs().mean() > 0.5
    return plain, steered


@pytest.mark.parametrize("name", ["sd", "pixart", "student"])
def test_nasa_changes_the_image_and_alpha_zero_is_exact(name, request):
    pipe = request.getfixturevalue(name)
    assert "nasa" in pipe.guidance_modes and pipe.nasa.modules > 0
    _nasa_checks(pipe)


def test_nasa_rows_do_not_mix_in_a_batch(sd):
    """A batch of one request with a negative prompt and one without: each image equals the image alone."""
    prompts, seeds = ["a cat", "a dog"], [5, 6]
    cond = sd.encode_prompt(prompts)
    neg = sd.negative_embeds(["red", ""])
    gens = lambda: [torch.Generator("cpu").manual_seed(s) for s in seeds]  # noqa: E731
    both = sd.denoise(cond, gens(), 64, 64, 1, 0.0, nasa=NasaInput(neg, torch.tensor([0.8, 0.0])))
    alone_neg = sd.denoise(cond[0], gens()[:1], 64, 64, 1, 0.0, nasa=NasaInput(neg[0], torch.tensor([0.8])))
    alone_plain = sd.denoise(cond[1], gens()[1:], 64, 64, 1, 0.0)
    # batch-size-dependent fp32 rounding of the CPU GEMMs only (a mixed-in negative moves latents by ~0.1)
    torch.testing.assert_close(both[0:1], alone_neg, rtol=0, atol=1e-4)
    torch.testing.assert_close(both[1:2], alone_plain, rtol=0, atol=1e-4)
    assert (alone_neg - sd.denoise(cond[0], gens()[:1], 64, 64, 1, 0.0)).abs().mean() > 1e-2
    assert sd.nasa.neg is None and sd.nasa.alpha is None  # nothing stays set after the forward


def test_nasa_kernel_path_matches_torch_path():
    """The processor's Triton path (interpreter on CPU) against its two-SDPA path, on a real diffusers Attention."""
    from diffusers.models.attention_processor import Attention

    from fewstep.kernels.nasa_processor import enable_nasa

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    block = torch.nn.Module()
    block.attn2 = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).to(dev, torch.float16)
    state = enable_nasa(block, allow_cpu_interpreter=True)
    assert state.modules == 1
    x = torch.randn(2, 37, 32, device=dev, dtype=torch.float16)
    ctx = torch.randn(2, 11, 24, device=dev, dtype=torch.float16)
    neg = torch.randn(2, 9, 24, device=dev, dtype=torch.float16)
    neg_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5], device=dev)
    alpha = torch.tensor([0.5, 1.2], device=dev)
    outs = {}
    for use_kernel in (True, False):
        state.use_kernel = use_kernel
        with torch.no_grad(), state.active(neg, alpha, neg_mask):
            outs[use_kernel] = block.attn2(x, encoder_hidden_states=ctx).float()
    torch.testing.assert_close(outs[True], outs[False], rtol=2e-2, atol=2e-2)


def test_nag_rows_beside_plain_and_unsteered_rows(sd):
    """NAG's renormalised form per image: in one batch, a row without a negative prompt is bit for bit the image
    without NASA, a plain-NASA row is the plain-NASA image, and the NAG row is its own image alone."""
    prompts, seeds = ["a cat", "a dog", "a bird"], [5, 6, 7]
    cond = sd.encode_prompt(prompts)
    neg = sd.negative_embeds(["red", "red", ""])
    gens = lambda: [torch.Generator("cpu").manual_seed(s) for s in seeds]  # noqa: E731
    nag = NasaInput.nag_rows([NagParams(4.0, 2.0, 0.7), None, None])
    mixed = sd.denoise(cond, gens(), 64, 64, 1, 0.0, nasa=NasaInput(neg, torch.tensor([0.0, 0.8, 0.0]), nag))
    plain_rows = sd.denoise(cond, gens(), 64, 64, 1, 0.0, nasa=NasaInput(neg, torch.tensor([0.0, 0.8, 0.0])))
    none = sd.denoise(cond, gens(), 64, 64, 1, 0.0)
    assert torch.equal(mixed[2], none[2])  # no negative prompt: exactly no NASA
    assert torch.equal(mixed[1], plain_rows[1])  # plain NASA rows do not change beside a NAG row
    alone = sd.denoise(cond[0], gens()[:1], 64, 64, 1, 0.0, nasa=NasaInput(neg[0], torch.tensor([0.0]), nag[:1]))
    torch.testing.assert_close(mixed[0:1], alone, rtol=0, atol=1e-4)  # batch-size rounding of the CPU GEMMs only
    assert (mixed[0] - none[0]).abs().mean() > 1e-2 and (mixed[0] - plain_rows[0]).abs().mean() > 1e-2
    # phi 1 extrapolates nothing: the blend of Z+ with itself, the unsteered image up to rounding
    unit = NasaInput(neg, torch.zeros(3), NasaInput.nag_rows([NagParams(1.0, 2.5, 0.5)] * 3))
    torch.testing.assert_close(sd.denoise(cond, gens(), 64, 64, 1, 0.0, nasa=unit), none, rtol=0, atol=1e-4)
    assert sd.nasa.nag is None  # nothing stays set after the forward


def test_nag_kernel_path_matches_torch_path():
    """NAG through the processor's Triton path (the kernel writes Z+ beside the combination; interpreter on CPU)
    against its two-SDPA path, a plain-NASA row beside a NAG row."""
    from diffusers.models.attention_processor import Attention

    from fewstep.kernels.nasa_processor import enable_nasa

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    block = torch.nn.Module()
    block.attn2 = Attention(query_dim=48, cross_attention_dim=24, heads=3, dim_head=16).to(dev, torch.float16)
    state = enable_nasa(block, allow_cpu_interpreter=True)
    x = torch.randn(2, 29, 48, device=dev, dtype=torch.float16)
    ctx = torch.randn(2, 11, 24, device=dev, dtype=torch.float16)
    neg = torch.randn(2, 9, 24, device=dev, dtype=torch.float16)
    neg_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5], device=dev)
    alpha = torch.tensor([0.7, 0.0], device=dev)
    nag = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.5, 0.8]], device=dev)
    outs = {}
    for use_kernel in (True, False):
        state.use_kernel = use_kernel
        with torch.no_grad(), state.active(neg, alpha, neg_mask, nag=nag):
            outs[use_kernel] = block.attn2(x, encoder_hidden_states=ctx).float()
        with torch.no_grad(), state.active(neg, alpha, neg_mask):
            outs[use_kernel, "plain"] = block.attn2(x, encoder_hidden_states=ctx).float()
    torch.testing.assert_close(outs[True], outs[False], rtol=2e-2, atol=2e-2)
    assert torch.equal(outs[True][0], outs[True, "plain"][0])  # the plain row, bit for bit
    assert (outs[False][1] - outs[False, "plain"][1]).abs().mean() > 1e-2


def test_fused_cfg_in_the_pipeline_matches_the_torch_path(sd, monkeypatch):
    """The pipeline's fused CFG step (forced on; interpreter on CPU) against its torch path, with and without
    Lin et al.'s rescale."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(sd, "_fuses_cfg", lambda x: True)
    for phi in (0.0, 0.7):
        monkeypatch.setattr(sd, "guidance_rescale", phi)
        cond = sd.encode_prompt(["a red circle"] * 2)
        uncond = sd.negative_embeds(["blurry", ""])
        noise, step_noise = sd.draw_noise([torch.Generator("cpu").manual_seed(s) for s in (1, 2)], 64, 64, 2)
        consts = sd.conditioning(4, 64, 64, 4.0)
        fused = sd.denoise_latents(noise, step_noise, cond, uncond, 2, consts)
        sd.fused_cfg = False
        try:
            ref = sd.denoise_latents(noise, step_noise, cond, uncond, 2, consts)
        finally:
            sd.fused_cfg = True
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


# -- guidance adapters -------------------------------------------------------------------------------------------
def test_adapters_attach_save_load_and_run_one_pass(tiny_dir, tmp_path):
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    before = pipe(["a cat"], [1], guidance_scale=1.0)
    state = random_adapters(pipe.denoiser, rank=4, seed=0, std=0.3)
    names = state.names
    assert names and all(n.rsplit(".", 2)[-2] in ("attn1", "attn2", "to_out") for n in names)
    assert any(n.endswith("attn2.to_out.0") for n in names) and any(n.endswith("attn1.to_q") for n in names)
    save_adapters(pipe.denoiser, tmp_path / "adapters")
    cfg = json.loads((tmp_path / "adapters" / "config.json").read_text())
    assert cfg["rank"] == 4 and (tmp_path / "adapters" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"), adapters=str(tmp_path / "adapters"))
    assert "agd" in loaded.guidance_modes and not loaded.uses_cfg(4.0)
    mods = [m for m in loaded.denoiser.modules() if isinstance(m, AdapterLinear)]
    assert len(mods) == len(names) and loaded.adapters.rank == 4
    # guidance 1: scale 0, the adapters are off and the model is the plain one
    torch.testing.assert_close(loaded(["a cat"], [1], guidance_scale=1.0).float(), before.float(), atol=0, rtol=0)
    # guidance 4: one pass with s = 3 per sample changes the image (random adapters)
    calls = []
    hook = loaded.denoiser.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[0] if a else
                                                     kw["sample"].shape[0]), with_kwargs=True)
    guided = loaded(["a cat"], [1], guidance_scale=4.0)
    hook.remove()
    assert calls == [1]  # one image, one row: no doubled batch
    assert (guided.float() - before.float()).abs().mean() > 0.5
    # the same adapters give the same image as the in-memory ones
    pipe.adapters = pipe.denoiser._fewstep_adapters
    torch.testing.assert_close(pipe(["a cat"], [1], guidance_scale=4.0).float(), guided.float(), atol=1, rtol=0)


def test_adapters_beside_the_checkpoint_are_found(tiny_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir / "sd_turbo", ckpt)
    pipe = FewStepPipeline(load_checkpoint(ckpt))
    assert "agd" not in pipe.guidance_modes
    random_adapters(pipe.denoiser, rank=2)
    save_adapters(pipe.denoiser, ckpt / "adapters")
    assert "agd" in FewStepPipeline(load_checkpoint(ckpt)).guidance_modes


def test_bad_adapters_are_refused(tiny_dir, tmp_path):
    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    with pytest.raises(AdapterError, match="needs config.json"):
        load_adapters(pipe.denoiser, tmp_path)
    other = FewStepPipeline(load_checkpoint(tiny_dir / "pixart"))
    random_adapters(other.denoiser, rank=2)
    save_adapters(other.denoiser, tmp_path / "pixart_adapters")
    with pytest.raises(AdapterError, match="missing"):
        load_adapters(pipe.denoiser, tmp_path / "pixart_adapters")


# -- admission ---------------------------------------------------------------------------------------------------
def test_engine_admission_by_guidance_mode(tiny_dir):
    lcm = FewStepPipeline(load_checkpoint(tiny_dir / "lcm"))
    sd = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    core = EngineCore({"sd": sd, "lcm": lcm})
    try:
        ok = core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red", guidance_scale=0.0))
        assert ok.nasa_scale == 0.5
        assert core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red",
                                             guidance_scale=3.0)).nasa_scale is None  # CFG
        with pytest.raises(EngineError, match="nasa_scale needs a negative_prompt"):
            core.validate(GenerateRequest(prompt="a cat", model="sd", nasa_scale=0.3))
        with pytest.raises(EngineError, match="runs through CFG"):
            core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red", guidance_scale=3.0,
                                          nasa_scale=0.3))
        # NAG's fields: any one selects the renormalised form, the others default; ranges and conflicts are 400s
        work = core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red", nag_alpha=1.0))
        assert work.nag == NagParams(alpha=1.0) and work.nasa_scale is not None
        assert core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red")).nag is None
        with pytest.raises(EngineError, match="nag_tau must be from 1 to 10, got 0.5") as e:
            core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red", nag_tau=0.5))
        assert e.value.status == 400 and e.value.param == "nag_tau"
        with pytest.raises(EngineError, match="do not combine"):
            core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red", nasa_scale=0.5,
                                          nag_scale=3.0))
        with pytest.raises(EngineError, match="nag_scale needs a negative_prompt"):
            core.validate(GenerateRequest(prompt="a cat", model="sd", nag_scale=3.0))
        with pytest.raises(EngineError, match="runs through CFG"):
            core.validate(GenerateRequest(prompt="a cat", model="sd", negative_prompt="red", guidance_scale=3.0,
                                          nag_scale=3.0))
        # without NASA the LCM (a guidance embedding, no CFG) takes no negative prompt: the 400 lists its modes
        lcm.nasa = None
        with pytest.raises(EngineError, match="supports guidance modes none") as e:
            core.validate(GenerateRequest(prompt="a cat", model="lcm", negative_prompt="red"))
        assert e.value.status == 400 and e.value.param == "negative_prompt"
    finally:
        core.shutdown()


# -- streams -----------------------------------------------------------------------------------------------------
def _frames(core, session, steps):
    for _ in range(steps):
        core.stream_step()
    out = []
    while (c := session.owner.take()) is not None:
        out.append(c.frames.astype(int))
    return out


@pytest.mark.parametrize("model", ["stream_dit", "default_video"])
def test_stream_negative_prompt_and_mid_stream_change(tiny_dir, model):
    import numpy as np

    from fewstep.engines.config import EngineConfig, StreamConfig
    from fewstep.engines.stream import StreamPipeline, StreamStart
    from fewstep.server.config import DEFAULT_VIDEO_MODEL_DIR

    path = DEFAULT_VIDEO_MODEL_DIR if model == "default_video" else tiny_dir / "stream_dit"
    pipe = StreamPipeline(load_checkpoint(path))
    assert pipe.capabilities.guidance_modes == ("none", "nasa")
    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig()))
    steps = pipe.buffer_chunks + 2
    start = dict(prompt="a red ball rolling", seed=4, fps=0, format="raw")
    try:
        plain = core.open_stream(StreamStart(**start))
        steered = core.open_stream(StreamStart(**start, negative_prompt="red", nasa_scale=1.5))
        zero = core.open_stream(StreamStart(**start, negative_prompt="red", nasa_scale=0.0))
        # three sessions in one forward pass: alpha is per session
        fp, fs, fz = _frames(core, plain, steps), _frames(core, steered, 0), _frames(core, zero, 0)
        assert fp and len(fp) == len(fs) == len(fz)
        assert all(np.array_equal(a, b) for a, b in zip(fp, fz))  # alpha 0: exactly the plain stream
        assert np.abs(fp[-1] - fs[-1]).mean() > 0.5
        # clearing the negative prompt mid-stream: from the next step on the two streams see the same conditioning
        core.update_prompt(steered.id, None, negative_prompt="")
        assert steered.negative_prompt is None
        core.update_prompt(plain.id, None, negative_prompt="red", nasa_scale=1.5)
        for _ in range(steps):
            core.stream_step()
        assert steered.neg_cond is None and plain.neg_cond is not None
        with pytest.raises(EngineError, match="nasa_scale needs a negative_prompt"):
            core.open_stream(StreamStart(**start, nasa_scale=1.0))
    finally:
        core.shutdown()


def test_stream_nag_per_session_and_switching_mid_stream(tiny_dir):
    import numpy as np

    from fewstep.engines.config import EngineConfig, StreamConfig
    from fewstep.engines.stream import StreamPipeline, StreamStart

    pipe = StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))
    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig()))
    steps = pipe.buffer_chunks + 2
    start = dict(prompt="a red ball rolling", seed=4, fps=0, format="raw", negative_prompt="red")
    try:
        nasa = core.open_stream(StreamStart(**start, nasa_scale=1.0))
        nag = core.open_stream(StreamStart(**start, nag_scale=4.0, nag_tau=2.0))
        assert nag.nag == NagParams(4.0, 2.0) and nasa.nag is None
        fa, fg = _frames(core, nasa, steps), _frames(core, nag, 0)
        assert np.abs(fa[-1] - fg[-1]).mean() > 0.5
        # an update's NAG field keeps the others; nasa_scale goes back to plain NASA
        core.update_prompt(nag.id, None, nag_fields={"nag_alpha": 0.9})
        assert nag.nag == NagParams(4.0, 2.0, 0.9)
        core.update_prompt(nag.id, None, nasa_scale=1.0)
        assert nag.nag is None and nag.nasa_scale == 1.0
        with pytest.raises(EngineError, match="nag_scale must be from 1 to 10"):
            core.update_prompt(nag.id, None, nag_fields={"nag_scale": 11.0})
        with pytest.raises(EngineError, match="nag_tau needs a negative_prompt"):
            core.open_stream(StreamStart(prompt="x", fps=0, format="raw", nag_tau=2.0))
    finally:
        core.shutdown()
