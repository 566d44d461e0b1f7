"""Public API: argument validation, batched <-> packed layout adapters, and backend dispatch.

This is the only module that chooses a backend. ``backend="auto"`` picks Triton for CUDA tensors and the
PyTorch reference otherwise; an explicit backend never falls back silently.

Validation reads ``cu_seqlens`` on the host (one synchronisation) when the tensors are eager; it is
skipped while torch.compile traces or a CUDA graph captures, so the compiled / captured path stays free
of host synchronisation (pass ``max_seqlen`` there, or nothing at all: the kernels do not need it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flashmoba._checks import (
    BACKENDS,
    TRITON_MAX_TOPK,
    TRITON_MIN_BLOCK,
    check_backend_support,
    check_bool,
    check_cu_seqlens,
    check_qkv,
    check_routing_args,
    resolve_backend,
)
from flashmoba.routing.result import BlockIndex, MoBARouting, block_layout, max_num_blocks

__all__ = ["moba_attn", "moba_attn_varlen", "moba_route_varlen", "BACKENDS"]


# ----------------------------------------------------------------------------------------------------
# validation


def _routing_shape(block_size: int, topk: int, num_tokens: int, num_seqs: int) -> tuple[int, int]:
    """``(block_size, topk)`` as the kernels see them: no larger than the batch can use.

    A block longer than every sequence is one block per sequence, whatever its nominal size, and no query
    can select more blocks than the batch has (``max_num_blocks``); clamping both keeps the results and
    bounds every allocation by the inputs' size. The block stays at least the Triton minimum so that the
    clamp never turns a valid call into a refused one.
    """
    block_size = min(block_size, max(num_tokens, TRITON_MIN_BLOCK))
    return block_size, min(topk, max_num_blocks(num_tokens, block_size, num_seqs))


# ----------------------------------------------------------------------------------------------------
# public functions


def moba_route_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    backend: str = "auto",
) -> MoBARouting:
    """Route every query token to its MoBA key blocks.

    Args:
        q: ``[N, HQ, D]`` packed queries.
        k: ``[N, HKV, D]`` packed keys, ``HQ % HKV == 0`` (query head ``h`` reads KV head ``h // (HQ // HKV)``).
        cu_seqlens: int32/int64 ``[S + 1]`` sequence boundaries (empty sequences allowed).
        max_seqlen: optional longest sequence length (checked, not needed by the kernels).
        block_size: tokens per key block. topk: blocks per query (the own block counts when causal).
        causal: own block forced plus the best ``topk - 1`` fully-past blocks; else plain top-k.
        backend: "auto", "reference" or "triton".

    Returns:
        ``MoBARouting``; ``.indices`` is int32 ``[N, HQ, topk]`` (local block ids, ascending,
        -1 padded) and ``.block_index`` the block -> query CSR view. A ``block_size`` longer than ``N`` is
        kept as ``max(N, 16)`` (one block per sequence either way).
    """
    check_qkv(q, k, None, 3, "[N, H, D]")
    block_size, topk = check_routing_args(block_size, topk, causal)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    backend = resolve_backend(backend, q.device)
    # The index has topk columns: no clamp, but a topk past every block of the batch and past the kernels'
    # limit would only allocate padding.
    block_size, usable = _routing_shape(block_size, topk, q.shape[0], cu_seqlens.numel() - 1)
    check_backend_support(backend, q, block_size, topk)
    if topk > max(usable, TRITON_MAX_TOPK):
        raise ValueError(
            f"topk must be <= {max(usable, TRITON_MAX_TOPK)} here (this batch has at most {usable} "
            f"blocks per sequence), got {topk}"
        )
    layout = block_layout(cu_seqlens, q.shape[0], block_size)
    block_index = None
    if backend == "reference":
        from flashmoba import reference

        indices = reference.route(q, k, cu_seqlens, block_size, topk, causal)
    else:
        from flashmoba.routing import route_triton

        indices, block_index = route_triton(q, k, cu_seqlens, block_size, topk, causal, layout)
    return MoBARouting(
        indices=indices,
        cu_seqlens=cu_seqlens,
        block_size=block_size,
        topk=topk,
        causal=causal,
        layout=layout,
        _block_index=block_index,
    )


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
):
    """MoBA attention over packed variable-length sequences.

    Args:
        q: ``[N, HQ, D]`` packed queries.
        k: ``[N, HKV, D]`` packed keys, ``HQ % HKV == 0`` (GQA/MQA without copies).
        v: ``[N, HKV, D]`` packed values.
        cu_seqlens: int32/int64 ``[S + 1]``; sequence ``s`` is tokens ``cu_seqlens[s]:cu_seqlens[s+1]``.
        max_seqlen: optional longest sequence length (checked, not needed by the kernels).
        block_size: tokens per key block (blocks start at each sequence's first token).
        topk: selected blocks per query and head (causal: the own block counts).
        causal: see ``flashmoba.reference`` for the exact rule.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log sum-exp ``[N, HQ]`` (float32; float64 for float64 inputs).
        backend: "auto" (Triton for CUDA tensors, reference otherwise), "reference" or "triton".
        deterministic: Triton only; bitwise reproducible forward and backward at the cost of
            ``N * HQ * topk * D`` float32 of scratch memory (the default accumulates with atomics).

    Returns:
        ``out [N, HQ, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    check_qkv(q, k, v, 3, "[N, H, D]")
    block_size, topk = check_routing_args(block_size, topk, causal, softmax_scale)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    return _attend(q, k, v, cu_seqlens, block_size, topk, causal, softmax_scale, return_lse, backend, deterministic)


def _attend(q, k, v, cu_seqlens, block_size, topk, causal, softmax_scale, return_lse, backend, deterministic):
    """Packed inputs whose shapes and sequence boundaries are checked -> the chosen backend."""
    backend = resolve_backend(backend, q.device)
    block_size, topk = _routing_shape(block_size, topk, q.shape[0], cu_seqlens.numel() - 1)
    check_backend_support(backend, q, block_size, topk)
    check_bool("return_lse", return_lse)
    check_bool("deterministic", deterministic)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        from flashmoba import reference

        out, lse = reference.attention(q, k, v, cu_seqlens, block_size, topk, causal, scale)
        lse = lse.float() if q.dtype != torch.float64 else lse
    else:
        from flashmoba.attention import moba_attn_triton

        out, lse = moba_attn_triton(q, k, v, cu_seqlens, block_size, topk, causal, scale, deterministic, return_lse)
    return (out, lse) if return_lse else out


def moba_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
):
    """MoBA attention over a batch of equal-length sequences.

    Args:
        q: ``[B, T, HQ, D]``.
        k: ``[B, T, HKV, D]`` with ``HQ % HKV == 0``.
        v: ``[B, T, HKV, D]``.
        block_size: as in ``moba_attn_varlen``, like every other argument.

    Returns:
        ``out [B, T, HQ, D]``, or ``(out, lse [B, T, HQ])`` when ``return_lse``.
    """
    check_qkv(q, k, v, 4, "[B, T, H, D]")
    B, T, HQ, D = q.shape
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=q.device) * T
    block_size, topk = check_routing_args(block_size, topk, causal, softmax_scale)
    res = _attend(
        q.reshape(B * T, HQ, D),
        k.reshape(B * T, k.shape[2], D),
        v.reshape(B * T, v.shape[2], D),
        cu_seqlens,
        block_size,
        topk,
        causal,
        softmax_scale,
        return_lse,
        backend,
        deterministic,
    )
    if return_lse:
        out, lse = res
        return out.view(B, T, HQ, D), lse.view(B, T, HQ)
    return res.view(B, T, HQ, D)


# ----------------------------------------------------------------------------------------------------
# internal: queries kept apart from their keys (context parallelism, flashmoba.distributed)


class QueryRouting(NamedTuple):
    """The routing of ``route_queries``, as ``attend_queries`` takes it."""

    indices: torch.Tensor  # int32 [Nq, HQ, topk], local block ids, ascending, -1 padded
    block_index: BlockIndex | None  # Triton: the block -> query view over the queries' rows
    block_size: int
    topk: int
    causal: bool
    backend: str


def _query_key_rows(cu_seqlens, query_cu_seqlens, query_positions):
    """int64 ``[Nq]``: each query's own key row, ``cu_seqlens[s] + position``."""
    num_queries = query_positions.shape[0]
    rows = torch.arange(num_queries, device=query_positions.device)
    seq = torch.searchsorted(query_cu_seqlens[1:].long(), rows, right=True)
    return cu_seqlens.long()[seq] + query_positions.long()


def route_queries(
    q, k, cu_seqlens, query_cu_seqlens, query_positions, *, block_size, topk, causal, backend
) -> QueryRouting:
    """The routing of queries that are not the keys' tokens: the rows ``query_cu_seqlens[s] :
    query_cu_seqlens[s + 1]`` of ``q [Nq, HQ, D]`` are sequence ``s``'s queries at the increasing positions
    ``query_positions [Nq]`` of the sequence, whose keys are ``k [N, HKV, D]`` with ``cu_seqlens``.

    The rule, the block clamp and the backends are those of ``moba_route_varlen`` on the whole
    sequences: the result is that call's rows at these positions. Shapes are the caller's to check (the
    context-parallel entry points do); the values of the positions are trusted.
    """
    block_size, topk = check_routing_args(block_size, topk, causal)
    backend = resolve_backend(backend, q.device)
    block_size, topk = _routing_shape(block_size, topk, k.shape[0], cu_seqlens.numel() - 1)
    check_backend_support(backend, q, block_size, topk)
    if backend == "reference":
        from flashmoba import reference

        indices = reference.route(q, k, cu_seqlens, block_size, topk, causal, query_cu_seqlens, query_positions)
        return QueryRouting(indices, None, block_size, topk, causal, backend)
    from flashmoba.routing import route_triton

    layout = block_layout(cu_seqlens, k.shape[0], block_size)
    indices, block_index = route_triton(
        q,
        k,
        cu_seqlens,
        block_size,
        topk,
        causal,
        layout,
        query_cu_seqlens=query_cu_seqlens,
        query_positions=query_positions.to(torch.int32),
    )
    return QueryRouting(indices, block_index, block_size, topk, causal, backend)


def attend_queries(
    q, k, v, cu_seqlens, query_cu_seqlens, query_positions, routing: QueryRouting, *, softmax_scale, return_lse
):
    """MoBA attention of the queries of ``route_queries`` over all keys, from that routing.

    Returns ``out [Nq, HQ, D]`` (or ``(out, lse [Nq, HQ])``), differentiable in q and in all of k and v:
    the rows of ``moba_attn_varlen``'s result at these queries.
    """
    check_routing_args(routing.block_size, routing.topk, routing.causal, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if routing.backend == "reference":
        from flashmoba import reference

        out, lse = reference.attention(
            q,
            k,
            v,
            cu_seqlens,
            routing.block_size,
            routing.topk,
            routing.causal,
            scale,
            indices=routing.indices,
            query_cu_seqlens=query_cu_seqlens,
            query_positions=query_positions,
        )
        lse = lse.float() if q.dtype != torch.float64 else lse
    else:
        from flashmoba.attention.queries import moba_attn_queries_triton

        out, lse = moba_attn_queries_triton(
            q,
            k,
            v,
            cu_seqlens,
            _query_key_rows(cu_seqlens, query_cu_seqlens, query_positions),
            routing.block_index,
            routing.block_size,
            routing.topk,
            routing.causal,
            scale,
            False,
            return_lse,
        )
    return (out, lse) if return_lse else out
