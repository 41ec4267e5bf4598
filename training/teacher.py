"""Stage 1: train the flow-matching teacher (text encoder + DiT) from scratch on streamed data.

``fewstep train teacher --out DIR [--minutes 8] [--resume]``

* data: ``training.data`` scenes rendered on the training device (see :mod:`training.stream`),
  caption dropout (``""``) for classifier-free guidance;
* objective: rectified-flow / flow matching, ``x_s = (1-s) x0 + s n``, target ``v = n - x0``,
  sigma ~ 80% logit-normal(``sigma_loc`` = 0.8, 1) + 20% uniform. The location is shifted towards
  high noise because that is where a shape's identity is decided in pixel space at 64x64 (the
  Bayes-optimal shape classifier on ``x_s`` goes from chance to ~100% between sigma 0.95 and 0.5,
  ``fewstep train study bayes``) and where the first base teacher fails (its x0 predictions
  carry the captioned shape 97% of the time at sigma 0.3 but 22% at 0.7, ``study probe``): 71% of
  the draws land in [0.5, 0.95] (49% before); the uniform part keeps the whole range covered;
* shape-aware loss: the per-pixel squared error is weighted ``1 + edge_weight * edge(x0)`` where
  ``edge`` is the 3x3-dilated colour-edge map of the clean image (object outlines), normalised by
  the mean weight, so the few pixels that carry the shape are not drowned by flat background;
* bf16 autocast, fused AdamW, warmup-stable-decay LR, EMA (exported), ``torch.compile`` with an
  eager fallback, checkpoints every minute, time-budgeted; exports the EMA weights (fp16) to
  ``DIR/teacher/`` and logs to ``DIR/teacher_log.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.training.common import Stage, bf16_autocast, count_params, guarded_train_step, log, step_seed
from fewstep.training.export import export_model
from fewstep.training.loop import Trainer
from fewstep.training.model import (DEFAULT_PRESET, PRESETS, ModelConfig, build_model, build_tokenizer,
                            required_max_length)

TEACHER_STEPS = 25
TEACHER_DEFAULT_GUIDANCE = 4.0


@dataclass
class TeacherArgs:
    out: str
    minutes: float = 8.0
    resume: bool = False
    tiny: bool = False
    preset: str = DEFAULT_PRESET
    batch: int | None = None    # default 512 for UNets (2026-11-30: 0.594 against 0.562 at 256, same minutes),
                                # 256 for DiTs (more optimiser steps in the budget; see README)
    lr: float | None = None
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.9995
    sigma_loc: float = 0.8      # logit-normal location (0 = median sigma 0.5; 0.8 = median 0.69)
    edge_weight: float = 4.0    # shape-aware loss: extra weight on object outlines (0 = plain MSE)
    low_sigma: float = 0.2      # loss weight min(1, (sigma / low_sigma)^2): see low_sigma_weight (0 = off)
    sigma_min: float = 0.02     # SIGMA_MIN: smallest training sigma
    drop_prob: float = 0.1
    drop_background: float = 0.0  # share of captions trained without " on a BG background" (data.without_background)
    reuse: int = 2              # steps per fresh rendered batch (see stream.ReplayBuffer)
    buffer_batches: int = 32    # replay buffer capacity, in batches
    flip: bool = True
    uniform_frac: float = 0.2
    seed: int = 0
    compile: bool = True
    max_steps: int | None = None
    ckpt_every: float = 60.0
    workers: int | None = None
    device: str = "auto"
    budget_start: float | None = None    # default: Budget's (the import of training.common)


#: smallest training sigma. Below ~0.02 the velocity target is the noise itself, invisible under a 1/255-step
#: image: unlearnable, and (before the low-noise weight below) the largest gradients of the batch.
SIGMA_MIN = 0.02


def draw_sigma(n: int, g: torch.Generator, device, uniform_frac: float, loc: float = 0.0,
               scale: float = 1.0, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """``n`` sigmas: ``uniform_frac`` uniform on (0, 1), the rest logit-normal(loc, scale)."""
    z = torch.randn(n, generator=g, device=device)
    u = torch.rand(n, generator=g, device=device)
    pick = torch.rand(n, generator=g, device=device) < uniform_frac
    return torch.where(pick, u, torch.sigmoid(loc + scale * z)).clamp(sigma_min, 1.0)


def sample_sigma_noise(x0: torch.Tensor, seed: int, step: int, uniform_frac: float, loc: float = 0.0,
                       sigma_min: float = SIGMA_MIN):
    g = torch.Generator(device=x0.device)
    g.manual_seed(step_seed(seed, step, 2))
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float32)
    sigma = draw_sigma(x0.shape[0], g, x0.device, uniform_frac, loc, sigma_min=sigma_min)
    return noise, sigma


def low_sigma_weight(sigma: torch.Tensor, low_sigma: float) -> torch.Tensor:
    """Per-sample loss weight ``min(1, (sigma / low_sigma)^2)``: below ``low_sigma`` the velocity error is scored
    as the clean-image error it causes (x0 error = sigma * v error), not as a noise-prediction error.

    Why: with a plain velocity loss, the few samples of a batch with sigma < 0.15 gave 95% of the gradient norm of
    the first H200 teacher (3.7 of 3.7-4.5; the other 123 of 128 samples: 0.10-0.14), so the global clip at 1.0
    shrank the useful part 4x and its direction was 4-6% of the step. Shapes, decided at sigma 0.6-0.9 and the
    weakest signal in the data, were never learnt (docs/default-models.md, "diagnosis, second round")."""
    if low_sigma <= 0:
        return torch.ones_like(sigma)
    return (sigma / low_sigma).square().clamp(max=1.0)


def weighted_mse(v: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, edge_weight: float,
                 sigma: torch.Tensor | None = None, low_sigma: float = 0.0) -> torch.Tensor:
    """Mean squared velocity error; ``edge_weight`` up-weights object outlines (normalised by the mean weight),
    ``low_sigma`` down-weights nearly clean samples (``low_sigma_weight``; ``sigma`` per sample, or per frame
    ``[B, T]`` for videos ``[B, T, C, H, W]``)."""
    err = (v.float() - target) ** 2
    if edge_weight > 0:
        w = 1.0 + edge_weight * edge_map(x0)
        err = err * (w / w.mean())
    if sigma is not None and low_sigma > 0:
        sw = low_sigma_weight(sigma.float(), low_sigma)
        err = err * sw.reshape(*sw.shape, *([1] * (err.dim() - sw.dim())))
    return err.mean()


def edge_map(x0: torch.Tensor, thr: float = 0.25) -> torch.Tensor:
    """Soft outline map in [0, 1] of images ``[..., C, H, W]`` in [-1, 1]: the largest colour step to
    a right/lower neighbour (summed over channels), dilated 3x3. Flat background and the mild
    background gradients of ``training.data`` give 0; an object's outline band (~3 px) gives 1."""
    lead = x0.shape[:-3]
    x = x0.reshape(-1, *x0.shape[-3:])
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(-3, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(-3, keepdim=True)
    g = torch.maximum(F.pad(dx, (0, 1, 0, 0)), F.pad(dy, (0, 0, 0, 1)))
    e = F.max_pool2d(g, 3, stride=1, padding=1)
    return (e / thr).clamp(0.0, 1.0).reshape(*lead, 1, *x0.shape[-2:])


def flow_loss(model, x0, ids, mask, noise, sigma, autocast: bool, edge_weight: float = 0.0,
              low_sigma: float = 0.0):
    s = sigma.view(-1, 1, 1, 1)
    xt = (1.0 - s) * x0 + s * noise
    ctx = bf16_autocast(autocast)
    with ctx:
        v = model(xt, sigma, ids, mask)
    return weighted_mse(v, noise - x0, x0, edge_weight, sigma, low_sigma)


def resolve(args: TeacherArgs, device: torch.device) -> tuple[str, ModelConfig, int, float]:
    # --tiny takes a tiny preset ("tiny", "tiny_unet") as given and swaps any other for "tiny"
    preset = args.preset if not args.tiny or args.preset.startswith("tiny") else "tiny"
    cfg = ModelConfig.from_dict(PRESETS[preset].to_dict())
    batch = args.batch or (8 if args.tiny else 512 if cfg.arch == "unet" else 256)
    lr = args.lr or (1e-3 if args.tiny else 5e-4)
    return preset, cfg, batch, lr


def train_teacher(args: TeacherArgs) -> Path:
    stage = Stage(args, "teacher_log.jsonl")
    budget, device, out, jsonl = stage.budget, stage.device, stage.out, stage.jsonl

    from fewstep.training import data
    preset, cfg, batch, lr = resolve(args, device)
    n_probe = 300 if args.tiny else 3000
    cfg.max_length = required_max_length([data.train_prompts(n_probe, seed=args.seed + 17),
                                          data.heldout_prompts(n_probe // 3)])
    tokenizer = build_tokenizer(data.vocabulary(), cfg.max_length)
    model = build_model(cfg, len(tokenizer)).to(device)
    model.train()
    n_tr, n_te = count_params(model.transformer), count_params(model.text_encoder)
    log(f"[teacher] device {device}, preset {preset}: {model.denoiser_name} "
        f"{n_tr / 1e6:.3f}M + text encoder {n_te / 1e6:.3f}M = {(n_tr + n_te) / 1e6:.3f}M params "
        f"(~{2 * (n_tr + n_te) / 1e6:.1f} MB fp16); vocab {len(tokenizer)}, max_length {cfg.max_length}; "
        f"batch {batch}, lr {lr}, sigma logit-normal loc {args.sigma_loc} (+{args.uniform_frac:.0%} uniform), "
        f"edge weight {args.edge_weight}, EMA {args.ema_decay}")
    jsonl.write(event="start", stage="teacher", config=cfg.to_dict(), batch=batch, lr=lr,
                params={"transformer": n_tr, "text_encoder": n_te}, args=vars(args),
                device=str(device), torch=torch.__version__)

    reserve = 6.0 if args.tiny or device.type != "cuda" else 20.0
    trainer = Trainer(name="teacher", out=out, model=model, device=device, budget=budget, lr=lr,
                      warmup=(5 if args.tiny else args.warmup), weight_decay=args.weight_decay,
                      ema_decay=args.ema_decay, batch=batch, reserve_s=reserve,
                      max_steps=(args.max_steps if args.max_steps is not None else (8 if args.tiny else None)),
                      ckpt_every_s=args.ckpt_every, jsonl=jsonl, log_every=(1 if args.tiny else 25),
                      estimate_after=(10**9 if args.tiny else 60))
    if args.resume:
        trainer.resume(model_config=cfg.to_dict(), config_defaults=ModelConfig().to_dict())

    def state():
        return {"stage": "teacher", "seed": args.seed, "model_config": cfg.to_dict(),
                "vocab": tokenizer.get_vocab(), "batch": batch, "lr": lr,
                "data_rng": {"kind": "stream batch j = sample_batch(numpy.default_rng([seed, j])), "
                                     "ingested at step j*reuse; per-step torch generators from (seed, step)",
                             "seed": args.seed, "reuse": args.reuse, "next_step": trainer.step},
                "total_steps": trainer.total_steps}

    use_ac = device.type == "cuda"

    step_fn = guarded_train_step(
        flow_loss,
        lambda f, x0, ids, mask, noise, sigma: f(model, x0, ids, mask, noise, sigma, use_ac, args.edge_weight,
                                                 args.low_sigma),
        args.compile and not args.tiny, device, "teacher step",
        on_fail=lambda: trainer.opt.zero_grad(set_to_none=True))

    from fewstep.training.stream import BatchStream, ReplayBuffer
    reuse = max(1, args.reuse)
    # stream batch j feeds the buffer at step j * reuse (a resumed run refills the buffer)
    stream = BatchStream(seed=args.seed, batch=batch, size=cfg.size, split="train", device=device,
                         start_step=-(-trainer.step // reuse), tokenizer=tokenizer, drop_prob=args.drop_prob,
                         bg_prob=args.drop_background,
                         workers=args.workers)
    buf = ReplayBuffer(max(batch, args.buffer_batches * batch), cfg.size, cfg.max_length, device,
                       vocab=tokenizer.get_vocab(), flip=args.flip)
    log(f"[teacher] data: {stream.workers} scene workers, rendering on {device}; replay buffer "
        f"{buf.cap} images, a fresh batch every {reuse} step(s), left-right flips {'on' if buf.flip else 'off'}")
    g = torch.Generator(device=device)
    try:
        while not trainer.should_stop():
            k = trainer.step
            if k % reuse == 0 or buf.n == 0:
                j, xb, idb, mb, _ = next(stream)
                buf.add(xb, idb, mb)
            g.manual_seed(step_seed(args.seed, k, 3))
            x0, ids, mask = buf.sample(batch, g)
            noise, sigma = sample_sigma_noise(x0, args.seed, k, args.uniform_frac, args.sigma_loc, args.sigma_min)
            trainer.begin_step()
            loss = step_fn(x0, ids, mask, noise, sigma)
            trainer.end_step(loss, state)
    finally:
        stream.close()
    trainer.finish(state())

    fewstep = {"default_steps": TEACHER_STEPS, "default_guidance_scale": TEACHER_DEFAULT_GUIDANCE,
               "default_size": cfg.size, "sizes": [cfg.size], "distillation": "none (flow-matching teacher)",
               "teacher_steps": TEACHER_STEPS, "train_steps": trainer.step, "seed": args.seed,
               "preset": preset,
               "recipe": {"batch": batch, "lr": lr, "sigma_loc": args.sigma_loc, "uniform_frac": args.uniform_frac,
                          "edge_weight": args.edge_weight, "ema_decay": args.ema_decay,
                          "low_sigma": args.low_sigma, "sigma_min": args.sigma_min}}
    return stage.exported("teacher", "EMA weights", export_model(trainer.ema, tokenizer, out / "teacher", fewstep),
                          trainer.step)
