"""Regenerate the results tables in benchmarks/README.md (and plots) from benchmarks/results/*.jsonl.

    fewstep bench report              # in a checkout: rewrites the blocks between the markers
    fewstep bench report --repo DIR   # the checkout at DIR

It rewrites two blocks: everything between ``<!-- results:start -->`` and ``<!-- results:end -->`` in
benchmarks/README.md (every row), and a short table of the headline figures between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in the top-level README.md. Plots need matplotlib; without it the committed plots are kept
and linked as they are.

Rows are appended by the benchmark scripts (pipeline_bench --out, or by hand from a device run's $OUT). Each row
carries its GPU, date, commit and command, so a number in the README always points back to how it was made. The
table is never typed by hand.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
SHORT_START, SHORT_END = "<!-- bench:start -->", "<!-- bench:end -->"
# The benchmarks/ folder of the checkout being reported on; main() sets it from --repo.
BENCH = HERE
PLOT_NAMES = ("batch_scaling_*.png", "resolution_scaling.png", "throughput_vs_concurrency.png",
              "stream_frame_cost_vs_length.png")


def find_repo(arg: str | None) -> Path:
    """--repo, else the current directory if it holds benchmarks/results, else the checkout holding this module."""
    if arg:
        repo = Path(arg).resolve()
    elif (Path.cwd() / "benchmarks" / "results").is_dir():
        repo = Path.cwd().resolve()
    else:
        repo = HERE.parent
    if not (repo / "benchmarks" / "results").is_dir():
        raise SystemExit(f"fewstep bench report: no benchmarks/results under {repo}; run it in a checkout of "
                         "fewstep or pass --repo DIR")
    return repo


def load_rows(results: Path | None = None) -> list[dict]:
    results = results or BENCH / "results"
    rows = []
    for f in sorted(results.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line) | {"_file": f.name})
    return rows


def _fmt(v, digits=1):
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def pipeline_table(rows: list[dict]) -> str:
    # per-request latency rows (saturation rows of `bench pipeline --saturate` carry images/s, not stage times)
    rows = [r for r in rows if "system" in r and "batch" in r and r.get("kind") not in ("saturation", "unavailable")]
    if not rows:
        return "_no pipeline rows yet_\n"
    head = ("| GPU | arch | size | steps | system | dtype | batch | prompt | encode_prompt | denoise | decode "
            "| encode_image | total ms | ms/image | MFU | date | commit |\n|" + "---|" * 17 + "\n")
    out = []
    for r in sorted(rows, key=lambda r: (r["gpu"], r["arch"], r["size"], r["steps"], r["system"], r["batch"],
                                         r.get("prompt", ""))):
        mfu = r.get("mfu")
        mfu_s = (f"{100 * mfu:.0f}%" if mfu is not None else
                 f"{100 * r['mfu_e2e']:.0f}% e2e" if r.get("mfu_e2e") is not None else "–")
        decode = _fmt(r.get("decode_ms"))
        encode = _fmt(r.get("encode_image_ms"))
        if r.get("decode_ms") is None and r.get("decode_encode_ms") is not None:  # see the row's note
            decode, encode = f"{r['decode_encode_ms']:.1f} (decode + encode)¹", "¹"
        out.append(f"| {r['gpu']} | {r['arch']} | {r['size']} | {r['steps']} | {r['system']} | "
                   f"{r.get('dtype') or '–'} | {r['batch']} | "
                   f"{r.get('prompt', '')} | {_fmt(r.get('encode_prompt_ms'))} | {_fmt(r.get('denoise_ms'))} | "
                   f"{decode} | {encode} | {_fmt(r.get('total_ms'))} | "
                   f"{_fmt(r['total_ms'] / r['batch'])} | {mfu_s} | "
                   f"{r['date'][:10]} | {r.get('commit') or '–'} |")
    cmds = sorted({r["command"] for r in rows})
    notes = sorted({r["note"] for r in rows if r.get("note")})
    return (head + "\n".join(out) + "\n\n" + "".join(f"¹ {n}\n\n" for n in notes) + "Commands:\n" +
            "".join(f"- `{c}`\n" for c in cmds))


def encode_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("bench") == "image_encode"]
    if not rows:
        return ""
    out = ["| GPU | image | encoder | batch | ms per image | KB | date | commit |", "|" + "---|" * 8]
    for r in rows:
        out.append(f"| {r['gpu']} | {r['size']}² {r['content']} | {r['encoder']} | {r['batch']} | "
                   f"{r['ms_per_image']:.2f} | {r['kb']:.1f} | {r['date'][:10]} | {r.get('commit') or '–'} |")
    return "\n".join(out) + f"\n\nCommand: `{rows[0]['command']}`\n"


def load_reports(kind: str, results: Path | None = None) -> list[dict]:
    """fewstep bench images/stream JSON reports under results/<kind>/<GPU name>/*.json (the client cannot see
    the server's GPU, so the folder names it)."""
    results = results or BENCH / "results"
    out = []
    for f in sorted((results / kind).glob("*/*.json")):
        rep = json.loads(f.read_text())
        out.append(rep | {"_gpu": f.parent.name, "_file": f.name})
    return out


def served_model(rep: dict) -> str:
    """The model a report measured: the request's ``model``, else what the server listed (``server_models``), else
    the note added when a device run's JSON was copied into the results store (``server``)."""
    listed = rep.get("server_models") or []
    return (rep["config"].get("model") or (listed[0].get("id") if listed else None)
            or (rep.get("server") or {}).get("model", "–").split(" ")[0])


def http_table(reps: list[dict]) -> str:
    if not reps:
        return ""
    out = ["| GPU | model | format | concurrency | requests | img/s | p50 ms | p90 ms | p99 ms | engine total p50 "
           "| serving overhead p50 | errors | date | commit |", "|" + "---|" * 14]
    for r in sorted(reps, key=lambda r: (r["_gpu"], served_model(r), r["config"]["output_format"],
                                         r["config"]["concurrency"] or 0)):
        c, lat, st = r["config"], r["latency_ms"] or {}, r.get("server_timings") or {}
        ov = r.get("serving_overhead_ms") or {}
        out.append(f"| {r['_gpu']} | {served_model(r)} | {c['output_format']} | {c['concurrency']} | "
                   f"{r['completed']} | {_fmt(r['image_throughput'])} | {_fmt(lat.get('p50'))} | "
                   f"{_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {_fmt((st.get('total_ms') or {}).get('p50'))} | "
                   f"{_fmt(ov.get('p50'))} | {r['errors']['total']} | {r['date_utc'][:10]} | "
                   f"{(r.get('git_commit') or '–')[:7]} |")
    return "\n".join(out) + "\n"


def stream_table(reps: list[dict]) -> str:
    if not reps:
        return ""
    out = ["| GPU | model | size | sessions | frames each | aggregate fps | fps per session p50 | TTFF p50 ms "
           "| inter-frame p99 ms | dropped | date |", "|" + "---|" * 11]
    for r in sorted(reps, key=lambda r: (r["_gpu"], served_model(r), r["config"]["sessions"], r["config"]["frames"])):
        c = r["config"]
        out.append(f"| {r['_gpu']} | {served_model(r)} | {c.get('size') or 'native'} | {c['sessions']} | {c['frames']} | {_fmt(r['aggregate_fps'])} | "
                   f"{_fmt((r['fps_per_session'] or {}).get('p50'))} | {_fmt((r['ttff_ms'] or {}).get('p50'))} | "
                   f"{_fmt((r['inter_frame_ms'] or {}).get('p99'))} | {r['frames_dropped']} | {r['date_utc'][:10]} |")
    return "\n".join(out) + "\n"


def latest(rows: list[dict]) -> list[dict]:
    """One row per measured point (GPU, arch, size, steps, system, batch, prompt, options): the newest. The tables
    keep every run; a curve must not mix points of two runs at the same x."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if "system" not in r or r.get("kind") in ("saturation", "unavailable"):  # not per-request latency rows
            continue
        key = (r["gpu"], r["arch"], r["size"], r["steps"], r["system"], r["batch"], r.get("prompt"),
               r.get("dtype"), r.get("options") and json.dumps(r["options"], sort_keys=True))
        if key not in best or r["date"] >= best[key]["date"]:
            best[key] = r
    return list(best.values())


def sdpa_baseline(rows: list[dict], file: str, d: int, n: int) -> float | None:
    """Dense SDPA ms for one shape in one run: the fastest of its section c and d timings (conservative for us)."""
    same = [r for r in rows if r["_file"] == file and r.get("provider") == "sdpa" and r["section"] in ("c", "d")
            and r["shape"]["D"] == d and r["shape"]["Nq"] == n]
    ms = [r["ms"] for r in same] + [m for r in same for m in (r.get("sdpa_ms_before_after") or [])]
    return min(ms) if ms else None


def _kernel_rows(results: Path) -> list[dict]:
    rows = []
    for f in sorted(results.glob("*.json")) if results.is_dir() else []:
        d = json.loads(f.read_text())
        # bench_block_sparse_attention rows only (the quality study's JSON sits in the same folder)
        rows += [r | {"_file": f.name, "_args": d.get("args", {})} for r in d.get("rows", [])
                 if isinstance(r, dict) and "section" in r]
    return rows


def kernel_tables(results: Path | None = None) -> str:
    """Block-sparse attention rows (benchmarks/kernels/bench_block_sparse_attention.py --out) -> markdown."""
    rows = _kernel_rows(results or BENCH / "results" / "kernels")
    if not rows:
        return ""
    out = []
    for f in sorted({r["_file"] for r in rows if r["section"] == "a"}):
        a = [r for r in rows if r["section"] == "a" and r["_file"] == f]
        ok = sum(r["status"] == "PASS" for r in a)
        out.append(f"Correctness against the fp32 reference: {ok}/{len(a)} cases pass "
                   f"(error ≤ 2× SDPA's own bf16/fp16 error + atol; {a[0]['gpu']}, {a[0]['date'][:10]}, `{f}`).\n")
    c = defaultdict(dict)
    for r in (r for r in rows if r["section"] == "c"):
        sh = r["shape"]
        c[(r["gpu"], sh["D"], sh["Nq"], r["_file"])][r["provider"]] = r["tflops"]
    if c:
        out.append("| GPU | head dim | tokens | ours, dense mode TF/s | SDPA TF/s | cuDNN TF/s | ours / SDPA | "
                   "all-blocks list via indices / SDPA | … prefetched / SDPA | … full rows as a plain loop / SDPA "
                   "| file |\n|" + "---|" * 11)
        for (gpu, d, n, f), p in sorted(c.items()):
            sd = p.get("sdpa")
            ratio = lambda k: f"{p[k] / sd:.2f}" if sd and p.get(k) else "–"  # noqa: E731
            # before the full-row loop existed (2026-11-29), bsa_full_mask went through the indices
            indexed = "bsa_full_mask_indexed" if "bsa_full_mask_indexed" in p else "bsa_full_mask"
            loop = ratio("bsa_full_mask") if indexed != "bsa_full_mask" else "–"
            out.append(f"| {gpu} | {d} | {n} | {_fmt(p.get('bsa_dense'), 0)} | {_fmt(sd, 0)} | "
                       f"{_fmt(p.get('sdpa_cudnn'), 0)} | {ratio('bsa_dense')} | {ratio(indexed)} | "
                       f"{ratio('bsa_full_mask_prefetch')} | {loop} | {f} |")
        out.append("")
    dd = [r for r in rows if r["section"] == "d" and r["provider"] in ("bsa", "flex", "bsa_prefetch")]
    if dd:
        out.append("| GPU | head dim | tokens | block sparsity | dense SDPA ms ¹ | ours ms | speed-up | ideal 1/(1−s) "
                   "| ours, index prefetch ms | FlexAttention ms | file |\n|" + "---|" * 11)
        for r in sorted((r for r in dd if r["provider"] == "bsa"),
                        key=lambda r: (r["_file"], r["shape"]["D"], r["shape"]["Nq"], r["sparsity"])):
            f, d, n = r["_file"], r["shape"]["D"], r["shape"]["Nq"]
            base = sdpa_baseline(rows, f, d, n)
            peer = {x["provider"]: x["ms"] for x in dd if x["_file"] == f and x["shape"]["D"] == d
                    and x["shape"]["Nq"] == n and abs(x["sparsity"] - r["sparsity"]) < 1e-6}
            out.append(f"| {r['gpu']} | {d} | {n} | {r['sparsity']:.2f} | {_fmt(base, 2)} | {r['ms']:.2f} | "
                       f"{_fmt(base and base / r['ms'], 2)}× | {1 / (1 - r['sparsity']):.2f}× | "
                       f"{_fmt(peer.get('bsa_prefetch'), 2)} | {_fmt(peer.get('flex'), 2)} | {f} |")
        out.append("\n¹ The fastest SDPA figure of the run for that shape (sections c and d). On 2026-11-29 section d "
                   "timed SDPA at D 128 17% slower than section c had a minute before; the faster one is used.\n")
    e = {r["provider"]: r for r in rows if r["section"] == "e"}
    if "asa_mask" in e and "bsa_gated" in e:
        m, g = e["asa_mask"], e["bsa_gated"]
        out.append(f"Adaptive mask construction (ASA, {m['shape']['Nq']} tokens, head dim {m['shape']['D']}): "
                   f"{m['ms']:.2f} ms = {100 * m['ms'] / g['ms']:.1f}% of the attention it gates "
                   f"({g['ms']:.2f} ms at sparsity {m['sparsity']:.2f}).\n")
    f_rows = [r for r in rows if r["section"] == "f"]
    if f_rows:
        out.append("| Wan2.1-T2V-1.3B forward (random bf16 weights, 480×832×81) | ms | speed-up | block sparsity | "
                   "rel. L2 vs dense |\n|---|---|---|---|---|")
        for r in f_rows:
            out.append(f"| {r.get('option') or r['provider']} | {r['ms']:.1f} | "
                       f"{_fmt(r.get('speedup_vs_sdpa'), 2)} | {_fmt(r.get('sparsity'), 2)} | "
                       f"{_fmt(r.get('rel_err_vs_dense'), 4)} |")
        out.append("")
    def flags(args: dict) -> str:
        return " ".join(f"--{k.replace('_', '-')}" + ("" if v == "True" else f" {v}") for k, v in args.items()
                        if v not in ("None", "False"))

    files = sorted({(r["_file"], flags(r["_args"])) for r in rows})
    out.append("Runs (`fewstep bench kernels` with):\n" +
               "".join(f"- `{f}`: `{a}`\n" for f, a in files))
    out += [f"![{p.stem}](plots/{p.name})\n" for p in sorted((BENCH / "plots").glob("bsa_speedup_vs_sparsity*.png"))]
    return "\n".join(out)


# Published figures from ../shared/ANCHORS.md (papers, READMEs, a vendor blog). Their hardware and conventions
# differ from ours; the table says which, and only our own rows are measured here.
ANCHORS_SD_TURBO = [
    ("StreamDiffusion, SD-Turbo 512² 1 step", "RTX 4090", 1000 / 106,
     "TensorRT UNet + VAE, tiny VAE (TAESD), stream batch, cached prompt"),
    ("plain diffusers eager, SD-Turbo 512² 1 step", "A100", 90.0, "vendor blog chart"),
]
ANCHORS_SDXL = [  # SDXL-Turbo 512², 1 step, A100, read off a vendor blog chart
    ("plain diffusers eager, SDXL-Turbo 512² 1 step", "A100", 145.0, "vendor blog chart"),
    ("diffusers torch.compile, SDXL-Turbo 512² 1 step", "A100", 59.0, "vendor blog chart"),
    ("diffusers ORT-TensorRT, SDXL-Turbo 512² 1 step", "A100", 45.0, "vendor blog chart"),
]
ANCHORS_STREAM = [  # (system, GPU, fps, time to first frame s or None, how)
    ("Self-Forcing, Wan2.1-1.3B causal, 832×480", "H100", 17.0, 0.69, "chunk-wise autoregression + KV cache, "
     "4 steps per chunk of 3 latent frames, DMD"),
    ("StreamDiT, 4B, 512p", "H100", 16.0, None, "moving buffer, window attention"),
    ("FastWan (FastVideo), Wan2.1-1.3B, 448×832", "H100", 16.0, None, "3 steps, DMD + video sparse attention"),
]
ANCHORS_ATTENTION = {  # N=32768, D=128, ms (ANCHORS.md, our H200, torch 2.11)
    "dense cuDNN": 10.6, "FlexAttention 50%": 9.9, "FlexAttention 75%": 5.3, "FlexAttention 90%": 2.4,
}


def anchor_table(rows: list[dict]) -> str:
    """Our best measured figures next to the anchors' published ones."""
    def best(system_prefix: str, **match):
        cands = [r for r in rows if r.get("system", "").startswith(system_prefix) and r.get("prompt") == "cold"
                 and r.get("kind") not in ("saturation", "unavailable")
                 and all(r.get(k) == v for k, v in match.items())]
        return min(cands, key=lambda r: r["total_ms"]) if cands else None

    out = ["| system | GPU | ms per image, batch 1 | images/s | how | source |", "|---|---|---|---|---|---|"]
    for name, gpu, ms, how in ANCHORS_SD_TURBO:
        out.append(f"| {name} | {gpu} | {ms:.1f} | {1000 / ms:.0f} | {how} | ANCHORS.md |")
    for system, label in (("fewstep-compiled", "fewstep compiled (torch.compile + CUDA graphs)"),
                          ("fewstep-eager", "fewstep eager"), ("diffusers-compile", "diffusers torch.compile"),
                          ("diffusers-eager", "diffusers eager")):
        r = best(system, arch="sd-turbo", size=512, steps=1, batch=1)
        if r:
            how = "text encoder + UNet + VAE + JPEG, cold prompt" if system.startswith("fewstep") else \
                "text encoder + UNet + VAE, to PIL"
            out.append(f"| {label}, SD-Turbo arch. 512² 1 step (`{r['system']}`, {r.get('dtype')}) | {r['gpu']} | "
                       f"{r['total_ms']:.1f} | "
                       f"{1000 / r['total_ms']:.0f} | {how} | measured {r['date'][:10]}, {r.get('commit') or '–'} |")
    for name, gpu, ms, how in ANCHORS_SDXL:
        out.append(f"| {name} | {gpu} | {ms:.1f} | {1000 / ms:.0f} | {how} | ANCHORS.md |")
    for system, label in (("fewstep-compiled", "fewstep compiled"), ("diffusers-compile", "diffusers torch.compile"),
                          ("diffusers-eager", "diffusers eager")):
        r = best(system, arch="sdxl-turbo", size=512, steps=1, batch=1)
        if r:
            how = "2 text encoders + UNet + VAE" + (" + JPEG, cold prompt" if system.startswith("fewstep") else
                                                   ", to PIL")
            out.append(f"| {label}, SDXL-Turbo arch. 512² 1 step (`{r['system']}`, {r.get('dtype')}) | {r['gpu']} | "
                       f"{r['total_ms']:.1f} | "
                       f"{1000 / r['total_ms']:.0f} | {how} | measured {r['date'][:10]}, {r.get('commit') or '–'} |")
    text = "\n".join(out) + "\n"
    streams = [r for r in load_reports("stream") if r["config"]["sessions"] == 1 and "wan" in served_model(r)]
    text += ("\n| video stream | GPU | fps delivered | time to first frame s | how | source |\n"
             "|---|---|---|---|---|---|\n")
    for name, gpu, fps, ttff, how in ANCHORS_STREAM:
        text += f"| {name} | {gpu} | {fps:.1f} | {_fmt(ttff, 2)} | {how} | ANCHORS.md |\n"
    for r in streams:
        text += (f"| fewstep, Wan2.1-1.3B arch. (random weights), {r['config'].get('size')} | {r['_gpu'].replace('_', ' ')} | "
                 f"{r['aggregate_fps']:.1f} | {r['ttff_ms']['p50'] / 1e3:.2f} | moving buffer of 4 chunks × 3 latent "
                 "frames, 1 call per 12 frames, eager, JPEG over WebSocket, 1 session | measured "
                 f"{r['date_utc'][:10]}, {(r.get('git_commit') or '–')[:7]} |\n")
    # one run only: the newest file with section d rows at 32K tokens, head dim 128
    krows = [r for r in _kernel_rows(BENCH / "results" / "kernels")
             if r.get("shape", {}).get("D") == 128 and r.get("shape", {}).get("Nq") == 32768]
    runs = sorted({(r["date"], r["_file"]) for r in krows if r["section"] == "d"})
    if runs:
        f = runs[-1][1]
        run = [r for r in krows if r["_file"] == f]
        dense = {r["provider"]: r["ms"] for r in run if r["section"] == "c"}
        text += (f"\n| attention, 32K tokens, head dim 128, bf16 (`{f}`) | anchor (ANCHORS.md, H200) ms | ours ms | "
                 "torch peer in the same run, ms |\n|---|---|---|---|\n")
        text += (f"| dense | cuDNN {ANCHORS_ATTENTION['dense cuDNN']} | {_fmt(dense.get('bsa_dense'), 2)} (dense mode) "
                 f"| {_fmt(sdpa_baseline(run, f, 128, 32768), 2)} (SDPA default; the same as its cuDNN backend) |\n")
        for sp in (50, 75, 90):
            pick = lambda prov: [r["ms"] for r in run if r["section"] == "d" and r["provider"] == prov  # noqa: E731
                                 and round(100 * r["sparsity"]) in (sp, sp - 1)]
            ours, flex = pick("bsa"), pick("flex")
            text += (f"| {sp}% block sparsity | FlexAttention {ANCHORS_ATTENTION[f'FlexAttention {sp}%']} | "
                     f"{_fmt(ours[0] if ours else None, 2)} | FlexAttention {_fmt(flex[0] if flex else None, 2)} |\n")
    return text


def plot_bsa_speedup(out_dir: Path) -> list[Path]:
    """Speed-up over dense SDPA against block sparsity, per run file, against the conservative baseline
    (`sdpa_baseline`); replaces the plot the bench draws on the device, which used section d's own SDPA."""
    rows = _kernel_rows(BENCH / "results" / "kernels")
    paths = []
    for gpu in sorted({r["gpu"] for r in rows if r["section"] == "d"}):
        series: dict[str, list] = defaultdict(list)
        for r in rows:
            if r["gpu"] != gpu or r["section"] != "d" or r.get("provider") not in ("bsa", "flex"):
                continue
            base = sdpa_baseline(rows, r["_file"], r["shape"]["D"], r["shape"]["Nq"])
            if base:
                name = "ours" if r["provider"] == "bsa" else "FlexAttention"
                series[f"{name}, N={r['shape']['Nq']} D={r['shape']['D']}"].append((r["sparsity"], base / r["ms"]))
        ideal = [(0.5 + 0.01 * i, 1 / (0.5 - 0.01 * i)) for i in range(41)]
        name = f"bsa_speedup_vs_sparsity_{gpu.replace(' ', '_')}"
        got = _plot(out_dir, name, dict(series) | {"ideal 1/(1-s)": ideal}, "block sparsity",
                    "speed-up over dense SDPA (fastest SDPA of the run)", f"block-sparse attention, {gpu}, bf16",
                    logx=False, logy=True)
        paths += got
    return paths


def plot_batch_scaling(rows: list[dict], out_dir: Path) -> list[Path]:
    """Latency per image against batch size, one line per (GPU, arch, system). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(list)
    for r in rows:
        if "system" in r and r.get("prompt") in ("cold", None):
            groups[(r["gpu"], r["arch"], r["size"], r["system"])].append((r["batch"], r["total_ms"] / r["batch"]))
    paths = []
    for gpu in sorted({k[0] for k in groups}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (g, arch, size, system), pts in sorted(groups.items()):
            if g != gpu or len(pts) < 2:
                continue
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=f"{arch} {size}² {system}")
        if not ax.lines:
            plt.close(fig)
            continue
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per image (end to end)", title=gpu)
        ax.legend(fontsize=7)
        path = out_dir / f"batch_scaling_{gpu.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot(out_dir: Path, name: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
          title: str, logx: bool = True, logy: bool = True) -> list[Path]:
    series = {k: sorted(v) for k, v in series.items() if len(v) >= 2}
    if not series:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(series.items()):
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xscale="log" if logx else "linear", yscale="log" if logy else "linear", xlabel=xlabel, ylabel=ylabel,
           title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_resolution_scaling(rows: list[dict], out_dir: Path) -> list[Path]:
    series = defaultdict(list)
    for r in rows:
        if "system" in r and r.get("prompt") == "cold" and r["batch"] == 1:
            series[f"{r['gpu']} {r['arch']} {r['system']}"].append((r["size"], r["total_ms"]))
    series = {k: v for k, v in series.items() if len({x for x, _ in v}) >= 3}
    return _plot(out_dir, "resolution_scaling", series, "image side (px)", "ms per image, batch 1 (end to end)",
                 "latency against resolution")


def plot_concurrency(reps: list[dict], out_dir: Path) -> list[Path]:
    series = defaultdict(list)
    for r in reps:
        c = r["config"]
        if c.get("mode") == "closed" and r["completed"]:
            # one curve per run (commit): two runs of one server must not zig-zag into a single line
            run = (r.get("git_commit") or "?")[:7]
            series[f"{r['_gpu']} {served_model(r)} {c['output_format']} @ {run}"].append(
                (c["concurrency"], r["image_throughput"]))
    return _plot(out_dir, "throughput_vs_concurrency", series, "concurrent requests", "images/s (HTTP)",
                 "throughput against concurrency", logy=False)


def plot_stream_length(reps: list[dict], out_dir: Path) -> list[Path]:
    series = {}
    for r in reps:
        pts = [(int(n), ms) for n, ms in (r.get("frame_ms_by_length") or {}).items()]
        if len(pts) >= 3:  # a curve needs a long stream: 300-frame runs give two points and are in the table
            series[f"{r['_gpu']} {served_model(r)}, {r['config']['sessions']} session(s) x "
                   f"{r['config']['frames']} frames"] = pts
    return _plot(out_dir, "stream_frame_cost_vs_length", series, "frames streamed", "ms per frame (last 100)",
                 "per-frame cost against stream length", logy=False)


def render(rows: list[dict], plots: list[Path], http: list[dict] = (), streams: list[dict] = ()) -> str:
    body = ("### Against the anchors\n\nPublished figures come from other GPUs and other conventions (see the "
            "how column); a ratio is only claimed between rows of one run.\n\n" + anchor_table(latest(rows)) +
            "\n### In-process pipeline latency (medians)\n\n" + pipeline_table(rows))
    if http:
        body += "\n### Through HTTP (`fewstep bench images`)\n\n" + http_table(http)
    if streams:
        body += "\n### Streams (`fewstep bench stream`)\n\n" + stream_table(streams)
    enc = encode_table(rows)
    if enc:
        body += "\n### Image encoding\n\n" + enc
    kern = kernel_tables()
    if kern:
        body += "\n### Block-sparse attention kernel (`fewstep.kernels`)\n\n" + kern
    if plots:
        body += "\n" + "".join(f"![{p.stem}](plots/{p.name})\n" for p in plots)
    return body


def short_table(rows: list[dict], http: list[dict], streams: list[dict]) -> str:
    """The headline figures for the top-level README: SD-Turbo 512², 1 step, batch 1, cold prompt, each system from
    the newest run that timed all four in one process (a ratio is only read within one run), the newest
    channels-last row, then HTTP and stream figures where reports exist."""
    out = ["| measurement | GPU | result | stages | measured |", "|---|---|---|---|---|"]
    base = ("diffusers-eager", "diffusers-compile", "fewstep-eager", "fewstep-compiled")
    label = {"diffusers-eager": "diffusers, eager (to PIL images)",
             "diffusers-compile": "diffusers, torch.compile (to PIL images)",
             "fewstep-eager": "fewstep `--engine eager`", "fewstep-compiled": "fewstep `--engine compiled`, NCHW",
             "fewstep-compiled+cl": "fewstep `--engine compiled` (channels-last, the default)"}
    pick = [r for r in rows if r.get("arch") == "sd-turbo" and r.get("size") == 512 and r.get("steps") == 1
            and r.get("batch") == 1 and r.get("prompt") == "cold" and r.get("dtype") in (None, "float16")]
    runs = defaultdict(dict)
    for r in pick:
        runs[(r["gpu"], r.get("commit"))][r["system"]] = r
    full = [v for v in runs.values() if all(s in v for s in base)]

    def row(r: dict, what: str) -> str:
        stages = (f"text {_fmt(r.get('encode_prompt_ms'))}, UNet {_fmt(r.get('denoise_ms'))}, "
                  f"decode {_fmt(r.get('decode_ms'))}" if r.get("decode_ms") is not None else "–")
        return (f"| {what} | {r['gpu']} | **{r['total_ms']:.1f} ms** | {stages} | {r['date'][:10]}, "
                f"{r.get('commit') or '–'} |")

    if full:
        run = max(full, key=lambda v: max(r["date"] for r in v.values()))
        out += [row(run[s], f"SD-Turbo arch. 512², 1 step, batch 1: {label[s]}") for s in base]
    cl = [r for r in pick if r["system"] == "fewstep-compiled+cl"]
    if cl:
        out.append(row(max(cl, key=lambda r: r["date"]), f"SD-Turbo arch. 512², 1 step, batch 1: {label['fewstep-compiled+cl']}"))
    jpeg = [r for r in http if r["config"].get("output_format") == "jpeg" and r.get("completed")]
    if jpeg:
        newest = max(r["date_utc"] for r in jpeg)[:10]
        commit = max(jpeg, key=lambda r: r["date_utc"]).get("git_commit")
        run = [r for r in jpeg if r.get("git_commit") == commit] or jpeg
        c1 = [r for r in run if r["config"].get("concurrency") == 1]
        top = max(run, key=lambda r: r["image_throughput"] or 0)
        when = f"{newest}, {(commit or '–')[:7]}"
        if c1:
            r = c1[0]
            out.append(f"| HTTP (`fewstep bench images`), SD-Turbo 512², concurrency 1 | {r['_gpu'].replace('_', ' ')} | "
                       f"**{_fmt((r['latency_ms'] or {}).get('p50'))} ms** p50 | engine "
                       f"{_fmt(((r.get('server_timings') or {}).get('total_ms') or {}).get('p50'))} ms, HTTP, JSON and base64 "
                       f"{_fmt((r.get('serving_overhead_ms') or {}).get('p50'))} ms | {when} |")
        out.append(f"| HTTP, SD-Turbo 512², concurrency {top['config']['concurrency']} | {top['_gpu'].replace('_', ' ')} | "
                   f"**{_fmt(top['image_throughput'])} images/s** | p50 {_fmt((top['latency_ms'] or {}).get('p50'))} "
                   f"ms | {when} |")
    for name, what in (("default-video", "stream, embedded video model (32×32), 1 session"),
                       ("wan", "stream, Wan2.1-1.3B arch. 832×480, 1 session")):
        one = [r for r in streams if name in served_model(r) and r["config"]["sessions"] == 1]
        if one:
            # the newest run: the embedded video model changed (StreamDiT until 2026-11-30, StreamUNet since), and
            # an older, faster row would describe a model that no longer ships
            r = max(one, key=lambda r: (r["date_utc"], -r["config"]["frames"]))
            out.append(f"| {what} (`fewstep bench stream`) | {r['_gpu'].replace('_', ' ')} | **{r['aggregate_fps']:.1f} frames/s** | "
                       f"first frame {_fmt((r['ttff_ms'] or {}).get('p50'))} ms | {r['date_utc'][:10]}, "
                       f"{(r.get('git_commit') or '–')[:7]} |")
    return "\n".join(out) + "\n"


def _replace_block(path: Path, start: str, end: str, body: str) -> bool:
    text = path.read_text()
    if start not in text or end not in text:
        return False
    pre, rest = text.split(start, 1)
    _, post = rest.split(end, 1)
    path.write_text(pre + start + "\n" + body + end + post)
    return True


def build_parser():
    """The command line of `fewstep bench report`, built without side effects."""
    import argparse

    ap = argparse.ArgumentParser(prog="fewstep bench report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", metavar="DIR", help="the fewstep checkout to report on (default: the current "
                    "directory if it has benchmarks/results, else the checkout holding this module)")
    return ap


def main(argv: list[str] | None = None) -> None:
    global BENCH
    args = build_parser().parse_args(argv)
    repo = find_repo(args.repo)
    BENCH = repo / "benchmarks"
    rows = load_rows()
    plots_dir = BENCH / "plots"
    plots_dir.mkdir(exist_ok=True)
    http, streams = load_reports("http"), load_reports("stream")
    plots = (plot_batch_scaling(latest(rows), plots_dir) + plot_resolution_scaling(latest(rows), plots_dir) +
             plot_concurrency(http, plots_dir) + plot_stream_length(streams, plots_dir))
    plot_bsa_speedup(plots_dir)  # linked from the kernel section
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # nothing was drawn: link the committed plots as they are
        plots = [p for pat in PLOT_NAMES for p in sorted(plots_dir.glob(pat))]
        print("matplotlib is not installed: plots not redrawn, the committed ones are linked")
    readme = BENCH / "README.md"
    _replace_block(readme, START, END, render(rows, plots, http, streams))
    top = repo / "README.md"
    short = _replace_block(top, SHORT_START, SHORT_END, short_table(rows, http, streams))
    print(f"{len(rows)} rows, {len(plots)} plots -> {readme}" +
          (f"; short table -> {top}" if short else f"; no {SHORT_START} block in {top}"))


if __name__ == "__main__":
    main()
