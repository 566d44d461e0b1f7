"""KV caches for MoBA decoding, with the running block key sums that routing reads.

Routing a new query needs the centroid (mean key) of every complete block of its sequence. Re-deriving
them from the cache would read every cached key at every step; instead the sums of each block's keys are
kept as tokens arrive, updated from the new keys only. A complete block's centroid is its sum divided by
``block_size``; the partial last block is never routed (it is the own block of the newest queries, always
attended), it only accumulates until it fills.

Sums are kept in ``promote(dtype, float32)`` (float32 for half-precision caches, float64 for float64), the
precision in which :func:`flashmoba.reference.block_centroids` averages keys; the centroid is then rounded
to the keys' dtype, as in the prefill.

Layout: sequence ``b`` of a cache buffer ``k [B, S, HKV, D]`` occupies the rows
``starts[b] : starts[b] + seqlens[b]`` (``starts`` is 0 for a left-aligned cache, the number of left
padding tokens for a Hugging Face cache); its local token ``p`` lies in block ``p // block_size``.
"""

from __future__ import annotations

import torch

from flashmoba.api import _check_int, _check_tensor, _tracing

__all__ = ["block_sums_dtype", "accumulate_block_sums", "MoBAKVCache"]


def block_sums_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the block sums of a cache holding ``dtype`` keys."""
    return torch.promote_types(dtype, torch.float32)


def accumulate_block_sums(
    block_sums: torch.Tensor,
    k: torch.Tensor,
    starts: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    block_size: int,
    max_new: int,
) -> None:
    """Add the keys of local tokens ``begin[b] : end[b]`` of every sequence into its block sums, in place.

    Deterministic and free of host synchronisation: the new tokens are gathered into a window aligned to
    block boundaries, summed per block, and each sum is added once to its block.

    Args:
        block_sums: contiguous ``[B, NB, HKV, D]`` running sums (see :func:`block_sums_dtype`), NB covering
            every block that receives a token.
        k: ``[B, S, HKV, D]`` cache buffer holding the tokens (any strides).
        starts: int ``[B]``, the buffer row of each sequence's first token.
        begin, end: int ``[B]``, the local token range to add (``end - begin`` may be 0).
        block_size: tokens per block.
        max_new: host-side upper bound on ``end - begin`` (sizes the window).
    """
    B, S, HKV, D = k.shape
    device = k.device
    if not block_sums.is_contiguous():
        raise ValueError("block_sums must be contiguous (it is updated through a flat view)")
    num_windows = (block_size - 1 + max_new + block_size - 1) // block_size  # blocks a range can touch
    begin, end, starts = begin.long(), end.long(), starts.long()
    first_block = torch.div(begin, block_size, rounding_mode="floor")
    slot = torch.arange(num_windows * block_size, device=device)
    pos = first_block[:, None] * block_size + slot[None, :]  # local token of every window slot
    new = (pos >= begin[:, None]) & (pos < end[:, None])
    rows = (starts[:, None] + pos).clamp(0, S - 1)
    window = k[torch.arange(B, device=device)[:, None], rows]  # [B, W, HKV, D]
    window = torch.where(new[..., None, None], window, torch.zeros((), dtype=k.dtype, device=device))
    partial = window.view(B, num_windows, block_size, HKV, D).sum(2, dtype=block_sums.dtype)
    # Window blocks past the last real block hold zeros; clamping their index adds 0 to a real block.
    num_blocks = block_sums.shape[1]
    blocks = (first_block[:, None] + torch.arange(num_windows, device=device)).clamp(max=num_blocks - 1)
    flat = (torch.arange(B, device=device)[:, None] * num_blocks + blocks).flatten()
    block_sums.view(B * num_blocks, HKV, D).index_add_(0, flat, partial.flatten(0, 1))


class MoBAKVCache:
    """A preallocated KV cache of one attention layer, with the running block key sums MoBA routes over.

    Sequence ``b`` holds rows ``0 : seqlens[b]`` of ``k[b]`` and ``v[b]``. Decode with::

        cache.append(k_new, v_new)
        out = flashmoba.moba_decode(q, cache.k, cache.v, cache.seqlens, cache.block_sums,
                                    block_size=cache.block_size, topk=8)

    Attributes:
        k, v: ``[B, max_seqlen, HKV, D]`` key and value buffers.
        seqlens: int32 ``[B]``, tokens held per sequence.
        block_sums: ``[B, ceil(max_seqlen / block_size), HKV, D]`` running key sums per block
            (float32; float64 for a float64 cache).
        block_size: tokens per MoBA block.
    """

    def __init__(
        self,
        batch_size: int,
        max_seqlen: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 128,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        for name, value in (("batch_size", batch_size), ("max_seqlen", max_seqlen),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("block_size", block_size)):
            _check_int(name, value, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (batch_size, max_seqlen, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.k.device)
        num_blocks = -(-max_seqlen // block_size)
        self.block_sums = torch.zeros(
            batch_size, num_blocks, num_kv_heads, head_dim, dtype=block_sums_dtype(dtype), device=self.k.device
        )
        self.block_size = block_size

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Append new tokens to every sequence and fold their keys into the block sums.

        Args:
            k, v: ``[B, T, HKV, D]`` new keys and values.
            lengths: optional int ``[B]``: sequence ``b`` takes only its first ``lengths[b]`` rows (a
                right-padded batch of prompts); default: all ``T`` rows. Passing it synchronises with the host.

        Without ``lengths`` and inside a CUDA graph capture nothing synchronises, so a whole decode step
        (append + :func:`flashmoba.moba_decode`) can be captured and replayed.
        """
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t)
            if t.dim() != 4 or t.shape[0] != self.k.shape[0] or t.shape[2:] != self.k.shape[2:]:
                raise ValueError(
                    f"{name} must have shape [B={self.k.shape[0]}, T, HKV={self.k.shape[2]}, D={self.k.shape[3]}], "
                    f"got {tuple(t.shape)}"
                )
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.k.device}")
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        B, T = k.shape[:2]
        ragged = lengths is not None
        if ragged:
            _check_tensor("lengths", lengths)
            if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"lengths must be an int32/int64 tensor of shape [{B}], got "
                                 f"{lengths.dtype} {tuple(lengths.shape)}")
            lengths = lengths.to(device=k.device, dtype=torch.int32)
        else:
            lengths = torch.full((B,), T, dtype=torch.int32, device=k.device)
        new_seqlens = self.seqlens + lengths
        if not _tracing():
            if ragged and (bool((lengths < 0).any()) or bool((lengths > T).any())):
                raise ValueError(f"lengths must lie in [0, T={T}], got {lengths.tolist()}")
            if int(new_seqlens.max()) > self.k.shape[1]:
                raise ValueError(
                    f"appending would exceed max_seqlen={self.k.shape[1]} (new lengths {new_seqlens.tolist()})"
                )
        steps = torch.arange(T, device=k.device)
        batch = torch.arange(B, device=k.device)[:, None].expand(B, T)
        rows = self.seqlens.long()[:, None] + steps[None, :]
        if ragged:
            # Keep only each sequence's real rows (boolean indexing synchronises, as documented).
            real = steps[None, :] < lengths[:, None]
            batch, rows, k, v = batch[real], rows[real], k[real], v[real]
        self.k[batch, rows] = k.to(self.k.dtype)
        self.v[batch, rows] = v.to(self.v.dtype)
        accumulate_block_sums(
            self.block_sums, self.k, torch.zeros_like(self.seqlens), self.seqlens, new_seqlens, self.block_size, T
        )
        self.seqlens.copy_(new_seqlens)  # in place: a captured CUDA graph keeps reading the same tensor
