"""Context-parallel MoBA attention: one sequence's queries split over the ranks of a group, exact.

Each rank holds its part of the sequence (``flashmoba.distributed.layout``) of q, k and v. The op

1. all-gathers k and v (two asynchronous all-gathers: ``gather_keys_values``);
2. as soon as the keys are in, routes the local queries against the block centroids of the whole sequence
   with the library's routing (``flashmoba.reference.select_blocks`` semantics, or the Triton router),
   each query at its position in the sequence, while the values are still in flight;
3. attends the local queries over the gathered keys and values (the engine's kernels with a query -> key
   row indirection on CUDA, ``flashmoba.reference.attention`` elsewhere);
4. in the backward, the gradients of the gathered keys and values (every rank's contributions to every
   block it read) are reduce-scattered back to their owners; dq stays local.

Why gather all keys rather than fetch only the selected blocks: a rank's queries select, over all their
heads, nearly every block of the sequence (``docs/distributed.md`` has the model and the table), so a
selective fetch would move almost as many bytes and add an index exchange. Routing needs only the block
centroids, but they are computed from the gathered keys at no extra transfer.

The result equals ``flashmoba.moba_attn`` / ``flashmoba.moba_attn_varlen`` on the whole sequence at
this rank's rows, forward and backward: the same centroids, the same routing rule and ties, the same
attention; only the order of floating-point sums differs.
"""

from __future__ import annotations

import torch

from flashmoba import api
from flashmoba._checks import check_choice, check_cu_seqlens, check_qkv
from flashmoba.distributed.comm import gather_keys_values, group_rank
from flashmoba.distributed.layout import LAYOUTS, check_length, local_positions
from flashmoba.nn.varlen import uniform_cu_seqlens

__all__ = ["context_parallel_moba_attn", "context_parallel_moba_attn_varlen", "varlen_queries"]


def varlen_queries(cu_seqlens: torch.Tensor, token_positions: torch.Tensor):
    """The query layout of a rank's tokens of a packed batch.

    Args:
        cu_seqlens: ``[S + 1]`` boundaries of the whole packed batch.
        token_positions: int64 ``[n]`` increasing indices (into the packed batch) of the rank's tokens.

    Returns:
        ``(query_cu_seqlens int32 [S + 1], query_positions int64 [n])``: sequence ``s``'s local tokens are
        rows ``query_cu_seqlens[s]:query_cu_seqlens[s + 1]``, at these positions of the sequence (counted
        from its start). A rank's tokens of one sequence are contiguous rows, since a sequence is a
        contiguous range of the packed batch and the rank's tokens are in increasing order.
    """
    bounds = cu_seqlens.long()
    seq = torch.searchsorted(bounds[1:], token_positions, right=True)
    counts = torch.bincount(seq, minlength=cu_seqlens.numel() - 1)
    query_cu = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=query_cu[1:])
    return query_cu, token_positions - bounds[seq]


def _attend(
    q, k, v, dim, cu_seqlens, query_cu, query_pos, block_size, topk, causal, scale, layout, group, backend, lse
):
    """Packed local queries ``q [n, HQ, D]``; local ``k, v`` gathered along ``dim`` and packed by ``cu_seqlens``."""
    routed = {}

    def route(k_full):  # between the keys' arrival and the values'
        routed["routing"] = api.route_queries(
            q.detach(),
            k_full.reshape(-1, *k_full.shape[-2:]),
            cu_seqlens,
            query_cu,
            query_pos,
            block_size=block_size,
            topk=topk,
            causal=causal,
            backend=backend,
        )

    k_full, v_full = gather_keys_values(k, v, dim, layout, group, on_keys=route)
    return api.attend_queries(
        q,
        k_full.reshape(-1, *k_full.shape[-2:]),
        v_full.reshape(-1, *v_full.shape[-2:]),
        cu_seqlens,
        query_cu,
        query_pos,
        routed["routing"],
        softmax_scale=scale,
        return_lse=lse,
    )


def context_parallel_moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    layout: str = "zigzag",
    group=None,
    backend: str = "auto",
):
    """MoBA attention of packed variable-length sequences whose tokens are split over the ranks of ``group``.

    The packed batch of ``N`` tokens (documents of any lengths, which may straddle rank boundaries) is
    sharded along its token dim by ``shard_sequence`` (``dim=0``, the same
    ``layout``); every rank passes its part and the boundaries of the whole batch.

    Args:
        q: ``[N / W, HQ, D]`` this rank's queries; k, v: ``[N / W, HKV, D]`` its keys and values (GQA:
            ``HQ % HKV == 0``); ``W`` is the group's size.
        cu_seqlens: int32/int64 ``[S + 1]`` boundaries of the whole packed batch (the same on every rank;
            blocks count from each sequence's start, as in ``flashmoba.moba_attn_varlen``).
        block_size: tokens per key block, as in ``flashmoba.moba_attn_varlen``.
        topk: selected blocks per query and head (causal: the own block counts).
        causal: the causal MoBA rule of ``flashmoba.reference``; else plain top-k.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log sum-exp of the rank's rows.
        backend: "auto" (Triton for CUDA tensors, the reference otherwise), "reference" or "triton".
        layout: "zigzag" (``N`` divisible by ``2W``) or "contiguous" (``N`` divisible by ``W``); see
            ``flashmoba.distributed.layout``.
        group: the process group of the ranks that share the batch (None: the default group).

    Returns:
        ``out [N / W, HQ, D]`` (and ``lse [N / W, HQ]`` with ``return_lse``): the rows of
        ``moba_attn_varlen`` on the whole batch at this rank's tokens. Differentiable in q, k and v.
    """
    check_qkv(q, k, v, 3, "[N_local, H, D]")
    check_choice("layout", layout, LAYOUTS)
    world_size, rank = group_rank(group)
    total = check_length("q (N = world_size * q.shape[0])", world_size * q.shape[0], world_size, layout)
    check_cu_seqlens(cu_seqlens, total, q.device)
    query_cu, query_pos = varlen_queries(cu_seqlens, local_positions(total, world_size, rank, layout, q.device))
    args = (cu_seqlens, query_cu, query_pos, block_size, topk, causal, softmax_scale, layout, group, backend)
    return _attend(q, k, v, 0, *args, return_lse)


def context_parallel_moba_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    layout: str = "zigzag",
    group=None,
    backend: str = "auto",
):
    """MoBA attention of a batch of equal-length sequences whose time dim is split over the ranks of ``group``.

    Every sequence of ``T`` tokens is sharded by ``shard_sequence`` (``dim=1``,
    the same ``layout``); every rank passes its part.

    Args:
        q: ``[B, T / W, HQ, D]`` this rank's queries; k, v: ``[B, T / W, HKV, D]``; ``W`` is the group's size.
        block_size: tokens per key block, as in ``flashmoba.moba_attn``.
        topk: selected blocks per query and head (causal: the own block counts).
        causal: the causal MoBA rule of ``flashmoba.reference``; else plain top-k.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log sum-exp of the rank's rows.
        backend: "auto" (Triton for CUDA tensors, the reference otherwise), "reference" or "triton".
        layout: "zigzag" (``T`` divisible by ``2W``: ``T / W`` even) or "contiguous" (any ``T / W``).
        group: the process group of the ranks that share the sequences (None: the default group).

    Returns:
        ``out [B, T / W, HQ, D]`` (and ``lse [B, T / W, HQ]``): ``moba_attn`` on the whole sequences at this
        rank's positions. Differentiable in q, k and v.
    """
    check_qkv(q, k, v, 4, "[B, T_local, H, D]")
    check_choice("layout", layout, LAYOUTS)
    world_size, rank = group_rank(group)
    batch, local, num_heads, head_dim = q.shape
    total = check_length("q (T = world_size * q.shape[1])", world_size * local, world_size, layout)
    device = q.device
    cu_seqlens = uniform_cu_seqlens(batch, total, device)
    query_cu = uniform_cu_seqlens(batch, local, device)
    query_pos = local_positions(total, world_size, rank, layout, device).repeat(batch)
    args = (cu_seqlens, query_cu, query_pos, block_size, topk, causal, softmax_scale, layout, group, backend)
    res = _attend(q.reshape(batch * local, num_heads, head_dim), k, v, 1, *args, return_lse)
    if return_lse:
        out, lse = res
        return out.view(batch, local, num_heads, head_dim), lse.view(batch, local, num_heads)
    return res.view(batch, local, num_heads, head_dim)
