"""Fused CFG combine + sampler update: Triton kernel vs the torch reference, and the affine step coefficients vs the
sampler rules they replace.

Without CUDA the kernel runs under the Triton interpreter (see tests/kernels/conftest.py).
"""

import pytest
import torch

from fewstep.engines.samplers import (
    Schedule,
    consistency_step,
    euler_ancestral_step,
    euler_step,
    rectified_flow_step,
    step_coefficients,
    x0_from_model_output,
)
from fewstep.kernels.reference import cfg_combine_ref, fused_cfg_step_ref
from tests.kernels.conftest import DEVICE, cuda_only, kernel_module

fc = kernel_module("fused_cfg", "_fused_cfg_kernel")


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 4, 9, 11), (2, 1, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("with_noise", [False, True])
def test_kernel_matches_reference(seed, shape, dtype, rescale, with_noise):
    B = shape[0]
    both = torch.randn(2 * B, *shape[1:], device=DEVICE).to(dtype)
    x = torch.randn(shape, device=DEVICE)
    noise = torch.randn(shape, device=DEVICE) if with_noise else None
    g = torch.tensor(4.5, device=DEVICE)
    # a small block so odd shapes span several programs and a ragged tail
    out = fc.fused_cfg_step(both, x, g, 0.93, -0.41, noise, 0.37, rescale, block=64)
    ref = fused_cfg_step_ref(both, x, g, 0.93, -0.41, noise, 0.37, rescale)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_per_sample_guidance(seed):
    B = 3
    both = torch.randn(2 * B, 2, 5, 5, device=DEVICE)
    x = torch.randn(B, 2, 5, 5, device=DEVICE)
    g = torch.tensor([1.0, 2.5, 7.0], device=DEVICE)
    out = fc.fused_cfg_step(both, x, g, 1.0, 1.0, guidance_rescale=0.5, block=16)
    ref = fused_cfg_step_ref(both, x, g, 1.0, 1.0, guidance_rescale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    # g = 1 gives the conditional prediction exactly (the rescale factor is then 1)
    torch.testing.assert_close(out[0], x[0] + both[B], rtol=1e-6, atol=1e-6)


def test_rescale_matches_diffusers(seed):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    guided = u + 3.0 * (c - u)
    torch.testing.assert_close(cfg_combine_ref(u, c, 3.0, 0.7), rescale_noise_cfg(guided, c, 0.7),
                               msg=f"diffusers {diffusers.__version__}, seed {seed}")


def test_bad_arguments():
    x = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="both must be"):
        fc.fused_cfg_step(torch.zeros(3, 3, device=DEVICE), x, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="guidance must be"):
        fc.fused_cfg_step(torch.zeros(4, 3, device=DEVICE), x, torch.ones(3, device=DEVICE), 1.0, 1.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        fc.fused_cfg_step(torch.zeros(4, 3, device=DEVICE), x, 1.0, 1.0, 1.0, guidance_rescale=2.0)


# -- the affine form of every sampler ----------------------------------------------------------------------------
def _schedules() -> list[Schedule]:
    sig = [14.6, 3.1, 0.9, 0.0]
    out = [Schedule("euler", [999, 500, 100], sig, (sig[0] ** 2 + 1) ** 0.5, pt)
           for pt in ("epsilon", "v_prediction", "sample")]
    out.append(Schedule("euler_ancestral", [999, 500, 100], sig, 1.0, "epsilon"))
    for pt in ("epsilon", "v_prediction", "sample"):
        out.append(Schedule("consistency", [999, 499, 259], prediction_type=pt, alphas=[0.005, 0.3, 0.7],
                            alphas_next=[0.3, 0.7, 0.7], c_skip=[0.01, 0.02, 0.001], c_out=[0.99, 0.97, 0.999]))
    out.append(Schedule("flow", [1000, 500], [1.0, 0.5, 0.0], 1.0, "flow"))
    out.append(Schedule("flow", [1000, 500], [1.0, 0.5, 0.0], 1.0, "flow", flow_sign=-1.0))
    return out


@pytest.mark.parametrize("sched", _schedules(), ids=lambda s: f"{s.kind}-{s.prediction_type}-{s.flow_sign:+g}")
def test_step_coefficients_reproduce_the_samplers(sched, seed):
    x, out, noise = torch.randn(3, 2, 4, 4, dtype=torch.float64).unbind(0)
    for i in range(sched.steps):
        last = i == sched.steps - 1
        fresh = None if last else noise
        if sched.kind in ("euler", "euler_ancestral"):
            sigma, nxt = sched.sigmas[i], sched.sigmas[i + 1]
            x0 = x0_from_model_output(out, x, sigma, sched.prediction_type)
            want = (euler_step(x, x0, sigma, nxt) if sched.kind == "euler"
                    else euler_ancestral_step(x, x0, sigma, nxt, fresh))
        elif sched.kind == "consistency":
            want, _ = consistency_step(out, x, sched.alphas[i], sched.alphas_next[i], sched.c_skip[i],
                                       sched.c_out[i], sched.prediction_type, fresh)
        else:
            want = rectified_flow_step(x, out, sched.sigmas[i], sched.sigmas[i + 1], sched.flow_sign)
        a, b, n = step_coefficients(sched, i, fresh is not None)
        got = a * x + b * out + (n * noise if n else 0)
        torch.testing.assert_close(got, want, msg=f"step {i}, seed {seed}")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_full_size(dtype, seed):
    both = torch.randn(4, 4, 64, 64, device="cuda", dtype=dtype)
    x = torch.randn(2, 4, 64, 64, device="cuda")
    g = torch.tensor(7.5, device="cuda")
    for phi in (0.0, 0.7):
        out = fc.fused_cfg_step(both, x, g, 1.0, -14.6, guidance_rescale=phi)
        ref = fused_cfg_step_ref(both, x, g, 1.0, -14.6, guidance_rescale=phi)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3, msg=f"seed {seed}")
