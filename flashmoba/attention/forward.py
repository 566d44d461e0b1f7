"""MoBA forward: key-block-centric "gather and densify" in one pass, against a per-row softmax reference.

Schedule. One program per (key block, KV head, key tile). It walks the block -> query index (see
``flashmoba.routing.result``) of the query heads that read this KV head, gathers ``BLOCK_M`` of those
queries into a dense tile, and runs them against the tile's keys on tensor cores. Every block has about
``topk * block_size`` queries whatever the sequence length, so tiles stay full even at 512K tokens, where a
query-block-centric schedule (the FlashMoBA paper's) gathers only a few rows per (query block, key block).

Merge. A query's keys are spread over ``topk`` programs, which run in no particular order, so no program
can know the row maximum that an online softmax rescales by. Each row gets a fixed reference instead, its
diagonal product ``r = q_t . k_t`` (the key ``t`` is always visible in causal mode, so its logit is a lower
bound of the row maximum), and every program adds ``sum_j w_j v_j`` and ``sum_j w_j`` with weights
``w_j = exp2(scale * log2(e) * (q . k_j - r))`` into float32 row accumulators. Both sums are exact for any
reference; the finalize kernel divides them. One pass over the queries, with no per-pair log-sum-exp
buffer and no second gather.

Softmax statistics. Exponents are formed as ``(q . k_j - r) * scale * log2(e)``: the difference of two
products before any scaling, so a large logit is rounded once (in the product), as PyTorch rounds it, and
not again after scaling. For the same reason the row's log-sum-exp is kept as the pair ``(r, lse2)`` with
``lse2 = log2(sum_j w_j)``, a number of the size of the row's spread of logits rather than of the logits
themselves; the backward forms ``P_j = exp2((q . k_j - r) * scale * log2(e) - lse2)`` from it. A single
float of the logits' size would round the normaliser, and with it every recomputed weight, by up to half
its last place: at logits in the hundreds that alone is twice PyTorch's error. The natural-log lse is
``scale * r + ln(2) * lse2``.

The rescue. The reference only has to keep the weights in range: a row fails when one of its keys lies
more than ``P_MAX`` (log2) above it (its weight, or the weight's 16-bit copy for the ``P @ V`` product,
would overflow), or when its sum is below one half (no visible key near the reference: possible only
without the causal diagonal). Programs record such a row's largest exponent (in causal mode only where
it overflows, so normally never; without the diagonal for every row). A row-wise kernel then moves each
failed row's reference to its largest logit and clears its sums, and a rescue pass of the same kernel
(``RESCUE``) recomputes those rows alone: it ends at once unless some row failed, and reads no keys unless
one of its program's queries did. The rescued rows are thereby computed with the same products as all
others, which the backward recomputes bit for bit. On random inputs no row fails; the rescue exists so
that no input is silently wrong (huge logits, a head that avoids its own token).

Accumulation. Atomics into one ``[N, HQ, D]`` row per query, or (``DETERMINISTIC``) a row per (pair, key
tile) that the finalize kernel sums in a fixed order.

Masking. In causal mode a block's own queries are the first ``len(block)`` entries of each of its
segments; only those tiles get the token-level causal mask. Routed queries are strictly later than the
block, so their tiles run unmasked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flashmoba import configs
from flashmoba.attention.tiles import gathered_queries, key_tile_of_program, segment_bounds

LOG2E = math.log2(math.e)


# Row maxima are recorded as ``max exponent + _MAX_OFFSET`` into a zero-filled buffer, so that one
# float atomic max works for negative exponents too; its rounding (2**-7) only moves the new reference.
_MAX_OFFSET = tl.constexpr(65536.0)


def max_weight_log2(dtype: torch.dtype) -> int:
    """``P_MAX``: the largest ``log2`` of a weight, so that the weight, sums of up to 2**20 of them times
    values, and the weight's copy in ``dtype`` for ``P @ V`` stay finite."""
    return 15 if dtype == torch.float16 else 64


@triton.jit
def _attn_fwd_row_ref_kernel(
    Q,
    K,
    RowRef,
    QueryKeyRow,
    num_tokens,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QUERY_ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``RowRef[t, h] = q[t, h] . k[t, h // GROUP]`` in float32 (``k[QueryKeyRow[t]]`` with QUERY_ROWS)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kvh = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < num_tokens
    mask = t_ok[:, None] & (d < HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)
    if QUERY_ROWS:
        krow = tl.load(QueryKeyRow + t64, mask=t_ok, other=0).to(tl.int64)
    else:
        krow = t64
    k = tl.load(K + krow[:, None] * stride_kn + kvh * stride_kh + d[None, :], mask=mask, other=0.0)
    for hh in range(GROUP):
        h = kvh * GROUP + hh
        q = tl.load(Q + t64[:, None] * stride_qn + h * stride_qh + d[None, :], mask=mask, other=0.0)
        tl.store(RowRef + t64 * HQ + h, tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1), mask=t_ok)


@triton.jit
def _attn_fwd_tile(
    Q,
    Entries,
    QueryKeyRow,
    RowRef,
    Acc,
    RowSum,
    RowMax,
    k,
    v,
    key_offset,
    key_ok,
    block_start,
    e_start,
    e_end,
    h,
    split,
    stride_qn,
    stride_qh,
    scale_log2,
    HQ: tl.constexpr,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KEY_SPLITS,
    CAUSAL_MASK: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    P_MAX: tl.constexpr,
    RECORD_ALL: tl.constexpr,
    RESCUE: tl.constexpr,
    QUERY_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One gathered tile of up to BLOCK_M queries against this program's key tile. ``RESCUE``: only the
    rows flagged in ``RowMax``, and nothing at all (no loads of Q) when the tile has none."""
    e = e_start + tl.arange(0, BLOCK_M)
    row_ok = e < e_end
    t, pair = gathered_queries(Entries, e, row_ok, h, HQ, TOPK)
    row = t * HQ + h
    if RESCUE:
        row_ok = row_ok & (tl.load(RowMax + row, mask=row_ok, other=0.0) != 0)
        any_row = tl.max(row_ok.to(tl.int32), axis=0) != 0
    else:
        any_row = True
    if any_row:
        d = tl.arange(0, BLOCK_D)
        io_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(Q + t[:, None] * stride_qn + h * stride_qh + d[None, :], mask=io_mask, other=0.0)
        ref = tl.load(RowRef + row, mask=row_ok, other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) - ref[:, None]) * scale_log2
        allowed = key_ok[None, :]
        if CAUSAL_MASK:  # in int32 offsets from the block start: an int64 [M, N] tile costs 2x registers
            if QUERY_ROWS:  # the query's own key row (its position among the keys)
                krow = tl.load(QueryKeyRow + t, mask=row_ok, other=0).to(tl.int64)
            else:
                krow = t
            allowed = allowed & (key_offset[None, :] <= (krow - block_start).to(tl.int32)[:, None])
        s = tl.where(allowed, s, -float("inf"))
        if not RESCUE:
            # Record the largest exponent where a weight would overflow (or everywhere, RECORD_ALL).
            s_max = tl.max(s, axis=1)
            record = row_ok & (s_max > -float("inf"))
            if not RECORD_ALL:
                record = record & (s_max > P_MAX)
            tl.atomic_max(RowMax + row, s_max + _MAX_OFFSET, mask=record, sem="relaxed")
        p = tl.exp2(s)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_sum = tl.sum(p, axis=1)
        if DETERMINISTIC:
            part = pair * KEY_SPLITS + split
            tl.store(Acc + part[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask)
            tl.store(RowSum + part, row_sum, mask=row_ok)
        else:
            tl.atomic_add(Acc + row[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask, sem="relaxed")
            tl.atomic_add(RowSum + row, row_sum, mask=row_ok, sem="relaxed")


@triton.jit
def _has_flagged_query(
    Entries,
    Offsets,
    RowMax,
    g,
    kvh,
    num_blocks_max,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Whether a query of block ``g``'s segments of KV head ``kvh`` is flagged (``RowMax != 0``)."""
    flagged = 0
    for hh in range(GROUP):
        h = kvh * GROUP + hh
        seg_start, seg_end = segment_bounds(Offsets, h, g, num_blocks_max)
        for e0 in range(seg_start, seg_end, BLOCK_M):
            e = e0 + tl.arange(0, BLOCK_M)
            row_ok = e < seg_end
            t, _ = gathered_queries(Entries, e, row_ok, h, HQ, TOPK)
            hit = tl.load(RowMax + t * HQ + h, mask=row_ok, other=0.0) != 0
            flagged = tl.maximum(flagged, tl.max(hit.to(tl.int32), axis=0))
    return flagged != 0


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Entries,
    Offsets,
    QueryKeyRow,
    RowRef,
    Acc,
    RowSum,
    RowMax,
    AnyFailed,
    cu_seqlens,
    cu_blocks,
    block_seq,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    num_seqs,
    num_blocks_max,
    scale_log2,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE,
    KEY_SPLITS,
    CAUSAL: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    P_MAX: tl.constexpr,
    RESCUE: tl.constexpr,
    QUERY_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (global block, KV head, key tile) of the main pass, or with ``RESCUE`` of the rescue pass
    (only the rows flagged in ``RowMax``, against their moved references)."""
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    active, block_start, key_offset, key_ok, num_own = key_tile_of_program(
        g, split, cu_seqlens, cu_blocks, block_seq, num_seqs, BLOCK_SIZE, BLOCK_N, CAUSAL
    )
    if RESCUE:  # nothing to do unless some row failed, and no keys to read unless one of ours did
        active = active & (tl.load(AnyFailed) != 0)
        if active:
            active = _has_flagged_query(Entries, Offsets, RowMax, g, kvh, num_blocks_max, HQ, GROUP, TOPK, BLOCK_M)
    if active:
        # This program's keys and values stay on chip while it walks the gathered queries.
        kpos = block_start + key_offset
        d = tl.arange(0, BLOCK_D)
        kv_mask = key_ok[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(K + kpos[:, None] * stride_kn + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kpos[:, None] * stride_vn + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)

        for hh in range(GROUP):
            h = kvh * GROUP + hh
            seg_start, seg_end = segment_bounds(Offsets, h, g, num_blocks_max)
            # at most the segment: under context parallelism a block may have fewer own queries here
            own_end = tl.minimum(seg_start + num_own, seg_end)
            # the own block's queries: token-level causal mask
            for e0 in range(seg_start, own_end, BLOCK_M):
                _attn_fwd_tile(
                    Q,
                    Entries,
                    QueryKeyRow,
                    RowRef,
                    Acc,
                    RowSum,
                    RowMax,
                    k,
                    v,
                    key_offset,
                    key_ok,
                    block_start,
                    e0,
                    own_end,
                    h,
                    split,
                    stride_qn,
                    stride_qh,
                    scale_log2,
                    HQ,
                    TOPK,
                    HEAD_DIM,
                    KEY_SPLITS,
                    True,
                    DETERMINISTIC,
                    P_MAX,
                    not CAUSAL,
                    RESCUE,
                    QUERY_ROWS,
                    BLOCK_M,
                    BLOCK_D,
                    PRECISION,
                )
            # routed queries lie after the block: no mask
            for e0 in range(own_end, seg_end, BLOCK_M):
                _attn_fwd_tile(
                    Q,
                    Entries,
                    QueryKeyRow,
                    RowRef,
                    Acc,
                    RowSum,
                    RowMax,
                    k,
                    v,
                    key_offset,
                    key_ok,
                    block_start,
                    e0,
                    seg_end,
                    h,
                    split,
                    stride_qn,
                    stride_qh,
                    scale_log2,
                    HQ,
                    TOPK,
                    HEAD_DIM,
                    KEY_SPLITS,
                    False,
                    DETERMINISTIC,
                    P_MAX,
                    not CAUSAL,
                    RESCUE,
                    QUERY_ROWS,
                    BLOCK_M,
                    BLOCK_D,
                    PRECISION,
                )


@triton.jit
def _row_sums(RowSum, r64, r_ok, PARTS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The weight sums of rows ``r64``: their ``PARTS`` partial sums, added in a fixed order."""
    row_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(PARTS):
        row_sum += tl.load(RowSum + r64 * PARTS + i, mask=r_ok, other=0.0)
    return row_sum


@triton.jit
def _attn_fwd_prepare_rescue_kernel(
    Acc,
    RowSum,
    RowMax,
    RowRef,
    AnyFailed,
    num_rows,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    PARTS: tl.constexpr,
    P_MAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rows that failed their reference: move the reference to the row's largest logit, clear the row's
    sums, and leave 1 in ``RowMax`` (0 for every other row) and in ``AnyFailed`` for the rescue pass."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    r64 = r.to(tl.int64)
    row_sum = _row_sums(RowSum, r64, r_ok, PARTS, BLOCK_R)
    recorded = tl.load(RowMax + r64, mask=r_ok, other=0.0)
    top = recorded - _MAX_OFFSET  # the largest exponent, where recorded (> 0)
    failed = r_ok & (((recorded > 0) & (top > P_MAX)) | ~(row_sum >= 0.5))
    shift = tl.where(recorded > 0, top / scale_log2, 0.0)
    ref = tl.load(RowRef + r64, mask=failed, other=0.0)
    tl.store(RowRef + r64, ref + shift, mask=failed)
    tl.store(RowMax + r64, failed.to(tl.float32), mask=r_ok)
    if tl.max(failed.to(tl.int32), axis=0) != 0:
        tl.atomic_max(AnyFailed, 1.0, sem="relaxed")
        for i in range(PARTS):
            tl.store(RowSum + r64 * PARTS + i, 0.0, mask=failed)
            for d0 in range(0, HEAD_DIM, BLOCK_R):
                d = d0 + tl.arange(0, BLOCK_R)
                tl.store(
                    Acc + (r64 * PARTS + i)[:, None] * HEAD_DIM + d[None, :],
                    0.0,
                    mask=failed[:, None] & (d < HEAD_DIM)[None, :],
                )


@triton.jit
def _attn_fwd_finalize_kernel(
    Acc,
    RowSum,
    Out,
    Lse2,
    num_rows,
    HEAD_DIM: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows ``t * HQ + h``: sum the ``PARTS`` partial accumulators in order, divide, write out and
    ``lse2 = log2(sum)``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    r64 = r.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(PARTS):  # in a fixed order (bitwise reproducible in deterministic mode)
        acc += tl.load(Acc + (r64 * PARTS + i)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    row_sum = _row_sums(RowSum, r64, r_ok, PARTS, BLOCK_R)
    tl.store(Out + r64[:, None] * HEAD_DIM + d[None, :], (acc / row_sum[:, None]).to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse2 + r64, tl.log2(row_sum), mask=r_ok)


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
    query_key_rows: torch.Tensor | None = None,
):
    """MoBA forward from a routing.

    Args:
        q: ``[N, HQ, D]``; k, v: ``[N, HKV, D]`` (last dim contiguous).
        cu_seqlens ``[S + 1]``, cu_blocks ``[S + 1]``, block_seq ``[G]``: sequence / block layout.
        offsets ``[HQ * (G + 1) + 1]``, entries ``[HQ * N * topk]``: the block -> query index
            (``flashmoba.routing.result``).
        topk: slots per (query, head); pair ids are ``(t * HQ + h) * topk + slot``.
        scale: the softmax scale, nonzero.
        query_key_rows: optional int64 ``[N]``: the queries are not the keys' tokens but these rows of
            ``k`` (``k, v`` then have their own length, which ``cu_seqlens`` describes; a query's causal
            mask and its reference row ``q . k`` are taken at its key row). The block index's entries are
            the queries' pairs.

    Returns:
        ``(out [N, HQ, D] in q's dtype, stats float32 [2, N, HQ])``: the softmax statistics ``(r, lse2)``
        of every row (module docstring; the natural-log lse is ``scale * r + ln(2) * lse2``), as the
        backward takes them.
    """
    N, HQ, D = q.shape
    HKV = k.shape[1]
    num_blocks_max = block_seq.numel()
    cfg = configs.attn_fwd(block_size, D, q.dtype, q.device)
    BLOCK_D = triton.next_power_of_2(D)
    key_splits = triton.cdiv(block_size, cfg.block_n)
    parts = topk * key_splits if deterministic else 1
    num_rows = N * HQ

    # One zero-filled float32 buffer: accumulators [rows, parts, D], row sums [rows, parts], row maxima,
    # and the flag that some row needs the rescue.
    scratch = torch.zeros(num_rows * parts * (D + 1) + num_rows + 1, dtype=torch.float32, device=q.device)
    acc = scratch[: num_rows * parts * D]
    row_sum = scratch[num_rows * parts * D : num_rows * parts * (D + 1)]
    row_max = scratch[num_rows * parts * (D + 1) : -1]
    any_failed = scratch[-1:]
    stats = torch.empty(2, N, HQ, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if N == 0:
        return out, stats
    scale_log2 = scale * LOG2E
    group = HQ // HKV
    p_max = max_weight_log2(q.dtype)
    BLOCK_T = max(16, 4096 // BLOCK_D)
    query_rows = query_key_rows is not None
    query_key_rows = query_key_rows if query_rows else stats
    _attn_fwd_row_ref_kernel[(triton.cdiv(N, BLOCK_T), HKV)](
        q,
        k,
        stats[0],
        query_key_rows,
        N,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        HQ=HQ,
        GROUP=group,
        HEAD_DIM=D,
        QUERY_ROWS=query_rows,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
    )
    BLOCK_R = max(16, min(64, 4096 // BLOCK_D))
    row_grid = (triton.cdiv(num_rows, BLOCK_R),)
    for rescue in (False, True):
        if rescue:
            _attn_fwd_prepare_rescue_kernel[row_grid](
                acc,
                row_sum,
                row_max,
                stats[0],
                any_failed,
                num_rows,
                scale_log2,
                HEAD_DIM=D,
                PARTS=parts,
                P_MAX=p_max,
                BLOCK_R=BLOCK_R,
            )
        _attn_fwd_kernel[(num_blocks_max, HKV, key_splits)](
            q,
            k,
            v,
            entries,
            offsets,
            query_key_rows,
            stats[0],
            acc,
            row_sum,
            row_max,
            any_failed,
            cu_seqlens,
            cu_blocks,
            block_seq,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cu_seqlens.numel() - 1,
            num_blocks_max,
            scale_log2,
            HQ=HQ,
            GROUP=group,
            TOPK=topk,
            HEAD_DIM=D,
            BLOCK_SIZE=block_size,
            KEY_SPLITS=key_splits,
            CAUSAL=causal,
            DETERMINISTIC=deterministic,
            P_MAX=p_max,
            RESCUE=rescue,
            QUERY_ROWS=query_rows,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=BLOCK_D,
            PRECISION=configs.dot_precision(q.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    _attn_fwd_finalize_kernel[row_grid](
        acc,
        row_sum,
        out,
        stats[1],
        num_rows,
        HEAD_DIM=D,
        PARTS=parts,
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
    )
    return out, stats
