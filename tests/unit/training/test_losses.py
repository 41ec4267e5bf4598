"""The teacher's loss weights: the low-noise weight (docs/default-models.md, "diagnosis, second round")."""

from __future__ import annotations

import numpy as np
import torch

from fewstep.training.teacher import draw_sigma, low_sigma_weight, weighted_mse


def test_low_sigma_weight_scores_nearly_clean_samples_as_clean_image_error():
    s = torch.tensor([0.0, 0.02, 0.1, 0.2, 0.5, 1.0])
    w = low_sigma_weight(s, 0.2)
    assert torch.allclose(w, torch.tensor([0.0, 0.01, 0.25, 1.0, 1.0, 1.0]))
    assert torch.equal(low_sigma_weight(s, 0.0), torch.ones_like(s))  # off


def test_weighted_mse_applies_the_weight_per_sample_and_per_frame():
    g = torch.Generator().manual_seed(0)
    v, t, x0 = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    per = ((v - t) ** 2).mean((1, 2, 3))
    sigma = torch.tensor([0.05, 0.1, 0.5, 0.9])
    assert torch.allclose(weighted_mse(v, t, x0, 0.0), per.mean())
    want = (per * torch.tensor([1 / 16, 1 / 4, 1.0, 1.0])).mean()
    assert torch.allclose(weighted_mse(v, t, x0, 0.0, sigma, 0.2), want)
    # videos: [B, T, C, H, W] with a noise level per frame
    vv, tv, xv = (torch.randn(2, 3, 3, 8, 8, generator=g) for _ in range(3))
    sf = torch.tensor([[0.0, 0.1, 0.8], [0.3, 0.3, 0.3]])
    per_f = ((vv - tv) ** 2).mean((2, 3, 4))
    assert torch.allclose(weighted_mse(vv, tv, xv, 0.0, sf, 0.2), (per_f * low_sigma_weight(sf, 0.2)).mean())


def test_training_sigmas_start_at_sigma_min():
    s = draw_sigma(100_000, torch.Generator().manual_seed(0), "cpu", 0.2, 0.8)
    assert s.min() >= 0.02 and (s == 0.02).any()  # the floor is reached, and nothing goes below it


def test_swap_shape_changes_only_the_shape_word():
    from fewstep.training import data as D
    from fewstep.training.study import swap_shape
    rng = np.random.default_rng(0)
    for _ in range(50):
        cap = D.sample_scene(rng, "heldout").caption
        sw = swap_shape(cap)
        diff = [(a, b) for a, b in zip(cap.split(), sw.split()) if a != b]
        assert len(diff) == 1 and diff[0][0] in D.SHAPES and diff[0][1] in D.SHAPES, (cap, sw)
