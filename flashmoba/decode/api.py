"""Public decode API: argument validation and backend dispatch for :func:`moba_decode`.

Validation follows :mod:`flashmoba.api`: shapes, dtypes and devices are always checked; the per-sequence
lengths are read on the host (one synchronisation) only when the tensors are eager, never while
torch.compile traces or a CUDA graph captures.
"""

from __future__ import annotations

import torch

from flashmoba.api import (
    _check_backend_support,
    _check_common,
    _check_tensor,
    _resolve_backend,
    _tracing,
)
from flashmoba.decode.cache import block_sums_dtype

__all__ = ["moba_decode"]


def _check_cache_tensors(q, k_cache, v_cache, block_sums, block_size):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_sums", block_sums)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all must share a device")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all must share a dtype")
    B, Tq, HQ, D = q.shape
    S, HKV = k_cache.shape[1], k_cache.shape[2]
    if Tq < 1 or S < 1:
        raise ValueError(f"q needs at least one token and k_cache at least one row, got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}")
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must have shape [B={B}, S, HKV, D={D}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if HKV < 1 or HQ % HKV != 0:
        raise ValueError(
            f"the number of query heads ({HQ}) must be a positive multiple of the number of KV heads ({HKV})"
        )
    num_blocks = -(-S // block_size)
    if block_sums.shape[0] != B or block_sums.shape[1] < num_blocks or block_sums.shape[2:] != (HKV, D):
        raise ValueError(
            f"block_sums must have shape [B={B}, NB >= ceil(S / block_size) = {num_blocks}, HKV={HKV}, D={D}], "
            f"got {tuple(block_sums.shape)}"
        )
    if block_sums.dtype != block_sums_dtype(q.dtype):
        raise TypeError(f"block_sums must be {block_sums_dtype(q.dtype)} for {q.dtype} queries, got {block_sums.dtype}")


def _check_lengths(name, t, batch, device):
    _check_tensor(name, t)
    if t.dtype not in (torch.int32, torch.int64) or t.shape != (batch,):
        raise ValueError(f"{name} must be an int32/int64 tensor of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_length_values(cache_seqlens, cache_starts, num_queries, rows):
    lengths, starts = cache_seqlens.tolist(), cache_starts.tolist()
    if any(n < num_queries for n in lengths):
        raise ValueError(
            f"every sequence must hold its {num_queries} new token(s) (cache_seqlens >= Tq), got {lengths}"
        )
    if any(s < 0 or s + n > rows for s, n in zip(starts, lengths)):
        raise ValueError(
            f"sequences must lie inside the cache rows [0, {rows}): cache_starts {starts}, cache_seqlens {lengths}"
        )


def _moba_decode(
    q, k_cache, v_cache, cache_seqlens, block_sums, *, cache_starts, block_size, topk, shared_kv_routing,
    softmax_scale, return_lse, backend, check_values,
):
    _check_common(block_size, topk, True, softmax_scale)
    _check_cache_tensors(q, k_cache, v_cache, block_sums, block_size)
    B = q.shape[0]
    _check_lengths("cache_seqlens", cache_seqlens, B, q.device)
    if cache_starts is None:
        cache_starts = torch.zeros_like(cache_seqlens)
    _check_lengths("cache_starts", cache_starts, B, q.device)
    for name, flag in (("shared_kv_routing", shared_kv_routing), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    backend = _resolve_backend(backend, q.device)
    _check_backend_support(backend, q, block_size, topk)
    if check_values and not _tracing():
        _check_length_values(cache_seqlens, cache_starts, q.shape[1], k_cache.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        from flashmoba.decode import reference

        out, lse = reference.decode(
            q, k_cache, v_cache, cache_seqlens, cache_starts, block_sums, block_size, topk, shared_kv_routing, scale
        )
        lse = lse.float() if q.dtype != torch.float64 else lse
    else:
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_sums", block_sums)):
            if t.stride(-1) != 1:
                raise ValueError(f"backend='triton' needs {name} contiguous in its last (head) dim")
        from flashmoba.decode.kernels import decode_fwd

        out, lse = decode_fwd(
            q, k_cache, v_cache, cache_seqlens.to(torch.int32), cache_starts.to(torch.int32), block_sums,
            block_size, topk, shared_kv_routing, scale,
        )
    return (out, lse) if return_lse else out


def moba_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_sums: torch.Tensor,
    *,
    cache_starts: torch.Tensor | None = None,
    block_size: int = 128,
    topk: int = 8,
    shared_kv_routing: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Sparse MoBA attention of the newest tokens of every sequence against its KV cache.

    Decoding (``Tq = 1``) and cached prefill / speculative verification (``Tq > 1``): query ``i`` sits at
    local position ``t = cache_seqlens[b] - Tq + i`` and gets exactly the output of the full causal MoBA
    pass (:func:`flashmoba.moba_attn_varlen`) at position ``t``: its own block attended causally, plus the
    ``topk - 1`` best earlier blocks, routed over the cached block sums (no cached key is read to route).

    Args:
        q: ``[B, Tq, HQ, D]`` queries of the ``Tq`` newest tokens of each sequence.
        k_cache, v_cache: ``[B, S, HKV, D]`` with ``HQ % HKV == 0``, any strides (the Triton backend needs
            a unit stride on D, e.g. a ``transpose(1, 2)`` view of a ``[B, HKV, S, D]`` cache). The new
            tokens' keys and values must already be in the cache.
        cache_seqlens: int32/int64 ``[B]``: tokens held by each sequence, the new ones included.
        block_sums: ``[B, NB >= ceil(S / block_size), HKV, D]`` running key sums of each block, float32
            (float64 for float64 inputs); kept by :class:`flashmoba.MoBAKVCache` or
            :func:`flashmoba.decode.accumulate_block_sums`.
        cache_starts: optional int ``[B]``: sequence ``b`` occupies rows
            ``cache_starts[b] : cache_starts[b] + cache_seqlens[b]`` (default 0: left-aligned; a
            left-padded Hugging Face cache starts after its padding).
        block_size, topk, softmax_scale: as in :func:`flashmoba.moba_attn_varlen` (always causal).
        shared_kv_routing: one block selection per KV head for its whole query group, by the sum of the
            group's scores, instead of one per query head. Each selected block is then read once per
            group (up to ``HQ / HKV`` times fewer K/V bytes); the price is quality: a query head whose
            best blocks differ from its group's consensus loses them, so the output no longer equals the
            per-head MoBA pass (it does when ``HQ == HKV``).
        return_lse: also return the natural-log sum-exp ``[B, Tq, HQ]`` (float32).
        backend: "auto" (Triton for CUDA tensors, reference otherwise), "reference" or "triton".

    Returns:
        ``out [B, Tq, HQ, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    return _moba_decode(
        q, k_cache, v_cache, cache_seqlens, block_sums, cache_starts=cache_starts, block_size=block_size,
        topk=topk, shared_kv_routing=shared_kv_routing, softmax_scale=softmax_scale, return_lse=return_lse,
        backend=backend, check_values=True,
    )
