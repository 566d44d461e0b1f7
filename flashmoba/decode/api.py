"""Public decode API over a ``MoBAKVCache``: validation and backend dispatch.

* ``moba_decode``: sparse MoBA attention of the newest tokens (routing over the cached block sums);
* ``dense_decode``: causal (optionally sliding-window) softmax attention of the newest tokens, for the
  dense and sliding-window layers of a model that decodes through the same cache.

Validation follows ``flashmoba.api``: shapes, dtypes and devices are always checked; the per-sequence
lengths are checked when eager, never while torch.compile traces or a CUDA graph captures, from the
cache's host copy of them (``MoBAKVCache.host_lengths``), so an eager decode step reads nothing back from
the GPU either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashmoba._checks import (
    check_backend_support,
    check_bool,
    check_int,
    check_routing_args,
    check_tensor,
    resolve_backend,
    tracing,
)
from flashmoba.decode.cache import MoBAKVCache

__all__ = ["moba_decode", "dense_decode"]


def _check_queries(q, cache) -> None:
    check_tensor("q", q, dim=4)
    if not isinstance(cache, MoBAKVCache):
        raise TypeError(f"cache must be a flashmoba.MoBAKVCache, got {type(cache).__name__}")
    if cache.is_empty:
        raise ValueError("the cache is empty: append the new tokens' keys and values first")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if q.device != cache.k.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.k.device}")
    if q.dtype != cache.k.dtype:
        raise TypeError(f"q has dtype {q.dtype} but the cache holds {cache.k.dtype}: all must share a dtype")
    B, Tq, HQ, D = q.shape
    _, _, HKV, DK = cache.k.shape
    if Tq < 1:
        raise ValueError(f"q needs at least one token, got shape {tuple(q.shape)}")
    if B != cache.batch_size or D != DK:
        raise ValueError(
            f"q must have shape [B={cache.batch_size}, Tq, HQ, D={DK}] to match the cache, got {tuple(q.shape)}"
        )
    if HQ % HKV != 0:
        raise ValueError(
            f"the number of query heads ({HQ}) must be a positive multiple of the number of KV heads ({HKV})"
        )
    if not tracing():
        lengths, starts = cache.host_lengths()  # no device read in a decode step (cache.host_lengths)
        if any(n < Tq for n in lengths):
            raise ValueError(f"every sequence must hold its {Tq} new token(s) (cache.seqlens >= Tq), got {lengths}")
        rows = cache.k.shape[1]
        if any(s < 0 or s + n > rows for s, n in zip(starts, lengths)):
            raise ValueError(
                f"sequences must lie inside the cache rows [0, {rows}): starts {starts}, seqlens {lengths}"
            )


def moba_decode(
    q: torch.Tensor,
    cache: MoBAKVCache,
    *,
    topk: int = 8,
    block_size: int | None = None,
    shared_kv_routing: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Sparse MoBA attention of the newest tokens of every sequence against its KV cache.

    Decoding (``Tq = 1``) and cached prefill / speculative verification (``Tq > 1``): query ``i`` sits at
    local position ``t = cache.seqlens[b] - Tq + i`` and gets exactly the output of the full causal MoBA
    pass (``flashmoba.moba_attn_varlen``) at position ``t``: its own block attended causally, plus the
    ``topk - 1`` best earlier blocks, routed over the cached block sums (no cached key is read to route).

    Args:
        q: ``[B, Tq, HQ, D]`` queries of the ``Tq`` newest tokens of each sequence, ``HQ`` a multiple of
            the cache's KV heads.
        cache: the ``MoBAKVCache`` holding every token, the new ones included.
        topk: blocks attended per query and head, the own block included.
        block_size: optional; when given it must equal ``cache.block_size`` (the block sums describe
            blocks of that size).
        shared_kv_routing: one block selection per KV head for its whole query group, by the sum of the
            group's scores, instead of one per query head. Each selected block is then read once per
            group (up to ``HQ / HKV`` times fewer K/V bytes); the price is quality: a query head whose
            best blocks differ from its group's consensus loses them, so the output no longer equals the
            per-head MoBA pass (it does when ``HQ == HKV``).
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log sum-exp ``[B, Tq, HQ]`` (float32; float64 for float64).
        backend: "auto" (Triton for CUDA tensors, reference otherwise), "reference" or "triton".

    Returns:
        ``out [B, Tq, HQ, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    _check_queries(q, cache)
    if cache.block_size is None:
        raise ValueError(
            "the cache keeps no block sums (block_size=None): make it with a block_size or call cache.bind_block_size()"
        )
    if block_size is not None:
        cache.bind_block_size(block_size)  # raises on a mismatch
    block_size, topk = check_routing_args(cache.block_size, topk, True, softmax_scale)
    check_bool("shared_kv_routing", shared_kv_routing)
    check_bool("return_lse", return_lse)
    backend = resolve_backend(backend, q.device)
    check_backend_support(backend, q, block_size, topk)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    block_sums = cache.block_sums
    if backend == "reference":
        from flashmoba.decode import reference

        out, lse = reference.decode(
            q, cache.k, cache.v, cache.seqlens, cache.starts, block_sums, block_size, topk, shared_kv_routing, scale
        )
        lse = lse.float() if q.dtype != torch.float64 else lse
    else:
        for name, t in (("q", q), ("cache.k", cache.k), ("cache.v", cache.v)):
            if t.stride(-1) != 1:
                raise ValueError(f"backend='triton' needs {name} contiguous in its last (head) dim")
        from flashmoba.decode.kernels import decode_fwd

        out, lse = decode_fwd(
            q, cache.k, cache.v, cache.seqlens, cache.starts, block_sums, block_size, topk, shared_kv_routing, scale
        )
    return (out, lse) if return_lse else out


def dense_decode(
    q: torch.Tensor,
    cache: MoBAKVCache,
    *,
    window: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal softmax attention of the newest tokens of every sequence against its KV cache (PyTorch SDPA).

    Query ``i`` at local position ``t = cache.seqlens[b] - Tq + i`` attends the keys at positions
    ``<= t`` (with ``window``: ``t - window < s <= t``, what the layer's sliding window sees). With a
    window only the last ``window + Tq - 1`` rows of each sequence are read.

    Args:
        q: ``[B, Tq, HQ, D]``, ``HQ`` a multiple of the cache's KV heads; cache: the
            ``MoBAKVCache`` holding every token, the new ones included.
        window: keys per query of a sliding-window layer, or ``None`` (all earlier keys).
        softmax_scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, Tq, HQ, D]`` in q's dtype.
    """
    _check_queries(q, cache)
    if window is not None:
        window = check_int("window", window, 1)
    if softmax_scale is not None:
        check_routing_args(1, 1, True, softmax_scale)
    B, Tq = q.shape[:2]
    device = q.device
    starts = cache.starts.long()[:, None]
    if window is None:
        k, v = cache.k[:, : cache.max_rows], cache.v[:, : cache.max_rows]  # views: every row in use
        key_pos = torch.arange(k.shape[1], device=device) - starts  # [B, R] local positions
    else:
        span = window + Tq - 1  # the keys any of the Tq queries can see
        rows = (starts + cache.seqlens.long()[:, None]) - span + torch.arange(span, device=device)
        key_pos = rows - starts
        batch = torch.arange(B, device=device)[:, None]
        safe = rows.clamp(0, cache.k.shape[1] - 1)
        k, v = cache.k[batch, safe], cache.v[batch, safe]  # [B, R, HKV, D]
    query_pos = (cache.seqlens.long() - Tq)[:, None] + torch.arange(Tq, device=device)  # [B, Tq]
    delta = query_pos[:, :, None] - key_pos[:, None, :]
    # Negative key positions are padding or rows before the sequence: never attended.
    allowed = (key_pos >= 0)[:, None, :] & (delta >= 0)
    if window is not None:
        allowed &= delta < window
    # GQA without copying the cache: the G query heads of a KV head become G x Tq query rows of that head
    # (row t * G + g), and the mask rows repeat to match.
    HQ, HKV, D = q.shape[2], k.shape[2], q.shape[3]
    G = HQ // HKV
    rows_q = q.view(B, Tq, HKV, G, D).permute(0, 2, 1, 3, 4).reshape(B, HKV, Tq * G, D)
    # Not cuDNN: it builds an execution plan per shape, and the key count grows with every step.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(
            rows_q,
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed.repeat_interleave(G, dim=1)[:, None],
            scale=softmax_scale,
        )
    return out.view(B, HKV, Tq, G, D).permute(0, 2, 1, 3, 4).reshape(B, Tq, HQ, D)
