import pytest
import torch

from fewstep.engines.samplers import (
    consistency_step,
    euler_ancestral_step,
    euler_step,
    make_schedule,
    rectified_flow_step,
    sampler_kind,
    x0_from_model_output,
)

TURBO = {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def _rand(*shape, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(*shape, generator=g)


def test_one_step_euler_is_the_x0_estimate():
    x, eps = _rand(2, 4, 8, 8), _rand(2, 4, 8, 8)
    sigma = 14.6
    x0 = x0_from_model_output(eps, x, sigma, "epsilon")
    torch.testing.assert_close(euler_step(x, x0, sigma, 0.0), x0)
    torch.testing.assert_close(x0, x - sigma * eps)


def test_euler_step_is_ddim_in_vp_space():
    # Euler in sigma space equals the deterministic DDIM update: x_vp' = sqrt(a') x0 + sqrt(1 - a') eps.
    x0, eps = _rand(1, 4, 8, 8), _rand(1, 4, 8, 8)
    s, s2 = 3.0, 0.7
    x = x0 + s * eps
    out = euler_step(x, x0, s, s2)
    a2 = 1 / (s2**2 + 1)
    torch.testing.assert_close(out / (s2**2 + 1) ** 0.5, a2**0.5 * x0 + (1 - a2) ** 0.5 * eps)


def test_v_prediction_inverts():
    x0, eps = _rand(1, 4, 8, 8), _rand(1, 4, 8, 8)
    sigma = 2.5
    a = 1 / (sigma**2 + 1)
    x = x0 + sigma * eps  # VE sample
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0  # v-target in VP terms
    torch.testing.assert_close(x0_from_model_output(v, x, sigma, "v_prediction"), x0, rtol=1e-5, atol=1e-5)


def test_ancestral_reduces_to_euler_at_the_last_step():
    x, x0 = _rand(1, 4, 8, 8), _rand(1, 4, 8, 8)
    torch.testing.assert_close(euler_ancestral_step(x, x0, 5.0, 0.0, None), euler_step(x, x0, 5.0, 0.0))
    with pytest.raises(ValueError):
        euler_ancestral_step(x, x0, 5.0, 1.0, None)


def test_consistency_step_boundary_and_renoise():
    x, eps, noise = _rand(1, 4, 8, 8), _rand(1, 4, 8, 8), _rand(1, 4, 8, 8)
    a, a_next = 0.2, 0.6
    nxt, den = consistency_step(eps, x, a, a_next, 0.0, 1.0, "epsilon", noise)
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    torch.testing.assert_close(den, x0)
    torch.testing.assert_close(nxt, a_next**0.5 * x0 + (1 - a_next) ** 0.5 * noise)
    last, den2 = consistency_step(eps, x, a, a_next, 0.0, 1.0, "epsilon", None)
    torch.testing.assert_close(last, den2)


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_rectified_flow_is_exact_on_straight_paths(steps):
    x0, noise = _rand(2, 3, 8, 8), _rand(2, 3, 8, 8)
    sched = make_schedule("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 1.0}, steps)
    x = noise
    for i in range(steps):
        x = rectified_flow_step(x, noise - x0, sched.sigmas[i], sched.sigmas[i + 1])  # exact velocity field
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)
    # InstaFlow's data-pointing velocity gives the same path with sign -1
    insta = make_schedule("DPMSolverMultistepScheduler", {}, steps, "RectifiedFlowPipeline")
    assert insta.kind == "flow" and insta.flow_sign == -1.0 and insta.timesteps[0] == 1000.0
    y = noise
    for i in range(steps):
        y = rectified_flow_step(y, x0 - noise, insta.sigmas[i], insta.sigmas[i + 1], insta.flow_sign)
    torch.testing.assert_close(y, x0, rtol=1e-5, atol=1e-5)


def test_schedules_follow_the_checkpoint_config():
    s = make_schedule("EulerDiscreteScheduler", TURBO, 1)
    assert s.kind == "euler" and s.timesteps == [999.0] and s.sigmas[-1] == 0.0
    # diffusers starts "trailing"/"linspace" Euler at sigma_max (not sqrt(sigma_max^2 + 1)); we follow the checkpoint.
    assert s.init_noise_sigma == pytest.approx(s.sigmas[0])
    lcm = make_schedule("LCMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                         "original_inference_steps": 50}, 4)
    assert lcm.kind == "consistency" and lcm.timesteps == [999.0, 759.0, 499.0, 259.0]
    assert lcm.alphas_next[:-1] == lcm.alphas[1:]
    assert make_schedule("EulerAncestralDiscreteScheduler", TURBO, 2).kind == "euler_ancestral"
    ddim = make_schedule("DDIMScheduler", {"timestep_spacing": "trailing"}, 2)
    assert ddim.kind == "euler" and ddim.sigmas[-1] == 0.0


@pytest.mark.parametrize("steps", [0, 9, 1000])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, 8\]"):
        make_schedule("EulerDiscreteScheduler", TURBO, steps)


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match="KarrasVeScheduler"):
        sampler_kind("KarrasVeScheduler")
