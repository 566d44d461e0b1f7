"""MoBA forward: key-block-centric "gather and densify" in two passes with an exact log-sum-exp merge.

Schedule. One program per (key block, KV head). It walks the block -> query index (see
:mod:`flashmoba.routing.result`) of the query heads that read this KV head, gathers ``BLOCK_M`` of those
queries into a dense tile, and runs them against the block's keys on tensor cores. Every block has about
``topk * block_size`` queries whatever the sequence length, so tiles stay full even at 512K tokens, where a
query-block-centric schedule (the FlashMoBA paper's) gathers only a few rows per (query block, key block).

Merge. A query's keys are spread over ``topk`` programs, so the softmax cannot be finished in one of them.
* Pass 1 (``STAGE=0``) computes, for every (query, selected block) pair, the log-sum-exp of its scores
  over that block (one float per pair, indexed by pair id).
* The row log-sum-exp ``lse = logsumexp(pair lse)`` is then exact.
* Pass 2 (``STAGE=1``) recomputes the scores, forms the final probabilities ``exp(s - lse)`` and adds
  ``P @ V`` into a float32 output: with atomics, or (``DETERMINISTIC``) into one row per pair that is
  summed afterwards in a fixed order.

Masking. In causal mode a block's own queries are the first ``len(block)`` entries of each of its
segments (they always select it, and segments are in token order); only those tiles get the token-level
causal mask. Routed queries are strictly later than the block, so their tiles run unmasked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


LOG2E = math.log2(math.e)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products (Triton would use TF32); 16-bit ones are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def segment_bounds(Offsets, h, g, num_blocks_max):
    """``[start, end)`` in the entries of segment (query head ``h``, global block ``g``), head-major
    (:mod:`flashmoba.routing.result`); shared by forward and backward."""
    seg = h * (num_blocks_max + 1) + g.to(tl.int64)
    return tl.load(Offsets + seg), tl.load(Offsets + seg + 1)


@triton.jit
def gathered_queries(Entries, e, row_ok, h, HQ: tl.constexpr, TOPK: tl.constexpr):
    """Query tokens and pair ids of entries ``e`` of head ``h``: entries are the head's pair positions
    ``t * TOPK + slot``, and per-pair scratch rows are indexed by pair id ``(t * HQ + h) * TOPK + slot``."""
    pos = tl.load(Entries + e, mask=row_ok, other=0).to(tl.int64)
    t = pos // TOPK
    return t, (t * HQ + h) * TOPK + (pos - t * TOPK)


@triton.jit
def _attn_fwd_tile(
    Q, Entries, PairLse, RowLse, Out,
    k, v, key_offset, key_ok, block_start,
    e_start, e_end, h, split,
    stride_qn, stride_qh, stride_on, stride_oh,
    scale_log2,
    HQ: tl.constexpr, TOPK: tl.constexpr, HEAD_DIM: tl.constexpr, KEY_SPLITS,
    STAGE: tl.constexpr, CAUSAL_MASK: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One gathered tile of up to BLOCK_M queries against this program's key tile."""
    e = e_start + tl.arange(0, BLOCK_M)
    row_ok = e < e_end
    t, pair = gathered_queries(Entries, e, row_ok, h, HQ, TOPK)
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(Q + t[:, None] * stride_qn + h * stride_qh + d[None, :], mask=io_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    allowed = key_ok[None, :]
    if CAUSAL_MASK:  # in int32 offsets from the block start: an int64 [M, N] tile would cost 2x registers
        allowed = allowed & (key_offset[None, :] <= (t - block_start).to(tl.int32)[:, None])
    s = tl.where(allowed, s, -float("inf"))
    if STAGE == 0:
        m = tl.max(s, axis=1)
        m_ref = tl.where(m == -float("inf"), 0.0, m)  # rows with no visible key in this tile
        l = tl.sum(tl.exp2(s - m_ref[:, None]), axis=1)
        # -inf when this key tile holds no visible key (a query before the tile, blocks > BLOCK_N)
        lse = tl.where(l > 0, m_ref + tl.log2(tl.where(l > 0, l, 1.0)), -float("inf"))
        tl.store(PairLse + pair * KEY_SPLITS + split, lse, mask=row_ok)
    else:
        row_lse = tl.load(RowLse + t * HQ + h, mask=row_ok, other=float("inf"))
        p = tl.exp2(s - row_lse[:, None])
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if DETERMINISTIC:
            tl.store(Out + (pair * KEY_SPLITS + split)[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask)
        else:
            tl.atomic_add(Out + t[:, None] * stride_on + h * stride_oh + d[None, :], acc, mask=io_mask,
                          sem="relaxed")


@triton.jit
def key_tile_of_program(g, split, cu_seqlens, cu_blocks, block_seq, num_seqs, BLOCK_SIZE,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The keys of program (global block ``g``, key tile ``split``), shared by forward and backward.

    Returns ``(active, block_start, key_offset, key_ok, num_own)``: ``active`` is false for programs past
    the real blocks (the grid is sized from shapes only) and past the end of a partial last block;
    ``key_offset`` [BLOCK_N] counts from the block start; ``num_own`` is the number of the block's own
    queries at the head of each of its segments (causal) or 0.
    """
    seq = tl.load(block_seq + g)
    active = seq < num_seqs
    seq = tl.where(active, seq, 0)
    seq_end = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    block_start = tl.load(cu_seqlens + seq).to(tl.int64) + (g - tl.load(cu_blocks + seq)) * BLOCK_SIZE
    block_end = tl.minimum(block_start + BLOCK_SIZE, seq_end)
    active = active & (block_start + split * BLOCK_N < block_end)
    key_offset = split * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = block_start + key_offset < block_end
    if CAUSAL:
        num_own = block_end - block_start
    else:
        num_own = tl.zeros_like(block_end)
    return active, block_start, key_offset, key_ok, num_own


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Entries, Offsets, PairLse, RowLse, Out,
    cu_seqlens, cu_blocks, block_seq,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    num_seqs, num_blocks_max, scale_log2,
    HQ: tl.constexpr, GROUP: tl.constexpr, TOPK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE, KEY_SPLITS, CAUSAL: tl.constexpr, STAGE: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    active, block_start, key_offset, key_ok, num_own = key_tile_of_program(
        g, split, cu_seqlens, cu_blocks, block_seq, num_seqs, BLOCK_SIZE, BLOCK_N, CAUSAL)
    if not active:
        return

    # This program's keys (and values) stay on chip while it walks the gathered queries.
    kpos = block_start + key_offset
    d = tl.arange(0, BLOCK_D)
    kv_mask = key_ok[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(K + kpos[:, None] * stride_kn + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
    if STAGE == 1:
        v = tl.load(V + kpos[:, None] * stride_vn + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
    else:
        v = k  # unused

    for hh in range(GROUP):
        h = kvh * GROUP + hh
        seg_start, seg_end = segment_bounds(Offsets, h, g, num_blocks_max)
        # the own block's queries: token-level causal mask
        for e0 in range(seg_start, seg_start + num_own, BLOCK_M):
            _attn_fwd_tile(
                Q, Entries, PairLse, RowLse, Out, k, v, key_offset, key_ok, block_start,
                e0, seg_start + num_own, h, split,
                stride_qn, stride_qh, stride_on, stride_oh, scale_log2,
                HQ, TOPK, HEAD_DIM, KEY_SPLITS, STAGE, True, DETERMINISTIC, BLOCK_M, BLOCK_D, PRECISION,
            )
        # routed queries lie after the block: no mask
        for e0 in range(seg_start + num_own, seg_end, BLOCK_M):
            _attn_fwd_tile(
                Q, Entries, PairLse, RowLse, Out, k, v, key_offset, key_ok, block_start,
                e0, seg_end, h, split,
                stride_qn, stride_qh, stride_on, stride_oh, scale_log2,
                HQ, TOPK, HEAD_DIM, KEY_SPLITS, STAGE, False, DETERMINISTIC, BLOCK_M, BLOCK_D, PRECISION,
            )


def _fwd_config(block_size: int, head_dim: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), measured on an H100 (benchmarks/tune_attention.py):
    128-query tiles beat 64 (14.3 vs 17.2 ms at 64K, D=128); 8 warps keep the tiles in registers.
    float32 inputs (exact products, a correctness path) need 32-row tiles to fit in shared memory."""
    if dtype == torch.float32:
        return 32, min(32, max(16, triton.next_power_of_2(block_size))), 4, 1
    block_n = min(128 if head_dim <= 128 else 64, max(16, triton.next_power_of_2(block_size)))
    return (128 if head_dim <= 128 else 64), block_n, 8, 2


def attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_blocks: torch.Tensor,
    block_seq: torch.Tensor,
    offsets: torch.Tensor,
    entries: torch.Tensor,
    topk: int,
    block_size: int,
    causal: bool,
    scale: float,
    deterministic: bool,
):
    """MoBA forward from a routing.

    Args:
        q: ``[N, HQ, D]``; k, v: ``[N, HKV, D]`` (last dim contiguous).
        cu_seqlens ``[S + 1]``, cu_blocks ``[S + 1]``, block_seq ``[G]``: sequence / block layout.
        offsets ``[HQ * (G + 1) + 1]``, entries ``[HQ * N * topk]``: the block -> query index
            (:mod:`flashmoba.routing.result`).
        topk: slots per (query, head); pair ids are ``(t * HQ + h) * topk + slot``.

    Returns:
        ``(out [N, HQ, D] in q's dtype, lse [N, HQ] float32 natural log)``.
    """
    N, HQ, D = q.shape
    HKV = k.shape[1]
    num_blocks_max = block_seq.numel()
    BLOCK_M, BLOCK_N, num_warps, num_stages = _fwd_config(block_size, D, q.dtype)
    BLOCK_D = triton.next_power_of_2(D)
    key_splits = triton.cdiv(block_size, BLOCK_N)
    num_pairs = N * HQ * topk

    pair_lse = torch.full((num_pairs * key_splits,), -float("inf"), dtype=torch.float32, device=q.device)
    if deterministic:
        out_acc = torch.zeros(num_pairs * key_splits, D, dtype=torch.float32, device=q.device)
    else:
        out_acc = torch.zeros(N, HQ, D, dtype=torch.float32, device=q.device)
    row_lse_log2 = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    if N > 0 and num_blocks_max > 0:
        for stage in (0, 1):
            if stage == 1:
                row_lse_log2 = torch.logsumexp(pair_lse.view(N, HQ, -1) / LOG2E, dim=-1) * LOG2E
            _attn_fwd_kernel[(num_blocks_max, HKV, key_splits)](
                q, k, v, entries, offsets, pair_lse, row_lse_log2, out_acc,
                cu_seqlens, cu_blocks, block_seq,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                HQ * D, D,
                cu_seqlens.numel() - 1, num_blocks_max, scale * LOG2E,
                HQ=HQ, GROUP=HQ // HKV, TOPK=topk, HEAD_DIM=D, BLOCK_SIZE=block_size,
                KEY_SPLITS=key_splits, CAUSAL=causal, STAGE=stage, DETERMINISTIC=deterministic,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=dot_precision(q.dtype),
                num_warps=num_warps, num_stages=num_stages,
            )
    if deterministic:
        out_acc = out_acc.view(N, HQ, topk * key_splits, D).sum(dim=2)
    return out_acc.to(q.dtype), row_lse_log2 / LOG2E
