"""The naive definition of MoBA: readable first, the correctness oracle of every test.

Everything here is plain PyTorch, runs on any device, supports autograd and any floating dtype.
It computes in ``promote(dtype, float32)`` (so float64 inputs give a float64 oracle) and materialises
one ``[HQ, L, L]`` attention matrix per sequence: fine for tests and demos, not for long contexts.

Semantics (per sequence of length L, per query token t and query head h):

* blocks of ``block_size`` tokens from the sequence start; the last block may be partial;
* centroid of block j = mean of its keys over the tokens it really has (per KV head), rounded to the
  keys' dtype as MoBA and FlashMoBA store it (a no-op for float32 and float64 keys);
* gate ``s[t, h, j] = <q[t, h], centroid[j, h // (HQ // HKV)]>`` (no scale); a block whose gate is
  -inf or NaN is never selected;
* causal: the own block ``t // block_size`` is always selected and counts toward ``topk``; the other
  ``topk - 1`` are the best-scoring blocks that end before the own block starts; a token-level causal
  mask applies inside the own block;
* non-causal: plain top-k over all blocks;
* ties: the lower block index wins (a stable descending sort);
* output = softmax(softmax_scale * q.k) @ v over the union of the selected blocks' keys.

Queries at positions. ``route`` and ``attention`` also take the queries of each sequence apart from
its keys (``query_cu_seqlens``, ``query_positions``): any subset of a sequence's tokens, each at its position
in the sequence, against all of the sequence's keys. The rule is the same; this is what a shard of a longer
sequence computes under context parallelism (``flashmoba.distributed``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "block_centroids",
    "route_scores",
    "select_blocks",
    "route",
    "attention",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sequences(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def block_centroids(k: torch.Tensor, block_size: int, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean key of every block of ONE sequence.

    Args:
        k: ``[L, HKV, D]`` keys of one sequence.
        block_size: tokens per block; the last block may be partial and is averaged over its length.
        compute_dtype: accumulation dtype; defaults to ``promote(k.dtype, float32)``.

    Returns:
        ``[ceil(L / block_size), HKV, D]``: the means rounded to k's dtype, returned in the compute dtype.
    """
    L, HKV, D = k.shape
    block_size = min(block_size, max(L, 1))  # a block longer than the sequence is one block
    n = -(-L // block_size)
    compute = compute_dtype or _compute_dtype(k.dtype)
    padded = k.new_zeros(n * block_size, HKV, D, dtype=compute)
    padded[:L] = k.to(compute)
    sums = padded.view(n, block_size, HKV, D).sum(1)
    lengths = torch.clamp(L - torch.arange(n, device=k.device) * block_size, max=block_size)
    return (sums / lengths.to(sums.dtype).view(n, 1, 1)).to(k.dtype).to(compute)


def route_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, compute_dtype: torch.dtype | None = None):
    """Gate scores of ONE sequence: ``[L, HQ, n_blocks]``, ``<q, centroid>`` in the compute dtype."""
    HQ, HKV = q.shape[1], k.shape[1]
    cent = block_centroids(k, block_size, compute_dtype).repeat_interleave(HQ // HKV, dim=1)  # [n, HQ, D]
    return torch.einsum("thd,nhd->thn", q.to(cent.dtype), cent)


def select_blocks(scores: torch.Tensor, own: torch.Tensor, topk: int, causal: bool) -> torch.Tensor:
    """The routing rule, the one place it is written: which blocks each query selects from its gate scores.

    Args:
        scores: ``[..., n]`` gate scores of ``n`` blocks (any float dtype).
        own: int ``[...]`` (broadcastable to ``scores.shape[:-1]``): each query's own block.
        topk: blocks per query; causal: the own block is forced and counts toward ``topk``, the other
            ``topk - 1`` are the best blocks ``j < own``; else plain top-k over all ``n``.

    Returns:
        bool ``[..., n]``: the selected blocks. A -inf or NaN gate never wins a place; among equal
        scores the lower block index wins (a stable descending sort).
    """
    n = scores.shape[-1]
    blocks = torch.arange(n, device=scores.device)
    own = own[..., None].expand(scores.shape)
    eligible = (blocks < own) if causal else torch.ones_like(scores, dtype=torch.bool)
    eligible = eligible & (scores > -math.inf)  # False for -inf and NaN
    picks = min(topk - 1 if causal else topk, n)
    order = torch.sort(scores.masked_fill(~eligible, -math.inf), dim=-1, descending=True, stable=True)
    order = order.indices[..., :picks]
    picked = torch.gather(eligible, -1, order)
    selected = torch.zeros(*scores.shape[:-1], n + 1, dtype=torch.bool, device=scores.device)
    selected.scatter_(-1, torch.where(picked, order, n), True)  # column n swallows unfilled places
    selected = selected[..., :n]
    return selected | (blocks == own) if causal else selected


def _route_one(q, k, block_size, topk, causal, positions):
    """Selected blocks of the queries ``q [Lq, HQ, D]`` at ``positions [Lq]`` of one sequence with keys
    ``k [L, HKV, D]``, as ``[Lq, HQ, topk]`` (ascending, -1 padded)."""
    Lq, HQ = q.shape[0], q.shape[1]
    scores = route_scores(q, k, block_size)
    own = (positions // block_size)[:, None].expand(Lq, HQ)
    selected = select_blocks(scores, own, topk, causal)
    # Ascending block ids, -1 padded at the end: sort the selected ids ahead of a sentinel n.
    n = scores.shape[-1]
    ids = torch.where(selected, torch.arange(n, device=q.device), n).sort(-1).values[..., :topk]
    out = torch.full((Lq, HQ, topk), -1, dtype=torch.int32, device=q.device)
    out[..., : ids.shape[-1]] = torch.where(ids == n, -1, ids).to(torch.int32)
    return out


def _query_spans(cu_seqlens, query_cu_seqlens, query_positions, num_queries, device):
    """Per sequence: ``(key span, query span, query positions)``; by default the queries are the keys' tokens."""
    keys = _sequences(cu_seqlens)
    if query_cu_seqlens is None:
        return [((a, b), (a, b), torch.arange(b - a, device=device)) for a, b in keys]
    if query_positions is None or query_positions.shape != (num_queries,):
        raise ValueError(f"query_positions must be given with query_cu_seqlens, one per query ({num_queries})")
    spans = []
    for (a, b), (qa, qb) in zip(keys, _sequences(query_cu_seqlens)):
        pos = query_positions[qa:qb].long()
        if qb > qa and (int(pos.min()) < 0 or int(pos.max()) >= b - a):
            raise ValueError(f"query_positions must lie in [0, {b - a}) for a sequence of {b - a} keys")
        spans.append(((a, b), (qa, qb), pos))
    return spans


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    query_cu_seqlens: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected key blocks of every query token and head.

    Args:
        q: ``[N, HQ, D]`` packed queries; k: ``[N, HKV, D]`` packed keys; cu_seqlens: ``[S + 1]``.
        query_cu_seqlens: optional ``[S + 1]``: the queries of sequence ``s`` are then the rows
            ``query_cu_seqlens[s]:query_cu_seqlens[s + 1]`` of ``q`` (``[Nq, HQ, D]``) (module docstring).
        query_positions: int ``[Nq]``, with ``query_cu_seqlens``: each query's position in its sequence.

    Returns:
        ``[Nq, HQ, topk]`` int32 block ids local to each sequence, ascending, -1 padded at the end.
    """
    N, HQ, _ = q.shape
    out = torch.full((N, HQ, topk), -1, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        for (a, b), (qa, qb), pos in _query_spans(cu_seqlens, query_cu_seqlens, query_positions, N, q.device):
            if qb > qa:
                out[qa:qb] = _route_one(q[qa:qb], k[a:b], block_size, topk, causal, pos)
    return out


def _attend_one(q, k, v, sel, block_size, causal, scale, dt, positions):
    """Dense masked attention of one sequence. q [Lq,HQ,D] at positions [Lq], k/v [L,HKV,D], sel [Lq,HQ,topk]."""
    Lq, HQ, _ = q.shape
    L = k.shape[0]
    group = HQ // k.shape[1]
    kx = k.to(dt).repeat_interleave(group, dim=1)
    vx = v.to(dt).repeat_interleave(group, dim=1)
    n = -(-L // block_size)
    # allowed[t, h, j]: block j selected by (t, h); -1 padding is dropped via an extra column.
    chosen = torch.zeros(Lq, HQ, n + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(sel < 0, n, sel).long(), True)
    key_block = torch.arange(L, device=q.device) // block_size
    allowed = chosen[..., :n][:, :, key_block].permute(1, 0, 2)  # [HQ, Lq, Lk]
    if causal:
        key_pos = torch.arange(L, device=q.device)
        allowed = allowed & (positions[None, :, None] >= key_pos[None, None, :])
    logits = torch.einsum("thd,shd->hts", q.to(dt), kx) * scale
    logits = logits.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [HQ, L]
    probs = torch.exp(logits - lse[..., None])
    out = torch.einsum("hts,shd->thd", probs, vx)
    return out, lse.transpose(0, 1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    softmax_scale: float,
    indices: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    query_cu_seqlens: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
):
    """MoBA attention over packed sequences, differentiable in q, k, v (not through routing).

    Args:
        q: ``[N, HQ, D]``; k, v: ``[N, HKV, D]``; cu_seqlens: ``[S + 1]``.
        indices: optional precomputed routing ``[N, HQ, topk]`` (from ``route``).
        compute_dtype: dtype of the products and softmax; defaults to ``promote(q.dtype, float32)``.
            Tests pass the input dtype to measure the error of a low-precision computation.
        query_cu_seqlens: queries apart from the keys, as in ``route`` (``q``, ``indices`` and the
            results then have ``Nq`` rows).
        query_positions: their positions in their sequences, as in ``route``.

    Returns:
        ``(out [N, HQ, D] in q's dtype, lse [N, HQ] float32-or-wider natural-log sum-exp)``.
    """
    if indices is None:
        indices = route(q.detach(), k.detach(), cu_seqlens, block_size, topk, causal, query_cu_seqlens, query_positions)
    N, HQ, D = q.shape
    dt = compute_dtype or _compute_dtype(q.dtype)
    outs, lses = [], []
    for (a, b), (qa, qb), pos in _query_spans(cu_seqlens, query_cu_seqlens, query_positions, N, q.device):
        if qb > qa:
            o, l = _attend_one(q[qa:qb], k[a:b], v[a:b], indices[qa:qb], block_size, causal, softmax_scale, dt, pos)
            outs.append(o)
            lses.append(l)
    if not outs:  # N == 0: empty outputs that stay connected to the graph
        return q * 0, q.new_zeros(N, HQ, dtype=dt)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
