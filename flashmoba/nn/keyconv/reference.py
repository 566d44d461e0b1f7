"""The key convolution in PyTorch: the definition (the oracle of the tests) and the "reference" backend.

Both take packed keys ``k [N, C]``, ``weight [C, W]`` (torch's cross-correlation order: column ``W - 1``
weighs the current token), an optional ``bias [C]``, sequence boundaries ``cu_seqlens [S + 1]`` and an
optional left context ``state [S, W - 1, C]``, and return ``k_t + SiLU(sum_l weight[:, W - 1 - l] * k_{t-l}
+ bias)`` in k's dtype. Neither touches the state; ``flashmoba.nn.keyconv.key_conv`` rolls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["key_conv_naive", "key_conv_reference"]


def key_conv_reference(k, weight, bias, cu_seqlens, seq_ids, state):
    """The ``backend="reference"`` path (any device and dtype; differentiable): ``W`` shifted multiply-adds
    over the sequences laid end to end, each preceded by its ``W - 1`` context rows.

    One padded copy of the keys serves every sequence, so there is no per-sequence loop and the keys stay
    in their ``[N, C]`` layout (``F.conv1d`` would want ``[1, C, N]`` and a padding per sequence); with
    ``W`` a handful of lags, the ``W`` passes over the copy are the whole cost.

    Args:
        k: ``[N, C]``; weight: ``[C, W]``; bias: ``[C]`` or None; cu_seqlens: ``[S + 1]``.
        seq_ids: int ``[N]``, each token's sequence; state: ``[S, W - 1, C]`` or None (zeros).

    Returns:
        ``[N, C]`` in k's dtype.
    """
    num_tokens, num_channels = k.shape
    context = weight.shape[1] - 1
    num_seqs = cu_seqlens.numel() - 1
    if state is None:
        state = k.new_zeros(num_seqs, context, num_channels)
    # Sequence s's tokens move right by (s + 1) * context slots; its context fills the gap before them.
    token_slot = torch.arange(num_tokens, device=k.device) + (seq_ids + 1) * context
    context_slot = (
        cu_seqlens[:-1].long()[:, None]
        + torch.arange(num_seqs, device=k.device)[:, None] * context
        + torch.arange(context, device=k.device)
    ).reshape(-1)
    extended = k.new_zeros(num_tokens + num_seqs * context, num_channels)
    extended = extended.index_copy(0, token_slot, k).index_copy(0, context_slot, state.reshape(-1, num_channels))
    # Row r of `pre` is the pre-activation of extended slot r + context.
    rows = extended.shape[0] - context
    weight = weight.to(k.dtype)
    pre = sum(weight[:, j] * extended[j : j + rows] for j in range(context + 1))
    if bias is not None:
        pre = pre + bias.to(k.dtype)
    return k + F.silu(pre[token_slot - context])


def key_conv_naive(k, weight, bias=None, cu_seqlens=None, state=None):
    """The definition, one sequence and one lag at a time (the oracle of the tests; differentiable).

    Args:
        k: ``[N, C]`` packed keys; weight: ``[C, W]``; bias: optional ``[C]``.
        cu_seqlens: ``[S + 1]`` (default: one sequence); state: optional ``[S, W - 1, C]`` left context.

    Returns:
        ``[N, C]``: ``k_t + SiLU(sum_l weight[:, W - 1 - l] * k_{t-l} + bias)``, in k's dtype.
    """
    num_tokens, num_channels = k.shape
    width = weight.shape[1]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, num_tokens])
    bounds = [int(x) for x in cu_seqlens]
    outputs = []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        left = state[s] if state is not None else k.new_zeros(width - 1, num_channels)
        padded = torch.cat([left.to(k.dtype), k[start:end]])
        pre = sum(
            weight[:, width - 1 - lag] * padded[width - 1 - lag : width - 1 - lag + end - start] for lag in range(width)
        )
        if bias is not None:
            pre = pre + bias
        outputs.append(k[start:end] + F.silu(pre))
    return torch.cat(outputs) if outputs else k.clone()
