"""Stage 2 of FlashMoBA routing: fused tiled top-k, with no score matrix in memory.

One program owns a tile of ``BLOCK_M`` queries of one sequence and one query head. It streams the
centroid tiles of that sequence, computes the scores on tensor cores, and keeps a running top-k per query in
registers; only the final ``[N, HQ, topk]`` block ids are written, so memory is O(N * HQ * topk).

Exact order without sorting (score, index) pairs: each score becomes one int64 *key*, the score's
order-preserving integer bits in the high word and ``2**31 - 1 - block`` in the low word. Comparing keys
compares scores, and among equal scores the lower block index wins (the reference's tie rule); keys are
distinct, so "the maximum" and "the minimum" always name one entry. A tile updates the running list in
as many rounds as its best query needs (a round moves the tile's best key in over the list's worst).
This is cheaper than a bitonic merge once the list is warm, and, unlike ``tl.topk``, runs at numpy speed
in the Triton interpreter that CI uses.

Scores are float32-accurate although the tensor-core operands are 16-bit: each float32 centroid is split
into ``hi + lo`` in the input dtype and the query is multiplied with both (``q`` itself is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmoba.routing.centroids import block_centroids
from flashmoba.routing.result import BlockIndex, block_layout, build_block_index

_INVALID_KEY = tl.constexpr(-(2**63))  # below the key of every real score, -inf included
_MAX_KEY = tl.constexpr(2**63 - 1)
_LOW_WORD = tl.constexpr(2**31 - 1)


@triton.jit
def _score_keys(scores, blocks, valid):
    """int64 keys ordering (score desc, block asc); invalid or NaN scores get the smallest key."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == signed int order
    keys = (ordered.to(tl.int64) << 32) | (-blocks + _LOW_WORD).to(tl.int64)
    return tl.where(valid & (scores == scores), keys, _INVALID_KEY)


@triton.jit
def _route_topk_kernel(
    Q, C, Indices,
    cu_seqlens, cu_blocks, cu_tiles, tile_seq,
    stride_qn, stride_qh,
    stride_cg, stride_ch,
    stride_in, stride_ih,
    num_seqs,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT_CENTROIDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tile_seq + pid)
    if seq >= num_seqs:
        return
    seq_start = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - seq_start
    first_block = tl.load(cu_blocks + seq)
    num_blocks = tl.load(cu_blocks + seq + 1) - first_block
    tile_start = (pid - tl.load(cu_tiles + seq)) * BLOCK_M

    pos = tile_start + tl.arange(0, BLOCK_M)  # positions local to the sequence
    row_ok = pos < seq_len
    own = pos // BLOCK_SIZE
    rows = (seq_start + pos).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + rows[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Causal: the own block is forced, so only TOPK - 1 places are contested, by blocks before it.
    PICKS: tl.constexpr = TOPK - 1 if CAUSAL else TOPK
    if CAUSAL:
        num_scan = tl.minimum(num_blocks, (tl.minimum(seq_len, tile_start + BLOCK_M) - 1) // BLOCK_SIZE)
    else:
        num_scan = num_blocks
    if PICKS == 0:
        num_scan = 0

    # The running top-PICKS keys of every query, unordered. Empty slots hold distinct invalid keys so
    # that "replace the minimum" replaces exactly one; slots >= PICKS hold the largest key, never replaced.
    col = tl.arange(0, K_PAD)
    best = tl.where(col < PICKS, col.to(tl.int64) + _INVALID_KEY, _MAX_KEY)
    best = tl.broadcast_to(best[None, :], [BLOCK_M, K_PAD])
    c_base = C + first_block.to(tl.int64) * stride_cg + (h // GROUP) * stride_ch
    for j0 in range(0, num_scan, BLOCK_N):
        blocks = j0 + tl.arange(0, BLOCK_N)
        cent = tl.load(c_base + blocks[:, None] * stride_cg + d[None, :],
                       mask=(blocks < num_scan)[:, None] & d_ok[None, :], other=0.0)
        if SPLIT_CENTROIDS:
            hi = cent.to(q.dtype)
            lo = (cent - hi.to(tl.float32)).to(q.dtype)
            scores = tl.dot(q, tl.trans(hi))
            scores = tl.dot(q, tl.trans(lo), scores)
        else:
            scores = tl.dot(q, tl.trans(cent), input_precision="ieee")
        valid = (blocks < num_scan)[None, :]
        if CAUSAL:
            valid = valid & (blocks[None, :] < own[:, None])
        keys = _score_keys(scores, blocks[None, :], valid)
        # Each round moves the tile's best key into the running list where it beats that list's worst;
        # a row needs at most min(#keys above its worst, PICKS) rounds, and most tiles need few.
        worst = tl.min(best, axis=1)
        rounds = tl.max(tl.minimum(tl.sum((keys > worst[:, None]).to(tl.int32), axis=1), PICKS), axis=0)
        for _ in range(rounds):
            top = tl.max(keys, axis=1)
            worst = tl.min(best, axis=1)
            better = top > worst
            best = tl.where(better[:, None] & (best == worst[:, None]), top[:, None], best)
            keys = tl.where(keys == top[:, None], _INVALID_KEY, keys)

    # Block ids of the picks plus the own block, ascending: repeated minimum extraction (ids are
    # distinct; empty slots hold distinct ids >= NONE and end up as the -1 padding).
    NONE: tl.constexpr = 2**30
    picked = (col[None, :] < PICKS) & (best > _INVALID_KEY + K_PAD)
    ids = tl.where(picked, -best.to(tl.int32) + _LOW_WORD, NONE + col[None, :])
    if CAUSAL:
        ids = tl.where(col[None, :] == PICKS, own[:, None], ids)
    ordered = tl.full([BLOCK_M, K_PAD], -1, dtype=tl.int32)
    for i in range(TOPK):
        smallest = tl.min(ids, axis=1)
        ordered = tl.where((col[None, :] == i) & (smallest < NONE)[:, None], smallest[:, None], ordered)
        ids = tl.where(ids == smallest[:, None], _LOW_WORD, ids)
    tl.store(Indices + rows[:, None] * stride_in + h * stride_ih + col[None, :], ordered,
             mask=row_ok[:, None] & (col[None, :] < TOPK))


def route_topk(
    q: torch.Tensor,
    centroids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    layout=None,
) -> torch.Tensor:
    """Top-k blocks of every query token from precomputed centroids.

    Args:
        q: ``[N, HQ, D]``; centroids: float32 ``[num_blocks_max, HKV, D]`` from :func:`block_centroids`.
        layout: ``block_layout(cu_seqlens, N, block_size)`` if the caller has it already.

    Returns:
        int32 ``[N, HQ, topk]``: local block ids, ascending, -1 padded.
    """
    N, HQ, D = q.shape
    HKV = centroids.shape[1]
    indices = torch.full((N, HQ, topk), -1, dtype=torch.int32, device=q.device)
    if N == 0:
        return indices
    q = q if q.stride(-1) == 1 else q.contiguous()
    K_PAD = triton.next_power_of_2(topk)
    BLOCK_M = 64 if K_PAD <= 16 else 32
    BLOCK_N = max(64, K_PAD)
    BLOCK_D = triton.next_power_of_2(D)
    cu_blocks, _, _ = layout or block_layout(cu_seqlens, N, block_size)
    cu_tiles, tile_seq, num_tiles_max = block_layout(cu_seqlens, N, BLOCK_M)
    _route_topk_kernel[(num_tiles_max, HQ)](
        q, centroids, indices,
        cu_seqlens, cu_blocks, cu_tiles, tile_seq,
        q.stride(0), q.stride(1),
        centroids.stride(0), centroids.stride(1),
        indices.stride(0), indices.stride(1),
        cu_seqlens.numel() - 1,
        GROUP=HQ // HKV, HEAD_DIM=D, BLOCK_SIZE=block_size, TOPK=topk, K_PAD=K_PAD,
        CAUSAL=causal, SPLIT_CENTROIDS=q.dtype != torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return indices


def route_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    layout=None,
) -> tuple[torch.Tensor, BlockIndex]:
    """The three routing stages: centroids, fused top-k, block -> query index.

    Args:
        q: ``[N, HQ, D]``; k: ``[N, HKV, D]``; cu_seqlens: int32/int64 ``[S + 1]``.
        layout: ``block_layout(cu_seqlens, N, block_size)`` if the caller has it already (computed
            once here otherwise and shared by the three stages).

    Returns:
        ``(indices int32 [N, HQ, topk], BlockIndex)``; no host synchronisation.
    """
    layout = layout or block_layout(cu_seqlens, q.shape[0], block_size)
    centroids = block_centroids(k, cu_seqlens, block_size, layout)
    indices = route_topk(q, centroids, cu_seqlens, block_size, topk, causal, layout)
    return indices, build_block_index(indices, cu_seqlens, block_size, layout)
