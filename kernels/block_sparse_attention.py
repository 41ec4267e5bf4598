"""Block-sparse attention forward (inference only) in Triton.

The key axis is cut into blocks of ``block_n`` tokens and the query axis into blocks of
``block_m`` tokens. A block mask ``[B, H, ceil(Nq/block_m), ceil(Nk/block_n)]`` says which key
blocks each query block attends to. It is turned into compact per-row lists (flash-attention
style metadata):

    kv_counts  [B, H, Mq]      number of selected key blocks of each query block
    kv_indices [B, H, Mq, Mk]  their indices, ascending, first ``kv_counts`` entries valid

The kernel runs an online softmax (fp32 statistics and accumulator) over the selected key blocks
only, so a skipped block costs neither loads nor FLOPs. Query rows whose block selects no key block
produce zeros (there is nothing to normalise over). Sequence lengths need not be multiples of the
block sizes: the ragged tail is masked.

triton is imported guarded so ``import fewstep.kernels`` works on CPU-only hosts without it; the
kernel is decorated at import time, so set ``TRITON_INTERPRET=1`` before importing this module to
run it on CPU.
"""

from __future__ import annotations

import dataclasses
import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU server without triton: callers check HAS_TRITON and fall back
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "INDEX_PATH",
    "SUPPORTED_DTYPES",
    "TILE_CONFIGS",
    "TileConfig",
    "block_sparse_attention",
    "get_tile_config",
    "is_supported_head_dim",
    "mask_to_indices",
    "set_tile_config",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Kernel tile: BLOCK_M query rows x BLOCK_N key columns per step, plus launch knobs."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Keyed by the padded head dim (next power of two >= 16). Hopper defaults; overwrite with the
# winners of `benchmarks/kernels/bench_block_sparse_attention.py` (it prints a ready snippet).
TILE_CONFIGS: dict[int, TileConfig] = {
    16: TileConfig(128, 64, 4, 3),
    32: TileConfig(128, 64, 4, 3),
    64: TileConfig(128, 64, 4, 3),
    128: TileConfig(128, 64, 8, 3),
}


# Index-path variants (compile-time switches; the benchmark A/Bs them on the device):
# full_rows_contiguous: rows whose mask keeps every key block run the plain loop of the dense mode;
# prefetch_index: load the next block index one iteration ahead. Off until measured.
INDEX_PATH: dict[str, bool] = {"full_rows_contiguous": True, "prefetch_index": False}


def _padded_head_dim(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_supported_head_dim(head_dim: int) -> bool:
    # non-power-of-two dims (e.g. PixArt's 72) run padded to the next power of two
    return 8 <= head_dim <= MAX_HEAD_DIM


def get_tile_config(head_dim: int) -> TileConfig:
    return TILE_CONFIGS[_padded_head_dim(head_dim)]


def set_tile_config(head_dim: int, config: TileConfig) -> None:
    TILE_CONFIGS[_padded_head_dim(head_dim)] = config


def mask_to_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block mask ``[..., Mq, Mk]`` -> ``(kv_counts [..., Mq], kv_indices [..., Mq, Mk])``.

    Selected key-block indices come first in ascending order (sequential, L2-friendly traversal;
    the kernel also relies on the ragged last block being last). Padding entries are valid block
    indices that the kernel never reads past ``kv_counts``.
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be bool, got {block_mask.dtype}")
    n_kb = block_mask.shape[-1]
    ar = torch.arange(n_kb, device=block_mask.device, dtype=torch.int32)
    # unselected blocks sort after all selected ones, each group stays ascending
    key = torch.where(block_mask, ar, ar + n_kb)
    kv_indices = key.sort(dim=-1).values
    kv_indices = torch.where(kv_indices >= n_kb, kv_indices - n_kb, kv_indices).contiguous()
    kv_counts = block_mask.sum(dim=-1, dtype=torch.int32).contiguous()
    return kv_counts, kv_indices


if HAS_TRITON:

    @triton.jit
    def _attend_tile(
        acc, l_i, m_i, q,
        k_base, v_base, stride_kn, stride_vn,
        start_n, N_K, qk_scale,
        offs_n, offs_d,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        offs = start_n + offs_n
        # k: [BLOCK_D, BLOCK_N] (loaded transposed), v: [BLOCK_N, BLOCK_D]
        k_ptrs = k_base + offs[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + offs[:, None] * stride_vn + offs_d[None, :]
        if MASK_N:
            if HEAD_DIM == BLOCK_D:
                k = tl.load(k_ptrs, mask=offs[None, :] < N_K, other=0.0)
                v = tl.load(v_ptrs, mask=offs[:, None] < N_K, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(offs[None, :] < N_K) & (offs_d[:, None] < HEAD_DIM), other=0.0)
                v = tl.load(v_ptrs, mask=(offs[:, None] < N_K) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            if HEAD_DIM == BLOCK_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)

        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASK_N:
            # tail sub-tiles start below N_K, so every row keeps a finite m_ij
            qk = tl.where(offs[None, :] < N_K, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, l_i, m_ij

    @triton.jit
    def _block_sparse_attention_kernel(
        Q, K, V, O, KV_IDX, KV_CNT,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on,
        stride_ib, stride_ih, stride_im,
        stride_cb, stride_ch,
        N_Q, N_K, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
        DENSE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
        FULL_ROWS_CONTIGUOUS: tl.constexpr, PREFETCH_INDEX: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        q_base = Q + off_b * stride_qb + off_h * stride_qh
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        o_base = O + off_b * stride_ob + off_h * stride_oh

        # q: [BLOCK_M, BLOCK_D]
        q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
        if EVEN_M:
            if HEAD_DIM == BLOCK_D:
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        SUB_N: tl.constexpr = MASK_BN // BLOCK_N
        n_kb = tl.cdiv(N_K, MASK_BN)

        if DENSE:
            n_main = n_kb
            if not EVEN_N:
                n_main = n_kb - 1
            for start_n in range(0, n_main * MASK_BN, BLOCK_N):
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                    start_n, N_K, qk_scale, offs_n, offs_d,
                    HEAD_DIM, BLOCK_D, False, DOT_FP32,
                )
            has_tail = not EVEN_N
        else:
            row = (pid_m * BLOCK_M) // MASK_BM
            cnt = tl.load(KV_CNT + off_b * stride_cb + off_h * stride_ch + row)
            idx_base = KV_IDX + off_b * stride_ib + off_h * stride_ih + row * stride_im
            n_main = cnt
            has_tail = False
            if not EVEN_N:
                # indices are ascending, so the ragged last block can only be the last entry
                last = tl.load(idx_base + tl.maximum(cnt - 1, 0))
                has_tail = (cnt > 0) & (last == n_kb - 1)
                n_main = cnt - has_tail.to(tl.int32)
            if FULL_ROWS_CONTIGUOUS and cnt == n_kb:
                # a row that keeps every block is dense: walk it as a plain loop (no index loads on the K/V
                # address path), which the H200 ran at 0.78-0.81 of SDPA against 0.51-0.67 through the indices
                # at head dim 128 (docs/benchmarks.md)
                for start_n in range(0, n_main * MASK_BN, BLOCK_N):
                    acc, l_i, m_i = _attend_tile(
                        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                        start_n, N_K, qk_scale, offs_n, offs_d,
                        HEAD_DIM, BLOCK_D, False, DOT_FP32,
                    )
            elif PREFETCH_INDEX:
                # the next sub-tile's block index is loaded one iteration ahead (experiment, see NOTES)
                kb_next = tl.load(idx_base)
                last_entry = tl.maximum(cnt - 1, 0)
                for t in range(0, n_main * SUB_N):
                    kb = kb_next
                    kb_next = tl.load(idx_base + tl.minimum((t + 1) // SUB_N, last_entry))
                    acc, l_i, m_i = _attend_tile(
                        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                        kb * MASK_BN + (t % SUB_N) * BLOCK_N, N_K, qk_scale, offs_n, offs_d,
                        HEAD_DIM, BLOCK_D, False, DOT_FP32,
                    )
            else:
                # one flat loop over BLOCK_N sub-tiles so the pipeliner buffers BLOCK_N, not MASK_BN, rows
                for t in range(0, n_main * SUB_N):
                    kb = tl.load(idx_base + t // SUB_N)
                    acc, l_i, m_i = _attend_tile(
                        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                        kb * MASK_BN + (t % SUB_N) * BLOCK_N, N_K, qk_scale, offs_n, offs_d,
                        HEAD_DIM, BLOCK_D, False, DOT_FP32,
                    )

        if not EVEN_N:
            if has_tail:
                for start_n in range((n_kb - 1) * MASK_BN, N_K, BLOCK_N):
                    acc, l_i, m_i = _attend_tile(
                        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                        start_n, N_K, qk_scale, offs_n, offs_d,
                        HEAD_DIM, BLOCK_D, True, DOT_FP32,
                    )

        # rows that selected no key block keep l_i == 0 and acc == 0 -> output zeros
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
        o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
        if EVEN_M:
            if HEAD_DIM == BLOCK_D:
                tl.store(o_ptrs, out)
            else:
                tl.store(o_ptrs, out, mask=offs_d[None, :] < HEAD_DIM)
        else:
            tl.store(o_ptrs, out, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM))


def _interpreted() -> bool:
    # the CPU interpreter multiplies bf16 tiles as their raw uint16 bits; upcast there only
    return type(_block_sparse_attention_kernel).__name__ == "InterpretedFunction"


_DUMMIES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _dummy_metadata(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # placeholders for the DENSE launch, which never reads them
    if device not in _DUMMIES:
        _DUMMIES[device] = (
            torch.zeros(1, 1, 1, dtype=torch.int32, device=device),
            torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device),
        )
    return _DUMMIES[device]


def _largest_pow2_divisor_at_most(block: int, cap: int) -> int:
    t = min(block, cap)
    while block % t:
        t //= 2
    return t


def _launch_block_sparse_attention(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k: torch.Tensor,  # k: [B, H, Nk, D]
    v: torch.Tensor,  # v: [B, H, Nk, D]
    out: torch.Tensor,  # out: [B, H, Nq, D]
    kv_counts: torch.Tensor | None,  # kv_counts: [B, H, Mq] int32 (may be broadcast)
    kv_indices: torch.Tensor | None,  # kv_indices: [B, H, Mq, Mk] int32 (may be broadcast)
    block_m: int,
    block_n: int,
    scale: float,
    config: TileConfig,
) -> None:
    B, H, n_q, head_dim = q.shape
    n_k = k.shape[2]
    tile_m = _largest_pow2_divisor_at_most(block_m, config.block_m)
    tile_n = _largest_pow2_divisor_at_most(block_n, config.block_n)
    dense = kv_indices is None
    if dense:
        kv_counts, kv_indices = _dummy_metadata(q.device)
    grid = (triton.cdiv(n_q, tile_m), H, B)
    _block_sparse_attention_kernel[grid](
        q, k, v, out, kv_indices, kv_counts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
        kv_counts.stride(0), kv_counts.stride(1),
        n_q, n_k, scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        HEAD_DIM=head_dim, BLOCK_D=_padded_head_dim(head_dim),
        BLOCK_M=tile_m, BLOCK_N=tile_n,
        MASK_BM=block_m, MASK_BN=block_n,
        DENSE=dense, EVEN_M=n_q % tile_m == 0, EVEN_N=n_k % block_n == 0,
        DOT_FP32=q.dtype == torch.bfloat16 and _interpreted(),
        FULL_ROWS_CONTIGUOUS=INDEX_PATH["full_rows_contiguous"], PREFETCH_INDEX=INDEX_PATH["prefetch_index"],
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _check_block(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    *,
    kv_indices: torch.Tensor | None = None,
    kv_counts: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 128,
    scale: float | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v restricted to the selected (block_m x block_n) blocks.

    q: [B, H, Nq, D], k/v: [B, H, Nk, D], fp16 or bf16, any strides with a contiguous last dim
    (so [B, N, H, D] buffers can be passed as ``.transpose(1, 2)`` views without a copy; the output
    has q's memory layout). D <= 128 (non powers of two are padded).

    Either ``block_mask`` ``[B, H, ceil(Nq/block_m), ceil(Nk/block_n)]`` bool, or the compact
    ``kv_counts``/``kv_indices`` from :func:`mask_to_indices` (B and H may be broadcast, i.e. size
    1), or neither for dense attention. Rows whose query block selects no key block output zeros.
    ``config`` overrides the per-head-dim tile from ``TILE_CONFIGS``; its tile sizes are shrunk to
    divide ``block_m``/``block_n``.
    """
    if not HAS_TRITON:
        raise RuntimeError("block_sparse_attention needs triton (pip install triton)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, N, D]")
    B, H, n_q, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != head_dim:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must all be fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not is_supported_head_dim(head_dim):
        raise ValueError(f"head dim {head_dim} unsupported (8..{MAX_HEAD_DIM})")
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    n_k = k.shape[2]
    n_qb, n_kb = _cdiv(n_q, block_m), _cdiv(n_k, block_n)

    if block_mask is not None:
        if kv_indices is not None or kv_counts is not None:
            raise ValueError("pass either block_mask or kv_indices/kv_counts, not both")
        if block_mask.dim() != 4 or block_mask.shape[-2:] != (n_qb, n_kb):
            raise ValueError(f"block_mask must be [B, H, {n_qb}, {n_kb}], got {tuple(block_mask.shape)}")
        kv_counts, kv_indices = mask_to_indices(block_mask)
    elif (kv_indices is None) != (kv_counts is None):
        raise ValueError("kv_indices and kv_counts go together")
    if kv_indices is not None:
        if kv_indices.dim() != 4 or kv_indices.shape[-2] != n_qb or kv_indices.shape[-1] < 1:
            raise ValueError(f"kv_indices must be [B, H, {n_qb}, <= {n_kb}], got {tuple(kv_indices.shape)}")
        if kv_counts.shape[-1] != n_qb:
            raise ValueError(f"kv_counts must be [B, H, {n_qb}], got {tuple(kv_counts.shape)}")
        kv_indices = kv_indices.to(torch.int32).expand(B, H, -1, -1)
        kv_counts = kv_counts.to(torch.int32).expand(B, H, -1)
        if kv_indices.stride(-1) != 1:
            kv_indices = kv_indices.contiguous()
        if kv_counts.stride(-1) != 1:
            kv_counts = kv_counts.contiguous()

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # per-token offsets are int32 in the kernel
    for t in (q, k, v):
        if t.shape[2] * t.stride(2) >= 2**31:
            raise ValueError("sequence too long for int32 token offsets")
    out = torch.empty_like(q)
    if n_q == 0:
        return out
    if n_k == 0:
        return out.zero_()
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    _launch_block_sparse_attention(
        q, k, v, out, kv_counts, kv_indices, block_m, block_n, float(scale),
        config or get_tile_config(head_dim),
    )
    return out

