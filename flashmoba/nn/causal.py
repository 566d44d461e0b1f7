"""Causal softmax attention of packed sequences, full or in a sliding window: the hybrid model's non-MoBA
layers.

One semantics, two implementations. Query ``t`` of a sequence attends the keys ``s`` of the same sequence
with ``s <= t`` (``window=None``) or ``t - window < s <= t`` (a window of ``window`` keys, itself included):

* ``"flash"``: FlashAttention-2's varlen kernel through ``torch.nn.attention.varlen.varlen_attn``
  (CUDA, fp16/bf16). Every sequence of the pack in one launch, GQA native, the window as the kernel's
  left window; nothing reads a device value on the host.
* ``"sdpa"``: PyTorch SDPA on any device and dtype (the CPU path, and the oracle the flash path is
  tested against): one call per sequence for full attention (this reads ``cu_seqlens`` on the host);
  for a window, chunks of ``window`` queries attending their own and the previous chunk under a band
  mask, so that memory grows linearly with the length.

``backend="auto"`` takes ``"flash"`` where it runs (CUDA tensors in fp16/bf16, a head dim that is a
multiple of 8 up to 256, a torch whose ``varlen_attn`` takes ``window_size``, as 2.11's does) and
``"sdpa"`` elsewhere, except for full attention over a pack of one sequence (known from the shape of
``cu_seqlens``, so still no host sync): there SDPA's fused causal kernel (cuDNN's on Hopper) is faster
than FlashAttention-2's varlen kernel (docs/benchmarks.md, training throughput). An explicit backend
that cannot run raises.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from flashmoba._checks import check_choice, check_int
from flashmoba.nn.varlen import token_positions, token_sequence_ids
from flashmoba.routing.result import block_layout

__all__ = ["CAUSAL_BACKENDS", "batched_causal_attention", "causal_attention"]

CAUSAL_BACKENDS = ("auto", "flash", "sdpa")


def _varlen_params() -> frozenset[str]:
    """The keyword parameters of this torch's ``varlen_attn`` (empty when it has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


# Read once at import: a cached function call would be traced (and warned about) inside torch.compile.
_VARLEN_PARAMS = _varlen_params()


def _flash_unavailable(q: torch.Tensor, window: int | None) -> str | None:
    """Why the flash backend cannot run on these inputs, or None when it can."""
    params = _VARLEN_PARAMS
    if not params:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen.varlen_attn"
    if "window_size" not in params:
        return f"this torch's varlen_attn ({torch.__version__}) takes no window_size"
    if not q.is_cuda:
        return f"it needs CUDA tensors, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16/bfloat16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"it needs a head dim that is a multiple of 8 and at most 256, got {q.shape[-1]}"
    return None


def _flash(q, k, v, cu_seqlens, window, max_seqlen):
    from torch.nn.attention.varlen import varlen_attn

    kwargs = {"window_size": (-1 if window is None else window - 1, 0)}  # (left, right): W keys, causal
    if "enable_gqa" in _VARLEN_PARAMS:  # newer torch asks for it; older ones take GQA natively
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _sdpa(q, k, v, *, attn_mask=None, is_causal=False):
    """SDPA of ``q [B, HQ, L, D]`` over ``k, v [B, HKV, S, D]``, KV heads repeated for GQA (this keeps the
    fused kernels available: not all of them take ``enable_gqa``)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def _sdpa_full(q, k, v, cu_seqlens):
    """Causal attention of every packed sequence on its own, one SDPA call each (a pack of one sequence
    reads nothing on the host)."""
    bounds = [0, q.shape[0]] if cu_seqlens.numel() == 2 else cu_seqlens.tolist()
    pieces = [
        _sdpa(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)[0].transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(pieces) if pieces else torch.zeros_like(q)


def _sdpa_window(q, k, v, cu_seqlens, window):
    """Sliding-window attention in chunks of ``window`` queries (static shapes, no host sync)."""
    num_tokens = q.shape[0]
    # Chunks of `window` queries, numbered globally as routing blocks are.
    cu_chunks, chunk_seq, num_chunks = block_layout(cu_seqlens, num_tokens, window)
    num_seqs = cu_seqlens.numel() - 1
    real = chunk_seq < num_seqs
    seq = chunk_seq.long().clamp(max=num_seqs - 1)
    start = cu_seqlens.long()[seq]
    length = cu_seqlens.long()[seq + 1] - start
    first_pos = (torch.arange(num_chunks, device=q.device) - cu_chunks.long()[seq]) * window  # [G]
    slots = torch.arange(window, device=q.device)
    q_pos = first_pos[:, None] + slots  # [G, window]
    k_pos = first_pos[:, None] - window + torch.arange(2 * window, device=q.device)  # previous + own chunk
    q_ok = real[:, None] & (q_pos < length[:, None])
    k_ok = real[:, None] & (k_pos >= 0) & (k_pos < length[:, None])
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = k_ok[:, None, :] & (delta >= 0) & (delta < window)
    # A padding query keeps one key (its own slot) so that its softmax stays finite; it is dropped below.
    allowed |= (~q_ok)[:, :, None] & (slots[:, None] + window == torch.arange(2 * window, device=q.device))
    last = num_tokens - 1
    q_tok = (start[:, None] + q_pos).clamp(0, last)
    k_tok = (start[:, None] + k_pos).clamp(0, last)
    out = _sdpa(
        q[q_tok].permute(0, 2, 1, 3),
        k[k_tok].permute(0, 2, 1, 3),
        v[k_tok].permute(0, 2, 1, 3),
        attn_mask=allowed[:, None],
    )  # [G, HQ, window, D]
    pos = token_positions(cu_seqlens, num_tokens)
    chunk = cu_chunks.long()[token_sequence_ids(cu_seqlens, num_tokens)] + pos // window
    return out[chunk, :, pos % window]


def batched_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention of ``B`` equal-length sequences in one SDPA call (its fused causal kernel; no
    host sync).

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, T, HKV, D]``.

    Returns:
        ``[B, T, HQ, D]``.
    """
    out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    window: int | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention of packed sequences, full or in a sliding window (module docstring).

    Args:
        q: ``[N, HQ, D]`` packed queries; k, v: ``[N, HKV, D]``, ``HQ`` a multiple of ``HKV``.
        cu_seqlens: int32/int64 ``[S + 1]`` sequence boundaries (``cu_seqlens[-1] = N``).
        window: keys per query (itself included), or None for every earlier key.
        max_seqlen: an upper bound of the longest sequence, for the flash kernel's grid (default ``N``:
            always right, and never read from the device; programs past a sequence's end exit at once).
        backend: "auto", "flash" or "sdpa".

    Returns:
        ``[N, HQ, D]`` in q's dtype; softmax scale ``D ** -0.5``.
    """
    check_choice("backend", backend, CAUSAL_BACKENDS)
    if window is not None:
        window = check_int("window", window, 1)
    num_tokens = q.shape[0]
    if max_seqlen is None:
        max_seqlen = num_tokens
    else:
        max_seqlen = check_int("max_seqlen", max_seqlen, 0)
    if num_tokens == 0:
        return torch.zeros_like(q)
    why_not = _flash_unavailable(q, window)
    if backend == "flash" and why_not is not None:
        raise ValueError(f'backend="flash" cannot run: {why_not}')
    one_sequence_full = window is None and cu_seqlens.numel() == 2
    if backend == "flash" or (backend == "auto" and why_not is None and not one_sequence_full):
        return _flash(q, k, v, cu_seqlens, window, max(1, max_seqlen))
    if window is None:
        return _sdpa_full(q, k, v, cu_seqlens)
    return _sdpa_window(q, k, v, cu_seqlens, window)
