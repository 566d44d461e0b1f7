"""MoBA backward: key-block-parallel with recomputation (FlashAttention-2 style, gathered queries).

One program per (key block, KV head, key tile of ``BLOCK_N`` keys). It holds its keys, values and their
gradients on chip, walks the block -> query index of every query head that reads this KV head (so dK/dV are
summed over the GQA group without copies or atomics), and for each gathered tile of queries recomputes
``P`` from the forward's softmax statistics ``(r, lse2)`` (``flashmoba.attention.forward``):

    dV += P^T dO        dP = dO V^T        dS = P * (dP - delta)        dK += dS^T Q        dQ += dS K

``delta = rowsum(dO * O)`` comes from a small pre-pass. dQ rows receive one contribution per (selected
block, key tile): added with float32 atomics, or (``DETERMINISTIC``) written to one row per (pair, key tile)
and summed afterwards in a fixed order. The own block's tiles get the causal mask, as in the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmoba import configs
from flashmoba.attention.forward import LOG2E
from flashmoba.attention.tiles import gathered_queries, key_tile_of_program, segment_bounds


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DOut,
    Delta,
    num_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[r] = sum_d out[r, d] * dout[r, d] over rows r of the contiguous [N * HQ, D] views."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (r < num_rows)[:, None] & (d < HEAD_DIM)[None, :]
    offs = r.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + r, tl.sum(o * do, axis=1), mask=r < num_rows)


@triton.jit
def _attn_bwd_tile(
    Q,
    DO,
    Stats,
    Delta,
    DQ,
    Entries,
    QueryKeyRow,
    k,
    v,
    dk,
    dv,
    key_offset,
    key_ok,
    block_start,
    e_start,
    e_end,
    h,
    split,
    num_rows,
    stride_qn,
    stride_qh,
    stride_don,
    stride_doh,
    stride_dqn,
    stride_dqh,
    scale,
    scale_log2,
    HQ: tl.constexpr,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KEY_SPLITS,
    CAUSAL_MASK: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    KEYS_MAJOR: tl.constexpr,
    QUERY_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One gathered tile of up to BLOCK_M queries against this program's key tile."""
    e = e_start + tl.arange(0, BLOCK_M)
    row_ok = e < e_end
    t, pair = gathered_queries(Entries, e, row_ok, h, HQ, TOPK)
    if CAUSAL_MASK and QUERY_ROWS:  # the query's own key row (its position among the keys)
        krow = tl.load(QueryKeyRow + t, mask=row_ok, other=0).to(tl.int64)
    else:
        krow = t
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(Q + t[:, None] * stride_qn + h * stride_qh + d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + t[:, None] * stride_don + h * stride_doh + d[None, :], mask=io_mask, other=0.0)
    ref = tl.load(Stats + t * HQ + h, mask=row_ok, other=0.0)
    lse2 = tl.load(Stats + num_rows + t * HQ + h, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + t * HQ + h, mask=row_ok, other=0.0)

    # Exponents from the products' difference, as the forward formed them.
    if KEYS_MAJOR:
        # Tiles [BLOCK_N, BLOCK_M]: dV and dK come out of the dots without transposes, and four of the
        # five products have BLOCK_N rows (a 64-row multiple runs on Hopper's warpgroup MMA).
        s_t = (tl.dot(k, tl.trans(q), input_precision=PRECISION) - ref[None, :]) * scale_log2 - lse2[None, :]
        allowed = key_ok[:, None] & row_ok[None, :]
        if CAUSAL_MASK:  # int32 offsets from the block start (an int64 tile costs 2x registers)
            allowed = allowed & (key_offset[:, None] <= (krow - block_start).to(tl.int32)[None, :])
        p_t = tl.where(allowed, tl.exp2(s_t), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * scale
    else:
        # Tiles [BLOCK_M, BLOCK_N] for key tiles under 64 rows: three of the five products then have
        # BLOCK_M rows (S, dP, dQ) instead of one.
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) - ref[:, None]) * scale_log2 - lse2[:, None]
        allowed = row_ok[:, None] & key_ok[None, :]
        if CAUSAL_MASK:
            allowed = allowed & (key_offset[None, :] <= (krow - block_start).to(tl.int32)[:, None])
        p = tl.where(allowed, tl.exp2(s), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    if DETERMINISTIC:
        tl.store(DQ + (pair * KEY_SPLITS + split)[:, None] * HEAD_DIM + d[None, :], dq, mask=io_mask)
    else:
        tl.atomic_add(DQ + t[:, None] * stride_dqn + h * stride_dqh + d[None, :], dq, mask=io_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_kernel(
    Q,
    K,
    V,
    DO,
    Stats,
    Delta,
    DQ,
    DK,
    DV,
    Entries,
    Offsets,
    QueryKeyRow,
    cu_seqlens,
    cu_blocks,
    block_seq,
    num_rows,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_don,
    stride_doh,
    stride_dqn,
    stride_dqh,
    stride_dkn,
    stride_dkh,
    stride_dvn,
    stride_dvh,
    num_seqs,
    num_blocks_max,
    scale,
    scale_log2,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE,
    KEY_SPLITS,
    CAUSAL: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    QUERY_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    active, block_start, key_offset, key_ok, num_own = key_tile_of_program(
        g, split, cu_seqlens, cu_blocks, block_seq, num_seqs, BLOCK_SIZE, BLOCK_N, CAUSAL
    )
    if not active:
        return

    kpos = block_start + key_offset
    d = tl.arange(0, BLOCK_D)
    kv_mask = key_ok[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(K + kpos[:, None] * stride_kn + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kpos[:, None] * stride_vn + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for hh in range(GROUP):
        h = kvh * GROUP + hh
        seg_start, seg_end = segment_bounds(Offsets, h, g, num_blocks_max)
        # at most the segment: under context parallelism a block may have fewer own queries here
        own_end = tl.minimum(seg_start + num_own, seg_end)
        for e0 in range(seg_start, own_end, BLOCK_M):
            dk, dv = _attn_bwd_tile(
                Q,
                DO,
                Stats,
                Delta,
                DQ,
                Entries,
                QueryKeyRow,
                k,
                v,
                dk,
                dv,
                key_offset,
                key_ok,
                block_start,
                e0,
                own_end,
                h,
                split,
                num_rows,
                stride_qn,
                stride_qh,
                stride_don,
                stride_doh,
                stride_dqn,
                stride_dqh,
                scale,
                scale_log2,
                HQ,
                TOPK,
                HEAD_DIM,
                KEY_SPLITS,
                True,
                DETERMINISTIC,
                BLOCK_N >= 64,
                QUERY_ROWS,
                BLOCK_M,
                BLOCK_D,
                PRECISION,
            )
        for e0 in range(own_end, seg_end, BLOCK_M):
            dk, dv = _attn_bwd_tile(
                Q,
                DO,
                Stats,
                Delta,
                DQ,
                Entries,
                QueryKeyRow,
                k,
                v,
                dk,
                dv,
                key_offset,
                key_ok,
                block_start,
                e0,
                seg_end,
                h,
                split,
                num_rows,
                stride_qn,
                stride_qh,
                stride_don,
                stride_doh,
                stride_dqn,
                stride_dqh,
                scale,
                scale_log2,
                HQ,
                TOPK,
                HEAD_DIM,
                KEY_SPLITS,
                False,
                DETERMINISTIC,
                BLOCK_N >= 64,
                QUERY_ROWS,
                BLOCK_M,
                BLOCK_D,
                PRECISION,
            )

    tl.store(
        DK + kpos[:, None] * stride_dkn + kvh * stride_dkh + d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(DV + kpos[:, None] * stride_dvn + kvh * stride_dvh + d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


def attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
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
    """Gradients of MoBA attention (none through the routing).

    Args:
        dout, q, out: ``[N, HQ, D]``; k, v: ``[N, HKV, D]``; stats: float32 ``[2, N, HQ]``, the forward's
            softmax statistics (``flashmoba.attention.forward.attn_fwd``).
        Layout and index arguments, and ``query_key_rows``, as in ``flashmoba.attention.forward.attn_fwd``.

    Returns:
        ``(dq [N, HQ, D], dk [N, HKV, D], dv [N, HKV, D])`` in the input dtype.
    """
    N, HQ, D = q.shape
    HKV = k.shape[1]
    num_blocks_max = block_seq.numel()
    cfg = configs.attn_bwd(block_size, D, q.dtype, q.device)
    BLOCK_M, BLOCK_N = cfg.block_m, cfg.block_n
    BLOCK_D = triton.next_power_of_2(D)
    key_splits = triton.cdiv(block_size, BLOCK_N)
    dout = dout.contiguous()
    out = out.contiguous()

    delta = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(k)  # every key row belongs to a block, whose programs write it
    dv = torch.empty_like(v)
    if deterministic:
        dq_acc = torch.zeros(N * HQ * topk * key_splits, D, dtype=torch.float32, device=q.device)
    else:
        dq_acc = torch.zeros(N, HQ, D, dtype=torch.float32, device=q.device)
    if N > 0 and num_blocks_max > 0:
        BLOCK_R = 64
        _attn_bwd_delta_kernel[(triton.cdiv(N * HQ, BLOCK_R),)](
            out,
            dout,
            delta,
            N * HQ,
            HEAD_DIM=D,
            BLOCK_R=BLOCK_R,
            BLOCK_D=BLOCK_D,
        )
        _attn_bwd_kernel[(num_blocks_max, HKV, key_splits)](
            q,
            k,
            v,
            dout,
            stats,
            delta,
            dq_acc,
            dk,
            dv,
            entries,
            offsets,
            query_key_rows if query_key_rows is not None else delta,
            cu_seqlens,
            cu_blocks,
            block_seq,
            N * HQ,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            dout.stride(0),
            dout.stride(1),
            HQ * D,
            D,
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            cu_seqlens.numel() - 1,
            num_blocks_max,
            scale,
            scale * LOG2E,
            HQ=HQ,
            GROUP=HQ // HKV,
            TOPK=topk,
            HEAD_DIM=D,
            BLOCK_SIZE=block_size,
            KEY_SPLITS=key_splits,
            CAUSAL=causal,
            DETERMINISTIC=deterministic,
            QUERY_ROWS=query_key_rows is not None,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=configs.dot_precision(q.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    if deterministic:
        dq_acc = dq_acc.view(N, HQ, topk * key_splits, D).sum(dim=2)
    return dq_acc.to(q.dtype), dk, dv
