"""The frozen teacher UNet's encoder as a feature extractor: what the LADD discriminator reads
(``training.adversarial.TeacherFeatureDiscriminator``) and what ``distill --feat W`` compares.

Why a perceptual distance on the teacher's features (``distill --feat W``): the student's regression is a pixel
loss, and where one step cannot fit the teacher's map exactly, a pixel loss is indifferent between a blurred star and
a sharp star shifted by a pixel, while a shape detector (and a person) is not. "Improving the Training of Rectified
Flows" (Lee et al. 2024) found LPIPS + pseudo-Huber the best one-step loss; LPIPS needs VGG weights we cannot
download, but our teacher's encoder already holds what our images are made of (outlines, corners, where an object
ends), at every noise level. The distance is LPIPS's form on those features: each level's feature vectors are
normalised over channels, and the squared differences are summed over channels and averaged over positions (LPIPS's
learned per-channel weights are left out: there is nothing to learn them from). Both images are noised with the same
noise at the same level ``s`` (drawn per image, U[0.1, 0.7] by default): the encoder is a denoiser's, and it was
trained on noised inputs only."""

from __future__ import annotations

import torch
import torch.nn as nn


def encoder_features(unet: nn.Module, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
    """The encoder half of ``UNet2DConditionModel.forward`` at noise level ``sigma`` (timestep = 1000 sigma, as
    ``FewstepModel.denoise``; no encoder mask, as the engine's "sd" path): each down block's output and the mid
    block's."""
    unet = getattr(unet, "unet", unet)   # PositionalUNet2DConditionModel wraps a UNet2DConditionModel
    t = (sigma.to(torch.float32) * 1000.0).expand(x.shape[0])
    temb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
    h = unet.conv_in(x)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=temb, encoder_hidden_states=emb)
        else:
            h, _ = block(hidden_states=h, temb=temb)
        feats.append(h)
    feats.append(unet.mid_block(h, temb, encoder_hidden_states=emb))
    return feats


def noised(x: torch.Tensor, s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``(1 - s) x + s n`` with one ``s`` per image."""
    sv = s.view(-1, 1, 1, 1).to(x.dtype)
    return (1.0 - sv) * x + sv * n.to(x.dtype)


def feature_distance(unet: nn.Module, fake: torch.Tensor, real: torch.Tensor, s: torch.Tensor, n: torch.Tensor,
                     emb: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS-form distance between ``fake`` and ``real`` on the encoder's features, both noised with
    ``n`` at ``s``: the mean over levels of the positions' mean of ``|f/|f| - g/|g||^2`` (channel-normalised
    feature vectors; 0 when equal, at most 4). Gradients reach ``fake`` only; ``unet``'s weights should not
    require gradients (the caller freezes them)."""
    with torch.no_grad():
        f_real = encoder_features(unet, noised(real, s, n), s, emb)
    f_fake = encoder_features(unet, noised(fake, s, n), s, emb)
    per_level = []
    for a, b in zip(f_fake, f_real):
        a, b = a.float(), b.float()
        a = a / (a.norm(dim=1, keepdim=True) + 1e-6)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-6)
        per_level.append(((a - b) ** 2).sum(dim=1).mean(dim=(1, 2)))
    return torch.stack(per_level).mean(0)
