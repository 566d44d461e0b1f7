"""Cross entropy of an LM head without the full ``[N, V]`` logits: the linear layer and the loss fused and
chunked over tokens.

The plain path, ``F.cross_entropy(lm_head(h).float(), targets)``, keeps the logits in the compute dtype, a
float32 copy and the float32 gradient alive at once: at 32K tokens and a 32K vocabulary that is about
10 GB, more than the decoder's activations. ``linear_cross_entropy`` walks the tokens in chunks: for
each chunk it computes the logits, the summed loss and, right away, the logits' gradient, which it turns
into the chunk's hidden-state gradient and adds into the weight gradient. Only one chunk's logits exist
at any time, and the backward is a scaling of the stored gradients (the loss is linear in its incoming
gradient). The same idea as Liger-Kernel's fused linear cross entropy, written in plain PyTorch so that
it runs (and is tested) on every device and dtype.

Under autocast the matmuls run in the autocast dtype like ``nn.Linear`` would; softmax and loss are
float32; the weight gradient is accumulated in float32 over the chunks.
"""

from __future__ import annotations

import torch

from flashmoba._checks import check_int

__all__ = ["linear_cross_entropy"]


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        dtype = _compute_dtype(hidden, weight)
        h_all, w = hidden.to(dtype), weight.to(dtype)
        accumulate = torch.promote_types(torch.float32, weight.dtype)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if weight.requires_grad else None
        )
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = h_all[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            keep = t != ignore_index
            rows, safe = torch.arange(t.shape[0], device=t.device), t.clamp(min=0)  # integer indexing: no sync
            logits = (h @ w.t()).to(accumulate)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits[rows, safe]) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of losses) / d logits = softmax - one_hot(target), zero on ignored rows (in place).
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[rows, safe] -= keep.to(accumulate)
            grad_logits = grad_logits.mul_(keep[:, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).to(accumulate)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Summed cross entropy of the logits ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    Args:
        hidden: ``[N, H]`` hidden states (the LM head's input).
        weight: ``[V, H]`` the LM head's weight (no bias).
        targets: int64 ``[N]`` target tokens, ``ignore_index`` for rows without a target.
        chunk_size: tokens per chunk (one ``[chunk_size, V]`` float32 logits block lives at a time).
        ignore_index: the target value that contributes nothing.

    Returns:
        A scalar: the sum over the rows with a target, in float32 (float64 for float64 weights). Its
        gradients flow to ``hidden`` and ``weight``; they are computed during the forward, so a backward
        costs no second pass over the vocabulary.
    """
    chunk_size = check_int("chunk_size", chunk_size, 1)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)
