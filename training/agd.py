"""Guidance adapters for the teacher (Adapter Guidance Distillation, arXiv 2503.07274): CFG in one pass per step.

``fewstep train agd --teacher DIR/teacher --out DIR [--minutes 4] [--rank 16] [--max-guidance 6] [--resume]``

* **base:** the exported teacher, frozen (its weights are never handed to the optimiser); low-rank adapters
  (``engines.adapters.attach_adapters``) on ``to_q``/``to_k``/``to_v``/``to_out.0`` of every ``attn1``/``attn2`` of
  its denoiser, the modules the engine's ``load_adapters`` finds on the served denoiser. Each adapted projection is
  ``W x + b + s B (A x)`` with ``s = g - 1`` per sample; ``A`` starts random and ``B`` at zero, so the adapted model
  starts as the base and is the plain conditional model at ``g = 1`` whatever the weights;
* **data:** CFG-guided trajectories of the teacher's own sampler: per trajectory a training-split prompt, noise and
  a scale ``g ~ U[1, G]``; Euler from the noise along the sigmas the engine serves the teacher with (its default
  step count) with CFG at ``g``. Every state ``x_t`` the guided sampler visits is a training input, and its target is
  what the sampler computed there, ``u + g (c - u)`` (the frozen base's unconditional and conditional
  velocities). Training on these states, not on noised data, is AGD's point: the adapted sampler visits them;
* **objective:** mean squared error in the teacher's prediction space (velocity) between the adapted model's one
  pass, told ``s = g - 1``, and that target. Trajectories are made first (``--gen-frac`` of the budget) into a pool
  of states on the training device, as the distill stage makes its pairs;
* **export:** ``DIR/agd/`` is a copy of the teacher export with the EMA adapters in ``DIR/agd/adapters/``
  (``engines.adapters.save_adapters``): ``fewstep serve --model DIR/agd`` picks them up, and so does
  ``fewstep serve --model DIR/teacher --adapters DIR/agd/adapters``. A request with ``guidance_scale`` > 1 then
  costs one denoiser pass per step instead of CFG's two.

``fewstep train agd-eval`` compares CFG and the adapters on held-out prompts with the same noise (``evaluate_agd``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.engines.adapters import AdapterLinear, AdapterState, attach_adapters, load_adapters, save_adapters
from fewstep.training.common import (JsonlLog, Stage, UsageError, bf16_autocast, log, pick_device, read_json,
                                     setup_torch, step_seed, write_json)
from fewstep.training.export import load_export, replace_dir
from fewstep.training.loop import Trainer
from fewstep.training.model import guided_velocity, served_sigmas, to_uint8_list, tokenize


@dataclass
class AgdArgs:
    teacher: str
    out: str
    minutes: float = 4.0
    resume: bool = False
    tiny: bool = False
    rank: int = 16
    max_guidance: float = 6.0
    teacher_steps: int | None = None   # default: the teacher export's default_steps (25); --tiny 2
    batch: int | None = None           # states per optimiser step (default 256; --tiny 8)
    lr: float | None = None            # default 1e-3 (--tiny 1e-2): adapters start at zero and have few steps
    warmup: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    gen_frac: float = 0.25             # share of the budget spent sampling guided trajectories
    chunk: int | None = None           # trajectories per sampler batch (default 512; --tiny 4)
    max_states: int | None = None      # pool capacity in states (default 400k, ~20 GB fp16 at 64 px; --tiny 64)
    seed: int = 0
    max_steps: int | None = None
    ckpt_every: float = 60.0
    device: str = "auto"
    budget_start: float | None = None


# ----------------------------------------------------------------------------------------------
# Adapters as the Trainer's model
# ----------------------------------------------------------------------------------------------

class AdapterWeights(nn.Module):
    """The adapters' ``lora_A``/``lora_B`` of a denoiser (the same Parameter objects), as one module: what the
    Trainer optimises, averages (EMA) and checkpoints. The base weights are not in it, so no optimiser sees them."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.paths: list[str] = []
        self.weights = nn.ParameterDict()
        for name, m in denoiser.named_modules():
            if isinstance(m, AdapterLinear):
                path = name.removesuffix(".base")
                self.paths.append(path)
                key = path.replace(".", "__")   # ParameterDict keys cannot hold dots
                self.weights[f"{key}__A"] = m.lora_A
                self.weights[f"{key}__B"] = m.lora_B

    def copy_to(self, other: "AdapterWeights") -> None:
        with torch.no_grad():
            for k, p in self.weights.items():
                other.weights[k].copy_(p)


def attach_trainable_adapters(denoiser: nn.Module, rank: int, seed: int) -> tuple[AdapterState, AdapterWeights]:
    """Freeze ``denoiser`` and attach trainable adapters: ``A`` Kaiming-uniform (LoRA's init, seeded), ``B`` zero,
    so the adapted model starts equal to the base. The Triton adapter kernel has no backward: torch ops here."""
    denoiser.requires_grad_(False)
    state = attach_adapters(denoiser, rank)
    state.use_kernel = False
    weights = AdapterWeights(denoiser)
    g = torch.Generator().manual_seed(seed)
    for k, p in weights.weights.items():
        if k.endswith("__A"):
            bound = 1.0 / p.shape[1] ** 0.5
            p.data.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
        p.requires_grad_(True)
    return state, weights


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A model's own weights under their original names (an adapted projection's ``.base.`` dropped, the adapters
    left out): comparable with its state dict before ``attach_adapters``."""
    return {k.replace(".base.", "."): v for k, v in module.state_dict().items()
            if not k.endswith((".lora_A", ".lora_B"))}


@torch.no_grad()
def guided_trajectories(model, ids: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, sigmas: list[float],
                        g: torch.Tensor, uncond: tuple[torch.Tensor, torch.Tensor], autocast: bool):
    """The teacher's Euler sampler with CFG at the per-sample scales ``g`` [B] from noise ``z`` (x at sigmas[0]).
    Returns (states [S, B, C, H, W], targets [S, B, C, H, W]): the input of each of the S steps and the guided
    velocity ``u + g (c - u)`` the sampler took there."""
    B = z.shape[0]
    x = z.float()
    u_ids, u_mask = (t.expand(B, -1) for t in uncond)
    states, targets = [], []
    with bf16_autocast(autocast):
        emb2 = torch.cat([model.encode(ids, mask), model.encode(u_ids, u_mask)])
        mask2 = torch.cat([mask, u_mask])
        gv = g.float().view(-1, 1, 1, 1)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = guided_velocity(model.denoise, x, torch.full((B,), s, device=x.device), emb2, mask2, gv)
            states.append(x.clone())
            targets.append(v)
            x = x + (s_next - s) * v
    return torch.stack(states), torch.stack(targets)


class StatePool:
    """Ring buffer of guided-trajectory states on the training device: x_t and its CFG target (fp16), sigma, g,
    token ids and mask."""

    def __init__(self, capacity: int, shape: tuple[int, ...], max_length: int, device):
        self.cap = capacity
        self.x = torch.empty((capacity, *shape), dtype=torch.float16, device=device)
        self.v = torch.empty_like(self.x)
        self.sigma = torch.empty(capacity, device=device)
        self.g = torch.empty(capacity, device=device)
        self.ids = torch.empty((capacity, max_length), dtype=torch.long, device=device)
        self.mask = torch.empty_like(self.ids)
        self.n = self.pos = self.added = 0

    def add(self, x, v, sigma, g, ids, mask) -> None:
        b = x.shape[0]
        idx = (torch.arange(b, device=x.device) + self.pos) % self.cap
        self.x[idx], self.v[idx] = x.half(), v.half()
        self.sigma[idx], self.g[idx], self.ids[idx], self.mask[idx] = sigma, g, ids, mask
        self.pos = (self.pos + b) % self.cap
        self.n = min(self.cap, self.n + b)
        self.added += b

    def get(self, idx):
        return (self.x[idx].float(), self.v[idx].float(), self.sigma[idx], self.g[idx], self.ids[idx],
                self.mask[idx])


def fill_states(pool: StatePool, model, tokenizer, *, seconds: float, chunk: int, sigmas: list[float],
                max_guidance: float, seed: int, first_chunk: int, device, jsonl: JsonlLog, size: int,
                max_chunks: int | None = None) -> int:
    """Guided trajectories into ``pool`` for ``seconds`` (at least one chunk; until the pool is full or
    ``max_chunks``); chunk ``c``'s prompts, noise and scales are functions of (seed, c). Returns chunks made."""
    from tqdm import tqdm

    from fewstep.training import data
    t0 = time.time()
    uncond = tokenize(tokenizer, [""], device)
    S = len(sigmas) - 1
    bar = tqdm(desc="guided trajectories", unit="traj", dynamic_ncols=True, mininterval=2.0)
    made, c = 0, first_chunk
    while not (made and time.time() - t0 > seconds):
        if pool.added + chunk * S > pool.cap or (max_chunks is not None and made >= max_chunks):
            break
        prompts = data.train_prompts(chunk, seed=step_seed(seed, c, 21) % (2**32))
        ids, mask = tokenize(tokenizer, prompts, device)
        gen = torch.Generator(device=device).manual_seed(step_seed(seed, c, 22))
        z = torch.randn((chunk, 3, size, size), generator=gen, device=device)
        g = 1.0 + (max_guidance - 1.0) * torch.rand(chunk, generator=gen, device=device)
        states, targets = guided_trajectories(model, ids, mask, z, sigmas, g, uncond, device.type == "cuda")
        sig = torch.tensor(sigmas[:-1], device=device).repeat_interleave(chunk)
        pool.add(states.flatten(0, 1), targets.flatten(0, 1), sig, g.repeat(S), ids.repeat(S, 1), mask.repeat(S, 1))
        made, c = made + 1, c + 1
        bar.update(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.time() - t0
    bar.close()
    log(f"[agd] sampled {made * chunk} guided trajectories ({made * chunk * S} states, CFG U[1, {max_guidance:g}], "
        f"{S} steps) in {dt:.1f}s; pool {pool.n} states")
    jsonl.write(event="trajectories", chunks=made, trajectories=made * chunk, states=made * chunk * S,
                seconds=round(dt, 2), pool=pool.n, first_chunk=first_chunk)
    return made


def agd_loss(model, state: AdapterState, x, v, sigma, g, ids, mask, autocast: bool) -> torch.Tensor:
    """MSE between the adapted model's one pass at ``s = g - 1`` and the CFG target ``v`` (velocity space)."""
    with torch.no_grad(), bf16_autocast(autocast):
        emb = model.encode(ids, mask)
    state.scale = g.float() - 1.0
    try:
        with bf16_autocast(autocast):
            pred = model.denoise(x, sigma, emb, mask)
    finally:
        state.scale = None
    return F.mse_loss(pred.float(), v)


@torch.no_grad()
def plain_gap(model, pool: StatePool, n: int, seed: int, autocast: bool) -> float:
    """MSE of the plain conditional model (adapters off, ``s = 0``) against the CFG targets: the error the adapters
    start from, logged beside the training loss."""
    g = torch.Generator(device=pool.x.device).manual_seed(step_seed(seed, 0, 23))
    idx = torch.randint(0, pool.n, (min(n, pool.n),), generator=g, device=pool.x.device)
    x, v, sigma, _, ids, mask = pool.get(idx)
    with bf16_autocast(autocast):
        pred = model(x, sigma, ids, mask)
    return float(F.mse_loss(pred.float(), v))


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------

def train_agd(args: AgdArgs) -> Path:
    stage = Stage(args, "agd_log.jsonl")
    budget, device, out, jsonl = stage.budget, stage.device, stage.out, stage.jsonl
    tiny = args.tiny
    if args.max_guidance <= 1.0:
        raise UsageError(f"--max-guidance must be above 1 (guidance scales are drawn from [1, G]); got "
                         f"{args.max_guidance:g}")
    teacher_dir = Path(args.teacher)
    if not (teacher_dir / "model_index.json").is_file():
        raise UsageError(f"--teacher {teacher_dir}: no model_index.json (expected an export such as DIR/teacher)")
    model, tokenizer, index = load_export(teacher_dir, device, torch.float32)
    model.requires_grad_(False).eval()
    fs = index.get("fewstep", {})
    size = int(fs.get("default_size", 64))
    steps = args.teacher_steps or (2 if tiny else int(fs.get("default_steps", 25)))
    sigmas = served_sigmas(teacher_dir, steps)
    batch = args.batch or (8 if tiny else 256)
    lr = args.lr or (1e-2 if tiny else 1e-3)
    chunk = args.chunk or (4 if tiny else 512)
    cap = max(args.max_states or (64 if tiny else 400_000), chunk * steps)
    max_steps = args.max_steps if args.max_steps is not None else (4 if tiny else None)

    # the frozen base, kept to check after training that no step touched it (bit for bit; 11.5 MB at unet4p fp32 x2)
    base_before = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state, weights = attach_trainable_adapters(model.transformer, args.rank, step_seed(args.seed, 0, 24))
    n_ad = sum(p.numel() for p in weights.parameters())
    log(f"[agd] teacher {teacher_dir} ({type(model.transformer).__name__}); adapters rank {args.rank} on "
        f"{len(state.names)} projections, {n_ad / 1e6:.3f}M trained params (the base frozen); device {device}; "
        f"{steps} steps, CFG U[1, {args.max_guidance:g}], batch {batch}, lr {lr:g}")
    jsonl.write(event="start", stage="agd", args=vars(args), batch=batch, lr=lr, teacher_steps=steps,
                rank=args.rank, targets=len(state.names), trained_params=n_ad, device=str(device),
                torch=torch.__version__)

    reserve = 6.0 if tiny or device.type != "cuda" else 12.0
    trainer = Trainer(name="agd", out=out, model=weights, device=device, budget=budget, lr=lr,
                      warmup=(2 if tiny else args.warmup), weight_decay=args.weight_decay,
                      ema_decay=args.ema_decay, batch=batch, reserve_s=reserve, max_steps=max_steps,
                      ckpt_every_s=args.ckpt_every, jsonl=jsonl, log_every=(1 if tiny else 25),
                      estimate_after=(10**9 if tiny else 60), cooldown_frac=0.2)
    config = {"rank": args.rank, "targets": sorted(weights.paths), "teacher_steps": steps}
    if args.resume:
        trainer.resume(model_config=config)
    extra = trainer.extra_state

    pool = StatePool(cap, (3, size, size), tokenizer.model_max_length, device)
    first_chunk = int(extra.get("chunks_done", 0))
    made = fill_states(pool, model, tokenizer, seconds=args.gen_frac * max(0.0, budget.left() - reserve),
                       chunk=chunk, sigmas=sigmas, max_guidance=args.max_guidance, seed=args.seed,
                       first_chunk=first_chunk, device=device, jsonl=jsonl, size=size,
                       max_chunks=(1 if tiny else None))
    extra["chunks_done"] = first_chunk + made
    use_ac = device.type == "cuda"
    gap = plain_gap(model, pool, 4 * batch, args.seed, use_ac)
    log(f"[agd] the plain conditional model (s = 0) against the CFG targets: MSE {gap:.5f} (the adapters start "
        "there)")
    jsonl.write(event="plain_gap", mse=gap)

    def st():
        return {"stage": "agd", "seed": args.seed, "teacher": str(teacher_dir), "model_config": config,
                "batch": batch, "lr": lr, "total_steps": trainer.total_steps}

    g = torch.Generator(device=device)
    while not trainer.should_stop():
        g.manual_seed(step_seed(args.seed, trainer.step, 25))
        idx = torch.randint(0, pool.n, (batch,), generator=g, device=device)
        trainer.begin_step()
        loss = agd_loss(model, state, *pool.get(idx), use_ac)
        loss.backward()
        trainer.end_step(loss.detach(), st)
    trainer.finish(st())

    after = base_state_dict(model)
    changed = [k for k in base_before if not torch.equal(base_before[k], after[k].cpu())]
    if changed or after.keys() != base_before.keys():
        raise RuntimeError(f"the frozen base changed during adapter training: {changed[:3]}")
    jsonl.write(event="base_check", tensors=len(base_before), identical=True)
    trainer.ema.copy_to(weights)   # export the EMA adapters
    model.eval()
    final = plain_gap_adapted(model, state, pool, 4 * batch, args.seed, use_ac)
    log(f"[agd] adapted model (EMA) against the CFG targets: MSE {final:.5f} (plain conditional: {gap:.5f})")
    jsonl.write(event="adapted_gap", mse=final, plain=gap)
    exp = export_agd(model.transformer, teacher_dir, out / "agd", {
        "rank": args.rank, "max_guidance": args.max_guidance, "teacher_steps": steps, "train_steps": trainer.step,
        "states": int(pool.added), "seed": args.seed, "mse_plain": round(gap, 6), "mse_adapted": round(final, 6)})
    log(f"[agd] exported the EMA adapters: {exp / 'adapters'} beside a copy of the teacher ({exp})")
    jsonl.write(event="exported", path=str(exp), step=trainer.step)
    jsonl.close()
    return exp


@torch.no_grad()
def plain_gap_adapted(model, state: AdapterState, pool: StatePool, n: int, seed: int, autocast: bool) -> float:
    """The same states as :func:`plain_gap`, through the adapted model at each state's ``s = g - 1``."""
    g = torch.Generator(device=pool.x.device).manual_seed(step_seed(seed, 0, 23))
    idx = torch.randint(0, pool.n, (min(n, pool.n),), generator=g, device=pool.x.device)
    return float(agd_loss(model, state, *pool.get(idx), autocast))


def export_agd(denoiser: nn.Module, teacher_dir: Path, out_dir: Path, info: dict) -> Path:
    """``out_dir``: a copy of the teacher export plus ``adapters/`` (atomic, as ``export.export_model``). The
    copy's ``model_index.json`` notes the adapters under ``fewstep.guidance_adapters``."""
    import os

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(teacher_dir, tmp, ignore=shutil.ignore_patterns("adapters"))
    save_adapters(denoiser, tmp / "adapters")
    index = read_json(tmp / "model_index.json")
    index.setdefault("fewstep", {})["guidance_adapters"] = {
        "method": "adapter guidance distillation (arXiv 2503.07274): one pass per step at guidance_scale > 1",
        "teacher": str(teacher_dir), **info}
    write_json(tmp / "model_index.json", index)
    return replace_dir(tmp, out_dir)


# ----------------------------------------------------------------------------------------------
# Evaluation: CFG (two passes per step) against the adapters (one pass), same prompts and noise
# ----------------------------------------------------------------------------------------------

@dataclass
class AgdEvalArgs:
    teacher: str
    adapters: str
    guidance: list = field(default_factory=lambda: [2.0, 4.0])
    steps: int | None = None     # default: the teacher's default_steps
    n: int = 512
    div_prompts: int = 16
    div_seeds: int = 8
    grid_prompts: int = 8
    batch: int = 512
    out: str | None = None
    seed: int = 0
    tiny: bool = False
    device: str = "auto"


class PassCounter:
    """Counts the denoiser's rows (one image through the network once) with a forward pre-hook."""

    def __init__(self, denoiser: nn.Module):
        self.rows = 0
        self._h = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, a, kw):
        x = a[0] if a else kw.get("hidden_states", kw.get("sample"))
        self.rows += int(x.shape[0])

    def close(self) -> None:
        self._h.remove()


@torch.no_grad()
def sample_with(model, state: AdapterState | None, mode: str, ids, mask, noise, sigmas: list[float], guidance: float,
                uncond) -> torch.Tensor:
    """Euler along ``sigmas``: ``mode`` "cfg" (doubled batch, ``u + g (c - u)``), "agd" (one pass, adapters at
    ``s = g - 1``) or "none" (one plain conditional pass)."""
    from fewstep.training.model import sample
    if mode == "cfg":
        return sample(model, ids, mask, noise, sigmas, guidance, uncond)
    if mode == "agd":
        state.scale = torch.full((noise.shape[0],), guidance - 1.0, device=noise.device)
    try:
        return sample(model, ids, mask, noise, sigmas, 0.0)
    finally:
        if state is not None:
            state.scale = None


def evaluate_agd(args: AgdEvalArgs) -> dict:
    from fewstep.training import data
    from fewstep.training.evaluate import _noise, draw_grid
    from fewstep.training.metrics import Scorer

    device = pick_device(args.device)
    setup_torch(device)
    out = Path(args.out) if args.out else Path(args.adapters).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    model, tok, index = load_export(args.teacher, device)
    state = load_adapters(model.transformer, args.adapters)   # the engine's loader: the served module paths
    state.use_kernel = True
    steps = args.steps or int(index.get("fewstep", {}).get("default_steps", 25))
    sigmas = served_sigmas(args.teacher, steps)
    prompts = data.heldout_prompts(args.n, seed=args.seed)
    div_prompts = data.heldout_prompts(args.div_prompts, seed=args.seed + 1)
    div_list = [p for p in div_prompts for _ in range(args.div_seeds)]
    noise = _noise(args.n, args.seed, 21, device)
    div_noise = _noise(len(div_list), args.seed, 22, device)
    uncond = tokenize(tok, [""], device)
    if device.type == "cuda":
        # the served path runs the adapters through kernels/adapter_linear.py; should it fail here, torch ops score
        # the same adapters (logged, and recorded in the JSON)
        try:
            ids, mask = tokenize(tok, prompts[:2], device)
            sample_with(model, state, "agd", ids, mask, noise[:2], sigmas[:2], 2.0, uncond)
        except Exception as e:  # pragma: no cover - GPU only
            log(f"[agd-eval] adapter kernel failed ({type(e).__name__}: {str(e)[:200]}); torch ops instead")
            state.use_kernel = False
    counter = PassCounter(model.transformer)

    def run(mode, guidance, ps, z):
        outs = []
        for i in range(0, len(ps), args.batch):
            ids, mask = tokenize(tok, ps[i:i + args.batch], device)
            outs.append(sample_with(model, state, mode, ids, mask, z[i:i + args.batch], sigmas, guidance, uncond))
        return torch.cat(outs).clamp(-1, 1)

    def timed(mode, guidance):
        k = min(args.n, args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.time()
        run(mode, guidance, prompts[:k], noise[:k])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000.0 * (time.time() - t0) / k

    configs = [("none", 1.0)] + [(m, float(gs)) for gs in args.guidance for m in ("cfg", "agd")]
    rows, grid = [], []
    scorer = Scorer(0 if args.tiny or device.type != "cuda" else None)
    try:
        for mode, gs in configs:
            counter.rows = 0
            imgs = run(mode, gs, prompts, noise)
            passes = counter.rows / args.n
            ms = timed(mode, gs)   # warm: the run above was this configuration's first
            adh = scorer.adherence(to_uint8_list(imgs), prompts)
            du = to_uint8_list(run(mode, gs, div_list, div_noise))
            div = [scorer.diversity(du[i * args.div_seeds:(i + 1) * args.div_seeds]) for i in range(args.div_prompts)]
            row = {"mode": mode, "guidance": gs, "steps": steps, "accuracy": adh.get("accuracy"),
                   "checks": {k: v for k, v in adh.items() if k not in ("accuracy", "n")},
                   "diversity": float(sum(div) / max(1, len(div))), "passes_per_image": passes,
                   "ms_per_image": round(ms, 4), "batch": min(args.n, args.batch), "n": args.n}
            rows.append(row)
            grid.append((f"{mode} {gs:g}" if mode != "none" else "no guidance",
                         to_uint8_list(imgs[: args.grid_prompts])))
            log(f"[agd-eval] {mode:4s} g {gs:g}: adherence {row['accuracy']:.3f} diversity {row['diversity']:.3f} | "
                f"{passes:g} passes/image | {ms:.3f} ms/image at batch {row['batch']}")
    finally:
        scorer.close()
        counter.close()
    by = {(r["mode"], r["guidance"]): r for r in rows}
    for gs in args.guidance:
        c, a = by[("cfg", float(gs))], by[("agd", float(gs))]
        a["vs_cfg"] = {"adherence_points": round(100 * (a["accuracy"] - c["accuracy"]), 2),
                       "diversity": round(a["diversity"] - c["diversity"], 4),
                       "passes_ratio": round(a["passes_per_image"] / c["passes_per_image"], 4),
                       "time_ratio": round(a["ms_per_image"] / max(c["ms_per_image"], 1e-9), 4)}
    result = {"teacher": str(args.teacher), "adapters": str(args.adapters), "n": args.n, "steps": steps,
              "sigmas": [round(s, 4) for s in sigmas], "prompts": "heldout_prompts", "seed": args.seed,
              "device": str(device), "adapter_kernel": bool(state.use_kernel and device.type == "cuda"), "rows": rows,
              "diversity_protocol": f"{args.div_prompts} heldout prompts x {args.div_seeds} seeds",
              "adapters_config": read_json(Path(args.adapters) / "config.json")}
    write_json(out / "agd_eval.json", result)
    md = agd_markdown(result)
    (out / "agd_eval.md").write_text(md, encoding="utf-8")
    draw_grid(prompts[: args.grid_prompts], grid, out / "agd_grid.png")
    print(md, flush=True)
    log(f"[agd-eval] wrote {out / 'agd_eval.json'}, {out / 'agd_eval.md'}, {out / 'agd_grid.png'}")
    return result


def agd_markdown(result: dict) -> str:
    head = ["mode", "cfg scale", "steps", "adherence", "diversity", "passes/image", "ms/image",
            "adherence vs CFG (points)", "passes vs CFG", "time vs CFG"]
    lines = [f"CFG against guidance adapters: {result['n']} held-out prompts (`{result['prompts']}`), the same noise "
             f"for every row, {result['steps']} steps, device {result['device']}; diversity: "
             f"{result['diversity_protocol']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        vs = r.get("vs_cfg")
        cells = [r["mode"], f"{r['guidance']:g}", str(r["steps"]), f"{r['accuracy']:.3f}", f"{r['diversity']:.3f}",
                 f"{r['passes_per_image']:g}", f"{r['ms_per_image']:.3f}",
                 f"{vs['adherence_points']:+.1f}" if vs else "", f"{vs['passes_ratio']:.2f}x" if vs else "",
                 f"{vs['time_ratio']:.2f}x" if vs else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
