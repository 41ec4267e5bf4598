"""An adversarial term for the one-step student (``distill --gan W``).

Why: the regression of ``distill`` fits the teacher's noise-to-image map in the mean, and where the student cannot fit
it exactly the mean is a blur. In the 2026-11-30 runs (ebb3bbb) the 1-step student kept the teacher's colours and positions
(0.99 / 0.98) but lost shapes (0.80 against 1.00) and counts (0.87 against 0.97): rounded corners, merged objects.
A discriminator sees blur at once. DMD2 (one of the seed methods) adds a GAN term for the same reason; ADD and LADD
keep the regression/distillation term beside it, as we do.

The "real" images are the teacher's own samples for the same prompts (the pair pool), so the discriminator judges
the student against what it is asked to copy, not against the training set. It is a small conditional patch
discriminator on the clean 64x64 images (a projection discriminator, Miyato & Koyama 2018, on the teacher's frozen
text embedding, mean-pooled), trained with the hinge loss. The generator's weight is adaptive as in VQGAN (Esser et
al. 2021): the ratio of the regression's and the GAN term's gradient norms at the student's last layer, times
``W``, so ``W`` means "this fraction of the regression's pull", whatever the two losses' scales.

Measured (2026-11-30, docs/default-models.md): at W = 0.2 and 0.5 the 1-step student lost 2-3 points of held-out
adherence and 15% of its steps. The discriminator, trained from scratch, was fooled within ~150 steps of the
generator's term. Off by default.

``distill --gan W --gan-features`` swaps in a discriminator on the teacher's features (LADD, Sauer et al. 2024):
the frozen teacher UNet's encoder (input convolution, down blocks, mid block) reads a noised copy of the image at a
random noise level, and a small conditional head per level scores its features. What a pixel discriminator has to
learn from scratch in two minutes (what a star's points or a cross's arms look like, at which noise level a blob
is an object) the teacher's features should already hold; the noise level chooses between coarse layout (high) and
edges (low). A CPU probe (``fewstep train study disc``, 2026-11-30) found it telling the shipped student's
samples from the teacher's earlier and more steadily than the pixel discriminator, and about as well after 100
steps. On the H200 (2026-11-30, 6210e5d) it did not help: its hinge loss started at 1.82 and the generator fooled it
from step ~325 on; at W = 0.2 the 1-step student scored 0.771 (half the regression's steps: the adversarial path is
eager) and at W = 0.5 0.619, against 0.789 without.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.training.common import bf16_autocast
from fewstep.training.features import encoder_features, noised


class PatchDiscriminator(nn.Module):
    """64x64 image + text embedding -> an 8x8 map of logits (one per 8x8-pixel patch and its surroundings)."""

    def __init__(self, text_dim: int, width: int = 64, levels: int = 3):
        super().__init__()
        chans = [width * min(2 ** i, 4) for i in range(levels + 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):   # each halves the resolution
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(chans[-1], 1, 1)
        self.embed = nn.Linear(text_dim, chans[-1])
        self.scale = 1.0 / math.sqrt(chans[-1])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        m = mask.to(emb.dtype).unsqueeze(-1)
        pooled = (emb * m).sum(1) / m.sum(1).clamp_min(1.0)
        # projection: a logit term that is large when the patch features agree with the prompt's embedding
        proj = (h * self.embed(pooled.to(h.dtype))[:, :, None, None]).sum(1, keepdim=True) * self.scale
        return self.out(h) + proj


class _Head(nn.Module):
    """Features of one level + pooled text embedding -> a 4x4 map of logits (projection discriminator)."""

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        groups = math.gcd(channels, 16)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                  nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(channels, 1, 1)
        self.embed = nn.Linear(text_dim, channels)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, h: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = self.body(h)
        proj = (h * self.embed(pooled.to(h.dtype))[:, :, None, None]).sum(1, keepdim=True) * self.scale
        return F.adaptive_avg_pool2d(self.out(h) + proj, 4)


class TeacherFeatureDiscriminator(nn.Module):
    """LADD-style discriminator: 64x64 image + text embedding -> ``[B, levels, 4, 4]`` logits, one map per level of
    the frozen teacher UNet's encoder (each down block's output and the mid block's), read at a noised copy
    ``(1 - s) x + s n`` with ``s`` drawn per image from ``sigma_range`` (uniform). Only the heads train: the UNet
    is held outside ``parameters()`` (not optimised, not saved) and its weights do not require gradients, but the
    image does, so the generator's term reaches the student through it."""

    def __init__(self, unet: nn.Module, text_dim: int, sigma_range: tuple[float, float] = (0.1, 0.7), seed: int = 0):
        super().__init__()
        self._unet = (unet,)    # a tuple keeps it out of the module tree
        chans = list(unet.config.block_out_channels)
        self.heads = nn.ModuleList(_Head(c, text_dim) for c in chans + [chans[-1]])
        self.sigma_range = sigma_range
        self.seed = seed
        self.noise_gen: torch.Generator | None = None   # its noise draws; a probe may swap in its own

    def _noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noise_gen is None or self.noise_gen.device != x.device:
            self.noise_gen = torch.Generator(device=x.device).manual_seed(self.seed)
        lo, hi = self.sigma_range
        s = lo + (hi - lo) * torch.rand(x.shape[0], generator=self.noise_gen, device=x.device)
        n = torch.randn(x.shape, generator=self.noise_gen, device=x.device, dtype=x.dtype)
        return noised(x, s, n), s

    def features(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        return encoder_features(self._unet[0], x, sigma, emb)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        xt, s = self._noise(x)
        m = mask.to(emb.dtype).unsqueeze(-1)
        pooled = (emb * m).sum(1) / m.sum(1).clamp_min(1.0)
        feats = self.features(xt, s, emb)
        return torch.cat([head(f, pooled) for head, f in zip(self.heads, feats)], dim=1)


def last_layer_weight(model: nn.Module) -> torch.Tensor:
    """The weight of the denoiser's output layer (where the adaptive weight compares gradient norms)."""
    den = getattr(model, "transformer", model)
    for name in ("conv_out", "proj_out"):
        layer = getattr(den, name, None)
        if isinstance(layer, nn.Module) and getattr(layer, "weight", None) is not None:
            return layer.weight
    return [p for p in den.parameters() if p.ndim >= 2][-1]


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor, cap: float = 1e4) -> torch.Tensor:
    """VQGAN's ``|grad rec| / |grad adv|`` at ``weight`` (detached; both losses keep their graphs)."""
    g_rec = torch.autograd.grad(rec, weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, weight, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, cap).detach()


class AdversarialLoss:
    """The discriminator, its optimiser, and the two hinge losses."""

    def __init__(self, text_dim: int, *, lr: float, device, autocast: bool, width: int = 64,
                 teacher_unet: nn.Module | None = None, seed: int = 0):
        from fewstep.training.common import make_adamw
        # teacher_unet: judge through the frozen teacher's encoder (LADD) instead of a pixel discriminator; seed: its
        # noise draws (not checkpointed: a resumed run draws anew, as it does new pairs)
        self.disc = (TeacherFeatureDiscriminator(teacher_unet, text_dim, seed=seed) if teacher_unet is not None
                     else PatchDiscriminator(text_dim, width)).to(device).train()
        # low momentum, as GANs use: the discriminator chases a moving generator. On blurred against sharp dataset
        # images (CPU probe, 32 images) beta1 0.5 at 5e-4 separated them within ~80 steps; 0.0 took ~120
        self.opt = make_adamw(self.disc, lr, 0.0, device, betas=(0.5, 0.99))
        self.params = list(self.disc.parameters())
        self.autocast = autocast

    def _ctx(self):
        return bf16_autocast(self.autocast)

    def logits(self, x, emb, mask) -> torch.Tensor:
        with self._ctx():
            return self.disc(x, emb, mask).float()

    def generator_loss(self, fake, emb, mask) -> torch.Tensor:
        """Hinge generator loss; gradients reach ``fake`` only."""
        self.disc.requires_grad_(False)
        try:
            return -self.logits(fake, emb, mask).mean()
        finally:
            self.disc.requires_grad_(True)

    def disc_step(self, real, fake, emb, mask) -> dict:
        lr_real = self.logits(real, emb, mask)
        lr_fake = self.logits(fake.detach(), emb, mask)
        loss = F.relu(1.0 - lr_real).mean() + F.relu(1.0 + lr_fake).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        return {"d_loss": loss.detach(), "d_real": lr_real.mean().detach(), "d_fake": lr_fake.mean().detach()}
