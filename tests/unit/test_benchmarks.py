"""Benchmark tooling: configs are the published architectures, pipeline_bench writes complete rows, the report
renders them. No speed is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from tests.conftest import FEWSTEP

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "benchmarks" / "configs"

# Published parameter counts (millions) of each full-size component.
EXPECTED_M = {
    ("sd-turbo", "unet"): 865.9, ("sd-turbo", "text_encoder"): 340.4, ("sd-turbo", "vae"): 83.7,
    ("sdxl-turbo", "unet"): 2567.5, ("sdxl-turbo", "text_encoder"): 123.1,
    ("sdxl-turbo", "text_encoder_2"): 694.7, ("pixart-lcm-512", "transformer"): 610.9,
    ("pixart-lcm-512", "text_encoder"): 4762.3, ("wan2.1-t2v-1.3b", "transformer"): 1419.0,
    ("wan2.1-t2v-1.3b", "vae"): 126.9,
    # the stream variant: the same transformer and VAE; UMT5-XXL's width and vocabulary with 2 of its 24 layers
    ("wan2.1-t2v-1.3b-stream", "transformer"): 1419.0, ("wan2.1-t2v-1.3b-stream", "vae"): 126.9,
    ("wan2.1-t2v-1.3b-stream", "text_encoder"): 1436.0,
}


@pytest.mark.parametrize("arch,comp", sorted(EXPECTED_M))
def test_configs_are_the_published_architectures(arch, comp):
    import diffusers
    import transformers

    folder = CONFIGS / arch / comp
    cfg = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        if "_class_name" in cfg:
            cls = getattr(diffusers, cfg["_class_name"])
            model = cls.from_config(cls.load_config(folder))
        else:
            c = transformers.AutoConfig.from_pretrained(folder)
            model = getattr(transformers, c.architectures[0])(c)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(EXPECTED_M[(arch, comp)], abs=0.1)


def test_pipeline_bench_rows_and_report(tiny_dir, tmp_path):
    out = tmp_path / "rows.jsonl"
    p = subprocess.run([*FEWSTEP, "bench", "pipeline", "--model", str(tiny_dir / "sd_turbo"),
                        "--size", "64", "32", "--batch", "1", "2", "--iters", "2", "--warmup", "1",
                        "--baseline", "diffusers-eager", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    systems = {(r["system"], r["batch"], r["prompt"]) for r in rows}
    assert ("fewstep-eager", 2, "cold") in systems and ("diffusers-eager", 1, "cold") in systems
    assert {r["size"] for r in rows} == {64, 32}
    for r in rows:
        assert {"gpu", "date", "commit", "command", "arch", "total_ms"} <= set(r)
        if r["system"].startswith("fewstep"):
            stages = r["encode_prompt_ms"] + r["denoise_ms"] + r["decode_ms"] + r["encode_image_ms"]
            assert 0 < stages <= r["total_ms"] * 1.01
        else:  # diffusers rows carry per-stage times from separate, synchronised runs
            assert min(r["encode_prompt_ms"], r["denoise_ms"], r["decode_ms"]) > 0
    cached = next(r for r in rows if r["system"] == "fewstep-eager" and r["prompt"] == "cached")
    cold = next(r for r in rows if r["system"] == "fewstep-eager" and r["prompt"] == "cold" and r["batch"] == 1)
    assert cached["encode_prompt_ms"] < cold["encode_prompt_ms"]  # the prompt cache skipped the text encoder

    from fewstep.benchmarks.report import pipeline_table

    table = pipeline_table(rows)
    assert table.count("\n| ") >= len(rows) - 1 and "fewstep-eager" in table and "fewstep bench pipeline" in table


def test_pipeline_bench_refuses_a_checkpoint_as_config(tiny_dir):
    """--config builds random weights from a config-only directory; a checkpoint gets a usage error naming --model."""
    p = subprocess.run([*FEWSTEP, "bench", "pipeline", "--config", str(tiny_dir / "sd_turbo")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pass it as --model" in p.stderr, p.stderr[-2000:]


def test_kernel_tables_render_the_committed_device_rows():
    from fewstep.benchmarks.report import kernel_tables

    text = kernel_tables()
    assert "cases pass" in text and "| Wan2.1-T2V-1.3B forward" in text
    assert "block sparsity" in text and "ideal 1/(1−s)" in text
