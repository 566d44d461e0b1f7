"""The collectives of context parallelism, on torch.distributed, with their autograd rules.

* gather: every rank's part of a sequence -> the whole sequence in natural order on every rank (one
  all-gather, then the layout's permutation); its gradient goes back to the owners with one
  reduce-scatter (each rank's contributions to every token, summed on the token's owner);
* the gather of keys and values is issued as two asynchronous all-gathers, and a callback runs between the
  arrival of the keys and that of the values: the routing, which needs only the keys, overlaps the
  transfer of the values. Its backward issues both reduce-scatters before waiting for either.

NCCL on GPUs (all-gather and reduce-scatter into flat tensors); gloo on CPUs, where the reduce-scatter is an
all-reduce and a slice (gloo's reduce-scatter is missing from some torch versions; CPU runs are for tests).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from flashmoba.distributed.layout import check_length, local_positions, rank_major_order

__all__ = ["group_rank", "gather_sequence", "gather_keys_values", "local_slice"]


def group_rank(group) -> tuple[int, int]:
    """``(world_size, rank)`` of this process in ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: torch.distributed is not initialized; call torch.distributed.init_process_group first "
            "(torchrun sets up the environment it reads)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


@functools.lru_cache(maxsize=64)
def _orders(length: int, world_size: int, layout: str, device: torch.device):
    """``(rank-major order, its inverse)`` of a sequence of ``length`` tokens, cached per shape."""
    order = rank_major_order(length, world_size, layout, device)
    return order, torch.argsort(order)


def _all_gather(x: torch.Tensor, world_size: int, group):
    """Start an all-gather of ``x [n, ...]`` (contiguous) into ``[world_size * n, ...]``; -> (out, work)."""
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return out, gather(out, x, group=group, async_op=True)


def _reduce_scatter(x: torch.Tensor, world_size: int, rank: int, group):
    """Start a sum-reduce-scatter of ``x [world_size * n, ...]`` (contiguous); -> (this rank's [n, ...], work)."""
    n = x.shape[0] // world_size
    if dist.get_backend(group) == "gloo":
        total = x.clone()
        return total[rank * n : (rank + 1) * n], dist.all_reduce(total, group=group, async_op=True)
    out = x.new_empty((n, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return out, scatter(out, x, group=group, async_op=True)


class _Gather:
    """An all-gather along ``dim`` in flight; ``wait`` returns the whole sequence in natural order."""

    def __init__(self, x: torch.Tensor, dim: int, layout: str, group):
        self.world_size, _ = group_rank(group)
        self.dim, self.layout = dim, layout
        moved = x.movedim(dim, 0).contiguous()
        self.length = check_length("the gathered sequence", self.world_size * moved.shape[0], self.world_size, layout)
        self.input = moved  # alive until the collective is done
        self.out, self.work = _all_gather(moved, self.world_size, group)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        _, inverse = _orders(self.length, self.world_size, self.layout, self.out.device)
        return self.out.index_select(0, inverse).movedim(0, self.dim)


class _Scatter:
    """The gradient of a gather in flight: the whole sequence's gradient -> this rank's part, summed."""

    def __init__(self, grad: torch.Tensor, dim: int, layout: str, group):
        world_size, rank = group_rank(group)
        self.dim = dim
        moved = grad.movedim(dim, 0)
        order, _ = _orders(moved.shape[0], world_size, layout, grad.device)
        self.input = moved.index_select(0, order)  # alive until the collective is done
        self.out, self.work = _reduce_scatter(self.input, world_size, rank, group)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out.movedim(0, self.dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, layout, group):
        ctx.args = (dim, layout, group)
        return _Gather(x, dim, layout, group).wait()

    @staticmethod
    def backward(ctx, grad):
        return _Scatter(grad, *ctx.args).wait(), None, None, None


class _GatherKeysValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, dim, layout, group, on_keys):
        ctx.args = (dim, layout, group)
        pending_k, pending_v = _Gather(k, dim, layout, group), _Gather(v, dim, layout, group)
        k_full = pending_k.wait()
        if on_keys is not None:
            on_keys(k_full.detach())  # runs while the values are still in flight
        return k_full, pending_v.wait()

    @staticmethod
    def backward(ctx, dk, dv):
        pending_k, pending_v = _Scatter(dk.contiguous(), *ctx.args), _Scatter(dv.contiguous(), *ctx.args)
        return pending_k.wait(), pending_v.wait(), None, None, None, None


def gather_sequence(x: torch.Tensor, dim: int, layout: str, group) -> torch.Tensor:
    """All ranks' parts of ``x`` along ``dim`` -> the whole sequence, natural order, on every rank.

    Differentiable: the gradient of the whole sequence is summed over the ranks onto each token's owner
    (one reduce-scatter), so each rank gets the gradient of its own part from every rank's use of it.
    """
    return _GatherSequence.apply(x, dim, layout, group)


def gather_keys_values(k: torch.Tensor, v: torch.Tensor, dim: int, layout: str, group, on_keys=None):
    """``gather_sequence`` of ``k`` and ``v`` together, calling ``on_keys(k_full)`` (detached) between the
    keys' arrival and the values'; the backward reduce-scatters both gradients, issued together."""
    return _GatherKeysValues.apply(k, v, dim, layout, group, on_keys)


def local_slice(x: torch.Tensor, dim: int, layout: str, group) -> torch.Tensor:
    """This rank's part of the whole sequence ``x`` along ``dim`` (an index_select: differentiable)."""
    world_size, rank = group_rank(group)
    length = check_length(f"x.shape[{dim}]", x.shape[dim], world_size, layout)
    return x.index_select(dim, local_positions(length, world_size, rank, layout, x.device))
