"""The KV cache of one attention layer, with the running block key sums that MoBA routing reads.

Routing a new query needs the centroid (mean key) of every complete block of its sequence. Re-deriving
them from the cache would read every cached key at every step; instead the sums of each block's keys are
kept as tokens arrive, folded in from the new keys only. A complete block's centroid is its sum divided by
``block_size``; the partial last block is never routed (it is the own block of the newest queries, always
attended), it only accumulates until it fills.

Sums are kept in ``promote(dtype, float32)`` (float32 for half-precision caches, float64 for float64), the
precision in which ``flashmoba.reference.block_centroids`` averages keys; the centroid is then rounded
to the keys' dtype, as in the prefill.

Layout: sequence ``b`` of a cache buffer ``k [B, S, HKV, D]`` occupies the rows
``starts[b] : starts[b] + seqlens[b]`` (``starts`` is 0 for a left-aligned cache, the number of left
padding tokens for a Hugging Face cache); its local token ``p`` lies in block ``p // block_size``.

``MoBAKVCache`` is the one cache type of the project: ``flashmoba.moba_decode`` and
``flashmoba.decode.dense_decode`` read it, ``flashmoba.nn.MoBAAttention`` (and through it the
hybrid model) keeps one per layer, and the transformers integration's cache layers wrap one each.
"""

from __future__ import annotations

import weakref

import torch

from flashmoba._checks import check_int, check_lengths, check_tensor, keeps_host_copy, tracing

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
        block_sums: contiguous ``[B, NB, HKV, D]`` running sums (see ``block_sums_dtype``), NB covering
            every block that receives a token.
        k: ``[B, S, HKV, D]`` cache buffer holding the tokens (any strides).
        starts: int ``[B]``, the buffer row of each sequence's first token.
        begin: int ``[B]``, the first local token to add.
        end: int ``[B]``, one past the last (``end - begin`` may be 0).
        block_size: tokens per block.
        max_new: host-side upper bound on ``end - begin`` (sizes the window).
    """
    B, S, HKV, D = k.shape
    device = k.device
    if not block_sums.is_contiguous():
        raise ValueError("block_sums must be contiguous (it is updated through a flat view)")
    if max_new <= 0 or S == 0:
        return
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
    """The KV cache of one attention layer, with the running block key sums MoBA routes over.

    Two ways to make one:

    * ``MoBAKVCache(batch_size, max_seqlen, num_kv_heads, head_dim, block_size=..., dtype=..., device=...)``
      preallocates ``max_seqlen`` rows per sequence (appending past them raises). Nothing in
      ``append`` or ``flashmoba.moba_decode`` then synchronises, so a whole decode step can be
      captured in a CUDA graph and replayed.
    * ``growing`` makes an empty cache that allocates at its first ``append`` (shapes, dtype and
      device from the keys) and doubles its rows when they run out: what a model's ``generate`` uses.
    * ``from_tensors`` wraps buffers managed elsewhere (no copy).

    Decode with::

        cache.append(k_new, v_new)                      # [B, T, HKV, D]
        out = flashmoba.moba_decode(q, cache, topk=8)   # q [B, T, HQ, D]

    Attributes:
        k, v: ``[B, S, HKV, D]`` key and value buffers (``None`` while a growing cache is empty).
        seqlens: int32 ``[B]``, tokens held per sequence.
        starts: int32 ``[B]``, the buffer row of each sequence's first token (0 unless left padded).
        block_size: tokens per MoBA block, or ``None`` for a layer that never routes (dense or sliding
            window); ``bind_block_size`` sets it once.
        conv_state: the rolling state of a key convolution that produced the cached keys, or ``None``
            (kept here so that ``reorder`` keeps it aligned with the sequences).
    """

    def __init__(
        self,
        batch_size: int,
        max_seqlen: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int | None = 128,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("max_seqlen", max_seqlen),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            check_int(name, value, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._reset(block_size, growable=False)
        shape = (batch_size, max_seqlen, num_kv_heads, head_dim)
        self._allocate(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def growing(cls, *, block_size: int | None = 128) -> MoBAKVCache:
        """An empty cache that takes its shapes from the first ``append`` and grows as needed."""
        cache = cls.__new__(cls)
        cache._reset(block_size, growable=True)
        return cache

    @classmethod
    def from_tensors(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        seqlens: torch.Tensor,
        *,
        block_size: int | None,
        starts: torch.Tensor | None = None,
        block_sums: torch.Tensor | None = None,
    ) -> MoBAKVCache:
        """A cache over existing buffers (no copy).

        Args:
            k: ``[B, S, HKV, D]`` keys, any strides (the Triton decode needs a unit stride on D, e.g. a
                ``transpose(1, 2)`` view of a ``[B, HKV, S, D]`` buffer).
            v: values, like ``k``.
            seqlens: int ``[B]`` tokens held by each sequence.
            starts: int ``[B]`` the row of each sequence's first token (default 0).
            block_size: tokens per MoBA block (``None``: a cache for ``dense_decode``).
            block_sums: ``[B, NB >= ceil(S / block_size), HKV, D]`` running key sums of exactly those
                tokens (``accumulate_block_sums``), or ``None`` to sum the held keys (reads all of them).
        """
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dim=4)
        if v.shape != k.shape or v.device != k.device or v.dtype != k.dtype:
            raise ValueError(
                f"v must match k in shape, dtype and device: {tuple(k.shape)} {k.dtype} {k.device}, "
                f"got {tuple(v.shape)} {v.dtype} {v.device}"
            )
        if not k.is_floating_point():
            raise TypeError(f"k must be a floating-point tensor, got {k.dtype}")
        batch = k.shape[0]
        check_lengths("seqlens", seqlens, batch, k.device)
        if starts is None:
            starts = torch.zeros_like(seqlens)
        check_lengths("starts", starts, batch, k.device)
        cache = cls.__new__(cls)
        cache._reset(block_size, growable=False)
        cache._allocate(k, v)
        cache.seqlens = seqlens.to(torch.int32)
        cache.starts = starts.to(torch.int32)
        cache._rows = k.shape[1]
        if block_sums is None:
            cache._pending = k.shape[1]
        else:
            check_tensor("block_sums", block_sums, dim=4)
            if cache.block_size is None:
                raise ValueError("block_sums need the block_size they were summed with")
            num_blocks = -(-k.shape[1] // cache.block_size)
            if block_sums.shape[0] != batch or block_sums.shape[1] < num_blocks or block_sums.shape[2:] != k.shape[2:]:
                raise ValueError(
                    f"block_sums must have shape [B={batch}, NB >= ceil(S / block_size) = {num_blocks}, "
                    f"HKV={k.shape[2]}, D={k.shape[3]}], got {tuple(block_sums.shape)}"
                )
            if block_sums.dtype != block_sums_dtype(k.dtype):
                raise TypeError(
                    f"block_sums must be {block_sums_dtype(k.dtype)} for {k.dtype} keys, got {block_sums.dtype}"
                )
            if block_sums.device != k.device or not block_sums.is_contiguous():
                raise ValueError(f"block_sums must be a contiguous tensor on {k.device}")
            cache._sums = block_sums
            cache._folded = cache.seqlens.clone()
        return cache

    # ------------------------------------------------------------------------------------------------
    # state

    def _reset(self, block_size, growable: bool) -> None:
        self.block_size = None if block_size is None else check_int("block_size", block_size, 1)
        self._growable = growable
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.seqlens: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.conv_state: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None  # [B, NB, HKV, D], allocated at the first fold
        self._folded: torch.Tensor | None = None  # int32 [B]: tokens of each sequence already in _sums
        self._pending = 0  # host bound on seqlens - folded
        self._rows = 0  # host bound on starts + seqlens (exact outside CUDA-graph capture)
        # host copy of (seqlens, starts) of a CUDA cache: ((weak reference, version) per tensor, values)
        self._host: tuple[tuple, list[int], list[int]] | None = None

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        batch = k.shape[0]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=k.device)
        self.starts = torch.zeros_like(self.seqlens)
        self._keep_host_lengths([0] * batch, [0] * batch)

    def _keep_host_lengths(self, seqlens: list[int], starts: list[int]) -> None:
        """Remember ``(seqlens, starts)`` as the values of the current tensors at their current versions (an
        in-place write, the cache's own or anyone's, moves a version; ``reorder`` replaces the tensors)."""
        if not keeps_host_copy(self.seqlens):
            self._host = None
            return
        tensors = (self.seqlens, self.starts)
        self._host = (tuple((weakref.ref(t), t._version) for t in tensors), seqlens, starts)

    def _host_copy_holds(self) -> bool:
        return self._host is not None and all(
            ref() is t and version == t._version
            for (ref, version), t in zip(self._host[0], (self.seqlens, self.starts))
        )

    def host_lengths(self) -> tuple[list[int], list[int]]:
        """``(seqlens, starts)`` as host lists. A CUDA cache reads them from the device only after a change
        it did not make itself: its appends keep the host copy in step, so a decode step (append, then
        ``moba_decode`` or ``dense_decode``) waits for the GPU nowhere."""
        if self.k is None:
            return [], []
        if self._host_copy_holds():
            return self._host[1], self._host[2]
        seqlens, starts = self.seqlens.tolist(), self.starts.tolist()
        self._keep_host_lengths(seqlens, starts)
        return seqlens, starts

    @property
    def is_empty(self) -> bool:
        """True until something was appended to a ``growing`` cache."""
        return self.k is None

    @property
    def batch_size(self) -> int:
        return 0 if self.k is None else self.k.shape[0]

    @property
    def max_rows(self) -> int:
        """A host-side bound on ``starts + seqlens`` (the buffer rows in use), exact in eager mode."""
        return self._rows

    def bind_block_size(self, block_size: int) -> None:
        """Fix the block size of a cache made with ``block_size=None`` (its sums are built from the held
        keys at the next read); a different block size than the one bound raises."""
        block_size = check_int("block_size", block_size, 1)
        if self.block_size is None:
            self.block_size = block_size
            self._sums, self._folded, self._pending = None, None, self._rows
        elif self.block_size != block_size:
            raise ValueError(
                f"block_size {block_size} does not match the cache's block size {self.block_size}: "
                "its block sums describe blocks of that size"
            )

    @property
    def block_sums(self) -> torch.Tensor:
        """``[B, NB >= ceil(S / block_size), HKV, D]`` key sums of every block of the held tokens (float32;
        float64 for a float64 cache). Tokens appended since the last read are folded in first."""
        if self.block_size is None:
            raise ValueError("this cache keeps no block sums (block_size=None); bind_block_size() sets one")
        if self.k is None:
            raise ValueError("the cache is empty")
        return self._fold()

    def _fold(self) -> torch.Tensor:
        """Fold the pending tokens' keys into the sums (allocating or growing them first)."""
        num_blocks = -(-self.k.shape[1] // self.block_size)
        if self._sums is None:
            self._sums = torch.zeros(
                self.k.shape[0],
                num_blocks,
                *self.k.shape[2:],
                dtype=block_sums_dtype(self.k.dtype),
                device=self.k.device,
            )
            self._folded = torch.zeros_like(self.seqlens)
            self._pending = self._rows
        elif self._sums.shape[1] < num_blocks:
            grown = self._sums.new_zeros(self._sums.shape[0], num_blocks, *self._sums.shape[2:])
            grown[:, : self._sums.shape[1]] = self._sums
            self._sums = grown
        if self._pending:
            accumulate_block_sums(
                self._sums, self.k, self.starts, self._folded, self.seqlens, self.block_size, self._pending
            )
            self._folded.copy_(self.seqlens)  # in place: a captured CUDA graph keeps reading the same tensor
            self._pending = 0
        return self._sums

    # ------------------------------------------------------------------------------------------------
    # changes

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Append new tokens after every sequence's held ones and fold their keys into the block sums.

        Args:
            k: ``[B, T, HKV, D]`` new keys, in the cache's dtype (any strides).
            v: the new values, like ``k``.
            lengths: optional int ``[B]``: sequence ``b`` takes only its first ``lengths[b]`` rows (a
                right-padded batch of prompts); default: all ``T`` rows. Passing it synchronises with the host.

        Without ``lengths`` nothing synchronises: eager appends keep the host copy of the lengths in step
        (``host_lengths``), and inside a CUDA graph capture nothing is read, so a whole decode step (append
        + ``flashmoba.moba_decode``) of a preallocated cache can be captured and replayed.
        """
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dim=4)
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if self.k is None:
            if not k.is_floating_point():
                raise TypeError(f"k must be a floating-point tensor, got {k.dtype}")
            self._allocate(
                k.new_zeros(k.shape[0], max(k.shape[1], 1), *k.shape[2:]),
                v.new_zeros(k.shape[0], max(k.shape[1], 1), *k.shape[2:]),
            )
        for name, t in (("k", k), ("v", v)):
            if t.shape[0] != self.k.shape[0] or t.shape[2:] != self.k.shape[2:]:
                raise ValueError(
                    f"{name} must have shape [B={self.k.shape[0]}, T, HKV={self.k.shape[2]}, D={self.k.shape[3]}], "
                    f"got {tuple(t.shape)}"
                )
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.k.device}")
            if t.dtype != self.k.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {self.k.dtype}: convert it first")
        B, T = k.shape[:2]
        ragged = lengths is not None
        if ragged:
            check_lengths("lengths", lengths, B, k.device)
            lengths = lengths.to(torch.int32)
        else:
            lengths = torch.full((B,), T, dtype=torch.int32, device=k.device)
        new_seqlens = self.seqlens + lengths
        host = None  # the new (seqlens, starts) on the host, eager only
        if tracing():
            self._rows += T
        else:
            held, starts = self.host_lengths()
            added = lengths.tolist() if ragged else [T] * B
            if any(n < 0 or n > T for n in added):
                raise ValueError(f"lengths must lie in [0, T={T}], got {added}")
            host = [n + a for n, a in zip(held, added)], starts
            self._rows = max((s + n for n, s in zip(*host)), default=0)
            if self._rows > self.k.shape[1]:
                if not self._growable:
                    raise ValueError(f"appending would exceed max_seqlen={self.k.shape[1]} (new lengths {host[0]})")
                self._grow(max(self._rows, 2 * self.k.shape[1]))
        steps = torch.arange(T, device=k.device)
        batch = torch.arange(B, device=k.device)[:, None].expand(B, T)
        rows = (self.starts + self.seqlens).long()[:, None] + steps[None, :]
        if ragged:
            # Keep only each sequence's real rows (boolean indexing synchronises, as documented).
            real = steps[None, :] < lengths[:, None]
            batch, rows, k, v = batch[real], rows[real], k[real], v[real]
        self.k[batch, rows] = k.detach()
        self.v[batch, rows] = v.detach()
        self._pending += T
        self.seqlens.copy_(new_seqlens)  # in place: a captured CUDA graph keeps reading the same tensor
        if host is not None:
            self._keep_host_lengths(*host)
        if self.block_size is not None:
            # Fold now rather than at the next read, so that a captured step (append + decode) replays the
            # fold of just its own tokens.
            self._fold()

    def _grow(self, rows: int) -> None:
        def grown(t):
            bigger = t.new_zeros(t.shape[0], rows, *t.shape[2:])
            bigger[:, : t.shape[1]] = t
            return bigger

        self.k, self.v = grown(self.k), grown(self.v)

    def mark_left_padding(self, starts: torch.Tensor) -> None:
        """Declare that the first ``starts[b]`` held rows of sequence ``b`` are padding, not tokens.

        For caches filled with uniformly padded rows (a Hugging Face cache): sequence ``b`` then holds rows
        ``starts[b] : starts[b] + seqlens[b]`` with ``seqlens`` reduced accordingly, and the block sums are
        rebuilt from the held keys at the next read (blocks start at each sequence's first token).
        """
        check_lengths("starts", starts, self.batch_size, self.k.device if self.k is not None else starts.device)
        starts = starts.to(torch.int32)
        self.seqlens.sub_(starts - self.starts)
        self.starts.copy_(starts)
        self._sums, self._folded, self._pending = None, None, self._rows

    def crop(self, num_tokens: int) -> None:
        """Drop the last ``num_tokens`` tokens of every sequence (the block sums are rebuilt at the next read)."""
        num_tokens = check_int("num_tokens", num_tokens, 0)
        if self.k is None or num_tokens == 0:
            return
        self.seqlens.sub_(num_tokens).clamp_(min=0)
        self._rows = max(self._rows - num_tokens, 0)
        self._sums, self._folded, self._pending = None, None, self._rows

    def reorder(self, index: torch.Tensor) -> None:
        """Keep / repeat / permute sequences: sequence ``i`` becomes the old sequence ``index[i]`` (beam
        search, batch selection)."""
        if self.k is None:
            return
        index = torch.as_tensor(index, device=self.k.device).long()
        # Tokens not yet folded stay pending: they are the range folded..seqlens, which moves with its sequence.
        for name in ("k", "v", "seqlens", "starts", "conv_state", "_sums", "_folded"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
