"""Regenerate the results tables in benchmarks/README.md (and plots) from benchmarks/results/*.jsonl.

    python -m benchmarks.report            # rewrites the block between the markers in benchmarks/README.md

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


def load_rows(results: Path = HERE / "results") -> list[dict]:
    rows = []
    for f in sorted(results.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line) | {"_file": f.name})
    return rows


def _fmt(v, digits=1):
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def pipeline_table(rows: list[dict]) -> str:
    rows = [r for r in rows if "system" in r and "batch" in r]
    if not rows:
        return "_no pipeline rows yet_\n"
    head = ("| GPU | arch | size | steps | system | batch | prompt | encode_prompt | denoise | decode | encode_image "
            "| total ms | ms/image | MFU | date | commit |\n|" + "---|" * 16 + "\n")
    out = []
    for r in sorted(rows, key=lambda r: (r["gpu"], r["arch"], r["size"], r["steps"], r["system"], r["batch"],
                                         r.get("prompt", ""))):
        mfu = r.get("mfu")
        out.append(f"| {r['gpu']} | {r['arch']} | {r['size']} | {r['steps']} | {r['system']} | {r['batch']} | "
                   f"{r.get('prompt', '')} | {_fmt(r.get('encode_prompt_ms'))} | {_fmt(r.get('denoise_ms'))} | "
                   f"{_fmt(r.get('decode_ms'))} | {_fmt(r.get('encode_image_ms'))} | {_fmt(r.get('total_ms'))} | "
                   f"{_fmt(r['total_ms'] / r['batch'])} | {'–' if mfu is None else f'{100 * mfu:.0f}%'} | "
                   f"{r['date'][:10]} | {r.get('commit') or '–'} |")
    cmds = sorted({r["command"] for r in rows})
    return head + "\n".join(out) + "\n\nCommands:\n" + "".join(f"- `{c}`\n" for c in cmds)


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


def render(rows: list[dict], plots: list[Path]) -> str:
    body = "### In-process pipeline latency (medians)\n\n" + pipeline_table(rows)
    if plots:
        body += "\n" + "".join(f"![{p.stem}](plots/{p.name})\n" for p in plots)
    return body


def main() -> None:
    rows = load_rows()
    plots_dir = HERE / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = plot_batch_scaling(rows, plots_dir)
    readme = HERE / "README.md"
    text = readme.read_text()
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    readme.write_text(pre + START + "\n" + render(rows, plots) + END + post)
    print(f"{len(rows)} rows, {len(plots)} plots -> {readme}")


if __name__ == "__main__":
    main()
