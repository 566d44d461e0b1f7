"""The naive definition of MoBA decoding over a KV cache: readable first, the oracle of the decode kernels.

Plain PyTorch, any device. Attention is computed in ``promote(dtype, float32)`` (float64 inputs give a
float64 oracle) unless a ``compute_dtype`` is given; routing always in the precision of the block sums
(or finer), as the kernels do, so that a low-precision reference attends the same blocks.

For query ``i`` of the ``Tq`` newest tokens of sequence ``b`` (local position ``t = seqlens[b] - Tq + i``):

* its own block ``t // block_size`` is always attended, causally (keys ``own * block_size .. t``);
* the other ``topk - 1`` are the best-scoring blocks ``j < own`` (all complete), scored against the
  centroid ``block_sums[b, j] / block_size`` rounded to the keys' dtype: per query head against its KV
  head's centroid, or, with ``shared_kv_routing``, by the sum of the scores of the KV group's query
  heads (one selection per token and KV head); ties: the lower block index wins.

Per query head this is exactly the causal rule of ``flashmoba.reference`` at position ``t``
(``flashmoba.reference.select_blocks``, applied to the scores above).
"""

from __future__ import annotations

import math

import torch

from flashmoba.reference import select_blocks

__all__ = ["decode"]


def _decode_one(q, k, v, block_sums, block_size, topk, shared_kv_routing, scale):
    """One sequence. q ``[Tq, HQ, D]``, k/v ``[L, HKV, D]``, block_sums ``[>= ceil(L / bs), HKV, D]``."""
    (Tq, HQ, _), (L, HKV, _) = q.shape, k.shape
    group = HQ // HKV
    pos = torch.arange(L - Tq, L, device=q.device)
    own = pos // block_size
    n = -(-L // block_size)
    route_dtype = torch.promote_types(q.dtype, block_sums.dtype)
    centroids = (block_sums[:n].to(route_dtype) / block_size).to(k.dtype).to(route_dtype)
    centroids = centroids.repeat_interleave(group, dim=1)  # [n, HQ, D]
    scores = torch.einsum("thd,nhd->thn", q.to(route_dtype), centroids)
    if shared_kv_routing:
        scores = scores.view(Tq, HKV, group, n).sum(2, keepdim=True).expand(Tq, HKV, group, n).reshape(Tq, HQ, n)
    selected = select_blocks(scores, own[:, None].expand(Tq, HQ), topk, causal=True)
    key_pos = torch.arange(L, device=q.device)
    allowed = selected[..., key_pos // block_size] & (key_pos[None, None, :] <= pos[:, None, None])
    logits = torch.einsum("thd,shd->ths", q, k.repeat_interleave(group, dim=1)) * scale
    logits = logits.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [Tq, HQ]
    out = torch.einsum("ths,shd->thd", torch.exp(logits - lse[..., None]), v.repeat_interleave(group, dim=1))
    return out, lse


def decode(
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
    compute_dtype: torch.dtype | None = None,
):
    """MoBA attention of the newest ``Tq`` tokens of every sequence against its cached keys and values.

    Args:
        q: ``[B, Tq, HQ, D]`` queries of the last ``Tq`` tokens of each sequence.
        k_cache, v_cache: ``[B, S, HKV, D]``; sequence ``b`` is rows ``starts[b] : starts[b] + seqlens[b]``,
            the new tokens' keys and values included.
        cache_seqlens, cache_starts: int ``[B]``.
        block_sums: ``[B, NB, HKV, D]`` running key sums per block.
        compute_dtype: the attention's arithmetic (default ``promote(q.dtype, float32)``).

    Returns:
        ``(out [B, Tq, HQ, D] in q's dtype, lse [B, Tq, HQ] in the compute dtype)``.
    """
    dtype = torch.promote_types(q.dtype, torch.float32) if compute_dtype is None else compute_dtype
    outs, lses = [], []
    for b, (length, start) in enumerate(zip(cache_seqlens.tolist(), cache_starts.tolist())):
        out, lse = _decode_one(
            q[b].to(dtype),
            k_cache[b, start : start + length].to(dtype),
            v_cache[b, start : start + length].to(dtype),
            block_sums[b],
            block_size,
            topk,
            shared_kv_routing,
            softmax_scale,
        )
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs).to(q.dtype), torch.stack(lses)
