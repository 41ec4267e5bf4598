"""Stage 2: reflow + one-step distillation of the teacher into a 1-4 step, guidance-free student.

``fewstep train distill --teacher DIR/teacher --out DIR [--minutes 8] [--resume]``

Method (InstaFlow; "Improving the Training of Rectified Flows"):

1. **Guidance scale.** Measure the teacher's prompt adherence (``benchmarks.quality.adherence``) on
   training-split prompts at a few CFG scales (the pairs' 12 Euler steps) and keep the best (logged).
2. **Coupling.** Draw noise ``z`` and integrate the teacher ODE from ``z`` with CFG at that scale
   (12 Euler steps: twice the pairs of 25 in the same seconds) on training-split prompts: a deterministic pair
   ``(z, x0 = T(z, c))``. Pairs are made first (a quarter of the budget) and live on the GPU (fp16) for the
   whole stage.
3. **Reflow + distillation.** The student starts as a copy of the teacher (text encoder
   fine-tuned too) and regresses the straight-line velocity ``z - x0`` at
   ``x_s = (1-s) x0 + s z``. Sigma is drawn from a mixture: ``s = 1`` exactly (the one-step case,
   extra loss weight: one Euler step from pure noise must land on the teacher sample), the
   few-step grid (the scheduler's 4-step sigmas and quarter points), and uniform. The velocity
   error is weighted on object outlines like the teacher's (``w_edge``, see ``teacher.edge_map``),
   and a low-frequency "perceptual-ish" term (L1 + L2 on 2x average-pooled ``x0`` predictions) is added. Each
   sample's velocity error goes through the pseudo-Huber function ``sqrt(e + c^2) - c`` ("Improving the Training
   of Rectified Flows"; ``--huber``, c = 1e-3), so a few badly fitted samples do not dominate the gradient.
   The student never sees CFG: it is guidance-distilled and ships ``default_guidance_scale: 0``.
4. **Distribution matching** (optional, ``--dmd W``; DMD / DMD2). The regression above leaves one-step samples
   blurred (2026-11-29, c419a67: shapes 0.96 in the teacher, 0.62 in the 1-step student). A "fake" score network
   (a copy of the teacher's denoiser) learns the student's one-step distribution by flow matching, one update per
   student step, and the student's one-step samples get DMD's gradient ``(x0_fake - x0_real) / |x - x0_real|``
   at a random noise level: away from what only the student makes, towards what the CFG teacher makes. The
   regression stays on (as in DMD, which kept a regression loss; DMD2 replaced it with a GAN term, item 5): it
   holds the student to the teacher's noise-to-image coupling while the fake network warms up.

5. **Adversarial term** (optional, ``--gan W``; ``training/adversarial.py``): a patch discriminator judges the
   one-step outputs against the teacher's samples. It made the student worse on 2026-11-30 (docs/default-models.md).
   ``--gan-features`` judges through the frozen teacher UNet's encoder instead (LADD); it hurt too (eleventh
   session).
6. **Teacher-feature perceptual distance** (optional, ``--feat W``; ``training/features.py``): LPIPS's form on the
   frozen teacher encoder's features, added to the regression inside the recorded step. It lowered the 1-step score
   (0.770 at W = 1, 0.705 at 3, against 0.789; 2026-11-30, 6210e5d).

Speed: the plain regression step is recorded as a CUDA graph after its first step (``training.graphs``; 1.2x the
eager step on the H200, 2026-11-30); ``--no-cuda-graphs`` runs it eagerly, and DMD or the adversarial term
always do.

Exports the EMA student (fp16) to ``DIR/student/`` with ``default_steps: 1``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.training.common import (GuardedCompiled, JsonlLog, Stage, UsageError, bf16_autocast, count_params, ema_decay_at,
                             ema_update, fmt_secs, guarded_train_step, log, maybe_compile, step_seed)
from fewstep.training.export import export_model, load_export
from fewstep.training.features import feature_distance
from fewstep.training.loop import Trainer
from fewstep.training.model import guided_velocity, sample, scheduler_sigmas, to_uint8_list, tokenize, uniform_sigmas

# sigmas of the few-step grids the student must handle: diffusers' set_timesteps(4) with shift=1
# (1, .667, .334, .001 -> 0) and the quarter points of linspace(1, 1/N, N) conventions.
FEW_STEP_SIGMAS = (0.75, 0.667, 0.5, 0.334, 0.25)
DEFAULT_GRID = (2.0, 3.0, 4.0, 5.0, 6.0)


@dataclass
class DistillArgs:
    teacher: str
    out: str
    minutes: float = 8.0
    resume: bool = False
    tiny: bool = False
    batch: int | None = None
    lr: float | None = None
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    teacher_steps: int | None = None
    guidance: float | None = None
    guidance_grid: tuple = DEFAULT_GRID
    search_n: int | None = None
    chunk: int | None = None
    gen_frac: float = 0.25
    max_pairs: int | None = None
    # share of sigma = 1 (one-step) draws; the rest is the few-step grid. 0.85 since 2026-11-30 (ebb3bbb): 0.717 held-out
    # at 1 step against 0.701 at 0.7 (same teacher, one run each: within run-to-run noise, but the train-split check
    # agreed, 0.742 against 0.691)
    p_one: float = 0.85
    p_grid: float = 0.3
    w_one: float = 2.0
    w_perc: float = 0.5
    w_edge: float = 4.0         # shape-aware weighting of the velocity error (see teacher.edge_map)
    low_sigma: float = 0.2      # weight min(1, (sigma/low_sigma)^2) on nearly clean samples (teacher.low_sigma_weight)
    freeze_text: bool = False
    dmd: float = 0.0            # weight of the distribution-matching term (0: off)
    dmd_batch: int | None = None  # one-step samples per step for it (default 128)
    dmd_lr: float | None = None   # the fake score network's learning rate (default: the student's)
    dmd_warmup: int = 50        # the weight ramps up over this many steps while the fake network catches up
    dmd_guidance: float | None = None  # the real score's CFG (default: the pairs' scale)
    drop_background: float = 0.0  # share of pair prompts without " on a BG background" (data.without_background)
    gan: float = 0.0            # adversarial term on the one-step samples, as a share of the regression's pull (0: off)
    gan_batch: int | None = None  # one-step samples per step it judges (default 256; taken from the sigma = 1 draws)
    gan_lr: float | None = None   # the discriminator's learning rate (default 5e-4, constant)
    gan_features: bool = False    # judge through the frozen teacher UNet's encoder (LADD) instead of a pixel network
    gan_warmup: int = 150       # the generator's adversarial weight is 0 for this many steps, then ramps over as many
    feat: float = 0.0           # weight of the teacher-feature perceptual distance (training.features; 0: off)
    feat_batch: int | None = None  # the batch's first N predictions it compares (default 128)
    feat_sigma: tuple = (0.1, 0.7)  # the noise levels (uniform) at which the teacher's encoder reads both images
    # pseudo-Huber constant on the per-sample velocity error (0: plain mean squares). 1e-3 since 2026-11-30 (8630d76):
    # 0.789 held-out at 1 step against 0.768 without (same teacher and pairs, one run each; train split 0.793 / 0.730)
    huber: float = 1e-3
    seed: int = 0
    # eager by default since the UNet (2026-11-29, c419a67): compiling its sampler and its train step cost ~100 s each
    # of a 210 s stage (one run trained a single step); eager it trains ~630 steps at 3.2k img/s
    compile: bool = False
    # the student's step recorded as a CUDA graph (training.graphs): 108 against 130 ms per batch-512 step on the
    # H200 (compiled: 83 ms, after 122 s of compilation); losses equal to the eager step's
    cuda_graphs: bool = True
    max_steps: int | None = None
    ckpt_every: float = 60.0
    device: str = "auto"
    budget_start: float | None = None    # default: Budget's (the import of training.common)
    # besides DIR/student (the EMA at ema_decay): the raw weights (DIR/student_raw) and EMAs at other decays
    # (DIR/student_ema<D>), for a paired comparison of what to export from one training trajectory. An EMA does not
    # feed back into training, so student_ema<D> is what a run with ema_decay = D would export
    export_raw: bool = False
    extra_emas: tuple = ()


# ----------------------------------------------------------------------------------------------
# Teacher sampling + adherence
# ----------------------------------------------------------------------------------------------

def _ac_dtype(device: torch.device):
    return torch.bfloat16 if device.type == "cuda" else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], noise: torch.Tensor, sig: list[float], guidance: float,
             batch: int) -> torch.Tensor:
    device = noise.device
    uncond = tokenize(tokenizer, [""], device)
    outs = []
    for i in range(0, len(prompts), batch):
        ids, mask = tokenize(tokenizer, prompts[i:i + batch], device)
        outs.append(sample(model, ids, mask, noise[i:i + batch], sig, guidance, uncond,
                           autocast_dtype=_ac_dtype(device)))
    return torch.cat(outs).clamp(-1, 1)


def adherence_of(images: torch.Tensor, prompts: list[str], scorer) -> dict:
    return scorer.adherence(to_uint8_list(images), list(prompts))


def search_guidance(model, tokenizer, grid, n: int, steps: int, seed: int, device, batch: int,
                    jsonl: JsonlLog, scorer) -> tuple[float, list[dict]]:
    from fewstep.training import data
    prompts = data.train_prompts(n, seed=seed + 101)
    g = torch.Generator(device=device).manual_seed(step_seed(seed, 0, 11))
    noise = torch.randn((n, 3, 64, 64), generator=g, device=device)
    rows = []
    for scale in grid:
        t0 = time.time()
        imgs = generate(model, tokenizer, prompts, noise, scheduler_sigmas(steps), scale, batch)
        res = adherence_of(imgs, prompts, scorer)
        rows.append({"guidance": scale, **res, "seconds": round(time.time() - t0, 2)})
        log(f"[distill] teacher @ {steps} steps, CFG {scale:g}: adherence {res.get('accuracy', float('nan')):.3f} "
            f"({n} train-split prompts)")
        jsonl.write(event="guidance_search", steps=steps, prompts=n, **rows[-1])
    return pick_guidance(rows), rows


def pick_guidance(rows: list[dict]) -> float:
    best = max(r.get("accuracy", 0.0) for r in rows)
    # the best scale (ties: the smaller). Before 8630d76 (2026-11-30): the smallest within 1 point of the best, for
    # diversity; on the unet4p teacher that chose 2 (0.941) over 3 (0.945), yet the student of CFG-3 pairs scored
    # 0.793 held-out at 1 step against 0.777 (one run each; train split 0.809 / 0.770), diversity 0.111 / 0.113
    return float(min(r["guidance"] for r in rows if r.get("accuracy", 0.0) >= best))


# ----------------------------------------------------------------------------------------------
# Pair pool
# ----------------------------------------------------------------------------------------------

class PairPool:
    """Ring buffer of (noise, teacher sample, ids, mask) on the training device (fp16 images)."""

    def __init__(self, capacity: int, max_length: int, size: int, device):
        self.cap = capacity
        self.z = torch.empty((capacity, 3, size, size), dtype=torch.float16, device=device)
        self.x0 = torch.empty_like(self.z)
        self.ids = torch.empty((capacity, max_length), dtype=torch.long, device=device)
        self.mask = torch.empty((capacity, max_length), dtype=torch.long, device=device)
        self.n = 0
        self.pos = 0
        self.added = 0

    def add(self, z, x0, ids, mask) -> None:
        b = z.shape[0]
        idx = (torch.arange(b, device=z.device) + self.pos) % self.cap
        self.z[idx] = z.half()
        self.x0[idx] = x0.half()
        self.ids[idx] = ids
        self.mask[idx] = mask
        self.pos = (self.pos + b) % self.cap
        self.n = min(self.cap, self.n + b)
        self.added += b

    def get(self, idx):
        return self.z[idx].float(), self.x0[idx].float(), self.ids[idx], self.mask[idx]


def fill_pool(pool: PairPool, teacher, tokenizer, *, seconds: float, chunk: int, steps: int, guidance: float,
              seed: int, first_chunk: int, device, jsonl: JsonlLog, max_chunks: int | None = None,
              denoise=None, bg_prob: float = 0.0) -> int:
    """Generate teacher pairs for ``seconds`` (or until full / max_chunks); returns chunks made.

    The sampler runs eagerly: recorded as one CUDA graph per chunk it ran at the same speed (1.82 against 1.84 s per
    1024 pairs, H200, ``fewstep train bench --variants``); its kernels, not their launches, are the cost."""
    from tqdm import tqdm

    from fewstep.training import data
    t0 = time.time()
    c = first_chunk
    sig = scheduler_sigmas(steps)
    uncond = tokenize(tokenizer, [""], device)
    bar = tqdm(desc="teacher pairs", unit="pair", dynamic_ncols=True, mininterval=2.0)
    made = 0
    while True:
        if made and time.time() - t0 > seconds:
            break
        if pool.added >= pool.cap or (max_chunks is not None and made >= max_chunks):
            break
        prompts = data.train_prompts(chunk, seed=step_seed(seed, c, 5) % (2**32))
        if bg_prob > 0:  # the teacher draws a background of its choosing for these
            prompts = data.drop_backgrounds(prompts, np.random.default_rng(step_seed(seed, c, 7) % (2**32)), bg_prob)
        ids, mask = tokenize(tokenizer, prompts, device)
        g = torch.Generator(device=device).manual_seed(step_seed(seed, c, 6))
        z = torch.randn((chunk, 3, 64, 64), generator=g, device=device)
        x0 = sample(teacher, ids, mask, z, sig, guidance, uncond, autocast_dtype=_ac_dtype(device),
                    denoise=denoise)
        pool.add(z, x0.clamp(-1, 1), ids, mask)
        c += 1
        made += 1
        bar.update(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.time() - t0
    bar.close()
    rate = made * chunk / max(dt, 1e-6)
    log(f"[distill] generated {made * chunk} teacher pairs in {dt:.1f}s ({rate:.0f} pairs/s, "
        f"{steps} steps, CFG {guidance:g}); pool {pool.n}")
    jsonl.write(event="pairs", chunks=made, pairs=made * chunk, seconds=round(dt, 2), pairs_per_s=round(rate, 1),
                pool=pool.n, first_chunk=first_chunk)
    return made


# ----------------------------------------------------------------------------------------------
# Student objective
# ----------------------------------------------------------------------------------------------

def draw_sigma(B: int, g: torch.Generator, device, p_one: float, p_grid: float) -> torch.Tensor:
    u = torch.rand(B, generator=g, device=device)
    grid = torch.tensor(FEW_STEP_SIGMAS, device=device)
    gi = torch.randint(0, len(FEW_STEP_SIGMAS), (B,), generator=g, device=device)
    cont = torch.rand(B, generator=g, device=device).clamp(1e-3, 1.0)
    return torch.where(u < p_one, torch.ones_like(u), torch.where(u < p_one + p_grid, grid[gi], cont))


def reflow_loss(model, z, x0, ids, mask, sigma, w_one: float, w_perc: float, autocast: bool,
                w_edge: float = 0.0, low_sigma: float = 0.0, huber: float = 0.0, return_pred: bool = False):
    s = sigma.view(-1, 1, 1, 1)
    xs = (1.0 - s) * x0 + s * z
    ctx = bf16_autocast(autocast)
    with ctx:
        v = model(xs, sigma, ids, mask)
    v = v.float()
    target = z - x0
    if w_edge > 0:
        from fewstep.training.teacher import edge_map
        pw = 1.0 + w_edge * edge_map(x0)
        mse = ((v - target) ** 2 * pw).mean(dim=(1, 2, 3)) / pw.mean(dim=(1, 2, 3))
    else:
        mse = ((v - target) ** 2).mean(dim=(1, 2, 3))
    if huber > 0:  # "Improving the Training of Rectified Flows": sqrt(|e|^2 + c^2) - c, per sample (as a mean)
        mse = torch.sqrt(mse + huber * huber) - huber
    x0_pred = xs - s * v
    d = F.avg_pool2d(x0_pred, 2) - F.avg_pool2d(x0, 2)
    perc = d.abs().mean(dim=(1, 2, 3)) + (d ** 2).mean(dim=(1, 2, 3))
    w = 1.0 + (w_one - 1.0) * (sigma >= 0.9999).float()
    if low_sigma > 0:  # the velocity error of a nearly clean sample is a noise-prediction error: see the teacher
        from fewstep.training.teacher import low_sigma_weight
        mse = mse * low_sigma_weight(sigma.float(), low_sigma)
    loss = ((mse + w_perc * perc) * w).sum() / w.sum()
    return (loss, x0_pred) if return_pred else loss


# ----------------------------------------------------------------------------------------------
# Distribution matching (DMD / DMD2)
# ----------------------------------------------------------------------------------------------

class DistributionMatching:
    """DMD's distribution-matching gradient for the student's one-step samples, and the "fake" score network it
    needs. The real score is the frozen teacher with CFG; the fake one starts as a copy of the teacher's denoiser and
    is trained by flow matching on the student's current one-step samples, once per student step (DMD2's two
    time-scale rule updates it five times; our budget is minutes). Both read the teacher's frozen text embeddings.

    Flow-matching form: at ``x_t = (1 - t) x + t n`` each network's clean-image estimate is ``x_t - t v``; the
    score difference ``s_fake - s_real`` is proportional to ``x0_fake - x0_real``, normalised per sample by
    ``mean |x - x0_real|`` as in DMD. The student minimises ``0.5 * mse(x, sg(x - grad))``, whose gradient in ``x``
    is ``grad / numel``."""

    def __init__(self, teacher, *, guidance: float, uncond, lr: float, device, autocast: bool,
                 t_min: float = 0.02, t_max: float = 0.98):
        import copy

        from fewstep.training.common import make_adamw
        from fewstep.training.model import FewstepModel
        self.teacher = teacher
        fake_den = copy.deepcopy(teacher.transformer).float().train().requires_grad_(True)
        self.fake = FewstepModel(teacher.text_encoder, fake_den)   # shares the frozen text encoder
        # DMD2: Adam without momentum for the fake network, which chases a moving target
        self.opt = make_adamw(fake_den, lr, 0.0, device, betas=(0.0, 0.99))
        self.params = [p for p in fake_den.parameters()]
        self.guidance = guidance
        self.autocast, self.t_min, self.t_max = autocast, t_min, t_max
        with torch.no_grad(), self._ctx():  # the empty prompt's embedding: the same every step
            self.u_mask = uncond[1]
            self.u_emb = teacher.encode(*uncond)

    def _ctx(self):
        return bf16_autocast(self.autocast)

    def _noised(self, x, g):
        B = x.shape[0]
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(B, generator=g, device=x.device)
        n = torch.randn(x.shape, generator=g, device=x.device)
        tt = t.view(-1, 1, 1, 1)
        return (1.0 - tt) * x + tt * n, t, n

    def generator_loss(self, student, z, ids, mask, g) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, the detached one-step samples, the teacher's text embeddings) for ``student``'s samples."""
        B = z.shape[0]
        ones = torch.ones(B, device=z.device)
        with self._ctx():
            v = student(z, ones, ids, mask)
        x = z - v.float()                  # one Euler step from sigma 1 to 0
        xt, t, _ = self._noised(x.detach(), g)
        tt = t.view(-1, 1, 1, 1)
        with torch.no_grad(), self._ctx():
            emb = self.teacher.encode(ids, mask)
            if self.guidance > 1.0:
                emb2 = torch.cat([emb, self.u_emb.expand(B, -1, -1).to(emb.dtype)])
                v_real = guided_velocity(self.teacher.denoise, xt, t, emb2,
                                         torch.cat([mask, self.u_mask.expand(B, -1)]), self.guidance)
            else:
                v_real = self.teacher.denoise(xt, t, emb, mask).float()
            v_fake = self.fake.denoise(xt, t, emb, mask).float()
        x0_real, x0_fake = xt - tt * v_real, xt - tt * v_fake
        norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
        loss = 0.5 * F.mse_loss(x, (x - grad).detach())
        return loss, x.detach(), emb

    def fake_step(self, x, emb, mask, g, lr: float) -> torch.Tensor:
        """One flow-matching update of the fake network on the student's samples ``x``."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        xt, t, n = self._noised(x, g)
        with self._ctx():
            v = self.fake.denoise(xt, t, emb, mask)
        loss = F.mse_loss(v.float(), n - x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        return loss.detach()


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------

def distill(args: DistillArgs) -> Path:
    stage = Stage(args, "distill_log.jsonl")
    budget, device, out, jsonl = stage.budget, stage.device, stage.out, stage.jsonl
    tiny = args.tiny
    batch = args.batch or (8 if tiny else 512)
    # 8e-4 since 8630d76 (2026-11-30; 0.777 held-out at 1 step against 0.789 at 5e-4 in another run, but 0.770 / 0.793
    # train-split: a tie; the shipped run, CFG 3, used 8e-4); the student trains ~1.1k steps in 3.8 minutes
    lr = args.lr or (1e-3 if tiny else 8e-4)
    # 12 teacher steps per pair: twice the pairs of 25 in the same seconds (the UNet teacher at 12 steps: 0.51-0.52
    # train-split adherence at CFG 2-3; at 25 steps, CFG 5: 0.55 held-out)
    steps = args.teacher_steps or (2 if tiny else 12)
    search_n = args.search_n or (4 if tiny else 256)
    chunk = args.chunk or (8 if tiny else 1024)
    cap = args.max_pairs or (32 if tiny else 400_000)
    cap = max(cap, chunk)
    grid = tuple(args.guidance_grid) if not tiny or args.guidance_grid != DEFAULT_GRID else (1.0, 3.0)
    max_steps = args.max_steps if args.max_steps is not None else (4 if tiny else None)

    from fewstep.training.metrics import Scorer
    scorer = Scorer(0 if tiny else None)   # detector worker processes start while we load
    teacher, tokenizer, index = load_export(args.teacher, device, torch.float32)
    teacher.requires_grad_(False).eval()
    # checked before the CFG search and the pairs, which take a minute on the H200
    encoder_flags = [f for f, on in (("--feat", args.feat > 0), ("--gan-features", args.gan > 0 and args.gan_features))
                     if on]
    if encoder_flags and not teacher.is_unet:
        raise UsageError(f"{' and '.join(encoder_flags)} need{'s' if len(encoder_flags) == 1 else ''} the teacher "
                         f"UNet's encoder; this teacher is a "
                         f"{type(teacher.transformer).__name__}: drop {' '.join(encoder_flags)}")
    cfg_size = int(index.get("fewstep", {}).get("default_size", 64))
    n_tr, n_te = count_params(teacher.transformer), count_params(teacher.text_encoder)
    log(f"[distill] teacher {args.teacher}: {(n_tr + n_te) / 1e6:.3f}M params; device {device}; "
        f"batch {batch}, lr {lr}, teacher steps {steps}")
    jsonl.write(event="start", stage="distill", args=vars(args), batch=batch, lr=lr, teacher_steps=steps,
                device=str(device), torch=torch.__version__)

    import copy
    student = copy.deepcopy(teacher).float().train().requires_grad_(True)
    if args.freeze_text:
        student.text_encoder.requires_grad_(False)

    disc_kind = "teacher-feature" if args.gan_features else "patch"   # --gan's discriminator, for the logs and export
    # the plain regression step is recorded as a CUDA graph; the DMD and adversarial terms run eagerly (their
    # boolean-mask selections and second networks are not capturable as written)
    graphs = args.cuda_graphs and device.type == "cuda" and not args.compile and args.dmd == 0 and args.gan == 0
    # after the last step: checkpoint (0.3 s), the quick check (1.5 s on the H200, eager) and the export (0.5 s).
    # It was 35 s before 8630d76 (2026-11-30), a fifth of a 3-minute stage left idle.
    reserve = 6.0 if tiny or device.type != "cuda" else 12.0
    trainer = Trainer(name="distill", out=out, model=student, device=device, budget=budget, lr=lr,
                      warmup=(3 if tiny else args.warmup), weight_decay=args.weight_decay,
                      ema_decay=args.ema_decay, batch=batch, reserve_s=reserve, max_steps=max_steps,
                      ckpt_every_s=args.ckpt_every, jsonl=jsonl, log_every=(1 if tiny else 25),
                      estimate_after=(10**9 if tiny else 60), cooldown_frac=0.2, capturable=graphs)
    resumed = trainer.resume() if args.resume else None
    extra = trainer.extra_state
    guidance = args.guidance
    if guidance is None and resumed is not None:
        guidance = extra.get("guidance")
    if guidance is None:
        guidance, rows = search_guidance(teacher, tokenizer, grid, search_n, steps, args.seed, device,
                                         batch=min(chunk, 1024), jsonl=jsonl, scorer=scorer)
        log(f"[distill] chosen CFG scale {guidance:g} (best teacher adherence on train-split prompts)")
        extra["guidance_search"] = rows
    extra["guidance"] = float(guidance)
    jsonl.write(event="guidance", guidance=guidance)

    # ---- pairs (front-loaded; on resume a fresh pool with new chunk seeds) ----
    pool = PairPool(cap, tokenizer.model_max_length, cfg_size, device)
    first_chunk = int(extra.get("chunks_done", 0))
    phase = max(0.0, budget.left() - reserve)
    # the pair sampler runs one fixed batch shape (2 x chunk with CFG): compile it (eager fallback)
    eager_den = teacher.denoise
    t_den = maybe_compile(eager_den, args.compile and not tiny, device, "teacher sampler")
    denoise = GuardedCompiled(eager_den, t_den, "teacher sampler") if t_den is not eager_den else None
    made = fill_pool(pool, teacher, tokenizer, seconds=args.gen_frac * phase, chunk=chunk, steps=steps,
                     guidance=guidance, seed=args.seed, first_chunk=first_chunk, device=device, jsonl=jsonl,
                     max_chunks=(2 if tiny else None), denoise=denoise, bg_prob=args.drop_background)
    extra["chunks_done"] = first_chunk + made
    extra["pairs_total"] = int(extra.get("pairs_total", 0)) + made * chunk

    def state():
        return {"stage": "distill", "seed": args.seed, "teacher": str(args.teacher), "batch": batch,
                "lr": lr, "teacher_steps": steps, "total_steps": trainer.total_steps}

    use_ac = device.type == "cuda"

    feat_batch = min(batch, args.feat_batch or (4 if tiny else 128)) if args.feat > 0 else 0
    if feat_batch:
        log(f"[distill] teacher-feature distance: weight {args.feat:g} on the batch's first {feat_batch} "
            f"predictions, read at noise levels U{tuple(args.feat_sigma)}")
        jsonl.write(event="feat", weight=args.feat, batch=feat_batch, sigma=list(args.feat_sigma))

    def student_loss(f, z, x0, ids, mask, sigma, fs=None, fn=None, return_pred=False):
        """The regression (``f`` is ``reflow_loss`` or its compiled form), plus with ``--feat`` the teacher-feature
        distance of the first ``feat_batch`` clean-image predictions at noise levels ``fs`` with noise ``fn``
        (drawn by the caller, so that a recorded step replays new draws)."""
        loss, x0_pred = f(student, z, x0, ids, mask, sigma, args.w_one, args.w_perc, use_ac, args.w_edge,
                          args.low_sigma, args.huber, return_pred=True)
        if fs is not None:
            k = fs.shape[0]
            with torch.no_grad(), bf16_autocast(use_ac):
                emb = teacher.encode(ids[:k], mask[:k])
            with bf16_autocast(use_ac):
                fd = feature_distance(teacher.transformer, x0_pred[:k], x0[:k], fs, fn, emb)
            loss = loss + args.feat * fd.mean()
        return (loss, x0_pred) if return_pred else loss

    def feat_inputs():
        """This step's noise levels and noise for ``--feat`` (from the step's generator ``g``): () when off."""
        if not feat_batch:
            return ()
        lo, hi = args.feat_sigma
        fs = lo + (hi - lo) * torch.rand(feat_batch, generator=g, device=device)
        return fs, torch.randn((feat_batch, 3, cfg_size, cfg_size), generator=g, device=device)
    step_fn = guarded_train_step(reflow_loss, student_loss, args.compile and not tiny, device, "distill step",
                                 on_fail=lambda: trainer.opt.zero_grad(set_to_none=True))
    graph_loss = functools.partial(student_loss, reflow_loss)
    if graphs:
        log("[distill] student step: recorded as a CUDA graph after its first step")
    dm = None
    if args.dmd > 0:
        dmd_guidance = guidance if args.dmd_guidance is None else args.dmd_guidance
        dm = DistributionMatching(teacher, guidance=dmd_guidance, uncond=tokenize(tokenizer, [""], device),
                                  lr=args.dmd_lr or lr, device=device, autocast=use_ac)
        dmd_batch = args.dmd_batch or (4 if tiny else 128)
        if resumed is not None:  # the fake network is not checkpointed: it re-learns the student's samples
            log("[distill] --resume with --dmd: the fake score network restarts from the teacher")
        log(f"[distill] distribution matching: weight {args.dmd:g} (ramp {args.dmd_warmup} steps), "
            f"{dmd_batch} one-step samples per step, real score CFG {dmd_guidance:g}")
        jsonl.write(event="dmd", weight=args.dmd, batch=dmd_batch, guidance=dmd_guidance, lr=args.dmd_lr or lr)
    adv = None
    if args.gan > 0:
        from fewstep.training.adversarial import AdversarialLoss, adaptive_weight, last_layer_weight
        gan_batch = args.gan_batch or (4 if tiny else 256)
        gan_lr = args.gan_lr or 5e-4
        adv = AdversarialLoss(teacher.text_encoder.config.hidden_size, lr=gan_lr, device=device, autocast=use_ac,
                              teacher_unet=teacher.transformer if args.gan_features else None,
                              seed=step_seed(args.seed, trainer.step, 13))
        last_w = last_layer_weight(student)
        log(f"[distill] adversarial term ({disc_kind} discriminator, "
            f"{sum(p.numel() for p in adv.params) / 1e6:.2f}M trained params): weight {args.gan:g} of the "
            f"regression's pull (ramp {args.gan_warmup} "
            f"steps after as many without), {gan_batch} one-step samples per step, discriminator lr {gan_lr:g}")
        jsonl.write(event="gan", weight=args.gan, batch=gan_batch, lr=gan_lr, warmup=args.gan_warmup,
                    features=args.gan_features)
    dm_acc, gan_acc = [], []
    extra_emas = {float(d): copy.deepcopy(trainer.ema) for d in args.extra_emas}

    def end_step(loss, **kw):
        trainer.end_step(loss, state, **kw)
        for d, e in extra_emas.items():
            ema_update(e, student, ema_decay_at(trainer.step - 1, d))   # the step trainer.ema was updated at

    g = torch.Generator(device=device)
    log(f"[distill] training the student on {pool.n} pairs; {fmt_secs(budget.left())} left")
    while not trainer.should_stop():
        g.manual_seed(step_seed(args.seed, trainer.step, 9))
        idx = torch.randint(0, pool.n, (batch,), generator=g, device=device)
        z, x0, ids, mask = pool.get(idx)
        sigma = draw_sigma(batch, g, device, args.p_one, args.p_grid)
        trainer.begin_step()
        judged = torch.nonzero(sigma >= 0.9999).squeeze(1)[:gan_batch] if adv is not None else None
        if graphs:
            # the first step is the recording's warm-up (a real step); every later one replays the recording
            loss, gn = trainer.recorded_step(graph_loss, (z, x0, ids, mask, sigma, *feat_inputs()))
            graphs = trainer.captured is not None   # a failed recording: eager steps from the next one on
            end_step(loss, grad_norm=gn, stepped=True)
            continue
        if judged is None or judged.numel() == 0:
            loss = step_fn(z, x0, ids, mask, sigma, *feat_inputs())
        else:
            rec, x0_pred = student_loss(reflow_loss, z, x0, ids, mask, sigma, *feat_inputs(), return_pred=True)
            # the judged samples: the batch's one-step draws (x_1 = z, so x0_pred is exactly the 1-step output)
            with torch.no_grad(), bf16_autocast(use_ac):
                emb_g = teacher.encode(ids[judged], mask[judged])
            fake, real, mask_g = x0_pred[judged], x0[judged], mask[judged]
            g_loss = adv.generator_loss(fake, emb_g, mask_g)
            # the generator feels the term only once the discriminator has learned something: off for gan_warmup
            # steps, then a linear ramp over as many (the CPU probe: ~100 steps to tell 3x3-blurred shapes)
            k = trainer.step - trainer.start_step
            ramp = min(1.0, max(0.0, (k - args.gan_warmup) / max(1, args.gan_warmup)))
            w_gan = adaptive_weight(rec, g_loss, last_w) * (args.gan * ramp)
            (rec + w_gan * g_loss).backward()
            loss = rec.detach()
        if dm is not None:
            # prompts from the pair pool (training split), fresh noise: the term needs no teacher pairs
            ids_d, mask_d = ids[:dmd_batch], mask[:dmd_batch]
            z_d = torch.randn((ids_d.shape[0], 3, cfg_size, cfg_size), generator=g, device=device)
            ramp = min(1.0, (trainer.step - trainer.start_step + 1) / max(1, args.dmd_warmup))
            dm_loss, x_d, emb_d = dm.generator_loss(student, z_d, ids_d, mask_d, g)
            (args.dmd * ramp * dm_loss).backward()
            loss = loss.detach() + args.dmd * ramp * dm_loss.detach()
        end_step(loss)
        if judged is not None and judged.numel():
            d = adv.disc_step(real, fake, emb_g, mask_g)   # constant LR: it must be sharp from the first steps
            gan_acc.append(torch.stack([g_loss.detach(), w_gan, d["d_loss"], d["d_real"], d["d_fake"]]))
            if len(gan_acc) >= trainer.log_every:
                vals = torch.stack(gan_acc).mean(0).tolist()
                jsonl.write(event="gan_loss", step=trainer.step,
                            **{k: round(v, 5) for k, v in zip(("g", "w", "d", "d_real", "d_fake"), vals)})
                gan_acc.clear()
        if dm is not None:
            fake_loss = dm.fake_step(x_d, emb_d, mask_d, g, trainer.cur_lr * (args.dmd_lr or lr) / lr)
            dm_acc.append(torch.stack([dm_loss.detach().float(), fake_loss.float()]))
            if len(dm_acc) >= trainer.log_every:
                d_mean, f_mean = torch.stack(dm_acc).mean(0).tolist()
                jsonl.write(event="dmd_loss", step=trainer.step, dm=round(d_mean, 6), fake=round(f_mean, 6))
                dm_acc.clear()
    trainer.finish(state())

    # ---- quick check on train-split prompts (held-out evaluation is the `eval` stage) ----
    from fewstep.training import data
    prompts = data.train_prompts(search_n, seed=args.seed + 202)
    gq = torch.Generator(device=device).manual_seed(step_seed(args.seed, 0, 12))
    noise = torch.randn((search_n, 3, 64, 64), generator=gq, device=device)
    quick = {}
    trainer.ema.eval()
    for n_steps in (1, 2, 4):
        # the student is served on the uniform grid it was trained on (export hint flow_sigmas "uniform")
        imgs = generate(trainer.ema, tokenizer, prompts, noise, uniform_sigmas(n_steps), 0.0, batch=1024)
        quick[n_steps] = adherence_of(imgs, prompts, scorer).get("accuracy")
        log(f"[distill] student (EMA) {n_steps}-step adherence on train-split prompts: {quick[n_steps]:.3f}")
    jsonl.write(event="student_quick_eval", n=search_n, accuracy=quick)
    scorer.close()

    fewstep = {"default_steps": 1, "default_guidance_scale": 0.0, "default_size": cfg_size, "sizes": [cfg_size],
               "distillation": "reflow + one-step distillation (InstaFlow-style) of a CFG flow-matching teacher; "
                               "guidance-distilled" + (f"; distribution matching (DMD, weight {args.dmd:g})"
                                                       if args.dmd > 0 else "")
                               + (f"; adversarial ({disc_kind} discriminator, weight {args.gan:g})"
                                  if args.gan > 0 else "")
                               + (f"; teacher-feature perceptual distance (weight {args.feat:g})"
                                  if args.feat > 0 else "")
                               + (f"; pseudo-Huber velocity loss (c = {args.huber:g})" if args.huber > 0 else ""),
               "teacher_steps": steps, "teacher_guidance_scale": float(guidance),
               "train_steps": trainer.step, "pairs": int(extra["pairs_total"]), "seed": args.seed}
    for name, model, what in ([("student_raw", student, "raw weights")] if args.export_raw else []) + [
            (f"student_ema{d:g}", e, f"EMA {d:g}") for d, e in extra_emas.items()]:
        log(f"[distill] exported the student's {what}: "
            f"{export_model(model, tokenizer, out / name, {**fewstep, 'weights': what})}")
    return stage.exported("distill", "EMA student", export_model(trainer.ema, tokenizer, out / "student", fewstep),
                          trainer.step)
