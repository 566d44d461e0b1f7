"""Rotary position embedding (RoPE) of packed tokens at explicit positions.

Positions are passed per token, so packed documents restart at 0 and decoded tokens continue from the
cache length. The rotation pairs channel ``i`` with ``i + D/2`` (the "rotate half" layout of Llama / HF),
computed in float32 and returned in the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary"]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [N, H, D]`` (``D`` even) by the angles ``positions[n] * theta ** (-2i / D)``.

    Args:
        x: ``[N, H, D]`` queries or keys; positions: integer ``[N]`` token positions; theta: the base.

    Returns:
        ``[N, H, D]`` in x's dtype.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=compute) / head_dim)
    angles = positions.to(compute)[:, None] * inv_freq  # [N, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, :]
    xc = x.to(compute)
    first, second = xc.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)
