"""Few-step samplers: pure functions on tensors, plus the schedule they walk.

Three families cover the distilled checkpoints we serve:

* ``euler``        x0 prediction stepped deterministically in sigma space (SD-Turbo, SDXL-Turbo at 1 step,
                   DDIM-style few-step). With one step it is exactly "one-step x0": the output is the model's
                   x0 estimate from pure noise.
* ``euler_ancestral``  the same, re-noised between steps (SDXL-Turbo's own scheduler at 2-4 steps).
* ``consistency``  LCM / Hyper-SD: a boundary-conditioned x0 estimate at every step, then fresh noise up to
                   the next timestep of the checkpoint's own schedule.
* ``flow``         rectified flow / flow matching: Euler on a predicted velocity (InstaFlow, SD3-style
                   ``FlowMatchEulerDiscreteScheduler`` checkpoints and our own default model).

The *schedule* (timesteps, sigmas, alphas) is taken from the checkpoint's own diffusers scheduler config, so
the samplers follow the timesteps the model was distilled on. The update rules themselves are ours: small,
side-effect free and batch-agnostic, so one request gives the same result alone or inside a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_STEPS, MAX_STEPS = 1, 8


@dataclass(frozen=True)
class Schedule:
    kind: str  # "euler" | "euler_ancestral" | "consistency" | "flow"
    timesteps: list[float]  # what the denoiser receives as `timestep` at each step
    # euler*: VE sigmas (len steps + 1, last is 0). flow: flow sigmas in [0, 1] (len steps + 1).
    sigmas: list[float] = field(default_factory=list)
    init_noise_sigma: float = 1.0
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample | flow (velocity = noise - x0)
    # consistency only: alpha_bar at t and at the next timestep, and the boundary scalings at t.
    alphas: list[float] = field(default_factory=list)
    alphas_next: list[float] = field(default_factory=list)
    c_skip: list[float] = field(default_factory=list)
    c_out: list[float] = field(default_factory=list)
    flow_sign: float = 1.0  # +1: v = noise - x0 (diffusers FlowMatch); -1: v = x0 - noise (InstaFlow)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


# ---------------------------------------------------------------------------------------------------------------
# Update rules. x: [B, C, H, W] (or [B, C, T, H, W]); scalars are python floats so the rules stay graph-friendly.


def x0_from_model_output(model_output: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str):
    """x0 estimate from a VE-space sample ``x = x0 + sigma * eps`` (the denoiser saw ``x / sqrt(sigma^2 + 1)``)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Deterministic Euler step of the probability-flow ODE in sigma space. With sigma_next == 0 it returns x0:
    the one-step x0 sampler."""
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma)


def euler_ancestral_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """Euler step to sigma_down, then fresh noise of size sigma_up (k-diffusion's ancestral split)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    x = x + (x - x0) / sigma * (sigma_down - sigma)
    if sigma_up > 0:
        if noise is None:
            raise ValueError("euler_ancestral_step needs noise when sigma_next > 0")
        x = x + noise * sigma_up
    return x


def consistency_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    alpha_next: float,
    c_skip: float,
    c_out: float,
    prediction_type: str,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCM step in VP space. Returns (next sample, boundary-conditioned x0). ``noise`` is None on the last
    step, where the next sample is the x0 estimate itself."""
    if prediction_type == "epsilon":
        x0 = (x - (1 - alpha) ** 0.5 * model_output) / alpha**0.5
    elif prediction_type == "v_prediction":
        x0 = alpha**0.5 * x - (1 - alpha) ** 0.5 * model_output
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised, denoised
    return alpha_next**0.5 * denoised + (1 - alpha_next) ** 0.5 * noise, denoised


def rectified_flow_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, sign: float = 1.0):
    """Euler on a velocity field; sigma runs from 1 (noise) to 0 (data). ``sign`` maps InstaFlow's
    data-pointing velocity onto the noise-pointing convention of diffusers' FlowMatch schedulers."""
    return x + (sigma_next - sigma) * (sign * v)


def step_coefficients(sched: Schedule, i: int, last_noise: bool = False) -> tuple[float, float, float]:
    """Step ``i`` of ``sched`` as ``x_next = a * x + b * model_output + n * noise``: every update rule above is affine
    in the sample, the model output and the fresh noise once the schedule is fixed, which lets the guidance combine
    and the step run as one fused pass (kernels/fused_cfg.py). ``x`` is the sample the loop carries (VE space for
    euler*, the model input for consistency and flow). ``n`` is 0 where the step draws no noise (``last_noise``:
    whether a consistency/ancestral step at ``i`` receives noise)."""
    kind, pt = sched.kind, sched.prediction_type
    if kind in ("euler", "euler_ancestral"):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        # x0 = p * out + q * x for each prediction type (x0_from_model_output)
        if pt == "epsilon":
            p, q = -sigma, 1.0
        elif pt == "v_prediction":
            p, q = -sigma / (sigma**2 + 1) ** 0.5, 1.0 / (sigma**2 + 1)
        elif pt == "sample":
            p, q = 1.0, 0.0
        else:
            raise ValueError(f"unsupported prediction_type {pt!r}")
        target, noise = sigma_next, 0.0
        if kind == "euler_ancestral":
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            target = (sigma_next**2 - sigma_up**2) ** 0.5
            noise = sigma_up if sigma_up > 0 else 0.0
        d = (target - sigma) / sigma  # x + (x - x0) / sigma * (target - sigma)
        return 1.0 + d * (1.0 - q), -d * p, noise
    if kind == "consistency":
        alpha = sched.alphas[i]
        if pt == "epsilon":
            p, q = -((1 - alpha) ** 0.5) / alpha**0.5, 1.0 / alpha**0.5
        elif pt == "v_prediction":
            p, q = -((1 - alpha) ** 0.5), alpha**0.5
        elif pt == "sample":
            p, q = 1.0, 0.0
        else:
            raise ValueError(f"unsupported prediction_type {pt!r}")
        a, b = sched.c_out[i] * q + sched.c_skip[i], sched.c_out[i] * p  # denoised = c_out x0 + c_skip x
        if not last_noise:
            return a, b, 0.0
        s = sched.alphas_next[i] ** 0.5
        return s * a, s * b, (1 - sched.alphas_next[i]) ** 0.5
    if kind == "flow":
        h = sched.sigmas[i + 1] - sched.sigmas[i]
        return 1.0, h * sched.flow_sign, 0.0
    raise ValueError(f"unknown schedule kind {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Schedules from a checkpoint's scheduler config.

_EULER = {"EulerDiscreteScheduler", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
          "EulerAncestralDiscreteScheduler", "TCDScheduler"}
_CONSISTENCY = {"LCMScheduler"}
_FLOW = {"FlowMatchEulerDiscreteScheduler"}


def sampler_kind(scheduler_class: str, pipeline_class: str = "") -> str:
    if pipeline_class in ("RectifiedFlowPipeline", "InstaFlowPipeline"):
        return "flow"
    if scheduler_class in _CONSISTENCY:
        return "consistency"
    if scheduler_class in _FLOW:
        return "flow"
    if scheduler_class == "EulerAncestralDiscreteScheduler":
        return "euler_ancestral"
    if scheduler_class in _EULER:
        return "euler"
    raise ValueError(
        f"scheduler {scheduler_class!r} is not supported; fewstep samples with Euler/DDIM-style x0 steps, "
        "LCMScheduler (consistency) or FlowMatchEulerDiscreteScheduler (rectified flow)"
    )


def make_schedule(scheduler_class: str, scheduler_config: dict, steps: int, pipeline_class: str = "",
                  flow_sigmas: str = "scheduler", max_steps: int = MAX_STEPS) -> Schedule:
    """Build the schedule for ``steps`` steps from the checkpoint's own scheduler config.

    diffusers' scheduler classes are used only as a config -> timestep-table function, so that our timesteps are
    exactly the ones the checkpoint was distilled on (trailing spacing for Turbo, the LCM skipping schedule ...).

    ``flow_sigmas="uniform"`` (a checkpoint hint) spaces FlowMatch sigmas as linspace(1, 0, N + 1): diffusers'
    own spacing, linspace(1, 1/1000, N), makes a 2-step schedule [1, 0.001, 0], which is in effect one step.
    ``max_steps``: the serving limit; offline tools (a teacher's 25-step evaluation) raise it.
    """
    import diffusers  # local: keep `import fewstep.engines.samplers` light

    if not MIN_STEPS <= steps <= max_steps:
        raise ValueError(f"steps must be in [{MIN_STEPS}, {max_steps}], got {steps}")
    kind = sampler_kind(scheduler_class, pipeline_class)
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}

    if kind == "flow" and scheduler_class not in _FLOW:
        # InstaFlow: Euler on a data-pointing velocity with t = (1 - i / N) * 1000.
        sig = [1.0 - i / steps for i in range(steps)] + [0.0]
        return Schedule("flow", [s * 1000.0 for s in sig[:-1]], sig, 1.0, "flow", flow_sign=-1.0)

    if scheduler_class in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        sched = getattr(diffusers, scheduler_class).from_config(config)
        sched.set_timesteps(steps, device="cpu")
        return Schedule(
            kind,
            [float(t) for t in sched.timesteps],
            [float(s) for s in sched.sigmas],
            float(sched.init_noise_sigma),
            sched.config.prediction_type,
        )

    if kind == "euler":
        # DDIM-like configs: express the deterministic DDIM update as Euler in sigma space (they are the same ODE
        # step), with sigma = sqrt((1 - a) / a) at each timestep and the final alpha from set_alpha_to_one.
        sched = getattr(diffusers, scheduler_class).from_config(config)
        sched.set_timesteps(steps, device="cpu")
        ac = sched.alphas_cumprod
        ts = [int(t) for t in sched.timesteps]
        final = 1.0 if config.get("set_alpha_to_one", True) else float(ac[0])
        alphas = [float(ac[t]) for t in ts] + [final]
        sig = [((1 - a) / a) ** 0.5 for a in alphas]
        return Schedule("euler", [float(t) for t in ts], sig, (sig[0] ** 2 + 1) ** 0.5,
                        sched.config.prediction_type)

    if kind == "consistency":
        sched = diffusers.LCMScheduler.from_config(config)
        sched.set_timesteps(steps, device="cpu")
        ts = [int(t) for t in sched.timesteps]
        ac = sched.alphas_cumprod
        alphas = [float(ac[t]) for t in ts]
        nxt = ts[1:] + [ts[-1]]
        alphas_next = [float(ac[t]) if t >= 0 else float(sched.final_alpha_cumprod) for t in nxt]
        scal = [sched.get_scalings_for_boundary_condition_discrete(t) for t in ts]
        return Schedule(
            "consistency",
            [float(t) for t in ts],
            init_noise_sigma=float(sched.init_noise_sigma),
            prediction_type=sched.config.prediction_type,
            alphas=alphas,
            alphas_next=alphas_next,
            c_skip=[float(c[0]) for c in scal],
            c_out=[float(c[1]) for c in scal],
        )

    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    if getattr(sched.config, "use_dynamic_shifting", False):
        raise ValueError("FlowMatch schedulers with use_dynamic_shifting need an image-size shift; not supported yet")
    if flow_sigmas == "uniform":
        sched.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], device="cpu")
    else:
        sched.set_timesteps(steps, device="cpu")
    return Schedule("flow", [float(t) for t in sched.timesteps], [float(s) for s in sched.sigmas], 1.0, "flow")
