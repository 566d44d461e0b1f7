"""MoBA attention of queries kept apart from their keys, from a routing computed outside.

The engine's usual call routes and attends one packed batch whose queries are its keys' tokens. Under
context parallelism (``flashmoba.distributed``) a rank holds a part of each sequence's queries and
attends them over all of the sequence's keys: the queries are ``q [Nq, HQ, D]``, the keys ``k, v [N, HKV,
D]`` with their own ``cu_seqlens``, and ``query_key_rows [Nq]`` says which key row is each query's own token
(its position). The kernels are the engine's (``attn_fwd``,
``attn_bwd``) with that one indirection, used for the causal mask and the
row reference; the routing comes from ``flashmoba.routing.topk.route_triton`` with the same query
layout, so nothing here restates the routing rule.
"""

from __future__ import annotations

import math

import torch

from flashmoba.attention.backward import attn_bwd
from flashmoba.attention.forward import attn_fwd
from flashmoba.routing.result import BlockIndex, block_layout

__all__ = ["moba_attn_queries_triton"]


class _QueryAttention(torch.autograd.Function):
    """out, stats = attention of the queries over the keys; backward to dq [Nq], dk and dv [N] (all keys)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, query_key_rows, offsets, entries, block_size, topk, causal, scale, det):
        cu_blocks, block_seq, _ = block_layout(cu_seqlens, k.shape[0], block_size)
        out, stats = attn_fwd(
            q,
            k,
            v,
            cu_seqlens,
            cu_blocks,
            block_seq,
            offsets,
            entries,
            topk,
            block_size,
            causal,
            scale,
            det,
            query_key_rows,
        )
        ctx.save_for_backward(q, k, v, out, stats, cu_seqlens, query_key_rows, offsets, entries)
        ctx.params = (block_size, topk, causal, scale, det)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, dout, dstats):
        q, k, v, out, stats, cu_seqlens, query_key_rows, offsets, entries = ctx.saved_tensors
        block_size, topk, causal, scale, det = ctx.params
        if q.shape[0] == 0:  # no queries: no gradient anywhere (the kernels would leave dk, dv unwritten)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *[None] * 9
        cu_blocks, block_seq, _ = block_layout(cu_seqlens, k.shape[0], block_size)
        dq, dk, dv = attn_bwd(
            dout,
            q,
            k,
            v,
            out,
            stats,
            cu_seqlens,
            cu_blocks,
            block_seq,
            offsets,
            entries,
            topk,
            block_size,
            causal,
            scale,
            det,
            query_key_rows,
        )
        return dq, dk, dv, *[None] * 9


def moba_attn_queries_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    query_key_rows: torch.Tensor,
    block_index: BlockIndex,
    block_size: int,
    topk: int,
    causal: bool,
    scale: float,
    deterministic: bool,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton attention of queries at key rows, from their block index (arguments already validated).

    Args:
        q: ``[Nq, HQ, D]``; k, v: ``[N, HKV, D]``; cu_seqlens: the keys' ``[S + 1]``.
        query_key_rows: int64 ``[Nq]``, each query's own key row, increasing within each sequence.
        block_index: the block -> query view of the queries' routing (entries are pairs of ``q``'s rows).

    Returns:
        ``(out [Nq, HQ, D], lse float32 [Nq, HQ] natural log, or None unless return_lse)``; out is
        differentiable in q, k and v.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, stats = _QueryAttention.apply(
        q,
        k,
        v,
        cu_seqlens,
        query_key_rows,
        block_index.offsets,
        block_index.entries,
        block_size,
        topk,
        causal,
        scale,
        deterministic,
    )
    return out, (torch.add(stats[0] * scale, stats[1], alpha=math.log(2.0)) if return_lse else None)
