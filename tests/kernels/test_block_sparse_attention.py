"""Block-sparse attention: Triton kernel vs fp32 reference, mask builder, diffusers processor.

On a machine without CUDA the kernel runs under the Triton interpreter (see tests/kernels/conftest.py).
Inputs are fresh random each run; failures print the seed.
"""

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fewstep.kernels import attention_processor as ap
from fewstep.kernels.block_sparse_mask import (
    block_mean_pool,
    build_block_mask,
    forced_block_mask,
    tile_3d_permutation,
)
from fewstep.kernels.reference import (
    attention_ref,
    block_sparse_attention_ref,
    expand_block_mask,
)
from tests.kernels.conftest import DEVICE, cuda_only, kernel_module

triton = pytest.importorskip("triton")
bsa = kernel_module("block_sparse_attention", "_block_sparse_attention_kernel")


def _interpreter_problem() -> str | None:
    """Older triton interpreters (e.g. 3.6 with numpy >= 2) cannot loop over a loaded bound."""
    if type(bsa._block_sparse_attention_kernel).__name__ != "InterpretedFunction":
        return None
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr):
        n = tl.load(x_ptr)
        for i in range(0, n):
            tl.store(x_ptr + 1 + i, i)

    try:
        _probe[(1,)](torch.tensor([2, 0, 0], dtype=torch.int32))
    except Exception as e:  # noqa: BLE001
        return f"triton {triton.__version__} interpreter cannot run this kernel ({type(e).__name__}); use triton>=3.9"
    return None


_PROBLEM = _interpreter_problem()
needs_kernel = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


def _rand_qkv(B, H, n_q, n_k, D, dtype, device=DEVICE):
    q = torch.randn(B, H, n_q, D, device=device, dtype=dtype)
    k = torch.randn(B, H, n_k, D, device=device, dtype=dtype)
    v = torch.randn(B, H, n_k, D, device=device, dtype=dtype)
    return q, k, v


def _torch_lowp(q, k, v, token_mask):
    """Torch SDPA in the inputs' precision; rows with no key -> zeros (like the kernel)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    if token_mask is not None:
        out = torch.where(token_mask.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.float()


def _assert_close_by_rule(out, ref, lowp, seed, what=""):
    """err(out) <= 2 * err(torch low precision) + atol, errors max-abs against the fp32 ref."""
    assert torch.isfinite(out).all(), f"non-finite output (seed {seed}) {what}"
    err = (out.float() - ref).abs().max().item()
    err_torch = (lowp.float() - ref).abs().max().item()
    # one unit in the last place at the output's scale
    atol = torch.finfo(out.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_torch + atol, f"err {err:.3e} > 2*{err_torch:.3e} + {atol:.1e} (seed {seed}) {what}"


def _make_mask(kind, B, H, n_qb, n_kb, device=DEVICE):
    if kind == "full":
        return torch.ones(B, H, n_qb, n_kb, dtype=torch.bool, device=device)
    if kind == "random":
        mask = torch.rand(B, H, n_qb, n_kb, device=device) < 0.5
        mask[..., 0, :] = False  # at least one row with no key block -> zeros
        return mask
    if kind == "one_per_row":
        mask = torch.zeros(B, H, n_qb, n_kb, dtype=torch.bool, device=device)
        mask.scatter_(-1, torch.randint(0, n_kb, (B, H, n_qb, 1), device=device), True)
        return mask
    if kind == "last_only":  # only the ragged tail block
        mask = torch.zeros(B, H, n_qb, n_kb, dtype=torch.bool, device=device)
        mask[..., -1] = True
        return mask
    raise ValueError(kind)


# (B, H, Nq, Nk, D, block_m, block_n, dtype, mask kind)
KERNEL_CASES = [
    (1, 1, 37, 37, 64, 16, 16, torch.float16, "random"),
    (2, 3, 96, 96, 128, 32, 32, torch.bfloat16, "random"),
    (1, 2, 130, 130, 64, 32, 32, torch.bfloat16, "full"),
    (2, 1, 130, 130, 128, 32, 16, torch.float16, "one_per_row"),
    (1, 2, 37, 130, 64, 16, 32, torch.float16, "random"),
    (1, 2, 130, 96, 128, 32, 32, torch.bfloat16, "one_per_row"),
    (1, 1, 130, 37, 32, 16, 16, torch.bfloat16, "random"),
    (1, 2, 96, 130, 72, 32, 32, torch.float16, "random"),
    (1, 1, 130, 130, 64, 32, 32, torch.float16, "last_only"),
    # production block size with the default tiles: 2 sub-tiles per key block, tail of 44 tokens
    (1, 1, 300, 300, 64, 128, 128, torch.bfloat16, "random"),
]


@needs_kernel
@pytest.mark.parametrize("B,H,n_q,n_k,D,bm,bn,dtype,kind", KERNEL_CASES)
def test_kernel_matches_reference(seed, B, H, n_q, n_k, D, bm, bn, dtype, kind):
    q, k, v = _rand_qkv(B, H, n_q, n_k, D, dtype)
    mask = _make_mask(kind, B, H, math.ceil(n_q / bm), math.ceil(n_k / bn))
    out = bsa.block_sparse_attention(q, k, v, mask, block_m=bm, block_n=bn)
    assert out.shape == q.shape and out.dtype == dtype
    ref = block_sparse_attention_ref(q, k, v, mask, bm, bn)
    lowp = _torch_lowp(q, k, v, expand_block_mask(mask, n_q, n_k, bm, bn))
    _assert_close_by_rule(out, ref, lowp, seed, kind)
    # rows whose query block selects nothing are exactly zero
    empty = ~expand_block_mask(mask, n_q, n_k, bm, bn).any(dim=-1)
    assert (out[empty] == 0).all()


@needs_kernel
@pytest.mark.parametrize("full_rows_contiguous,prefetch_index", [(True, False), (False, False), (False, True),
                                                                 (True, True)])
def test_index_path_variants_match_reference(seed, monkeypatch, full_rows_contiguous, prefetch_index):
    """Every compile-time variant of the index path, on one mask with full, partial and empty rows, a ragged
    tail and two sub-tiles per key block."""
    monkeypatch.setitem(bsa.INDEX_PATH, "full_rows_contiguous", full_rows_contiguous)
    monkeypatch.setitem(bsa.INDEX_PATH, "prefetch_index", prefetch_index)
    B, H, n, D, blk = 1, 2, 150, 64, 32
    q, k, v = _rand_qkv(B, H, n, n, D, torch.float16)
    nb = math.ceil(n / blk)
    mask = torch.rand(B, H, nb, nb) < 0.5
    mask[:, :, 0] = True  # full rows (incl. the ragged last block)
    mask[:, 0, 1] = False  # an empty row
    mask[:, 1, 2] = False
    mask[:, 1, 2, -1] = True  # only the ragged tail
    out = bsa.block_sparse_attention(q, k, v, mask, block_m=blk, block_n=blk, config=bsa.TileConfig(16, 16, 4, 1))
    ref = block_sparse_attention_ref(q, k, v, mask, blk, blk)
    lowp = _torch_lowp(q, k, v, expand_block_mask(mask, n, n, blk, blk))
    _assert_close_by_rule(out, ref, lowp, seed, f"variant {full_rows_contiguous}/{prefetch_index}")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out[:, 0, blk:2 * blk] == 0).all()  # the empty row outputs zeros
    assert out[:, 0, :blk].abs().amax() > 0  # the full row does not


@needs_kernel
@pytest.mark.parametrize("n,D,dtype", [(96, 64, torch.float16), (130, 128, torch.bfloat16)])
def test_dense_mode(seed, n, D, dtype):
    q, k, v = _rand_qkv(1, 2, n, n, D, dtype)
    out = bsa.block_sparse_attention(q, k, v, block_m=32, block_n=32)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    _assert_close_by_rule(out, attention_ref(q, k, v), _torch_lowp(q, k, v, None), seed)


@needs_kernel
def test_sub_tiles_and_custom_scale(seed):
    # kernel tile smaller than the mask block on both axes: 2x2 sub-tiles per mask block
    q, k, v = _rand_qkv(1, 2, 130, 130, 64, torch.float16)
    mask = _make_mask("random", 1, 2, 3, 3)
    cfg = bsa.TileConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    out = bsa.block_sparse_attention(q, k, v, mask, block_m=64, block_n=64, scale=0.05, config=cfg)
    assert out.shape == q.shape and torch.isfinite(out).all()
    token_mask = expand_block_mask(mask, 130, 130, 64, 64)
    ref = block_sparse_attention_ref(q, k, v, mask, 64, 64, scale=0.05)
    lowp = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask, scale=0.05)
    lowp = torch.where(token_mask.any(-1, keepdim=True), lowp, torch.zeros((), dtype=lowp.dtype)).float()
    _assert_close_by_rule(out, ref, lowp, seed)


@needs_kernel
def test_index_api_broadcast_and_strided_layout(seed):
    # [B, N, H, D] buffers passed as [B, H, N, D] views; metadata shared over B and H
    B, H, n, D = 2, 2, 96, 64
    qb, kb, vb = (torch.randn(B, n, H, D, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    mask = _make_mask("random", 1, 1, 3, 3)
    counts, indices = bsa.mask_to_indices(mask)
    out = bsa.block_sparse_attention(q, k, v, kv_indices=indices, kv_counts=counts, block_m=32, block_n=32)
    assert out.transpose(1, 2).is_contiguous()  # output keeps q's [B, N, H, D] memory layout
    full_mask = mask.expand(B, H, -1, -1)
    ref = block_sparse_attention_ref(q, k, v, full_mask, 32, 32)
    lowp = _torch_lowp(q, k, v, expand_block_mask(full_mask, n, n, 32, 32))
    _assert_close_by_rule(out, ref, lowp, seed)


def test_mask_to_indices():
    mask = torch.rand(2, 3, 5, 7) < 0.4
    counts, indices = bsa.mask_to_indices(mask)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts, mask.sum(-1).int())
    for b, h, r in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        c = int(counts[b, h, r])
        expect = torch.nonzero(mask[b, h, r]).flatten().int()
        assert torch.equal(indices[b, h, r, :c], expect)
    assert int(indices.min()) >= 0 and int(indices.max()) < 7


def test_input_validation():
    q, k, v = _rand_qkv(1, 1, 32, 32, 64, torch.float16)
    with pytest.raises(TypeError):
        bsa.block_sparse_attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError):
        bsa.block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_m=16, block_n=16)
    with pytest.raises(ValueError):
        bsa.block_sparse_attention(q, k, v, block_m=24)


# -- mask builder ------------------------------------------------------------------------------


def _pooled_probs(q, k, bm, bn):
    pq = torch.stack([c.float().mean(2) for c in q.split(bm, dim=2)], dim=2)
    pk = torch.stack([c.float().mean(2) for c in k.split(bn, dim=2)], dim=2)
    sizes = torch.tensor([c for c in (min(bn, k.shape[2] - i) for i in range(0, k.shape[2], bn))], dtype=torch.float32)
    logits = pq @ pk.transpose(-1, -2) / math.sqrt(q.shape[-1]) + sizes.log()
    return logits.softmax(-1)


def test_block_mean_pool_ragged():
    x = torch.randn(1, 2, 70, 8, dtype=torch.bfloat16)
    pooled = block_mean_pool(x, 32)
    assert pooled.shape == (1, 2, 3, 8) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 64:].float().mean(2), atol=1e-6, rtol=1e-5)


def test_mask_diagonal_local_sinks_always_kept():
    q, k, _ = _rand_qkv(2, 2, 200, 200, 32, torch.float16, device="cpu")
    res = build_block_mask(q, k, block_m=16, block_n=16, threshold=0.05, local=1, sinks=2)
    n_b = res.mask.shape[-1]
    idx = torch.arange(n_b)
    band = (idx[:, None] - idx[None, :]).abs() <= 1
    assert res.mask[..., band].all()
    assert res.mask[..., :2].all()
    assert float(res.sparsity) == pytest.approx(1.0 - res.mask.float().mean().item())
    assert 0.0 < float(res.sparsity) < 1.0


def test_mask_threshold_one_keeps_everything():
    q, k, _ = _rand_qkv(1, 3, 130, 130, 64, torch.float16, device="cpu")
    res = build_block_mask(q, k, block_m=32, block_n=32, threshold=1.0)
    assert res.mask.shape == (1, 3, 5, 5) and res.mask.all()
    assert float(res.sparsity) == 0.0


def test_mask_threshold_is_minimal_cover():
    q, k, _ = _rand_qkv(1, 2, 160, 150, 32, torch.float32, device="cpu")
    q = q * 3  # peakier scores so the sets differ between rows
    thr = 0.7
    res = build_block_mask(q, k, block_m=16, block_n=16, threshold=thr, diagonal=False)
    probs = _pooled_probs(q, k, 16, 16)
    kept_mass = (probs * res.mask).sum(-1)
    assert (kept_mass >= thr - 1e-5).all()
    # dropping the weakest kept block would fall below the threshold
    weakest = torch.where(res.mask, probs, torch.full_like(probs, 2.0)).min(-1).values
    assert (kept_mass - weakest < thr + 1e-5).all()


def test_mask_topk_count():
    q, k, _ = _rand_qkv(2, 2, 160, 96, 32, torch.float16, device="cpu")
    res = build_block_mask(q, k, block_m=32, block_n=16, threshold=None, topk=3)  # Nq != Nk: no diagonal
    assert (res.mask.sum(-1) == 3).all()
    q2, k2, _ = _rand_qkv(1, 2, 128, 128, 32, torch.float16, device="cpu")
    res2 = build_block_mask(q2, k2, block_m=16, block_n=16, threshold=None, topk=3, local=0)
    counts = res2.mask.sum(-1)
    assert ((counts >= 3) & (counts <= 4)).all()  # top-3 plus the diagonal when not among them
    assert res2.mask[..., torch.eye(8, dtype=torch.bool)].all()


def test_forced_mask_rectangular_blocks():
    forced = forced_block_mask(128, 128, 32, 16, diagonal=True, local=0)
    # query block i covers tokens [32i, 32i+32) = key blocks 2i and 2i+1
    expect = torch.zeros(4, 8, dtype=torch.bool)
    for i in range(4):
        expect[i, 2 * i : 2 * i + 2] = True
    assert torch.equal(forced, expect)


@pytest.mark.parametrize("grid,tile", [((4, 6, 8), (2, 3, 4)), ((3, 5, 7), (2, 2, 4)), ((1, 8, 8), (1, 4, 4))])
def test_tile_3d_permutation_round_trip(grid, tile):
    T, H, W = grid
    perm, inv = tile_3d_permutation(T, H, W, tile)
    n = T * H * W
    assert sorted(perm.tolist()) == list(range(n))
    x = torch.randn(2, n, 3)
    assert torch.equal(x[:, perm][:, inv], x)
    assert torch.equal(perm[inv], torch.arange(n))
    # the first tile's tokens come first and form a cube
    tt, th, tw = (min(a, b) for a, b in zip(tile, grid))
    first = perm[: tt * th * tw]
    t, h, w = first // (H * W), (first // W) % H, first % W
    assert int(t.max()) < tt and int(h.max()) < th and int(w.max()) < tw


# -- diffusers processor -----------------------------------------------------------------------


def test_package_import_does_not_need_triton():
    import subprocess
    import sys

    code = (
        "import sys; import fewstep.kernels as K; "
        "from fewstep.kernels import BlockSparseConfig, enable_block_sparse_attention, build_block_mask; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_config_parse():
    assert ap.BlockSparseConfig.parse("dense") is None
    assert ap.BlockSparseConfig.parse("") is None
    assert ap.BlockSparseConfig.parse("block_sparse") == ap.BlockSparseConfig()
    cfg = ap.BlockSparseConfig.parse("block_sparse(threshold=0.8, topk=4, block=64, local=2, sinks=1, tile_3d=2x4x8)")
    assert cfg == ap.BlockSparseConfig(threshold=0.8, topk=4, block=64, local=2, sinks=1, tile_3d=(2, 4, 8))
    assert ap.BlockSparseConfig.parse(cfg.to_option()) == cfg
    assert ap.BlockSparseConfig.parse("block_sparse(threshold=none,topk=2)").threshold is None
    for bad in ("sparse", "block_sparse(foo=1)", "block_sparse(block=100)", "block_sparse(threshold=1.5)"):
        with pytest.raises(ValueError):
            ap.BlockSparseConfig.parse(bad)


def _tiny_pixart():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, cross_attention_dim=64, caption_channels=24, norm_num_groups=1,
    ).eval()


def _pixart_inputs(dtype, device):
    x = torch.randn(2, 4, 16, 16, device=device, dtype=dtype)
    ehs = torch.randn(2, 7, 24, device=device, dtype=dtype)
    t = torch.tensor([10, 500], device=device)
    return dict(hidden_states=x, encoder_hidden_states=ehs, timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _tiny_wan():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()


def _wan_inputs(dtype, device):
    return dict(hidden_states=torch.randn(1, 4, 3, 10, 12, device=device, dtype=dtype),
                timestep=torch.tensor([300], device=device),
                encoder_hidden_states=torch.randn(1, 5, 16, device=device, dtype=dtype))


def _cast_inputs(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.mark.parametrize("family", ["pixart", "wan"])
def test_processor_fallback_is_exact_on_cpu(family):
    model = _tiny_pixart() if family == "pixart" else _tiny_wan()
    inputs = (_pixart_inputs if family == "pixart" else _wan_inputs)(torch.float32, "cpu")
    stock = {name: type(p) for name, p in model.attn_processors.items()}
    with torch.no_grad():
        ref = model(**inputs).sample
        n = ap.enable_block_sparse_attention(model, "block_sparse(threshold=0.5,block=16,tile_3d=1x4x4)")
        out = model(**inputs).sample
    assert n == 2  # one self-attention per block; cross-attention untouched
    procs = model.attn_processors
    assert sum(isinstance(p, ap.BlockSparseAttnProcessor) for p in procs.values()) == 2
    for name, p in procs.items():
        if "attn2" in name:
            assert type(p) is stock[name]
    assert torch.equal(out, ref)
    assert ap.disable_block_sparse_attention(model) == 2
    assert {name: type(p) for name, p in model.attn_processors.items()} == stock


def test_processor_via_set_attn_processor(seed):
    # one instance model-wide (cross-attention included) still reproduces the dense model on CPU
    model = _tiny_wan()
    inputs = _wan_inputs(torch.float32, "cpu")
    with torch.no_grad():
        ref = model(**inputs).sample
        model.set_attn_processor(ap.BlockSparseAttnProcessor(threshold=0.8, block=16))
        out = model(**inputs).sample
    assert torch.equal(out, ref)


def test_processor_logs_fallback_reason_once(caplog):
    model = _tiny_pixart()
    ap._logged_reasons.discard("not on CUDA (device cpu)")
    ap.enable_block_sparse_attention(model, ap.BlockSparseConfig(block=16))
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"), torch.no_grad():
        model(**_pixart_inputs(torch.float32, "cpu"))
        model(**_pixart_inputs(torch.float32, "cpu"))
    hits = [r for r in caplog.records if "not on CUDA" in r.getMessage()]
    assert len(hits) == 1


def _processor_vs_dense(family, dtype, device, cfg, seed, allow_cpu_interpreter=False):
    model = (_tiny_pixart() if family == "pixart" else _tiny_wan()).to(device)
    inputs = (_pixart_inputs if family == "pixart" else _wan_inputs)(torch.float32, device)
    with torch.no_grad():
        ref = model(**inputs).sample.float()  # fp32 dense
        model = model.to(dtype)
        lowp_inputs = _cast_inputs(inputs, dtype)
        lowp = model(**lowp_inputs).sample  # low-precision dense (stock processors)
        n = ap.enable_block_sparse_attention(model, cfg, allow_cpu_interpreter=allow_cpu_interpreter)
        out = model(**lowp_inputs).sample
    procs = ap.block_sparse_processors(model)
    assert n == 2 and all(p.last_sparsity is not None for p in procs)  # the kernel path ran
    return out, ref, lowp, procs


# threshold=1.0 runs the kernel's dense mode; topk >= #blocks runs a full mask through the indices
FULL_CONFIGS = {
    "dense_mode": ap.BlockSparseConfig(threshold=1.0, block=16, tile_3d=(1, 4, 4)),
    "full_mask": ap.BlockSparseConfig(threshold=None, topk=64, block=16, tile_3d=(1, 4, 4)),
}


@needs_kernel
@pytest.mark.parametrize("family,dtype,mode", [
    ("pixart", torch.float16, "dense_mode"), ("wan", torch.bfloat16, "dense_mode"), ("wan", torch.float16, "full_mask"),
])
def test_processor_kernel_path_full_mask_matches_dense(seed, family, dtype, mode):
    # CPU: the Triton kernel under the interpreter; exercises q/k/v plumbing, rope and 3-D tiling
    cfg = FULL_CONFIGS[mode]
    out, ref, lowp, procs = _processor_vs_dense(family, dtype, DEVICE, cfg, seed, allow_cpu_interpreter=True)
    assert procs[0].state.grid == ((1, 8, 8) if family == "pixart" else (3, 5, 6))
    assert procs[0].state.perm_cache  # the tiling was applied
    _assert_close_by_rule(out, ref, lowp, seed, family)


@needs_kernel
def test_processor_kernel_path_sparse_runs(seed):
    cfg = ap.BlockSparseConfig(threshold=0.5, block=16, local=0)
    out, ref, _, procs = _processor_vs_dense("wan", torch.bfloat16, DEVICE, cfg, seed, allow_cpu_interpreter=True)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert all(0.0 <= float(p.last_sparsity) < 1.0 for p in procs)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("family,dtype", [("pixart", torch.bfloat16), ("wan", torch.bfloat16), ("pixart", torch.float16)])
@pytest.mark.parametrize("mode", sorted(FULL_CONFIGS))
def test_processor_gpu_full_mask_matches_dense(seed, family, dtype, mode):
    out, ref, lowp, _ = _processor_vs_dense(family, dtype, "cuda", FULL_CONFIGS[mode], seed)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    _assert_close_by_rule(out, ref, lowp, seed, family)
