"""MoBA attention as torch.library custom ops: autograd, fake (meta) implementations for torch.compile.

``flashmoba::moba_attn_fwd`` routes (centroids, top-k, block index) and runs the forward;
``flashmoba::moba_attn_bwd`` runs the backward from the saved block index. Both are opaque to
torch.compile (``fullgraph=True`` works) and contain no host synchronisation (CUDA-graph capturable).
"""

from __future__ import annotations

import torch

from flashmoba.attention.backward import attn_bwd
from flashmoba.attention.forward import attn_fwd
from flashmoba.routing.result import block_layout, entries_dtype, max_num_blocks
from flashmoba.routing.topk import route_triton


@torch.library.custom_op("flashmoba::moba_attn_fwd", mutates_args=())
def moba_attn_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out [N, HQ, D], softmax stats float32 [2, N, HQ] (see attn_fwd), block offsets, block entries)."""
    layout = block_layout(cu_seqlens, q.shape[0], block_size)
    _, block_index = route_triton(q, k, cu_seqlens, block_size, topk, causal, layout)
    cu_blocks, block_seq, _ = layout
    out, stats = attn_fwd(
        q,
        k,
        v,
        cu_seqlens,
        cu_blocks,
        block_seq,
        block_index.offsets,
        block_index.entries,
        topk,
        block_size,
        causal,
        scale,
        deterministic,
    )
    return out, stats, block_index.offsets, block_index.entries


@moba_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens, block_size, topk, causal, scale, deterministic):
    N, HQ, _ = q.shape
    num_blocks_max = max_num_blocks(N, block_size, cu_seqlens.shape[0] - 1)
    return (
        torch.empty_like(q),
        q.new_empty(2, N, HQ, dtype=torch.float32),
        q.new_empty(HQ * (num_blocks_max + 1) + 1, dtype=torch.int64),
        q.new_empty(HQ * N * topk, dtype=entries_dtype(N * topk)),
    )


@torch.library.custom_op("flashmoba::moba_attn_bwd", mutates_args=())
def moba_attn_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    cu_seqlens: torch.Tensor,
    offsets: torch.Tensor,
    entries: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv)."""
    cu_blocks, block_seq, _ = block_layout(cu_seqlens, q.shape[0], block_size)
    return attn_bwd(
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
        deterministic,
    )


@moba_attn_bwd_op.register_fake
def _(dout, q, k, v, out, stats, cu_seqlens, offsets, entries, block_size, topk, causal, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, block_size, topk, causal, scale, deterministic = inputs
    out, stats, offsets, entries = output
    ctx.save_for_backward(q, k, v, out, stats, cu_seqlens, offsets, entries)
    ctx.params = (block_size, topk, causal, scale, deterministic)
    ctx.mark_non_differentiable(stats, offsets, entries)


def _backward(ctx, dout, dstats, doffsets, dentries):
    q, k, v, out, stats, cu_seqlens, offsets, entries = ctx.saved_tensors
    dq, dk, dv = moba_attn_bwd_op(dout, q, k, v, out, stats, cu_seqlens, offsets, entries, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("flashmoba::moba_attn_fwd", _backward, setup_context=_setup_context)
