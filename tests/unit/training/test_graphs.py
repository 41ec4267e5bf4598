"""The distill stage's recorded training step (training.graphs) computes what the eager step computes.

CUDA only (a CUDA graph needs a GPU): skipped in CI, run on the device (``pytest tests/unit/training/test_graphs.py``).
The CPU part checks the optimizer's LR handling that the recording relies on."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fewstep.training.common import make_adamw
from fewstep.training.graphs import set_lr

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_set_lr_writes_tensor_lr_in_place_and_float_lr_by_assignment():
    m = torch.nn.Linear(3, 3)
    opt = make_adamw(m, 1e-3, 0.0, torch.device("cpu"))
    set_lr(opt, 5e-4)
    assert all(g["lr"] == 5e-4 for g in opt.param_groups)
    opt.param_groups[0]["lr"] = t = torch.tensor(1e-3)
    set_lr(opt, 2e-4)
    assert opt.param_groups[0]["lr"] is t and float(t) == pytest.approx(2e-4)


def test_trainer_end_step_after_a_recorded_step_does_not_step_again(tmp_path):
    """``end_step(..., stepped=True)`` (what distill passes after a recorded step or its warm-up): no second clip or
    optimiser step, the given gradient norm logged; without ``stepped`` the eager path steps as before."""
    import time

    from fewstep.training.common import Budget
    from fewstep.training.loop import Trainer
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    tr = Trainer(name="t", out=tmp_path, model=m, device=torch.device("cpu"), budget=Budget(1.0, time.time()),
                 lr=1e-2, warmup=0, weight_decay=0.0, ema_decay=0.9, batch=2, reserve_s=0.0, max_steps=10,
                 ckpt_every_s=1e9, show_bar=False, log_every=1)
    x = torch.randn(2, 4)
    tr.begin_step()
    loss = m(x).square().mean()
    loss.backward()
    before = [p.detach().clone() for p in m.parameters()]
    tr.end_step(loss, lambda: {}, grad_norm=torch.tensor(3.0), stepped=True)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())) and tr.step == 1
    tr.begin_step()
    loss = m(x).square().mean()
    loss.backward()
    tr.end_step(loss, lambda: {})
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters())) and tr.step == 2
    rows = [json.loads(x) for x in (tmp_path / "t_log.jsonl").read_text().splitlines()]
    gn = [r["grad_norm"] for r in rows if "grad_norm" in r]
    assert gn[0] == 3.0 and gn[1] > 0   # the given norm, then the eager step's own


def _tiny(dev):
    from fewstep.training import data
    from fewstep.training.model import PRESETS, build_model, build_tokenizer, tokenize
    cfg = PRESETS["tiny_unetp"]
    tok = build_tokenizer(data.vocabulary(), cfg.max_length)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok)).to(dev).train()
    ids, mask = tokenize(tok, data.train_prompts(8, seed=0), dev)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = []
    for _ in range(5):
        z = torch.randn(8, 3, cfg.size, cfg.size, device=dev, generator=g)
        x0 = torch.rand(8, 3, cfg.size, cfg.size, device=dev, generator=g) * 2 - 1
        sigma = torch.rand(8, device=dev, generator=g).clamp(0.05, 1.0)
        batches.append((z, x0, ids, mask, sigma))
    return model, batches


@pytest.mark.gpu
@cuda
def test_recorded_step_matches_eager_steps_with_changing_lr():
    from fewstep.training.distill import reflow_loss
    from fewstep.training.graphs import CapturedTrainStep
    dev = torch.device("cuda")
    model_e, batches = _tiny(dev)
    model_g = copy.deepcopy(model_e)
    lrs = [1e-3, 8e-4, 6e-4, 4e-4, 2e-4]

    def loss_of(model):
        return lambda z, x0, ids, mask, sigma: reflow_loss(model, z, x0, ids, mask, sigma, 2.0, 0.5, True, 4.0,
                                                           0.2, 1e-3)
    p0 = [p.detach().clone() for p in model_e.parameters() if p.requires_grad]
    opt_e = make_adamw(model_e, lrs[0], 0.01, dev)
    params_e = [p for p in model_e.parameters() if p.requires_grad]
    eager = []
    for lr, b in zip(lrs, batches):
        set_lr(opt_e, lr)
        opt_e.zero_grad(set_to_none=True)
        loss = loss_of(model_e)(*b)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params_e, 1.0, foreach=True)
        opt_e.step()
        eager.append((float(loss.detach()), float(gn)))

    opt_g = make_adamw(model_g, lrs[0], 0.01, dev, capturable=True)
    assert torch.is_tensor(opt_g.param_groups[0]["lr"])
    params_g = [p for p in model_g.parameters() if p.requires_grad]
    step = CapturedTrainStep(loss_of(model_g), params_g, opt_g, 1.0, [batches[0]])
    step.record()
    graphed = [tuple(float(t) for t in step.warmup_out[0])]
    recorded_at = [p.detach().clone() for p in params_g]
    for lr, b in zip(lrs[1:], batches[1:]):
        set_lr(opt_g, lr)
        graphed.append(tuple(float(t) for t in step(*b)))
    # bf16 backward convolutions are not deterministic (the H200 gave gradient norms 2e-4 apart, losses 2e-7): the
    # tolerances are far below what a broken recording gives (accumulated gradients double the norm; a stale LR or
    # a skipped optimizer step moves the weights by a whole step's share of their total movement)
    for (le, ge), (lg, gg) in zip(eager, graphed):
        assert lg == pytest.approx(le, rel=1e-3) and gg == pytest.approx(ge, rel=1e-2)
    with torch.no_grad():
        moved = torch.sqrt(sum(((pe - q) ** 2).sum() for pe, q in zip(params_e, p0)))
        apart = torch.sqrt(sum(((pg - pe) ** 2).sum() for pg, pe in zip(params_g, params_e)))
    assert float(apart) < 0.05 * float(moved), (float(apart), float(moved))
    # the replays trained: the weights moved away from where the warm-up step left them
    assert any(not torch.equal(a, b) for a, b in zip(recorded_at, params_g))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fail,extra", [(False, []), (True, []), (False, ["--feat", "1"])])
def test_distill_records_its_step_and_survives_a_failed_recording(tmp_path, monkeypatch, fail, extra):
    """The distill stage on CUDA: its step is recorded (``distill_log.jsonl`` has no failure event and the stage
    takes every step), also with the teacher-feature distance (``--feat``: the frozen teacher's text encoder and
    UNet encoder inside the recording), or, when the recording raises, the warm-up step counts once and the stage
    goes on eagerly."""
    from fewstep.training.__main__ import main
    from fewstep.training.graphs import CapturedTrainStep
    if fail:
        def broken(self):
            raise RuntimeError("recording refused (test)")
        monkeypatch.setattr(CapturedTrainStep, "record", broken)
    assert main(["teacher", "--tiny", "--preset", "tiny_unetp", "--out", str(tmp_path), "--max-steps", "2"]) == 0
    assert main(["distill", "--tiny", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path),
                 "--max-steps", "4", *extra]) == 0
    log = [json.loads(x) for x in (tmp_path / "distill_log.jsonl").read_text().splitlines()]
    failed = [r for r in log if r.get("event") == "cuda_graph_failed"]
    assert len(failed) == (1 if fail else 0)
    assert [r for r in log if r.get("event") == "finished"][-1]["step"] == 4
