"""Sharding a sequence over the ranks of a group and putting it back together, in the op's layout."""

from __future__ import annotations

import torch

from flashmoba._checks import check_choice, check_int, check_tensor
from flashmoba.distributed.comm import gather_sequence, group_rank, local_slice
from flashmoba.distributed.layout import LAYOUTS, check_length

__all__ = ["shard_sequence", "unshard_sequence"]


def _dim(x: torch.Tensor, dim) -> int:
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the sequence dim)")
    return check_int("dim", dim, -x.dim(), x.dim() - 1) % x.dim()


class _Unshard(torch.autograd.Function):
    """Gather; the gradient of the whole tensor, which every rank holds alike, is sliced, not summed."""

    @staticmethod
    def forward(ctx, x, dim, layout, group):
        ctx.args = (dim, layout, group)
        return gather_sequence(x, dim, layout, group)  # (no graph inside a Function's forward)

    @staticmethod
    def backward(ctx, grad):
        return local_slice(grad, *ctx.args), None, None, None


def shard_sequence(x: torch.Tensor, dim: int = 1, *, layout: str = "zigzag", group=None) -> torch.Tensor:
    """This rank's part of ``x`` along its sequence dim, in the layout the context-parallel ops expect.

    Args:
        x: the whole tensor, the same on every rank of ``group``: ``[B, T, ...]`` for
            ``context_parallel_moba_attn`` (``dim=1``), packed ``[N, ...]`` for
            the varlen op (``dim=0``).
        dim: the sequence dim.
        layout: "zigzag" (the length divisible by ``2 * world_size``) or "contiguous" (by ``world_size``);
            see ``flashmoba.distributed.layout``.
        group: the process group (None: the default group).

    Returns:
        ``x`` with ``x.shape[dim] / world_size`` positions along ``dim``: the rank's chunks, in increasing
        order of position. Differentiable (an index_select).
    """
    check_tensor("x", x)
    check_choice("layout", layout, LAYOUTS)
    return local_slice(x, _dim(x, dim), layout, group)


def unshard_sequence(x: torch.Tensor, dim: int = 1, *, layout: str = "zigzag", group=None) -> torch.Tensor:
    """The inverse of ``shard_sequence``: every rank's part -> the whole tensor, on every rank.

    Args:
        x: this rank's part (``[B, T / W, ...]`` with ``dim=1``); the same shape on every rank.
        dim: the sequence dim, as given to ``shard_sequence``.
        layout: as given to ``shard_sequence``.
        group: as given to ``shard_sequence``.

    Returns:
        ``[B, T, ...]`` in natural order (one all-gather). Differentiable for a loss that every rank
        computes alike from the whole tensor: the backward keeps this rank's slice of the gradient (no
        communication). For a loss that differs per rank, compute it on the local part instead.
    """
    check_tensor("x", x)
    check_choice("layout", layout, LAYOUTS)
    dim = _dim(x, dim)
    world_size, _ = group_rank(group)
    check_length(
        f"the whole x.shape[{dim}] (world_size * {x.shape[dim]})", world_size * x.shape[dim], world_size, layout
    )
    return _Unshard.apply(x, dim, layout, group)
