"""The time-budgeted optimisation loop shared by the teacher and distillation stages.

Owns: AdamW (fused on CUDA), warmup-stable-decay LR, EMA of the weights, gradient clipping,
periodic atomic safetensors checkpoints (``DIR/<name>_ckpt/``), resuming, the tqdm bar, loss
logging (``DIR/<name>_log.jsonl``) and throughput / ETA lines.

The step budget: unless ``max_steps`` is given, the loop measures its own speed over the first
``estimate_after`` steps (after compilation; the first ``rate_skip`` of them are left out of the
rate, so that a one-off cost early in the run, e.g. a recompilation, does not shrink the budget)
and sets ``total_steps`` = what fits in the remaining wall-clock budget; the LR cooldown is placed
on that step count (logged). Until the cooldown begins the count is re-derived every
``refine_every_s`` seconds (and at each loss line) from the rate since the same anchor; training
stops at whichever of ``total_steps`` or the time budget comes first.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from fewstep.training.common import (Budget, JsonlLog, ema_decay_at, ema_update, fmt_secs, load_checkpoint,
                             log, make_adamw, pack_training_state, save_checkpoint,
                             unpack_training_state, wsd_lr)
from fewstep.training.graphs import set_lr


class Trainer:
    def __init__(self, *, name: str, out: Path, model: torch.nn.Module, device: torch.device,
                 budget: Budget, lr: float, warmup: int, weight_decay: float, ema_decay: float,
                 batch: int, reserve_s: float, max_steps: int | None, ckpt_every_s: float,
                 cooldown_frac: float = 0.2, grad_clip: float = 1.0, log_every: int = 25,
                 estimate_after: int = 60, jsonl: JsonlLog | None = None, show_bar: bool = True,
                 rate_skip: int = 0, refine_every_s: float = 5.0, capturable: bool = False):
        self.name, self.out, self.model, self.device, self.budget = name, Path(out), model, device, budget
        self.lr, self.warmup, self.ema_decay, self.batch = lr, warmup, ema_decay, batch
        self.reserve_s, self.max_steps, self.ckpt_every_s = reserve_s, max_steps, ckpt_every_s
        self.cooldown_frac, self.grad_clip, self.log_every = cooldown_frac, grad_clip, log_every
        self.estimate_after = estimate_after
        self.rate_skip, self.refine_every_s = max(0, int(rate_skip)), refine_every_s
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # capturable: the optimizer keeps its LR and step count on the GPU, so that a CUDA graph can record its step
        # (capture_step); the LR is then written in place
        self.opt = make_adamw(model, lr, weight_decay, device, capturable=capturable)
        self.captured = None
        self.step = 0
        self.start_step = 0
        self.total_steps: int | None = max_steps
        self.jsonl = jsonl or JsonlLog(self.out / f"{name}_log.jsonl")
        self.extra_state: dict = {}
        self._loss_acc: torch.Tensor | None = None
        self._gn_acc: torch.Tensor | None = None  # summed pre-clip gradient norms since the last log line
        self._loss_n = 0
        self._last_ckpt = time.time()
        self._last_print = 0.0
        self._t_run0: float | None = None      # time of the first optimiser step of this run
        self._step_run0 = 0
        self._t_rate0: float | None = None    # anchor of the speed measurement (rate_skip steps after run0)
        self._step_rate0 = 0
        self._t_refine = 0.0
        self._t_log = time.time()
        self._step_log = 0
        self._rate: float | None = None      # set once the step budget has been estimated
        self._frozen = max_steps is not None  # the estimate is refined until the cooldown starts
        self.last_loss: float | None = None
        self.bar = None
        self.show_bar = show_bar

    # -- resume / save --------------------------------------------------------------------------
    def resume(self, model_config: dict | None = None, config_defaults: dict | None = None) -> dict | None:
        """Load the stage's checkpoint, if any. ``model_config``: refuse a checkpoint of another architecture;
        ``config_defaults`` fill the keys a checkpoint written before they existed lacks."""
        got = load_checkpoint(self.out, self.name)
        if got is None:
            log(f"[{self.name}] --resume: no checkpoint in {self.out}, starting from scratch")
            return None
        tensors, state = got
        saved = state.get("model_config")
        if saved is not None and config_defaults:
            saved = {**config_defaults, **saved}
        if model_config is not None and saved not in (None, model_config):
            raise ValueError(f"checkpoint model config {state['model_config']} != {model_config}")
        unpack_training_state(tensors, self.model, self.ema, self.opt)
        self.step = self.start_step = int(state["step"])
        self.extra_state = state.get("extra", {})
        log(f"[{self.name}] resumed from {self.out / (self.name + '_ckpt')} at step {self.step}")
        self.jsonl.write(event="resume", step=self.step)
        return state

    def save(self, state: dict) -> float:
        t0 = time.time()
        st = dict(state, step=self.step, extra=self.extra_state)
        save_checkpoint(self.out, self.name, pack_training_state(self.model, self.ema, self.opt), st)
        self._last_ckpt = time.time()
        dt = self._last_ckpt - t0
        self.jsonl.write(event="checkpoint", step=self.step, seconds=round(dt, 3))
        return dt

    # -- loop -----------------------------------------------------------------------------------
    def begin_step(self) -> None:
        # schedule relative to this run (a resumed run re-warms briefly and has its own cooldown)
        run_total = None if self.total_steps is None else max(1, self.total_steps - self.start_step)
        lr = wsd_lr(self.step - self.start_step, self.lr, self.warmup, run_total, self.cooldown_frac)
        self.cur_lr = lr
        set_lr(self.opt, lr)
        if self.captured is None:   # a recorded step owns its gradient buffers and clears them itself
            self.opt.zero_grad(set_to_none=True)

    def capture_step(self, loss_fn, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Records ``loss_fn(*inputs)``, its backward, the clip and the optimizer step as one CUDA graph
        (``training.graphs.CapturedTrainStep``); later calls of ``graph_step`` replay it. The recording needs one
        warm-up step, which is a real training step on ``inputs``: call between ``begin_step`` and ``end_step``
        like a loss function; returns (loss, pre-clip gradient norm) for ``end_step(loss, state, grad_norm=...,
        stepped=True)``.
        If the recording fails, the warm-up step still counts, ``captured`` stays None (the log and the jsonl say
        why) and the caller goes on eagerly."""
        from fewstep.training.graphs import CapturedTrainStep
        assert self.captured is None
        step = CapturedTrainStep(loss_fn, self.params, self.opt, self.grad_clip, [inputs])
        try:
            step.record()
        except Exception as e:   # a failed recording must not cost the stage
            error = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"[{self.name}] CUDA graph recording failed ({error}); eager steps from here")
            self.jsonl.write(event="cuda_graph_failed", step=self.step, error=error)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        else:
            self.captured = step
            log(f"[{self.name}] training step recorded as a CUDA graph at step {self.step + 1}; replaying it from here")
        loss, gn = step.warmup_out[0]
        return loss, (gn if self.grad_clip else None)   # no clip: no norm to log, as in the eager step

    def graph_step(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One replay of the recorded step (see ``capture_step``)."""
        loss, gn = self.captured(*inputs)
        return loss.clone(), (gn.clone() if self.grad_clip else None)

    def recorded_step(self, loss_fn, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The stages' recorded step: the first call records (``capture_step``, a real warm-up step), later calls
        replay (``graph_step``). If the recording failed, ``captured`` is None afterwards and the caller steps
        eagerly from then on."""
        if self.captured is None:
            return self.capture_step(loss_fn, inputs)
        return self.graph_step(*inputs)

    def end_step(self, loss: torch.Tensor, state_fn, grad_norm: torch.Tensor | None = None,
                 stepped: bool = False) -> None:
        """Clip, optimiser step, EMA, counters, logging, periodic checkpoint. ``stepped``: the clip and the optimiser
        step already ran (a recorded step, or its warm-up; see ``capture_step``), and ``grad_norm`` is their pre-clip
        norm (None without clipping)."""
        if stepped:
            if grad_norm is not None:
                gn = grad_norm.detach().float()
                self._gn_acc = gn if self._gn_acc is None else self._gn_acc + gn
        else:
            if self.grad_clip:
                # the pre-clip norm is logged: a norm far above the clip means a few samples steer every step
                gn = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True).detach().float()
                self._gn_acc = gn if self._gn_acc is None else self._gn_acc + gn
            self.opt.step()
        ema_update(self.ema, self.model, ema_decay_at(self.step, self.ema_decay))
        self.step += 1
        ld = loss.detach().float()
        self._loss_acc = ld if self._loss_acc is None else self._loss_acc + ld
        self._loss_n += 1
        if self._t_run0 is None:
            # the first step includes compilation; measure speed from here on
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._t_run0 = time.time()
            self._step_run0 = self.step
            self._t_log, self._step_log = self._t_run0, self.step
            compile_s = self._t_run0 - self.budget.start
            log(f"[{self.name}] first step done at {compile_s:.1f}s after the stage's start "
                "(imports, data workers, compilation)")
        if self._t_rate0 is None and self.step - self._step_run0 >= self.rate_skip:
            if self.rate_skip and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._t_rate0, self._step_rate0 = time.time(), self.step
        if self.bar is None and self.show_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=self.step - 1, desc=self.name,
                            unit="step", dynamic_ncols=True, mininterval=2.0)
        if self.bar is not None:
            self.bar.update(1)
        if self._loss_n >= self.log_every:
            self._flush_log()
        if (self.total_steps is None and self.step - self._step_run0 >= self.estimate_after
                and self._t_rate0 is not None and self.step > self._step_rate0):
            self._estimate_total()
        elif (self._rate is not None and not self._frozen
              and (self._loss_n == 0 or time.time() - self._t_refine >= self.refine_every_s)):
            self._refine_total()
        if time.time() - self._last_ckpt > self.ckpt_every_s:
            self.save(state_fn())

    def _flush_log(self) -> None:
        loss = float(self._loss_acc.item()) / self._loss_n  # syncs the GPU (keeps the CPU close)
        gnorm = None if self._gn_acc is None else round(float(self._gn_acc.item()) / self._loss_n, 4)
        self._gn_acc = None
        now = time.time()
        rate = (self.step - self._step_log) / max(1e-6, now - self._t_log)
        self._t_log, self._step_log = now, self.step
        self.last_loss = loss
        self._loss_acc, self._loss_n = None, 0
        ips = rate * self.batch
        self.jsonl.write(step=self.step, loss=round(loss, 6), grad_norm=gnorm, lr=self.cur_lr,
                         steps_per_s=round(rate, 3),
                         img_per_s=round(ips, 1), elapsed=round(self.budget.elapsed(), 1))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", lr=f"{self.cur_lr:.2e}")
        if now - self._last_print > 20.0 or not self.show_bar:
            self._last_print = now
            eta = self.eta()
            log(f"[{self.name}] step {self.step} loss {loss:.4f} lr {self.cur_lr:.2e} | {ips:.0f} img/s "
                f"({rate:.2f} step/s) | elapsed {fmt_secs(self.budget.elapsed())} | ETA {fmt_secs(eta)}")

    def eta(self) -> float:
        left_time = max(0.0, self.budget.left() - self.reserve_s)
        if self.total_steps is not None and self._t_rate0 is not None and self.step > self._step_rate0:
            rate = self._measured_rate()
            if rate > 0:
                return min(left_time, (self.total_steps - self.step) / rate)
        return left_time

    def _measured_rate(self) -> float:
        """Steps per second since the rate anchor (``rate_skip`` steps after the first step)."""
        return (self.step - self._step_rate0) / max(1e-6, time.time() - self._t_rate0)

    def _estimate_total(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rate = self._measured_rate()
        self._t_refine = time.time()
        # checkpoints cost a little time every ckpt_every_s; keep 3% slack
        left = max(0.0, self.budget.left() - self.reserve_s) * 0.97
        self.total_steps = self.step + int(rate * left)
        self._rate = rate
        self.jsonl.write(event="step_budget", step=self.step, total_steps=self.total_steps,
                         steps_per_s=round(rate, 3), img_per_s=round(rate * self.batch, 1))
        log(f"[{self.name}] throughput {rate * self.batch:.0f} img/s ({rate:.2f} step/s, batch {self.batch}); "
            f"step budget: {self.total_steps} steps (LR cooldown over the last {self.cooldown_frac:.0%}), "
            f"ETA {fmt_secs(left)}")
        if self.bar is not None:
            self.bar.total = self.total_steps
            self.bar.refresh()

    def _refine_total(self) -> None:
        """Re-derive the step budget from the average speed so far (checkpoints, data stalls and
        all) until the LR cooldown begins; from then on it is fixed."""
        run_total = self.total_steps - self.start_step
        if self.step - self.start_step >= run_total * (1.0 - self.cooldown_frac) - 1:
            self._frozen = True
            self.jsonl.write(event="step_budget_frozen", step=self.step, total_steps=self.total_steps)
            return
        self._t_refine = time.time()
        rate = self._measured_rate()
        left = max(0.0, self.budget.left() - self.reserve_s) * 0.98
        total = self.step + int(rate * left)
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        self.total_steps = max(total, self.step + 1)
        if self.bar is not None:
            self.bar.total = self.total_steps

    def should_stop(self) -> bool:
        if self.total_steps is not None and self.step >= self.total_steps:
            return True
        return self.budget.left() < self.reserve_s

    def finish(self, state: dict) -> None:
        if self._loss_n:
            self._flush_log()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.save(state)
        n = self.step - self._step_run0 if self._t_run0 else 0
        dt = time.time() - self._t_run0 if self._t_run0 else 0.0
        ips = n * self.batch / dt if dt > 0 else 0.0
        log(f"[{self.name}] finished at step {self.step} ({n} steps this run, {ips:.0f} img/s), "
            f"last loss {self.last_loss}, elapsed {fmt_secs(self.budget.elapsed())}")
        self.jsonl.write(event="finished", step=self.step, steps_this_run=n, img_per_s=round(ips, 1),
                         loss=self.last_loss, elapsed=round(self.budget.elapsed(), 1))
