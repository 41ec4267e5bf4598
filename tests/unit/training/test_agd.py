"""The guidance-adapter stage (``fewstep train agd``, training/agd.py) on the CPU with --tiny: only the adapters
train, the base is bit-identical afterwards, s = 0 is the base exactly, and the export loads through the engine's
loader and serves guidance in one pass per step, as the training side samples it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.training.__main__ import main

PROMPTS = ["a red circle left of a blue square on a white background", "a green star on a black background"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core box two threads thrash (a tiny UNet forward took 4 s with two, 0.25 s
    with one, with other test runs beside it); results are compared within this module only."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("agd_teacher")
    assert main(["teacher", "--tiny", "--preset", "tiny_unetp", "--device", "cpu", "--out", str(out),
                 "--max-steps", "3"]) == 0
    return out / "teacher"


def test_adapter_training_moves_only_the_adapters_and_s0_is_the_base(teacher):
    from fewstep.training.agd import (StatePool, agd_loss, attach_trainable_adapters, base_state_dict,
                                      guided_trajectories)
    from fewstep.training.export import load_export
    from fewstep.training.model import served_sigmas, tokenize

    torch.manual_seed(0)
    model, tok, _ = load_export(teacher, "cpu", torch.float32)
    base = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    model.requires_grad_(False)
    state, weights = attach_trainable_adapters(model.transformer, 4, seed=0)
    assert sorted(weights.paths) == sorted(state.names) and len(state.names) >= 8
    trained = {id(p) for p in weights.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trained

    ids, mask = tokenize(tok, PROMPTS)
    z = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    sig = served_sigmas(teacher, 2)
    g = torch.tensor([3.0, 5.0])
    states, targets = guided_trajectories(model, ids, mask, z, sig, g, tokenize(tok, [""]), autocast=False)
    assert states.shape == (2, 2, 3, 64, 64) and torch.equal(states[0], z)
    # the targets are the CFG combination of the frozen base's two predictions at the visited states
    with torch.no_grad():
        c = base(states[1], torch.full((2,), sig[1]), ids, mask)
        u = base(states[1], torch.full((2,), sig[1]), *tokenize(tok, ["", ""]))
    assert torch.allclose(targets[1], u + g.view(-1, 1, 1, 1) * (c - u), atol=1e-5)
    assert float((c - u).abs().max()) > 0   # the prompt matters to this teacher: there is something to learn

    pool = StatePool(4, (3, 64, 64), tok.model_max_length, "cpu")
    pool.add(states.flatten(0, 1), targets.flatten(0, 1), torch.tensor(sig[:-1]).repeat_interleave(2),
             g.repeat(2), ids.repeat(2, 1), mask.repeat(2, 1))
    batch = pool.get(torch.arange(4))
    opt = torch.optim.Adam(weights.parameters(), lr=1e-2)
    init = {k: p.detach().clone() for k, p in weights.weights.items()}
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        loss = agd_loss(model, state, *batch, autocast=False)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert any(not torch.equal(p, init[k]) for k, p in weights.weights.items() if k.endswith("__B"))

    after = base_state_dict(model.transformer)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(v, model.text_encoder.state_dict()[k]) for k, v in text_before.items())
    # s = 0 (guidance 1) is the base exactly, with trained adapters; s > 0 is not
    x, sigma = states[1], torch.full((2,), sig[1])
    with torch.no_grad():
        ref = base(x, sigma, ids, mask)
        state.scale = torch.zeros(2)
        at_one = model(x, sigma, ids, mask)
        state.scale = torch.full((2,), 2.0)
        guided = model(x, sigma, ids, mask)
        state.scale = None
    assert torch.equal(at_one, ref)
    assert not torch.equal(guided, ref)


def test_agd_stage_exports_adapters_the_engine_serves_in_one_pass(teacher, tmp_path):
    from safetensors.torch import load_file

    from fewstep.engines.adapters import load_adapters
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline
    from fewstep.training.agd import PassCounter, sample_with
    from fewstep.training.common import load_checkpoint as load_ckpt
    from fewstep.training.export import load_export
    from fewstep.training.model import served_sigmas, tokenize

    assert main(["agd", "--tiny", "--device", "cpu", "--teacher", str(teacher), "--out", str(tmp_path),
                 "--rank", "4"]) == 0
    agd = tmp_path / "agd"
    cfg = json.loads((agd / "adapters" / "config.json").read_text())
    assert cfg["rank"] == 4 and cfg["format"] == "fewstep-guidance-adapters"
    idx = json.loads((agd / "model_index.json").read_text())
    assert idx["fewstep"]["guidance_adapters"]["rank"] == 4
    # the base travels unchanged: the copy's denoiser file is the teacher's, byte for byte
    den = "unet/diffusion_pytorch_model.safetensors"
    assert (agd / den).read_bytes() == (teacher / den).read_bytes()
    # the optimiser and the checkpoint hold adapters only; the trained B moved away from its zero init
    tensors, st = load_ckpt(tmp_path, "agd")
    assert tensors and all(k.endswith(("__A", "__B")) for k in tensors)
    assert st["step"] == 4
    w = load_file(str(agd / "adapters" / "diffusion_pytorch_model.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in w.items() if k.endswith("lora_B"))
    log = [json.loads(x) for x in (tmp_path / "agd_log.jsonl").read_text().splitlines()]
    assert sum("loss" in r and "step" in r and "event" not in r for r in log) == 4
    # the stage compares the base (denoiser and text encoder) before and after training, bit for bit
    assert any(r.get("event") == "base_check" and r["identical"] and r["tensors"] > 20 for r in log)
    assert any(r.get("event") == "trajectories" and r["states"] == 4 * 2 for r in log)   # 4 trajectories x 2 steps

    # the engine's loader finds every adapter on the served denoiser (given, or beside the copy)
    served = FewStepPipeline(load_checkpoint(teacher), adapters=str(agd / "adapters"))
    beside = FewStepPipeline(load_checkpoint(agd))
    plain = FewStepPipeline(load_checkpoint(teacher))
    assert "agd" in served.guidance_modes and "agd" in beside.guidance_modes
    assert len(served.adapters.names) == len(cfg["targets"])
    seeds, steps = [3, 4], 2
    # guidance 1: the adapters are off, the image is the plain model's bit for bit
    assert torch.equal(served(PROMPTS, seeds, steps=steps, guidance_scale=1.0),
                       plain(PROMPTS, seeds, steps=steps, guidance_scale=1.0))
    counter = PassCounter(served.denoiser)
    out = served(PROMPTS, seeds, steps=steps, guidance_scale=3.0).numpy()
    assert counter.rows == steps * len(PROMPTS)   # one pass per step (CFG: two)
    counter.close()
    counter = PassCounter(plain.denoiser)
    plain(PROMPTS, seeds, steps=steps, guidance_scale=3.0)
    assert counter.rows == 2 * steps * len(PROMPTS)
    counter.close()
    assert torch.equal(beside(PROMPTS, seeds, steps=steps, guidance_scale=3.0), torch.from_numpy(out))
    # ... and it is what the training side samples with the adapters at s = g - 1
    model, tok, _ = load_export(teacher, "cpu", torch.float32)
    state = load_adapters(model.transformer, agd / "adapters")
    ids, mask = tokenize(tok, PROMPTS)
    z = torch.cat([torch.randn((1, 3, 64, 64), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    x = sample_with(model, state, "agd", ids, mask, z, served_sigmas(teacher, steps), 3.0, None)
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1

    # the evaluation: CFG and the adapters on the same prompts and noise, passes counted
    assert main(["agd-eval", "--tiny", "--device", "cpu", "--teacher", str(teacher), "--adapters",
                 str(agd / "adapters"), "--guidance", "3"]) == 0
    res = json.loads((tmp_path / "agd_eval.json").read_text())
    rows = {(r["mode"], r["guidance"]): r for r in res["rows"]}
    assert set(rows) == {("none", 1.0), ("cfg", 3.0), ("agd", 3.0)}
    assert rows[("cfg", 3.0)]["passes_per_image"] == 2 * 2 and rows[("agd", 3.0)]["passes_per_image"] == 2
    assert rows[("agd", 3.0)]["vs_cfg"]["passes_ratio"] == 0.5
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["rows"])
    assert "| agd | 3 |" in (tmp_path / "agd_eval.md").read_text()
    assert (tmp_path / "agd_grid.png").is_file()


def test_agd_stage_resumes_and_refuses_bad_options(teacher, tmp_path, capsys):
    assert main(["agd", "--tiny", "--device", "cpu", "--teacher", str(teacher), "--out", str(tmp_path),
                 "--max-steps", "2", "--rank", "2"]) == 0
    assert main(["agd", "--tiny", "--device", "cpu", "--teacher", str(teacher), "--out", str(tmp_path),
                 "--max-steps", "3", "--rank", "2", "--resume"]) == 0
    log = [json.loads(x) for x in (tmp_path / "agd_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in log)
    assert [r["step"] for r in log if r.get("event") == "exported"] == [2, 3]
    assert main(["agd", "--tiny", "--device", "cpu", "--teacher", str(teacher), "--out", str(tmp_path),
                 "--max-guidance", "1"]) == 2
    assert "--max-guidance must be above 1" in capsys.readouterr().err
