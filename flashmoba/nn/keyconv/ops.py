"""The key convolution's entry point: argument checks, the backend dispatch, autograd and the decode state.

``backend="triton"`` runs ``flashmoba.nn.keyconv.kernels`` (imported on first use, so this package
imports without triton) under ``_KeyConvTriton``; ``"reference"`` runs
``key_conv_reference`` under plain autograd. Either way the rolling
state is read as the left context and then overwritten here, outside autograd.
"""

from __future__ import annotations

import torch

from flashmoba._checks import TRITON_DTYPES, check_cu_seqlens, check_tensor, resolve_backend
from flashmoba.nn.keyconv.reference import key_conv_reference
from flashmoba.nn.varlen import token_sequence_ids, uniform_cu_seqlens

__all__ = ["key_conv"]


def _kernels():
    """The Triton kernels module, imported on first use: ``import flashmoba.nn`` must work without triton
    (the reference path), and ``key_conv`` has checked that triton is there before it gets here."""
    from flashmoba.nn.keyconv import kernels

    return kernels


class _KeyConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, weight, bias, cu_seqlens, seq_ids, state):
        ctx.save_for_backward(k, weight, bias, cu_seqlens, seq_ids, state)
        return _kernels().key_conv_fwd(k, weight, bias, cu_seqlens, seq_ids, state)

    @staticmethod
    def backward(ctx, dout):
        k, weight, bias, cu_seqlens, seq_ids, state = ctx.saved_tensors
        dk, dw, db = _kernels().key_conv_bwd(dout.contiguous(), k, weight, bias, cu_seqlens, seq_ids, state)
        return dk, dw, db, None, None, None


def _roll_state_(state, k, cu_seqlens):
    """Overwrite ``state [S, W - 1, C]`` with the last ``W - 1`` keys of every sequence (older state rows
    fill in for sequences shorter than ``W - 1`` tokens)."""
    context = state.shape[1]
    if context == 0 or k.shape[0] == 0:
        return
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # Local position, in this call's tokens, of the key that lands in state row j.
    source = lens[:, None] - context + torch.arange(context, device=k.device)
    from_keys = k[(cu_seqlens[:-1].long()[:, None] + source).clamp(min=0)]
    from_state = torch.gather(
        state, 1, (context + source).clamp(max=context - 1)[..., None].expand(-1, -1, state.shape[2])
    )
    state.copy_(torch.where((source >= 0)[..., None], from_keys.detach(), from_state))


def _check_key_conv_args(k, weight, bias, cu_seqlens, state):
    check_tensor("k", k)
    check_tensor("weight", weight)
    if not k.is_floating_point():
        raise TypeError(f"k must be a floating-point tensor, got {k.dtype}")
    if weight.dim() != 2 or weight.shape[1] < 1:
        raise ValueError(f"weight must be [C, W] with W >= 1, got shape {tuple(weight.shape)}")
    num_channels = weight.shape[0]
    if k.dim() not in (2, 3) or k.shape[-1] != num_channels:
        raise ValueError(f"k must be [B, T, {num_channels}] or packed [N, {num_channels}], got {tuple(k.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (num_channels,):
            raise ValueError(f"bias must be [{num_channels}], got shape {tuple(bias.shape)}")
    if cu_seqlens is not None:
        if k.dim() != 2:
            raise ValueError("cu_seqlens goes with packed k [N, C], not with a batch [B, T, C]")
        check_cu_seqlens(cu_seqlens, k.shape[0], k.device, None)
    if state is not None:
        check_tensor("state", state)
        num_seqs = k.shape[0] if k.dim() == 3 else (cu_seqlens.numel() - 1 if cu_seqlens is not None else 1)
        expected = (num_seqs, weight.shape[1] - 1, num_channels)
        if tuple(state.shape) != expected:
            raise ValueError(f"state must be [S, W - 1, C] = {list(expected)}, got {tuple(state.shape)}")
        if state.dtype != k.dtype or state.device != k.device:
            raise TypeError(
                f"state must match k's dtype and device ({k.dtype}, {k.device}), got ({state.dtype}, {state.device})"
            )


def key_conv(
    k: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal depthwise key convolution with SiLU and residual (see ``flashmoba.nn.keyconv``).

    Args:
        k: ``[B, T, C]`` batched keys, or ``[N, C]`` packed keys (with ``cu_seqlens``; without it, one sequence).
        weight: ``[C, W]`` (column ``W - 1`` weighs the current token); bias: optional ``[C]``.
        cu_seqlens: int32/int64 ``[S + 1]`` boundaries of packed sequences.
        state: optional ``[S, W - 1, C]`` (``S = B`` for batched keys), k's dtype: the keys before each
            sequence's first token; updated in place to the last ``W - 1`` keys (decoding).
        backend: "auto", "reference" (PyTorch) or "triton".

    Returns:
        the convolved keys, same shape and dtype as ``k``.
    """
    _check_key_conv_args(k, weight, bias, cu_seqlens, state)
    backend = resolve_backend(backend, k.device)
    if backend == "triton" and k.dtype not in TRITON_DTYPES:
        raise TypeError(f"dtype {k.dtype} is not supported by backend='triton' ({TRITON_DTYPES})")
    flat = k.reshape(-1, k.shape[-1]) if k.dim() == 3 else k
    if cu_seqlens is None:
        num_seqs, seq_len = (k.shape[0], k.shape[1]) if k.dim() == 3 else (1, k.shape[0])
        cu_seqlens = uniform_cu_seqlens(num_seqs, seq_len, k.device)
    if flat.shape[0] == 0:
        return k.clone()
    seq_ids = token_sequence_ids(cu_seqlens, flat.shape[0])
    # A copy: the state is overwritten below, but the backward still needs this call's left context.
    context = None if state is None else state.detach().clone()
    if backend == "triton":
        out = _KeyConvTriton.apply(
            flat.contiguous(),
            weight.contiguous(),
            bias,
            cu_seqlens,
            seq_ids.to(torch.int32),
            context,
        )
    else:
        out = key_conv_reference(flat, weight, bias, cu_seqlens, seq_ids, context)
    if state is not None:
        with torch.no_grad():
            _roll_state_(state, flat, cu_seqlens)
    return out.view_as(k)
