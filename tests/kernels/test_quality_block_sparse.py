"""The block-sparse processor's fp32 reference backend (CPU quality studies) and the quality study script.

Everything here runs on the CPU without triton: ``backend="reference"`` builds the same adaptive block
mask as the kernel path and computes attention with ``kernels/reference.py``. The script smoke tests use
the tiny checkpoints of ``tests/tiny_models.py`` (not out/r4) and check that the dense rows reproduce the
training evaluations they reuse.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # nothing here runs triton, but diffusers imports it: import it in the interpreter mode that
    # test_block_sparse_attention.py needs, whichever of the two modules pytest imports first
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewstep.kernels import attention_processor as ap  # noqa: E402
from fewstep.kernels.block_sparse_mask import build_block_mask  # noqa: E402
from fewstep.kernels.reference import expand_block_mask  # noqa: E402

diffusers = pytest.importorskip("diffusers")


# -- tiny denoisers -----------------------------------------------------------------------------------


def _tiny_pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, cross_attention_dim=64, caption_channels=24, norm_num_groups=1,
    ).eval()


def _pixart_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g),  # 8x8 = 64 tokens
                encoder_hidden_states=torch.randn(2, 7, 24, generator=g), timestep=torch.tensor([10, 500]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _tiny_wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()


def _wan_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 3, 10, 12, generator=g),  # 3x5x6 = 90 tokens (ragged blocks)
                timestep=torch.tensor([300]), encoder_hidden_states=torch.randn(1, 5, 16, generator=g))


def _tiny_stream_dit():
    from fewstep.engines.models import StreamDiTModel

    torch.manual_seed(0)
    model = StreamDiTModel(sample_size=32, patch_size=4, in_channels=3, num_layers=2, num_attention_heads=2,
                           attention_head_dim=16, caption_channels=32, max_frames=12)
    with torch.no_grad():  # DiT init zeroes modulation and output (as tests/tiny_models.py does)
        for p in (model.time_mod[1].weight, model.proj_out.weight):
            p.normal_(0.0, 0.05)
    return model.eval()


def _stream_dit_inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(1, 5)
    mask[:, 3:] = 0  # padded caption: cross-attention gets an attention mask
    return dict(hidden_states=torch.randn(1, 3, 6, 32, 32, generator=g),  # 6 frames x 8x8 = 384 tokens
                timestep=torch.tensor([[1000.0, 1000.0, 600.0, 600.0, 200.0, 200.0]]),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g), encoder_attention_mask=mask)


FAMILIES = {"pixart": (_tiny_pixart, _pixart_inputs), "wan": (_tiny_wan, _wan_inputs),
            "stream_dit": (_tiny_stream_dit, _stream_dit_inputs)}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _processors(model) -> dict:
    # StreamDiTModel is not a diffusers AttentionMixin (no attn_processors / set_attn_processor): walk modules,
    # as enable_block_sparse_attention does
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


def _sparsities(model):
    return [None if p.last_sparsity is None else float(p.last_sparsity) for p in ap.block_sparse_processors(model)]


# -- reference backend ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("spec", ["block_sparse(threshold=1.0,block=16)",  # config.full shortcut
                                  "block_sparse(threshold=none,topk=64,block=16)"])  # mask path, every block
def test_reference_full_mask_matches_dense(family, spec):
    build, inputs = FAMILIES[family]
    model, x = build(), inputs()
    dense = _run(model, x)
    n = ap.enable_block_sparse_attention(model, spec, backend="reference")
    assert n == 2  # the self-attention of each of the 2 blocks
    out = _run(model, x)
    assert _sparsities(model) == [0.0, 0.0]  # ran the sparse path (not the dense fallback), nothing skipped
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_sparse_mask_differs(family):
    build, inputs = FAMILIES[family]
    model, x = build(), inputs()
    dense = _run(model, x)
    ap.enable_block_sparse_attention(model, "block_sparse(threshold=0.3,block=16,local=0)", backend="reference")
    out = _run(model, x)
    sp = _sparsities(model)
    assert all(s is not None and s > 0.2 for s in sp), sp
    assert torch.isfinite(out).all()
    assert (out - dense).abs().max() > 1e-3 * dense.abs().max()
    # and dense again once disabled
    ap.disable_block_sparse_attention(model)
    assert torch.equal(_run(model, x), dense)


def test_reference_attention_matches_masked_sdpa():
    # one Attention module: the processor equals an independent computation (torch SDPA with the expanded
    # block mask of build_block_mask on the same q/k) and really skips blocks
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=32, bias=True).eval()
    x = torch.randn(2, 100, 64) * 2  # 100 tokens: 7 blocks of 16, ragged tail
    proc = ap.BlockSparseAttnProcessor(threshold=0.6, block=16, local=0, sinks=1, backend="reference")
    with torch.no_grad():
        out = proc(attn, x)
        q, k, v = (f(x).view(2, 100, 2, 32).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        res = build_block_mask(q, k, block_m=16, block_n=16, threshold=0.6, local=0, sinks=1)
        token_mask = expand_block_mask(res.mask, 100, 100, 16, 16)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
        expect = attn.to_out[0](o.transpose(1, 2).reshape(2, 100, 64))
        dense = AttnProcessor2_0()(attn, x)
    assert 0.1 < float(proc.last_sparsity) == pytest.approx(float(res.sparsity))
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, dense, atol=1e-3)


def test_reference_backend_keeps_dtype_and_chunks(monkeypatch):
    # bf16 on CPU (the triton backend would fall back here); tiny chunk limit: one batch element per chunk
    monkeypatch.setattr(ap, "_REFERENCE_CHUNK_ELEMS", 1)
    proc = ap.BlockSparseAttnProcessor(threshold=0.5, block=16, backend="reference")
    q, k, v = (torch.randn(3, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    out = proc._attend(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    from fewstep.kernels.reference import block_sparse_attention_ref

    mask = build_block_mask(q, k, block_m=16, block_n=16, threshold=0.5, local=1).mask
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, mask, 16, 16).to(torch.bfloat16))


def test_stream_dit_coverage_and_tile_3d():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, x = _tiny_stream_dit(), _stream_dit_inputs()
    dense = _run(model, x)
    # enable on the denoiser: its attn1 (self) modules are replaced, attn2 (cross, masked) keeps the stock one
    assert ap.enable_block_sparse_attention(model, "block_sparse(threshold=1.0,block=16,tile_3d=2x2x4)",
                                            backend="reference") == 2
    procs = _processors(model)
    assert sorted(procs) == [f"transformer_blocks.{i}.{a}" for i in range(2) for a in ("attn1", "attn2")]
    assert all(isinstance(p, ap.BlockSparseAttnProcessor) for k, p in procs.items() if k.endswith("attn1"))
    assert all(type(p) is AttnProcessor2_0 for k, p in procs.items() if k.endswith("attn2"))
    full_tiled = _run(model, x)
    state = ap.block_sparse_processors(model)[0].state
    # StreamDiT flattens tokens (t, row, col) after a patch_size conv: [1, 3, 6, 32, 32] -> 6 x 8 x 8
    assert state.grid == (6, 8, 8)
    assert ((6, 8, 8), (2, 2, 4), "cpu") in state.perm_cache  # the permutation was used
    torch.testing.assert_close(full_tiled, dense, atol=2e-5, rtol=1e-4)  # permute + inverse is exact
    # sparse: tiling changes which tokens share a block, hence the mask and the output
    ap.enable_block_sparse_attention(model, "block_sparse(threshold=0.5,block=16)", backend="reference")
    plain = _run(model, x)
    ap.enable_block_sparse_attention(model, "block_sparse(threshold=0.5,block=16,tile_3d=2x2x4)", backend="reference")
    tiled = _run(model, x)
    assert not torch.allclose(plain, tiled, atol=1e-4)
    assert (tiled - dense).abs().max() > 1e-4


def test_reference_backend_is_explicit_and_logged(caplog):
    model, x = _tiny_pixart(), _pixart_inputs()
    dense = _run(model, x)
    # the default (triton) backend on CPU still falls back to the stock processor: bit-identical dense
    ap.enable_block_sparse_attention(model, "block_sparse(threshold=0.3,block=16)")
    assert torch.equal(_run(model, x), dense)
    assert _sparsities(model) == [None, None]
    # the reference backend is opt-in, warns once, and is not reachable from the engine's option string
    ap._logged_reasons.discard("reference backend on cpu")
    with caplog.at_level(logging.INFO, logger="fewstep.kernels"):
        ap.enable_block_sparse_attention(model, "block_sparse(threshold=0.3,block=16)", backend="reference")
        _run(model, x)
        _run(model, x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "REFERENCE backend" in r.getMessage()]
    assert len(warnings) == 1
    assert any("reference backend" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    with pytest.raises(ValueError):
        ap.BlockSparseConfig.parse("block_sparse(threshold=0.9,backend=reference)")
    with pytest.raises(ValueError):
        ap.enable_block_sparse_attention(model, "block_sparse", backend="flash")
    with pytest.raises(ValueError):
        ap.BlockSparseAttnProcessor(backend="cpu")


def test_reference_backend_model_wide_processor_keeps_cross_attention_dense():
    # one processor installed everywhere (cross-attention with a caption mask included): self-attention
    # runs the reference path, cross-attention the stock processor
    model, x = _tiny_stream_dit(), _stream_dit_inputs()
    dense = _run(model, x)
    proc = ap.BlockSparseAttnProcessor(threshold=1.0, block=16, backend="reference")
    for m in model.modules():
        if hasattr(m, "set_processor"):
            m.set_processor(proc)
    torch.testing.assert_close(_run(model, x), dense, atol=2e-5, rtol=1e-4)
    assert proc.last_sparsity is None  # the last call of each block is its (masked) cross-attention


# -- the quality study script on tiny checkpoints ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory):
    """Just the two tiny checkpoints the study needs (the image protocol draws 64x64: 256 tokens at patch 4;
    the tiny StreamDiT buffer is 6 frames x 8 x 8 = 384 tokens)."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("tiny_quality")
    tiny_models.pixel_dit(root / "pixel_dit")
    tiny_models.stream_dit(root / "stream_dit")
    return root


@pytest.fixture(scope="module")
def qbs():
    return importlib.import_module("fewstep.benchmarks.kernels.quality_block_sparse")


def test_image_study_smoke_matches_training_eval(qbs, tiny_models_dir, tmp_path):
    from fewstep.training.evaluate import EvalArgs, evaluate

    model = str(tiny_models_dir / "pixel_dit")
    out = tmp_path / "q.json"
    assert qbs.main(["--only", "image", "--image-model", model, "--n", "8", "--batch", "8", "--device", "cpu",
                     "--settings", "block_sparse(threshold=1.0,block=16)", "block_sparse(threshold=0.3,block=16)",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["backend"] == "reference" and res["meta"]["device_type"] == "cpu"
    assert {"commit", "date", "command", "env"} <= set(res["meta"])
    dense, full, sparse = res["image"]["rows"]
    assert dense["setting"] == "dense"  # run first, added when not listed
    assert dense["backend"] == "dense" and dense["mad_u8"] == 0 and dense["sparsity"] == 0.0
    assert full["backend"] == "reference" and full["sparsity"] == 0.0 and full["fallback_calls"] == 0
    assert full["mad_u8"] < 0.01
    assert sparse["sparsity"] > 0.2 and sparse["fallback_calls"] == 0 and sparse["mad_u8"] > 0
    assert len(sparse["sparsity_per_layer"]) == 2 and sparse["denoiser_calls"] == dense["steps"]
    assert res["image"]["tokens"] == 256
    md = out.with_suffix(".md").read_text()
    assert "| `block_sparse(threshold=0.3,block=16)` |" in md and "reference" in md
    # the dense row is the training eval's own result (same prompts, noise, sampler, scorer)
    ev = evaluate(EvalArgs(model=model, steps=[dense["steps"]], n=8, div_prompts=2, div_seeds=2, grid_prompts=4,
                           batch=8, tiny=True, device="cpu", out=str(tmp_path / "eval")))
    row = ev["rows"][0]
    assert row["accuracy"] == pytest.approx(dense["adherence"], abs=1e-4)
    for c, v in dense["checks"].items():
        assert row["checks"][c] == pytest.approx(v, abs=1e-4)


def test_video_study_smoke_matches_video_eval(qbs, tiny_models_dir, tmp_path):
    from fewstep.training.video import VideoEvalArgs, video_evaluate

    model = str(tiny_models_dir / "stream_dit")
    res = qbs.video_study(model, ["dense", "block_sparse(threshold=0.3,block=16)",
                                  "block_sparse(threshold=0.3,block=16,tile_3d=1x4x4)"],
                          n=2, frames=12, device=torch.device("cpu"), backend="reference")
    dense, plain, tiled = res["rows"]
    assert res["token_grid"] == (6, 8, 8) and res["tokens"] == 384
    assert dense["mad_u8"] == 0 and dense["sparsity"] == 0.0
    for r in (plain, tiled):
        assert r["sparsity"] > 0.2 and r["fallback_calls"] == 0 and r["mad_u8"] > 0
        assert r["denoiser_calls"] == r["buffer_steps"] and len(r["sparsity_per_layer"]) == 2
    assert plain["mad_u8"] != tiled["mad_u8"]
    # tiny video_evaluate draws 2 streams x 12 frames with the same seeds: identical metrics
    ev = video_evaluate(VideoEvalArgs(model=model, tiny=True, device="cpu", out=str(tmp_path)))["rows"][0]
    for k in qbs.VIDEO_KEYS:
        assert ev[k] == dense[k], k
    md = qbs.markdown({"meta": {"device_type": "cpu", "backend": "reference", "env": {"device": "cpu"},
                                "commit": None, "date": "", "wall_seconds": 0.0, "command": "x"}, "video": res})
    assert "identity_consistency" in md and "384 tokens" in md and np.isfinite(tiled["mad_u8"])
