"""Static sliding-tile masks (STA, ``mode=static``): the window's block pattern, the kernel against the reference
under that mask, the processor's cache and per-layer grids, the per-layer table.

On a machine without CUDA the kernel runs under the Triton interpreter (see tests/kernels/conftest.py).
"""

import json

import pytest
import torch

from fewstep.kernels import attention_processor as ap
from fewstep.kernels.block_sparse_mask import static_tile_mask, tile_3d_permutation, tile_window_mask
from fewstep.kernels.reference import block_sparse_attention_ref, expand_block_mask
from tests.kernels.conftest import DEVICE, kernel_module

triton = pytest.importorskip("triton")
bsa = kernel_module("block_sparse_attention", "_block_sparse_attention_kernel")


def test_window_along_one_axis_by_hand():
    # 6 tiles in a row, window 3: centred, shifted inward at both ends (every query tile sees 3 key tiles)
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(tile_window_mask((1, 1, 6), (1, 1, 3)), expected)
    assert torch.equal(tile_window_mask((6, 1, 1), (3, 1, 1)), expected)
    # a window as large as the axis (or larger) keeps the whole axis
    assert tile_window_mask((1, 1, 6), (1, 1, 9)).all()


def test_static_mask_block_pattern_by_hand():
    # grid 2 x 4 x 4, tiles 1 x 2 x 2 = one block of 4 tokens each: 8 tiles, index t*4 + th*2 + tw
    eye = torch.eye(8, dtype=torch.bool)
    assert torch.equal(static_tile_mask((2, 4, 4), (1, 2, 2), (1, 1, 1), 4, 4), eye)
    # window 1 x 3 x 3: every tile of the same frame (the 2 x 2 tile plane is smaller than the window)
    same_frame = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool()
    assert torch.equal(static_tile_mask((2, 4, 4), (1, 2, 2), (1, 3, 3), 4, 4), same_frame)
    # window 3 x 1 x 1: the same spatial tile in both frames
    same_place = torch.tensor([[i % 4 == j % 4 for j in range(8)] for i in range(8)])
    assert torch.equal(static_tile_mask((2, 4, 4), (1, 2, 2), (3, 1, 1), 4, 4), same_place)
    # forced blocks come on top: sinks=1 keeps key block 0 everywhere, local=1 the neighbours of the diagonal
    m = static_tile_mask((2, 4, 4), (1, 2, 2), (1, 1, 1), 4, 4, local=1, sinks=1)
    assert m[:, 0].all() and m.diagonal(1).all() and m.diagonal(-1).all() and m.sum() == 8 + 14 + 6


def _token_window_mask(grid, tile, window):
    """Token-level truth from coordinates: key token j is in the window of query token i (tiled order)."""
    T, H, W = grid
    perm, _ = tile_3d_permutation(T, H, W, tile)
    coords = torch.stack([perm // (H * W), perm % (H * W) // W, perm % W], dim=1)  # [N, 3] in tiled order
    tiles = coords // torch.tensor(tile)
    n_tiles = [-(-g // t) for g, t in zip(grid, tile)]
    ok = torch.ones(len(perm), len(perm), dtype=torch.bool)
    for ax in range(3):
        w, n = min(window[ax], n_tiles[ax]), n_tiles[ax]
        start = (tiles[:, ax] - (w - 1) // 2).clamp(0, n - w)
        ok &= (tiles[None, :, ax] >= start[:, None]) & (tiles[None, :, ax] < start[:, None] + w)
    return ok


@pytest.mark.parametrize("grid,tile,window,block", [
    ((3, 5, 7), (1, 4, 4), (1, 3, 3), 16),   # odd grid, ragged edge tiles, blocks straddle tiles
    ((3, 5, 7), (2, 2, 4), (3, 1, 3), 16),
    ((5, 3, 3), (1, 3, 3), (3, 1, 1), 16),   # 9-token tiles in 16-token blocks
    ((2, 4, 8), (2, 2, 4), (1, 3, 1), 16),   # aligned: one tile = one block, the mask is exact
])
def test_static_mask_covers_the_window_on_odd_grids(grid, tile, window, block):
    n = grid[0] * grid[1] * grid[2]
    mask = static_tile_mask(grid, tile, window, block, block)
    truth = _token_window_mask(grid, tile, window)
    tokens = expand_block_mask(mask[None, None], n, n, block, block)[0, 0]
    assert (tokens | ~truth).all()  # never drops a pair inside the window
    # every kept block holds a windowed pair, except the forced diagonal
    blocks = -(-n // block)
    hit = torch.zeros(blocks, blocks, dtype=torch.bool)
    idx = torch.arange(n) // block
    hit[idx[:, None].expand(n, n)[truth], idx[None, :].expand(n, n)[truth]] = True
    assert torch.equal(mask, hit | torch.eye(blocks, dtype=torch.bool))
    if tile[0] * tile[1] * tile[2] == block and all(g % t == 0 for g, t in zip(grid, tile)):
        assert torch.equal(tokens, truth)


@pytest.mark.parametrize("grid,tile,window,dtype", [
    ((3, 5, 7), (1, 4, 4), (1, 3, 3), torch.float16),
    ((3, 5, 7), (2, 2, 4), (3, 1, 3), torch.bfloat16),
])
def test_kernel_with_static_mask_equals_reference(seed, grid, tile, window, dtype):
    n, block = grid[0] * grid[1] * grid[2], 16
    q, k, v = (torch.randn(2, 2, n, 32, device=DEVICE, dtype=dtype) for _ in range(3))
    mask = static_tile_mask(grid, tile, window, block, block, device=DEVICE)[None, None]  # [1, 1, Mq, Mk]
    counts, indices = bsa.mask_to_indices(mask)
    out = bsa.block_sparse_attention(q, k, v, kv_counts=counts, kv_indices=indices, block_m=block, block_n=block)
    ref = block_sparse_attention_ref(q, k, v, mask.expand(2, 2, -1, -1), block, block)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=f"seed {seed}")
    assert 0.0 < 1.0 - mask.float().mean() < 1.0  # the case skips something


def test_config_static_parse_round_trip_and_errors():
    cfg = ap.BlockSparseConfig.parse("block_sparse(mode=static,window=3x3x1,block=64,tile_3d=2x4x8)")
    assert cfg.static and cfg.window == (3, 3, 1) and cfg.tile_3d == (2, 4, 8) and not cfg.full
    assert ap.BlockSparseConfig.parse(cfg.to_option()) == cfg
    # the adaptive option string is what it was before the static mode
    assert ap.BlockSparseConfig(block=64).to_option() == (
        "block_sparse(threshold=0.9,topk=none,block=64,local=1,sinks=0,tile_3d=none,min_seq_len=0)")
    for bad, says in [("block_sparse(mode=static,window=3x3x3)", "tile_3d"),
                      ("block_sparse(mode=static,tile_3d=2x4x8)", "window"),
                      ("block_sparse(mode=sliding,window=3x3x3,tile_3d=2x4x8)", "mode must be one of"),
                      ("block_sparse(mode=static,window=3x3,tile_3d=2x4x8)", "window"),
                      ("block_sparse(mode=static,window=0x3x3,tile_3d=2x4x8)", "window"),
                      ("block_sparse(window=3x3x3)", "only used with mode=static")]:
        with pytest.raises(ValueError, match=says):
            ap.BlockSparseConfig.parse(bad)


def _tiny_stream_unet():
    from fewstep.engines.models.stream_unet import StreamUNetModel

    torch.manual_seed(0)
    model = StreamUNetModel(sample_size=16, block_out_channels=(16, 32), down_block_types=("DownBlock2D",
                            "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                            attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8, position_features=8,
                            max_frames=8, joint_tokens=64).eval()
    for fa in model.frame_attentions:  # a fresh model's frame attention outputs zero; make it count
        torch.nn.init.normal_(fa.attn.to_out[0].weight, std=0.2)
    return model


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 3, 6, 16, 16, generator=g), timestep=torch.full((1, 6), 500.0),
                encoder_hidden_states=torch.randn(1, 4, 32, generator=g))


def _unet_run(model):
    with torch.no_grad():
        return model(**_unet_inputs()).sample


def test_stream_unet_layers_get_their_grids_and_the_static_mask_is_cached():
    model = _tiny_stream_unet()
    dense = _unet_run(model)
    names = ap.self_attention_layers(model)
    # window wider than every tile grid: the static path must reproduce dense (permutation + full mask)
    assert ap.enable_block_sparse_attention(model, "block_sparse(mode=static,window=9x9x9,block=16,tile_3d=2x2x4)",
                                            backend="reference") == len(names)
    torch.testing.assert_close(_unet_run(model), dense, atol=1e-4, rtol=1e-4)
    procs = dict(zip(names, ap.block_sparse_processors(model)))
    joint = [n for n in names if n.endswith("frames.attn")]
    assert joint and all(procs[n].grid == (6, 8, 8) for n in joint)  # 16 px frame, one down step: 8 x 8 cells
    spatial = [n for n in names if n.endswith("attn1")]
    assert spatial and all(procs[n].grid[0] == 1 for n in spatial)  # within one frame
    # a real window: sparsity > 0 on the joint layers, the same cached mask on every call
    ap.enable_block_sparse_attention(model, "block_sparse(mode=static,window=1x3x3,block=16,tile_3d=2x2x4,local=0)",
                                     backend="reference")
    out = _unet_run(model)
    procs = dict(zip(names, ap.block_sparse_processors(model)))
    state = procs[joint[0]].state
    cached = dict(state.static_cache)
    assert float(procs[joint[0]].last_sparsity) > 0.5
    _unet_run(model)
    assert all(state.static_cache[k] is v for k, v in cached.items()) and len(state.static_cache) == len(cached)
    assert (out - dense).abs().max() > 1e-4


def test_layer_table_sets_each_layer_and_names_the_valid_ones(tmp_path):
    model = _tiny_stream_unet()
    names = ap.self_attention_layers(model)
    joint = [n for n in names if n.endswith("frames.attn")][0]
    table = tmp_path / "layers.json"
    table.write_text(json.dumps({"layers": {joint: "static(1x3x3)", "0": "dense", names[2]: "adaptive(0.5)"}}))
    opt = f"block_sparse(threshold=0.9,block=16,tile_3d=2x2x4,table={table})"
    n = ap.enable_block_sparse_attention(model, opt, backend="reference")
    assert n == len(names) - 1
    mods = dict(model.named_modules())
    assert not isinstance(mods[names[0]].processor, ap.BlockSparseAttnProcessor)  # "0": dense
    assert names[2] != joint and mods[names[2]].processor.config.threshold == 0.5
    assert mods[joint].processor.config.static and mods[joint].processor.config.window == (1, 3, 3)
    others = [x for x in names if x not in (names[0], names[2], joint)]
    assert all(mods[x].processor.config == ap.BlockSparseConfig(threshold=0.9, block=16, tile_3d=(2, 2, 4))
               for x in others)
    _unet_run(model)
    table.write_text(json.dumps({"layers": {"down_blocks.9.attn1": "dense"}}))
    with pytest.raises(ValueError, match=r"unknown layer 'down_blocks.9.attn1'; valid: 0\.\.\d+ or .*frames\.attn"):
        ap.enable_block_sparse_attention(model, opt, backend="reference")
    table.write_text(json.dumps({"layers": {"0": "static(3x3)"}}))
    with pytest.raises(ValueError, match="bad layer setting 'static\\(3x3\\)'"):
        ap.enable_block_sparse_attention(model, opt, backend="reference")
    table.write_text(json.dumps({"layers": {"0": "sliding"}}))
    with pytest.raises(ValueError, match="use dense, static"):
        ap.enable_block_sparse_attention(model, opt, backend="reference")


def test_processor_kernel_path_static_equals_reference_backend(seed):
    # the Triton kernel (interpreter on CPU) fed the cached static indices vs the reference backend, same mask
    from tests.kernels.test_block_sparse_attention import _cast_inputs, _tiny_wan, _wan_inputs

    model = _tiny_wan().to(DEVICE).to(torch.bfloat16)
    inputs = _cast_inputs(_wan_inputs(torch.float32, DEVICE), torch.bfloat16)
    opt = "block_sparse(mode=static,window=1x1x3,block=16,local=0,tile_3d=1x4x4)"
    with torch.no_grad():
        ap.enable_block_sparse_attention(model, opt, allow_cpu_interpreter=True)
        out = model(**inputs).sample.float()
        procs = ap.block_sparse_processors(model)
        assert all(p.last_sparsity is not None for p in procs)  # the kernel ran, no fallback
        sparsity = float(procs[0].last_sparsity)
        ap.enable_block_sparse_attention(model, opt, backend="reference")
        ref = model(**inputs).sample.float()
    assert procs[0].state.grid == (3, 5, 6) and 0.0 < sparsity < 1.0
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2, msg=f"seed {seed}")
