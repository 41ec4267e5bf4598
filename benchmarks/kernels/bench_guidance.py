"""Benchmark the guidance kernels against torch (unfused) at SD-Turbo-architecture shapes, in one run.

Sections (all on by default, pick with --sections):
  c  fused CFG combine (+ Lin et al. rescale) + sampler update vs the pipeline's torch ops -> ms, GB/s
     latents 2 x 4 x 64 x 64 (SD-Turbo 512^2, batch 2) and 2 x 4 x 128 x 128 (SDXL 1024^2), fp16 model output
  a  adapter linear x W^T + b + s (x A^T) B^T vs torch's three GEMMs + scale + add, and the plain linear (the floor)
     -> ms, TFLOP/s; SD-Turbo UNet projections: 320/640/1280 channels at 4096/1024/256 tokens, batch 2, rank 16/64
  n  NASA dual cross-attention vs two SDPA calls + scaled subtract, and one SDPA (the floor) -> ms, TFLOP/s;
     4096/1024/256 queries x 77 keys (both prompts), 5/10/20 heads x 64 (SD 2.1's attn2), batch 2
  g  NAG's renormalised form of NASA (same shapes, phi 3, tau 2.5, alpha 0.5): the kernel writing Z+ beside the
     combination + the per-token L1 clip/blend epilogue (nasa_processor.nag_renorm) vs two SDPA calls + the same
     epilogue (the processor's torch path), and the plain fused NASA kernel (what the renormalisation adds)
Every timed case is first checked against the fp32 reference (kernels/reference.py); a mismatch is a FAIL row.

    fewstep bench guidance --out OUT_DIR   # H100/H200
    fewstep bench guidance --cpu-smoke     # interpreter, tiny shapes, no meaningful timing

Writes OUT_DIR/bench_guidance.json (rows).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SECTIONS = "cang"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep bench guidance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="directory for bench_guidance.json")
    p.add_argument("--sections", default=SECTIONS, help=f"subset of '{SECTIONS}' to run")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="model dtype (default float16, what SD-Turbo serves in)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every code path on CPU under TRITON_INTERPRET=1 with tiny shapes")
    return p


ARGS = build_parser().parse_args(None if __name__ == "__main__" else [])
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewstep.benchmarks.kernels.common import BenchRun  # noqa: E402
from fewstep.engines.samplers import euler_step, x0_from_model_output  # noqa: E402
from fewstep.kernels.adapter_linear import adapter_linear  # noqa: E402
from fewstep.kernels.fused_cfg import fused_cfg_step  # noqa: E402
from fewstep.kernels.nasa_attention import nasa_attention  # noqa: E402
from fewstep.kernels.nasa_processor import nag_renorm  # noqa: E402
from fewstep.kernels.reference import (  # noqa: E402
    adapter_linear_ref,
    attention_ref,
    cfg_combine_ref,
    fused_cfg_step_ref,
    nag_attention_ref,
    nasa_attention_ref,
)

SMOKE = ARGS.cpu_smoke
DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = getattr(torch, ARGS.dtype)
RUN = BenchRun(SMOKE, dtype=ARGS.dtype)
ENV, ROWS, FAILURES = RUN.env, RUN.rows, RUN.failures
log, bench_ms = RUN.log, RUN.bench_ms


def add_row(section: str, provider: str, ms: float, shape: dict, **extra) -> None:
    RUN.add_row(section=section, provider=provider, shape=shape, ms=ms, **extra)


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    err = (got.float() - ref.float()).abs().max().item()
    ok = err <= tol * max(1.0, ref.float().abs().max().item())
    if not ok:
        FAILURES.append(f"{name}: max abs error {err:.3g}")
    log(f"  check {name}: max abs err {err:.2e} {'PASS' if ok else 'FAIL'}")
    return ok


# -- c: fused CFG --------------------------------------------------------------------------------------------------
def section_cfg() -> None:
    shapes = [(2, 4, 8, 8)] if SMOKE else [(2, 4, 64, 64), (2, 4, 128, 128), (8, 4, 64, 64)]
    sigma, sigma_next = 14.61, 0.0  # SD-Turbo's one step: sigma_max -> 0 (the x0 form)
    for shape in shapes:
        B = shape[0]
        both = torch.randn(2 * B, *shape[1:], device=DEVICE, dtype=DTYPE)
        x = torch.randn(shape, device=DEVICE) * sigma
        g = torch.tensor(7.5, device=DEVICE)
        n = x.numel()
        for phi in (0.0, 0.7):
            def torch_path():
                # what FewStepPipeline runs without the kernel: upcast, combine (+ rescale), x0, Euler step
                u, c = both.float().chunk(2)
                out = cfg_combine_ref(u, c, g, phi) if phi else u + g * (c - u)
                return euler_step(x, x0_from_model_output(out, x, sigma, "epsilon"), sigma, sigma_next)

            def fused():
                return fused_cfg_step(both, x, g, 1.0, sigma_next - sigma, guidance_rescale=phi)

            ok = check(f"cfg {shape} phi={phi}", fused(),
                       fused_cfg_step_ref(both, x, g, 1.0, sigma_next - sigma, guidance_rescale=phi), 1e-4)
            # bytes the step must move at least: read both (2B rows, model dtype) and x (fp32), write x_next (fp32)
            nbytes = 2 * n * both.element_size() + n * 4 + n * 4
            times = {"torch": bench_ms(torch_path), "fused": bench_ms(fused)}
            for prov, ms in times.items():
                gbs = nbytes / (ms * 1e-3) / 1e9
                add_row("cfg", prov, ms, {"latents": list(shape), "phi": phi}, gbs=gbs, ok=ok,
                        speedup_vs_torch=times["torch"] / ms)
                log(f"cfg {shape} phi={phi} {prov:6s} {ms * 1e3:8.1f} us {gbs:8.1f} GB/s "
                    f"({times['torch'] / ms:.2f}x torch)")


# -- a: adapter linear ---------------------------------------------------------------------------------------------
def section_adapter() -> None:
    cases = [(2, 7, 24, 3)] if SMOKE else [(2, t, c, r) for c, t in ((320, 4096), (640, 1024), (1280, 256))
                                            for r in (16, 64)]
    for S, T, C, R in cases:
        x = torch.randn(S, T, C, device=DEVICE, dtype=DTYPE)
        w = torch.randn(C, C, device=DEVICE, dtype=DTYPE) / C**0.5
        b = torch.randn(C, device=DEVICE, dtype=DTYPE)
        a = torch.randn(R, C, device=DEVICE, dtype=DTYPE) / C**0.5
        bb = torch.randn(C, R, device=DEVICE, dtype=DTYPE) / R**0.5
        s = torch.rand(S, device=DEVICE) * 6
        s_col = s.to(DTYPE).view(S, 1, 1)

        def torch_path():
            return F.linear(x, w, b) + s_col * F.linear(F.linear(x, a), bb)

        def plain():
            return F.linear(x, w, b)

        kw = {"block_m": 16, "block_n": 16, "block_k": 16} if SMOKE else {}

        def fused():
            return adapter_linear(x, w, b, a, bb, s, **kw)

        ok = check(f"adapter S{S} T{T} C{C} r{R}", fused(), adapter_linear_ref(x, w, b, a, bb, s.repeat_interleave(T)),
                   2e-2)
        M = S * T
        flops = 2 * M * C * C + 2 * M * R * (C + C)
        times = {"torch": bench_ms(torch_path), "fused": bench_ms(fused), "linear_only": bench_ms(plain)}
        for prov, ms in times.items():
            tf = flops / (ms * 1e-3) / 1e12
            add_row("adapter", prov, ms, {"S": S, "T": T, "C": C, "rank": R}, tflops=tf, ok=ok,
                    speedup_vs_torch=times["torch"] / ms)
            log(f"adapter C={C} T={T} r={R} {prov:11s} {ms * 1e3:8.1f} us {tf:7.1f} TFLOP/s "
                f"({times['torch'] / ms:.2f}x torch)")


# -- n: NASA -------------------------------------------------------------------------------------------------------
def section_nasa() -> None:
    cases = [(2, 2, 37, 13, 24)] if SMOKE else [(2, 5, 4096, 77, 64), (2, 10, 1024, 77, 64), (2, 20, 256, 77, 64)]
    for B, H, NQ, NK, D in cases:
        q = torch.randn(B, H, NQ, D, device=DEVICE, dtype=DTYPE)
        kp, vp, kn, vn = (torch.randn(B, H, NK, D, device=DEVICE, dtype=DTYPE) for _ in range(4))
        alpha = torch.full((B,), 0.5, device=DEVICE)
        alpha_col = alpha.to(DTYPE).view(B, 1, 1, 1)

        def torch_path():
            return F.scaled_dot_product_attention(q, kp, vp) - alpha_col * F.scaled_dot_product_attention(q, kn, vn)

        def positive_only():
            return F.scaled_dot_product_attention(q, kp, vp)

        kw = {"block_m": 16, "block_n": 16} if SMOKE else {}

        def fused():
            return nasa_attention(q, kp, vp, kn, vn, alpha, **kw)

        ok = check(f"nasa B{B} H{H} Nq{NQ} Nk{NK}", fused(), nasa_attention_ref(q, kp, vp, kn, vn, alpha), 2e-2)
        flops = 4 * B * H * NQ * (2 * NK) * D
        times = {"torch": bench_ms(torch_path), "fused": bench_ms(fused), "sdpa_positive_only": bench_ms(positive_only)}
        for prov, ms in times.items():
            f = flops if prov != "sdpa_positive_only" else flops / 2
            tf = f / (ms * 1e-3) / 1e12
            add_row("nasa", prov, ms, {"B": B, "H": H, "Nq": NQ, "Nk": NK, "D": D}, tflops=tf, ok=ok,
                    speedup_vs_torch=times["torch"] / ms)
            log(f"nasa H={H} Nq={NQ} {prov:18s} {ms * 1e3:8.1f} us {tf:7.2f} TFLOP/s "
                f"({times['torch'] / ms:.2f}x torch)")


# -- g: NAG (NASA renormalised) ---------------------------------------------------------------------------------
def section_nag() -> None:
    cases = [(2, 2, 37, 13, 24)] if SMOKE else [(2, 5, 4096, 77, 64), (2, 10, 1024, 77, 64), (2, 20, 256, 77, 64)]
    for B, H, NQ, NK, D in cases:
        q = torch.randn(B, H, NQ, D, device=DEVICE, dtype=DTYPE)
        kp, vp, kn, vn = (torch.randn(B, H, NK, D, device=DEVICE, dtype=DTYPE) for _ in range(4))
        phi, tau, blend = (torch.full((B,), v, device=DEVICE) for v in (3.0, 2.5, 0.5))
        phi4 = phi.view(B, 1, 1, 1)
        kw = {"block_m": 16, "block_n": 16} if SMOKE else {}

        def torch_path():
            pos = F.scaled_dot_product_attention(q, kp, vp)
            guided = phi4 * pos.float() - (phi4 - 1) * F.scaled_dot_product_attention(q, kn, vn).float()
            return nag_renorm(pos, guided, tau, blend)

        def fused():
            comb, pos = nasa_attention(q, kp, vp, kn, vn, (phi - 1) / phi, return_pos=True, **kw)
            return nag_renorm(pos, phi4 * comb.float(), tau, blend)

        def fused_plain_nasa():
            return nasa_attention(q, kp, vp, kn, vn, blend, **kw)

        ok = check(f"nag B{B} H{H} Nq{NQ} Nk{NK}", fused(), nag_attention_ref(q, kp, vp, kn, vn, phi, tau, blend)
                   if SMOKE else _nag_ref_vectorised(q, kp, vp, kn, vn, phi4, tau, blend), 3e-2)
        flops = 4 * B * H * NQ * (2 * NK) * D
        times = {"torch": bench_ms(torch_path), "fused": bench_ms(fused),
                 "fused_plain_nasa": bench_ms(fused_plain_nasa)}
        for prov, ms in times.items():
            tf = flops / (ms * 1e-3) / 1e12
            add_row("nag", prov, ms, {"B": B, "H": H, "Nq": NQ, "Nk": NK, "D": D}, tflops=tf, ok=ok,
                    speedup_vs_torch=times["torch"] / ms)
            log(f"nag H={H} Nq={NQ} {prov:18s} {ms * 1e3:8.1f} us {tf:7.2f} TFLOP/s "
                f"({times['torch'] / ms:.2f}x torch)")


def _nag_ref_vectorised(q, kp, vp, kn, vn, phi4, tau, blend):
    """The fp32 check at GPU shapes (``nag_attention_ref`` loops over tokens in Python: too slow at 4096)."""
    pos, neg = attention_ref(q, kp, vp), attention_ref(q, kn, vn)
    return nag_renorm(pos, phi4 * pos - (phi4 - 1) * neg, tau, blend)


def main() -> int:
    if not RUN.start():
        return 2
    torch.manual_seed(0)
    RUN.run_sections(ARGS.sections, {"c": section_cfg, "a": section_adapter, "n": section_nasa,
                                    "g": section_nag})
    RUN.write_json(ARGS.out, "bench_guidance.json", vars(ARGS))
    print(f"\n{ENV['gpu']} | {len(ROWS)} rows | {len(FAILURES)} failures | {RUN.elapsed_s():.0f}s")
    for f in FAILURES:
        print("FAIL", f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
