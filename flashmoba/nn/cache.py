"""The KV cache of one attention layer: S sequences of different lengths, grown as tokens arrive."""

from __future__ import annotations

import torch

from flashmoba.nn.varlen import token_positions, token_sequence_ids

__all__ = ["KVCache"]


class KVCache:
    """Keys and values one :class:`~flashmoba.nn.MoBAAttention` has seen, per sequence.

    Attributes:
        keys, values: ``[S, capacity, HKV, D]`` (``None`` until the first call); sequence ``s`` fills
            slots ``0 .. lengths[s] - 1``, the rest is unused. Keys are the ones attention reads
            (convolved and roped where the layer does that). Stored detached: the cache is for inference.
        lengths: host ``list[int]``, tokens cached per sequence.
        conv_state: ``[S, W - 1, C]`` rolling state of the layer's key convolution, or ``None``.

    The capacity at least doubles when it runs out, so appending one token at a time costs amortised O(1)
    copies per token.
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.lengths: list[int] = []
        self.conv_state: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def is_empty(self) -> bool:
        return self.keys is None

    def lengths_tensor(self, device) -> torch.Tensor:
        """int64 ``[S]`` cached tokens per sequence."""
        return torch.tensor(self.lengths, dtype=torch.long, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, new_lengths: list[int]) -> None:
        """Append packed ``k, v [N, HKV, D]`` (sequence ``s`` adds ``new_lengths[s]`` tokens, bounded by
        ``cu_seqlens [S + 1]``) after each sequence's cached tokens; ``S`` must match the cache's."""
        if self.keys is None:
            self.lengths = [0] * len(new_lengths)
            shape = (len(new_lengths), max(new_lengths, default=0), k.shape[1], k.shape[2])
            # Zeros, not empty: masked-out slots still enter the attention product (0 * NaN = NaN).
            self.keys = k.new_zeros(shape)
            self.values = v.new_zeros(shape)
        needed = max((a + b for a, b in zip(self.lengths, new_lengths)), default=0)
        capacity = self.keys.shape[1]
        if needed > capacity:
            self._grow(max(needed, 2 * capacity))
        num_tokens = k.shape[0]
        seq = token_sequence_ids(cu_seqlens, num_tokens)
        slot = self.lengths_tensor(k.device)[seq] + token_positions(cu_seqlens, num_tokens)
        flat_index = seq * self.keys.shape[1] + slot
        self.keys.view(-1, *self.keys.shape[2:]).index_copy_(0, flat_index, k.detach().to(self.keys.dtype))
        self.values.view(-1, *self.values.shape[2:]).index_copy_(0, flat_index, v.detach().to(self.values.dtype))
        self.lengths = [a + b for a, b in zip(self.lengths, new_lengths)]

    def _grow(self, capacity: int) -> None:
        def grown(t):
            bigger = t.new_zeros(t.shape[0], capacity, *t.shape[2:])
            bigger[:, : t.shape[1]] = t
            return bigger

        self.keys, self.values = grown(self.keys), grown(self.values)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep / repeat / permute sequences: sequence ``i`` becomes the old sequence ``index[i]``
        (beam search)."""
        if self.keys is None:
            return
        self.keys = self.keys.index_select(0, index.to(self.keys.device))
        self.values = self.values.index_select(0, index.to(self.values.device))
        if self.conv_state is not None:
            self.conv_state = self.conv_state.index_select(0, index.to(self.conv_state.device))
        self.lengths = [self.lengths[i] for i in index.tolist()]
