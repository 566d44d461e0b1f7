"""Bookkeeping of packed variable-length batches shared by the layers: which sequence a token is in.

All helpers build their results on the device with static shapes (no host synchronisation).
"""

from __future__ import annotations

import torch

from flashmoba._checks import built_valid_boundaries

__all__ = ["uniform_cu_seqlens", "token_sequence_ids", "token_positions", "next_token_targets"]


def uniform_cu_seqlens(batch_size: int, seq_len: int, device) -> torch.Tensor:
    """int32 ``[B + 1]`` boundaries of ``B`` equal-length sequences laid end to end (known valid: the layers'
    input check reads nothing back from them)."""
    cu_seqlens = torch.arange(batch_size + 1, dtype=torch.int32, device=device) * seq_len
    return built_valid_boundaries(cu_seqlens, batch_size * seq_len, seq_len if batch_size else 0)


def token_sequence_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``[N]``: the sequence index ``s`` of every packed token (``cu[s] <= t < cu[s + 1]``)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)


def token_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``[N]``: the position of every packed token inside its own sequence (0 at its start)."""
    seq = token_sequence_ids(cu_seqlens, num_tokens)
    return torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[seq]


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N]`` targets of packed ``labels [N]``: token ``t`` predicts token ``t + 1`` of its sequence; the
    last token of every sequence predicts nothing (-100)."""
    if labels.numel() == 0:
        return labels
    ends_sequence = torch.zeros_like(labels, dtype=torch.bool)
    # cu_seqlens[s + 1] - 1 is sequence s's last token; for an empty sequence it is the last token of the
    # sequence before it (or, wrapping from -1, of the last one): an end either way, and no host sync.
    ends_sequence[(cu_seqlens[1:] - 1).long()] = True
    return labels.roll(-1).masked_fill(ends_sequence, -100)
