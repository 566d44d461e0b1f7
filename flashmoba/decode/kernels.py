"""Sparse MoBA decoding in Triton, flash-decoding style: route, attend the selected blocks in parallel, combine.

Three launches per call, none of which reads a device value on the host:

1. ``_decode_route_kernel``, grid ``(B * Tq, HKV, route_splits)``: each program scores a tile of
   ``BLOCK_NB`` complete blocks of one sequence against the centroids (``block_sums / block_size``,
   rounded to the keys' dtype) for the query heads of one KV group, and keeps the tile's best
   ``topk - 1`` blocks per head (or per group with ``shared_kv_routing``), ties to the lower block index.
2. ``_decode_attend_kernel``, grid ``(B * Tq * routes, topk * splits_per_block)``: program ``(r, slot, sub)``
   finds the ``slot``-th best block of route ``r`` among the tiles' candidates (the last slot is the own
   block, attended causally up to the query), attends one ``1 / splits_per_block`` share of it, and writes
   a partial output normalised by its own sum-exp, with its log-sum-exp.
3. ``_decode_combine_kernel``, grid ``(B * Tq, HQ)``: merges the partials of each query head.

A *route* is one query head (per-head routing) or one KV head with its whole query group (shared routing:
one selection per group, each selected block read once for the group). When every earlier block of a
query fits in ``topk - 1`` places there is nothing to choose and slot ``j`` is block ``j``; when that holds
for the longest possible sequence the routing launch is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_fwd"]

ROUTE_TILE = 64  # blocks scored per routing program
MIN_DOT = 16  # smallest tl.dot operand dimension


@triton.jit
def _decode_route_kernel(
    Q,
    SUMS,
    SEQLENS,
    CAND_SCORE,
    CAND_BLOCK,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_sb,
    stride_sn,
    stride_sh,
    num_queries,
    head_dim,
    block_size,
    num_routes,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    SHARED: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * Tq + i
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    b = row // num_queries
    seqlen = tl.load(SEQLENS + b)
    own = (seqlen - num_queries + row % num_queries) // block_size
    first = split * BLOCK_NB
    if first < own:  # tiles past the own block have nothing eligible; the attend kernel ignores them
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        g = tl.arange(0, GROUP_P)
        q = tl.load(
            Q
            + b.to(tl.int64) * stride_qb
            + (row % num_queries) * stride_qt
            + (kv_head * GROUP + g)[:, None] * stride_qh
            + d[None, :],
            mask=(g < GROUP)[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        blocks = first + tl.arange(0, BLOCK_NB)
        eligible = blocks < own
        centroids = (
            tl.load(
                SUMS
                + b.to(tl.int64) * stride_sb
                + blocks.to(tl.int64)[:, None] * stride_sn
                + kv_head * stride_sh
                + d[None, :],
                mask=eligible[:, None] & d_ok[None, :],
                other=0.0,
            )
            / block_size
        )
        # Rounded to the keys' dtype as the prefill router stores them, then scored exactly in fp32.
        centroids = centroids.to(Q.dtype.element_ty).to(tl.float32)
        scores = tl.dot(q, tl.trans(centroids), input_precision="ieee")  # [GROUP_P, BLOCK_NB] fp32
        if SHARED:
            scores = tl.sum(scores, axis=0, keep_dims=True)  # padded heads score 0
            routes = kv_head + tl.zeros([1], dtype=tl.int32)
            route_ok = routes >= 0
        else:
            routes = kv_head * GROUP + g
            route_ok = g < GROUP
        scores = tl.where(eligible[None, :], scores, float("-inf"))
        out = ((row * num_routes + routes).to(tl.int64) * num_splits + split) * KEEP
        for place in tl.static_range(KEEP):
            best = tl.max(scores, axis=1)
            pick = tl.min(tl.where(scores == best[:, None], blocks[None, :], 2147483647), axis=1)
            tl.store(CAND_SCORE + out + place, best, mask=route_ok)
            tl.store(CAND_BLOCK + out + place, tl.where(best > float("-inf"), pick, -1), mask=route_ok)
            scores = tl.where(blocks[None, :] == pick[:, None], float("-inf"), scores)


@triton.jit
def _decode_attend_kernel(
    Q,
    K,
    V,
    SEQLENS,
    STARTS,
    CAND_SCORE,
    CAND_BLOCK,
    O_PART,
    LSE_PART,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    num_queries,
    num_heads,
    head_dim,
    block_size,
    num_routes,
    num_splits,
    chunk,
    scale,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    KEEP: tl.constexpr,
    KEEP_P: tl.constexpr,
    SPLITS_P: tl.constexpr,
    ROUTE_NB: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    route_row = tl.program_id(0)  # (b * Tq + i) * num_routes + route
    part = tl.program_id(1)  # slot * SUB + sub
    row = route_row // num_routes
    route = route_row % num_routes
    b = row // num_queries
    i = row % num_queries
    seqlen = tl.load(SEQLENS + b)
    start = tl.load(STARTS + b).to(tl.int64)
    pos = seqlen - num_queries + i
    own = pos // block_size
    slot = part // SUB

    # Which block this slot attends: the own block in the last slot, else the slot-th best earlier block.
    block = tl.where(slot == KEEP, own, tl.where(slot < own, slot, -1))
    if (slot < KEEP) & (own > KEEP):
        sp = tl.arange(0, SPLITS_P)
        kk = tl.arange(0, KEEP_P)
        offs = (route_row.to(tl.int64) * num_splits + sp[:, None]) * KEEP + kk[None, :]
        valid = (sp[:, None] < tl.cdiv(own, ROUTE_NB)) & (kk[None, :] < KEEP)
        cand = tl.load(CAND_SCORE + offs, mask=valid, other=float("-inf"))
        cand_block = tl.load(CAND_BLOCK + offs, mask=valid, other=-1)
        # The best candidate (ties to the lower block), then slot times: drop it and take the next best.
        best = tl.max(tl.max(cand, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(cand == best, cand_block, 2147483647), axis=1), axis=0)
        for _ in range(slot):
            cand = tl.where(cand_block == pick, float("-inf"), cand)
            best = tl.max(tl.max(cand, axis=1), axis=0)
            pick = tl.min(tl.min(tl.where(cand == best, cand_block, 2147483647), axis=1), axis=0)
        block = tl.where(best > float("-inf"), pick, -1)
    block_end = tl.where(slot == KEEP, pos + 1, (block + 1) * block_size)
    lo = block * block_size + (part % SUB) * chunk
    hi = tl.where(block >= 0, tl.minimum(lo + chunk, block_end), lo)

    m = tl.arange(0, BLOCK_M)
    heads = route * HEADS + m
    head_ok = m < HEADS
    kv_head = route * HEADS // GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + i * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=head_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        rows = (start + n)[:, None]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    # An empty share (unused slot, or past the causal end) leaves lse = -inf and a zero output.
    filled = l_i > 0
    l_safe = tl.where(filled, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(filled, m_i + tl.log(l_safe), float("-inf"))
    parts = tl.num_programs(1)
    at = (row * num_heads + heads).to(tl.int64) * parts + part
    tl.store(O_PART + at[:, None] * head_dim + d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + at, lse, mask=head_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART,
    LSE_PART,
    OUT,
    LSE,
    stride_ob,
    stride_ot,
    stride_oh,
    num_queries,
    num_heads,
    head_dim,
    num_parts,
    PARTS_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, PARTS_P)
    p_ok = p < num_parts
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    at = (row * num_heads + head).to(tl.int64) * num_parts + p
    lse_part = tl.load(LSE_PART + at, mask=p_ok, other=float("-inf"))
    top = tl.max(lse_part, axis=0)  # finite: the own block always holds the query's own key
    weight = tl.exp(lse_part - top)
    o_part = tl.load(O_PART + at[:, None] * head_dim + d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * o_part, axis=0) / total
    b = row // num_queries
    tl.store(
        OUT + b.to(tl.int64) * stride_ob + (row % num_queries) * stride_ot + head * stride_oh + d,
        out.to(OUT.dtype.element_ty),
        mask=d_ok,
    )
    tl.store(LSE + row * num_heads + head, top + tl.log(total))


def _splits_per_block(device: torch.device, programs: int, block_size: int) -> int:
    """Split each selected block over more programs until the grid covers the GPU about twice."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while programs * splits < target and block_size // (2 * splits) >= 32:
        splits *= 2
    return splits


def decode_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_starts: torch.Tensor,
    block_sums: torch.Tensor,
    block_size: int,
    topk: int,
    shared_kv_routing: bool,
    softmax_scale: float,
    splits_per_block: int | None = None,
):
    """Launch routing, attention and combine for the newest ``Tq`` tokens of every cached sequence.

    Args:
        q: ``[B, Tq, HQ, D]``; k_cache, v_cache: ``[B, S, HKV, D]`` (any strides, unit stride on D).
        cache_seqlens, cache_starts: int32 ``[B]``; block_sums: float32 ``[B, NB, HKV, D]``.
        splits_per_block: programs per selected block (default: enough to fill the GPU).

    Returns:
        ``(out [B, Tq, HQ, D] in q's dtype, lse [B, Tq, HQ] float32)``.
    """
    B, Tq, HQ, D = q.shape
    S, HKV = k_cache.shape[1], k_cache.shape[2]
    group = HQ // HKV
    keep = topk - 1
    routes = HKV if shared_kv_routing else HQ
    heads_per_route = group if shared_kv_routing else 1
    block_d = max(MIN_DOT, triton.next_power_of_2(D))
    # Blocks before the own block of the longest possible sequence: if they fit in keep places, no routing.
    max_earlier = (S - 1) // block_size
    num_splits = triton.cdiv(max(max_earlier, 1), ROUTE_TILE)
    rows = B * Tq
    cand_shape = (rows, routes, num_splits, keep) if max_earlier > keep else (1,)
    cand_score = torch.empty(cand_shape, dtype=torch.float32, device=q.device)
    cand_block = torch.empty(cand_shape, dtype=torch.int32, device=q.device)
    if max_earlier > keep:
        _decode_route_kernel[(rows, HKV, num_splits)](
            q,
            block_sums,
            cache_seqlens,
            cand_score,
            cand_block,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            block_sums.stride(0),
            block_sums.stride(1),
            block_sums.stride(2),
            Tq,
            D,
            block_size,
            routes,
            num_splits,
            GROUP=group,
            GROUP_P=max(MIN_DOT, triton.next_power_of_2(group)),
            SHARED=shared_kv_routing,
            KEEP=keep,
            BLOCK_NB=ROUTE_TILE,
            BLOCK_D=block_d,
        )
    if splits_per_block is None:
        splits_per_block = _splits_per_block(q.device, rows * routes * topk, block_size)
    chunk = triton.cdiv(block_size, splits_per_block)
    parts = topk * splits_per_block
    o_part = torch.empty(rows * HQ * parts, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(rows * HQ * parts, dtype=torch.float32, device=q.device)
    _decode_attend_kernel[(rows * routes, parts)](
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        cache_starts,
        cand_score,
        cand_block,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        Tq,
        HQ,
        D,
        block_size,
        routes,
        num_splits,
        chunk,
        softmax_scale,
        GROUP=group,
        HEADS=heads_per_route,
        BLOCK_M=max(MIN_DOT, triton.next_power_of_2(heads_per_route)),
        KEEP=keep,
        KEEP_P=triton.next_power_of_2(max(keep, 1)),
        SPLITS_P=triton.next_power_of_2(num_splits),
        ROUTE_NB=ROUTE_TILE,
        SUB=splits_per_block,
        BLOCK_N=max(MIN_DOT, min(64, triton.next_power_of_2(chunk))),
        BLOCK_D=block_d,
    )
    out = torch.empty(B, Tq, HQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    _decode_combine_kernel[(rows, HQ)](
        o_part,
        lse_part,
        out,
        lse,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        Tq,
        HQ,
        D,
        parts,
        PARTS_P=triton.next_power_of_2(parts),
        BLOCK_D=block_d,
    )
    return out, lse
