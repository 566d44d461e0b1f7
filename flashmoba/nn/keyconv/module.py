"""The key convolution as a layer: ``KeyConv``, its parameters and its decoding state."""

from __future__ import annotations

import torch
from torch import nn

from flashmoba._checks import BACKENDS, check_bool, check_choice, check_int
from flashmoba.nn.keyconv.ops import key_conv

__all__ = ["KeyConv"]


class KeyConv(nn.Module):
    """Learnable key convolution ``k'_t = k_t + SiLU(sum_l w_l k_{t-l} + b)`` over ``num_channels`` channels.

    Args:
        num_channels: key channels C (all KV heads: ``num_kv_heads * head_dim``).
        kernel_size: W >= 1 (the paper uses 3 and 5).
        bias: learn a bias inside the SiLU.
        backend: "auto", "reference" or "triton" (see ``key_conv``).

    Parameters start at zero: a fresh KeyConv is exactly the identity (see ``flashmoba.nn.keyconv``),
    and the SiLU's slope of 1/2 at zero gives the weights a gradient from the first step. What they learn is
    a deviation from that identity, which weight decay would pull back to zero, that is, to no convolution
    at all: the class attribute ``no_weight_decay = True`` asks training loops to leave them undecayed
    (the optimizer of ``flashmoba.train.loop`` does).

    Shapes: ``forward(k [B, T, C])`` or packed ``forward(k [N, C], cu_seqlens [S + 1])`` -> k's shape; with
    ``state`` from ``initial_state`` (``[S, W - 1, C]``, ``S = B`` for batched keys), calls on
    consecutive pieces of the sequences give the keys of one full pass.
    """

    no_weight_decay = True

    def __init__(self, num_channels: int, kernel_size: int = 3, bias: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.num_channels = check_int("num_channels", num_channels, 1)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_bool("bias", bias)
        self.weight = nn.Parameter(torch.empty(self.num_channels, self.kernel_size))
        self.bias = nn.Parameter(torch.empty(self.num_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero weight and bias: the identity map (see ``flashmoba.nn.keyconv`` for why)."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def initial_state(self, num_seqs: int, *, device=None, dtype=None) -> torch.Tensor:
        """A zero decoding state ``[num_seqs, W - 1, C]`` (no keys seen yet)."""
        return torch.zeros(
            num_seqs,
            self.kernel_size - 1,
            self.num_channels,
            device=device if device is not None else self.weight.device,
            dtype=dtype if dtype is not None else self.weight.dtype,
        )

    def forward(
        self, k: torch.Tensor, cu_seqlens: torch.Tensor | None = None, state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``k [B, T, C]`` or packed ``[N, C]`` (+ ``cu_seqlens``) -> same shape; see ``key_conv``."""
        return key_conv(k, self.weight, self.bias, cu_seqlens=cu_seqlens, state=state, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
