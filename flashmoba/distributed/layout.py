"""Which tokens of a sequence each rank holds: the two sharding layouts of context parallelism.

A sequence of ``L`` tokens is cut into equal chunks and every rank of a group of ``W`` holds some of them,
in increasing order of position:

* ``"zigzag"``: ``2W`` chunks of ``L / (2W)`` tokens; rank ``r`` holds chunks ``r`` and ``2W - 1 - r``.
  Causal work grows with the position (routing scores every earlier block, dense attention every earlier
  key), and each rank's pair of chunks has the same sum of positions, so every rank gets the same work:
  the load balance of ring attention's zigzag split. ``L`` must be divisible by ``2W``.
* ``"contiguous"``: ``W`` chunks of ``L / W``; rank ``r`` holds chunk ``r``. The natural split when the
  work does not depend on the position (non-causal attention). ``L`` must be divisible by ``W``.

Chunks need not fall on MoBA block boundaries: every rank attends over the gathered keys of the whole
sequence (``flashmoba.distributed.attention``), so a block whose tokens lie on two ranks is one block,
as it is for packed documents, whose blocks count from each document's start wherever it lies.
"""

from __future__ import annotations

import torch

from flashmoba._checks import check_choice, check_int

__all__ = ["LAYOUTS", "check_length", "local_positions", "rank_major_order"]

LAYOUTS = ("zigzag", "contiguous")


def _chunks(layout: str, world_size: int) -> int:
    return 2 * world_size if layout == "zigzag" else world_size


def check_length(name: str, length: int, world_size: int, layout: str) -> int:
    """``length`` if the layout splits it evenly over ``world_size`` ranks, else a ValueError naming ``name``."""
    check_choice("layout", layout, LAYOUTS)
    length = check_int(name, length, 0)
    chunks = _chunks(layout, world_size)
    if length % chunks:
        what = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(
            f"{name} has {length} tokens: the {layout} layout over {world_size} ranks cuts them into {chunks} "
            f"equal chunks, so the length must be divisible by {what} = {chunks}"
        )
    return length


def local_positions(length: int, world_size: int, rank: int, layout: str, device=None) -> torch.Tensor:
    """int64 ``[length // world_size]``: the positions of the tokens rank ``rank`` holds, increasing.

    Args:
        length: tokens of the whole sequence (checked by ``check_length``).
        world_size: ranks of the group. rank: this rank's index in the group.
        layout: "zigzag" or "contiguous" (module docstring).
    """
    check_length("length", length, world_size, layout)
    check_int("rank", rank, 0, world_size - 1)
    if layout == "contiguous":
        size = length // world_size
        return torch.arange(rank * size, (rank + 1) * size, device=device)
    size = length // (2 * world_size)
    first = torch.arange(rank * size, (rank + 1) * size, device=device)
    second = (2 * world_size - 1 - rank) * size + torch.arange(size, device=device)
    return torch.cat([first, second])


def rank_major_order(length: int, world_size: int, layout: str, device=None) -> torch.Tensor:
    """int64 ``[length]``: the positions of the ranks' tokens concatenated rank after rank.

    An all-gather of the local parts yields the sequence in this order: element ``i`` of the gathered
    tensor is the token at position ``rank_major_order(...)[i]``.
    """
    return torch.cat([local_positions(length, world_size, r, layout, device) for r in range(world_size)])
