"""Stage 1: train the flow-matching teacher (text encoder + DiT) from scratch on streamed data.

``python -m training teacher --out DIR [--minutes 8] [--resume]``

* data: ``training.data`` scenes rendered on the training device (see :mod:`training.stream`),
  caption dropout (``""``) for classifier-free guidance;
* objective: rectified-flow / flow matching, ``x_s = (1-s) x0 + s n``, target ``v = n - x0``,
  sigma ~ 80% logit-normal(0, 1) + 20% uniform (the uniform part keeps the high-noise end, which
  decides the layout, and the few-step sigmas well covered);
* bf16 autocast, fused AdamW, warmup-stable-decay LR, EMA (exported), ``torch.compile`` with an
  eager fallback, checkpoints every minute, time-budgeted; exports the EMA weights (fp16) to
  ``DIR/teacher/`` and logs to ``DIR/teacher_log.jsonl``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.common import (Budget, GuardedCompiled, JsonlLog, count_params, log, maybe_compile,
                             pick_device, setup_torch, step_seed)
from training.export import export_model, summarize
from training.loop import Trainer
from training.model import PRESETS, ModelConfig, build_model, build_tokenizer, required_max_length

TEACHER_STEPS = 25
TEACHER_DEFAULT_GUIDANCE = 4.0


@dataclass
class TeacherArgs:
    out: str
    minutes: float = 8.0
    resume: bool = False
    tiny: bool = False
    preset: str = "base"
    batch: int | None = None
    lr: float | None = None
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    drop_prob: float = 0.1
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
    budget_start: float | None = None    # default: process start


def sample_sigma_noise(x0: torch.Tensor, seed: int, step: int, uniform_frac: float):
    g = torch.Generator(device=x0.device)
    g.manual_seed(step_seed(seed, step, 2))
    B = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float32)
    z = torch.randn(B, generator=g, device=x0.device)
    u = torch.rand(B, generator=g, device=x0.device)
    pick = torch.rand(B, generator=g, device=x0.device) < uniform_frac
    sigma = torch.where(pick, u, torch.sigmoid(z)).clamp(1e-4, 1.0)
    return noise, sigma


def flow_loss(model, x0, ids, mask, noise, sigma, autocast: bool):
    s = sigma.view(-1, 1, 1, 1)
    xt = (1.0 - s) * x0 + s * noise
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        v = model(xt, sigma, ids, mask)
    return F.mse_loss(v.float(), noise - x0)


def resolve(args: TeacherArgs, device: torch.device) -> tuple[ModelConfig, int, float]:
    preset = "tiny" if args.tiny else args.preset
    cfg = ModelConfig.from_dict(PRESETS[preset].to_dict())
    batch = args.batch or (8 if args.tiny else 1024)
    lr = args.lr or (1e-3 if args.tiny else 6e-4)
    return cfg, batch, lr


def train_teacher(args: TeacherArgs) -> Path:
    budget = Budget(args.minutes, args.budget_start)
    device = pick_device(args.device)
    setup_torch(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = JsonlLog(out / "teacher_log.jsonl")
    torch.manual_seed(args.seed)

    from training import data
    cfg, batch, lr = resolve(args, device)
    n_probe = 300 if args.tiny else 3000
    cfg.max_length = required_max_length([data.train_prompts(n_probe, seed=args.seed + 17),
                                          data.heldout_prompts(n_probe // 3)])
    tokenizer = build_tokenizer(data.vocabulary(), cfg.max_length)
    model = build_model(cfg, len(tokenizer)).to(device)
    model.train()
    n_tr, n_te = count_params(model.transformer), count_params(model.text_encoder)
    log(f"[teacher] device {device}, preset {'tiny' if args.tiny else args.preset}: transformer "
        f"{n_tr / 1e6:.3f}M + text encoder {n_te / 1e6:.3f}M = {(n_tr + n_te) / 1e6:.3f}M params "
        f"(~{2 * (n_tr + n_te) / 1e6:.1f} MB fp16); vocab {len(tokenizer)}, max_length {cfg.max_length}; "
        f"batch {batch}, lr {lr}")
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
        st = trainer.resume()
        if st is not None and st.get("model_config") not in (None, cfg.to_dict()):
            raise ValueError(f"checkpoint model config {st['model_config']} != {cfg.to_dict()}")

    def state():
        return {"stage": "teacher", "seed": args.seed, "model_config": cfg.to_dict(),
                "vocab": tokenizer.get_vocab(), "batch": batch, "lr": lr,
                "data_rng": {"kind": "stream batch j = sample_batch(numpy.default_rng([seed, j])), "
                                     "ingested at step j*reuse; per-step torch generators from (seed, step)",
                             "seed": args.seed, "reuse": args.reuse, "next_step": trainer.step},
                "total_steps": trainer.total_steps}

    use_ac = device.type == "cuda"

    def step_eager(x0, ids, mask, noise, sigma):
        loss = flow_loss(model, x0, ids, mask, noise, sigma, use_ac)
        loss.backward()
        return loss

    compiled_loss = maybe_compile(flow_loss, args.compile and not args.tiny, device, "teacher loss")

    def step_compiled(x0, ids, mask, noise, sigma):
        loss = compiled_loss(model, x0, ids, mask, noise, sigma, use_ac)
        loss.backward()
        return loss

    def on_fallback():
        trainer.opt.zero_grad(set_to_none=True)

    step_fn = GuardedCompiled(step_eager, step_compiled if compiled_loss is not flow_loss else step_eager,
                              "teacher step", on_fail=on_fallback)

    from training.stream import BatchStream, ReplayBuffer
    reuse = max(1, args.reuse)
    # stream batch j feeds the buffer at step j * reuse (a resumed run refills the buffer)
    stream = BatchStream(seed=args.seed, batch=batch, size=cfg.size, split="train", device=device,
                         start_step=-(-trainer.step // reuse), tokenizer=tokenizer, drop_prob=args.drop_prob,
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
            noise, sigma = sample_sigma_noise(x0, args.seed, k, args.uniform_frac)
            trainer.begin_step()
            loss = step_fn(x0, ids, mask, noise, sigma)
            trainer.end_step(loss, state)
    finally:
        stream.close()
    trainer.finish(state())

    fewstep = {"default_steps": TEACHER_STEPS, "default_guidance_scale": TEACHER_DEFAULT_GUIDANCE,
               "default_size": cfg.size, "sizes": [cfg.size], "distillation": "none (flow-matching teacher)",
               "teacher_steps": TEACHER_STEPS, "train_steps": trainer.step, "seed": args.seed}
    exp = export_model(trainer.ema, tokenizer, out / "teacher", fewstep)
    log(f"[teacher] exported EMA weights: {summarize(exp)}")
    jsonl.write(event="exported", path=str(exp), step=trainer.step)
    jsonl.close()
    return exp
