"""Adaptive block-mask construction (ASA-style) and 3-D space-time tiling of video tokens.

Also the static spatio-temporal mask of Sliding Tile Attention (STA, arXiv 2502.04507): with the
tokens in 3-D tiles, a query tile attends the key tiles inside a fixed window around it, with no
score estimate; it depends only on the token grid, so it is built once per grid and reused.

Plain torch: the estimate works on mean-pooled blocks, i.e. on a ``[Mq, Mk]`` score matrix per head
(256 x 256 for 32k tokens and 128-token blocks), which costs well under 1% of the attention it
gates; nothing here synchronises with the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "BlockMaskResult",
    "block_mean_pool",
    "build_block_mask",
    "forced_block_mask",
    "static_tile_mask",
    "tile_3d_permutation",
    "tile_window_mask",
]


class BlockMaskResult(NamedTuple):
    mask: torch.Tensor  # mask: [B, H, Mq, Mk] bool, True = attend to that key block
    sparsity: torch.Tensor  # 0-dim fp32 tensor: fraction of skipped blocks (float() syncs)


def block_mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """x: [B, H, N, D] (any strides) -> per-block token means [B, H, ceil(N/block), D] in fp32."""
    n = x.shape[2]
    n_full = n // block
    parts = []
    if n_full:
        # sum with dtype= accumulates in fp32 without materialising an fp32 copy of x
        parts.append(x[:, :, : n_full * block].unflatten(2, (n_full, block)).sum(dim=3, dtype=torch.float32) / block)
    if n % block:
        parts.append(x[:, :, n_full * block :].sum(dim=2, keepdim=True, dtype=torch.float32) / (n % block))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def forced_block_mask(
    n_q: int,
    n_k: int,
    block_m: int,
    block_n: int,
    *,
    diagonal: bool,
    local: int = 0,
    sinks: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Blocks kept regardless of scores: [Mq, Mk] bool.

    ``diagonal``: key blocks overlapping the query block's token range, widened by ``local`` key
    blocks on each side (self-attention only). ``sinks``: the first ``sinks`` key blocks.
    """
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    qb = torch.arange(n_qb, device=device)
    kb = torch.arange(n_kb, device=device)
    forced = torch.zeros(n_qb, n_kb, dtype=torch.bool, device=device)
    if diagonal:
        row_lo = (qb * block_m - local * block_n)[:, None]
        row_hi = ((qb + 1) * block_m + local * block_n)[:, None]
        forced |= (kb[None, :] * block_n < row_hi) & ((kb[None, :] + 1) * block_n > row_lo)
    if sinks > 0:
        forced |= (kb < sinks)[None, :]
    return forced


@torch.no_grad()
def build_block_mask(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k: torch.Tensor,  # k: [B, H, Nk, D]
    *,
    block_m: int = 128,
    block_n: int = 128,
    threshold: float | None = 0.9,
    topk: int | None = None,
    local: int = 0,
    sinks: int = 0,
    diagonal: bool | None = None,
    scale: float | None = None,
) -> BlockMaskResult:
    """Pick, per head and query block, the key blocks worth computing.

    Block scores are ``softmax(mean(q_blk) . mean(k_blk) * scale + log|k_blk|)`` over key blocks
    (the log-size term makes a ragged last block weigh by its token count). Per row, the forced
    blocks (diagonal +- ``local`` when self-attention, first ``sinks``) are taken first, then the
    highest-scoring blocks until the kept mass reaches ``threshold``; ``topk`` additionally keeps
    the ``topk`` highest-scoring blocks (a floor, not a cap). ``threshold >= 1`` keeps every block;
    with both ``threshold`` and ``topk`` None only the forced blocks are kept.
    ``diagonal=None`` means "Nq == Nk" (self-attention).
    """
    B, H, n_q, head_dim = q.shape
    n_k = k.shape[2]
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    if diagonal is None:
        diagonal = n_q == n_k
    if threshold is not None and threshold >= 1.0:
        mask = torch.ones(B, H, n_qb, n_kb, dtype=torch.bool, device=q.device)
        return BlockMaskResult(mask, torch.zeros((), dtype=torch.float32, device=q.device))
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    forced = forced_block_mask(
        n_q, n_k, block_m, block_n, diagonal=diagonal, local=local, sinks=sinks, device=q.device
    )  # forced: [Mq, Mk]
    keep = forced.expand(B, H, n_qb, n_kb).clone()
    if threshold is not None or topk is not None:
        pq = block_mean_pool(q, block_m)  # pq: [B, H, Mq, D]
        pk = block_mean_pool(k, block_n)  # pk: [B, H, Mk, D]
        logits = torch.matmul(pq, pk.transpose(-1, -2)) * scale  # logits: [B, H, Mq, Mk]
        if n_k % block_n:
            sizes = torch.full((n_kb,), float(block_n), device=q.device)
            sizes[-1] = n_k % block_n
            logits = logits + sizes.log()
        probs = torch.softmax(logits, dim=-1)
        if threshold is not None and threshold > 0:
            # forced blocks sort first (their mass counts toward the threshold), then by score
            order = torch.argsort(probs + forced.to(probs.dtype) * 2.0, dim=-1, descending=True)
            p_sorted = probs.gather(-1, order)
            mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
            keep.scatter_(-1, order, (mass_before < threshold) | keep.gather(-1, order))
        if topk is not None and topk > 0:
            top = probs.topk(min(topk, n_kb), dim=-1).indices
            keep.scatter_(-1, top, True)
    sparsity = 1.0 - keep.float().mean()
    return BlockMaskResult(keep, sparsity)


def tile_3d_permutation(
    T: int,
    H: int,
    W: int,
    tile: tuple[int, int, int],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder (t, h, w) row-major tokens into space-time tiles of ``tile = (tt, th, tw)``.

    Returns ``(perm, inv)``, int64 ``[T*H*W]``: ``x_tiled = x[:, perm]`` groups each tile's tokens
    contiguously (tiles in row-major tile order, tokens row-major inside a tile), and
    ``x = x_tiled[:, inv]`` restores the layout. Edge tiles are smaller when a tile size does not
    divide the grid; choose ``tt*th*tw`` equal to the attention block so blocks are compact cubes.
    """
    tt, th, tw = (max(1, int(s)) for s in tile)
    t = torch.arange(T, device=device).view(T, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1)
    w = torch.arange(W, device=device).view(1, 1, W)
    n_th, n_tw = -(-H // th), -(-W // tw)
    tile_id = ((t // tt) * n_th + h // th) * n_tw + w // tw
    within = ((t % tt) * th + h % th) * tw + w % tw
    key = (tile_id * (tt * th * tw) + within).reshape(-1)
    perm = torch.argsort(key)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=device)
    return perm, inv


def _window_starts(n: int, w: int, device) -> torch.Tensor:
    """First tile of each query tile's window along one axis: centred, shifted inward at the edges."""
    w = min(w, n)
    q = torch.arange(n, device=device)
    return (q - (w - 1) // 2).clamp(0, n - w)


def tile_window_mask(
    tile_grid: tuple[int, int, int],
    window: tuple[int, int, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[n_tiles, n_tiles] bool over row-major tile coordinates: key tile inside the query tile's window.

    Per axis the window covers ``min(w, n)`` consecutive tiles, centred on the query tile and shifted
    inward at the grid's edges (as STA does), so every query tile sees the same number of key tiles.
    """
    axes = []
    for n, w in zip(tile_grid, window):
        start = _window_starts(n, w, device)[:, None]  # start: [n, 1]
        k = torch.arange(n, device=device)[None, :]
        axes.append((k >= start) & (k < start + min(w, n)))  # [n_q, n_k] along this axis
    a_t, a_h, a_w = axes
    nt, nh, nw = tile_grid
    m = a_t[:, None, None, :, None, None] & a_h[None, :, None, None, :, None] & a_w[None, None, :, None, None, :]
    return m.reshape(nt * nh * nw, nt * nh * nw)


def static_tile_mask(
    grid: tuple[int, int, int],
    tile: tuple[int, int, int],
    window: tuple[int, int, int],
    block_m: int,
    block_n: int,
    *,
    local: int = 0,
    sinks: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Block mask [Mq, Mk] of the sliding-tile window for tokens in ``tile_3d_permutation`` order.

    A (query block, key block) pair is kept when some token of the query block lies in a tile whose
    window contains the tile of some token of the key block; this is exact when a block is one
    tile (``tt*th*tw == block``) and conservative (never drops a windowed pair) otherwise. The
    forced blocks of :func:`forced_block_mask` (diagonal +- ``local``, first ``sinks``) are added.
    Built from [blocks, tiles] incidence matrices, so it costs O(blocks * tiles), not O(N^2).
    """
    T, H, W = grid
    tt, th, tw = (max(1, int(s)) for s in tile)
    tile_grid = (-(-T // tt), -(-H // th), -(-W // tw))
    n_tiles = math.prod(tile_grid)
    perm, _ = tile_3d_permutation(T, H, W, (tt, th, tw), device=device)
    # tile of each token in tiled order (perm lists row-major token ids)
    t, rest = perm // (H * W), perm % (H * W)
    h, w = rest // W, rest % W
    tile_of = ((t // tt) * tile_grid[1] + h // th) * tile_grid[2] + w // tw  # tile_of: [N]
    n = T * H * W
    pos = torch.arange(n, device=device)

    def incidence(block: int) -> torch.Tensor:  # [ceil(N/block), n_tiles] float: block touches tile
        inc = torch.zeros(-(-n // block), n_tiles, device=device)
        inc[pos // block, tile_of] = 1.0
        return inc

    win = tile_window_mask(tile_grid, window, device=device).float()  # win: [n_tiles, n_tiles]
    keep = (incidence(block_m) @ win @ incidence(block_n).T) > 0  # keep: [Mq, Mk]
    return keep | forced_block_mask(n, n, block_m, block_n, diagonal=True, local=local, sinks=sinks, device=device)
