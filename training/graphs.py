"""CUDA graphs for the training stages: a whole optimizer step recorded once and replayed, with none of
``torch.compile``'s start-up cost (``CapturedTrainStep``, the distill stage's student step). No-grad calls have the
engine's recorder (``fewstep.engines.backends.compiled.StaticGraph``): ``fewstep train bench --variants`` times
the pair sampler with it, and the stage keeps the sampler eager, where the graph saved 1%.

Why: the UNet student's eager step at batch 512 (64x64 images, 32-128 channels) launches many small kernels and keeps
the H200 at 5-8% of its bf16 peak. Recorded, it ran 108 against 130 ms (docs/benchmarks.md, 2026-11-30);
``torch.compile`` ran 83 ms, after 122 s of compilation that a 3.8-minute stage cannot pay. A recording costs one
warm-up step (a real one) and the recording itself (~2 s).

What a recording requires, and what the callers guarantee: fixed input shapes and a fixed Python path (same batch,
same branch every call), no host synchronisation inside (no ``.item()``, no boolean-mask indexing), and an optimizer
that keeps its step count and learning rate on the device (``make_adamw(..., capturable=True)``: a tensor LR that
``set_lr`` writes in place)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Sets the LR of every group: in place for a tensor LR (what a recorded step reads), else by assignment."""
    for g in opt.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


class CapturedTrainStep:
    """``loss = loss_fn(*inputs)``, backward, global gradient clipping and ``opt.step()``, as one CUDA graph.

    ``warmup_inputs`` are real batches: each is one full training step, run eagerly on a side stream as the
    recording needs (cuDNN picks its algorithms, the optimizer creates its state); ``warmup_out`` holds their
    (loss, gradient norm). Then ``record()`` records the step; recording launches no kernel, so nothing is applied
    twice.
    Call it like the eager step: it returns device tensors (the loss and the pre-clip gradient norm) that the next
    replay overwrites, so callers copy what they keep."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor],
                 opt: torch.optim.Optimizer, grad_clip: float, warmup_inputs: Sequence[Sequence[torch.Tensor]]):
        assert warmup_inputs, "at least one warm-up batch (a real training step)"
        self.loss_fn, self.params, self.opt, self.grad_clip = loss_fn, list(params), opt, grad_clip
        self.static = [x.clone() for x in warmup_inputs[0]]
        self.graph: torch.cuda.CUDAGraph | None = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.warmup_out = []
        with torch.cuda.stream(side):
            for inputs in warmup_inputs:
                self.warmup_out.append([t.detach().clone() for t in self._step(inputs)])
        torch.cuda.current_stream().wait_stream(side)

    def record(self) -> None:
        """Records the step. Separate from the warm-up, so that a caller whose recording fails knows the warm-up
        steps were applied (and counts them) before it goes on eagerly."""
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)   # the graph's own gradient buffers come from its private pool
        with torch.cuda.graph(graph):
            self.out = self._step(self.static)
        self.graph = graph

    def _step(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        # inside the recording the gradients are None (cleared just before it), so backward allocates them in the
        # graph's pool and every replay writes, not accumulates, into the same buffers
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(*inputs)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True) if self.grad_clip \
            else torch.zeros((), device=loss.device)
        self.opt.step()
        return loss.detach(), gn.detach()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for s, x in zip(self.static, inputs):
            s.copy_(x)
        self.graph.replay()
        return self.out
