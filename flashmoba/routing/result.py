"""The routing result: which key blocks every query selected, and the inverse (block -> queries) view.

Both views have static shapes (they depend only on tensor shapes, never on data), so building them needs
no host synchronisation and can be captured in a CUDA graph or traced by torch.compile.

Block numbering
    Blocks are numbered globally over the packed batch: sequence ``s`` owns the global blocks
    ``cu_blocks[s] .. cu_blocks[s + 1] - 1`` (``ceil(L_s / block_size)`` of them), and local block ``j``
    of sequence ``s`` is global block ``cu_blocks[s] + j``. ``num_blocks_max = N // block_size + S`` bounds
    the real count from the shapes alone; ``block_seq[g]`` is ``S`` for global blocks past the real ones.

Query view (``indices``)
    int32 ``[N, HQ, topk]``: local block ids, ascending, padded with -1 at the end.

Block view (``BlockIndex``, a CSR over *segments*)
    A segment is one (query head ``h``, global block ``g``) pair, numbered ``h * (num_blocks_max + 1) + g``:
    head-major, so that the segments come from stable sorts of 16-bit keys, a few heads per sort row (half
    the radix passes of a flat sort by (block, head) at long lengths; ``block_sort_rows``).
    Segment ``g = num_blocks_max`` of each head collects its empty (-1) slots. The entries of head ``h``
    are its pair positions ``i = t * topk + slot`` (``indices[t, h, slot] == j``; the pair id is
    ``(t * HQ + h) * topk + slot``), in ascending order of the query token ``t = i // topk``. Segment
    ``s`` occupies ``entries[offsets[s] : offsets[s + 1]]``; ``entries`` has the static length
    ``HQ * N * topk`` (head ``h``'s pairs in ``[h * N * topk, (h + 1) * N * topk)``). In causal mode the
    own-block queries of a block come first in each of its segments (they are the smallest tokens that
    select it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = [
    "BlockIndex",
    "BlockLayout",
    "MoBARouting",
    "block_index_from_keys",
    "block_key_dtype",
    "block_layout",
    "block_sort_rows",
    "build_block_index",
    "entries_dtype",
    "max_num_blocks",
]


def max_num_blocks(num_tokens: int, block_size: int, num_seqs: int) -> int:
    """``num_blocks_max``: a bound on the blocks of ``num_seqs`` sequences of ``num_tokens`` tokens in all,
    from the shapes alone."""
    return num_tokens // block_size + num_seqs


def entries_dtype(pairs_per_head: int) -> torch.dtype:
    """dtype of ``BlockIndex.entries``, per-head pair positions below ``pairs_per_head = N * topk``."""
    return torch.int32 if pairs_per_head < 2**31 else torch.int64


class BlockLayout(NamedTuple):
    """The global block numbering of a packed batch (module docstring), with static shapes.

    Attributes:
        cu_blocks: int32 ``[S + 1]``: sequence ``s`` owns global blocks ``cu_blocks[s] .. cu_blocks[s + 1] - 1``.
        block_seq: int32 ``[num_blocks_max]``: the sequence of each global block (``S`` past the real ones).
        num_blocks_max: ``max_num_blocks`` of the batch, a bound from the shapes alone.
    """

    cu_blocks: torch.Tensor
    block_seq: torch.Tensor
    num_blocks_max: int


def block_layout(cu_seqlens: torch.Tensor, num_tokens: int, block_size: int) -> BlockLayout:
    """The ``BlockLayout`` of ``num_tokens`` packed tokens in blocks of ``block_size`` (no host sync)."""
    num_seqs = cu_seqlens.numel() - 1
    num_blocks_max = max_num_blocks(num_tokens, block_size, num_seqs)
    device = cu_seqlens.device
    blocks = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + (block_size - 1), block_size, rounding_mode="floor")
    # Few launches on purpose: this runs on every routing call, and at 8K tokens the host is the bottleneck.
    cu_blocks = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    torch.cumsum(blocks, 0, dtype=torch.int32, out=cu_blocks[1:])
    g = torch.arange(num_blocks_max, dtype=torch.int32, device=device)
    block_seq = torch.searchsorted(cu_blocks[1:], g, right=True, out_int32=True)
    return BlockLayout(cu_blocks, block_seq, num_blocks_max)


@dataclass
class BlockIndex:
    """Block -> query view (CSR over segments ``h * (num_blocks_max + 1) + g``); see the module docstring."""

    offsets: torch.Tensor  # int64 [HQ * (num_blocks_max + 1) + 1]
    entries: torch.Tensor  # int32 (int64 if N * topk >= 2**31) [HQ * N * topk]: per-head pair positions
    num_heads: int
    topk: int

    @property
    def num_blocks_max(self) -> int:
        """Global blocks per head (each head has one more segment: its empty slots)."""
        return (self.offsets.numel() - 1) // self.num_heads - 1

    @property
    def counts(self) -> torch.Tensor:
        """int32 ``[HQ, num_blocks_max]``: the queries of each (head, global block)."""
        per_head = (self.offsets[1:] - self.offsets[:-1]).view(self.num_heads, -1)
        return per_head[:, :-1].to(torch.int32)  # without the empty-slot segments

    def tokens(self) -> torch.Tensor:
        """Entries as query token ids (same layout as ``entries``)."""
        return torch.div(self.entries, self.topk, rounding_mode="floor")


def block_key_dtype(num_blocks_max: int) -> torch.dtype:
    """The narrowest sort key holding every global block id and the empty-slot key ``num_blocks_max``:
    radix sort time scales with key width (int16 keys sort in half the passes of int32 ones)."""
    if num_blocks_max < 2**15:
        return torch.int16
    if num_blocks_max < 2**31:
        return torch.int32
    raise ValueError(f"too many blocks for the block index: {num_blocks_max}")


def block_sort_rows(num_heads: int, num_blocks_max: int) -> tuple[int, int]:
    """How the block index sorts: ``(heads_per_row, key_base)``.

    The pairs are sorted in rows of ``heads_per_row`` heads, under the sort key
    ``(h % heads_per_row) * (num_blocks_max + 1) + g + key_base`` (of ``block_key_dtype``) for head
    ``h``'s pair in global block ``g``. With 16-bit keys a row takes as many heads (a divisor of
    ``num_heads``) as the signed 16-bit range holds, ``key_base = -2**15`` shifting them into it: a few long
    rows sort faster than many short ones (fewer launches of the segmented radix sort, each over more
    data). 32-bit keys keep a row per head.
    """
    if block_key_dtype(num_blocks_max) != torch.int16:
        return 1, 0
    fits = 2**16 // (num_blocks_max + 1)
    heads_per_row = max(d for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= fits)
    return heads_per_row, (-(2**15) if heads_per_row > 1 else 0)


def block_index_from_keys(keys: torch.Tensor, topk: int, num_blocks_max: int) -> BlockIndex:
    """The block view from the sort key of every pair, head-major.

    Args:
        keys: ``[HQ, N, topk]`` sort keys (``block_sort_rows``) of the global block ``g`` of head ``h``'s
            pair ``(t, slot)``, with ``g = num_blocks_max`` where ``indices`` is -1.

    A stable sort keeps each segment in ascending pair-position order, which is ascending token order; the
    sort's permutation gives the entries, and a binary search of the sorted keys the offsets (no atomics).
    """
    num_heads = keys.shape[0]
    stride = num_blocks_max + 1  # segments per head
    pairs_per_head = keys[0].numel()
    device = keys.device
    heads_per_row, key_base = block_sort_rows(num_heads, num_blocks_max)
    rows = num_heads // heads_per_row
    sorted_keys, order = torch.sort(keys.reshape(rows, -1), dim=-1, stable=True)
    bounds = (torch.arange(heads_per_row * stride, device=device) + key_base).to(keys.dtype)
    starts = torch.searchsorted(sorted_keys, bounds.expand(rows, -1).contiguous())
    row_start = torch.arange(rows, device=device).view(-1, 1) * (heads_per_row * pairs_per_head)
    total = torch.full((1,), num_heads * pairs_per_head, dtype=torch.int64, device=device)
    # Row positions -> per-head pair positions, in one pass that also narrows them to int32 where they fit:
    # the low halves of the int64 positions (little-endian; every position is below 2**31).
    order = order.view(num_heads, pairs_per_head)
    head_start = torch.arange(num_heads, device=device).view(-1, 1) % heads_per_row * pairs_per_head
    if entries_dtype(pairs_per_head) == torch.int32:
        positions = torch.sub(order.view(torch.int32)[:, ::2], head_start.to(torch.int32))
    else:
        positions = order - head_start
    return BlockIndex(
        offsets=torch.cat([(starts + row_start).flatten(), total]),
        entries=positions.flatten(),
        num_heads=num_heads,
        topk=topk,
    )


def build_block_index(
    indices: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, layout: BlockLayout | None = None
) -> BlockIndex:
    """Invert ``indices [N, HQ, topk]`` into the block view (no host sync).

    ``layout``: the batch's ``BlockLayout`` if the caller has it already. The Triton router writes the block
    keys itself and calls ``block_index_from_keys`` directly.
    """
    N, HQ, topk = indices.shape
    device = indices.device
    cu_blocks, _, num_blocks_max = layout or block_layout(cu_seqlens, N, block_size)
    token_seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(N, device=device), right=True)
    g = torch.where(indices >= 0, cu_blocks[token_seq].view(N, 1, 1) + indices, num_blocks_max)
    heads_per_row, key_base = block_sort_rows(HQ, num_blocks_max)
    row_offset = torch.arange(HQ, device=device) % heads_per_row * (num_blocks_max + 1) + key_base
    keys = (g + row_offset.view(1, HQ, 1)).to(block_key_dtype(num_blocks_max))
    return block_index_from_keys(keys.permute(1, 0, 2), topk, num_blocks_max)


@dataclass
class MoBARouting:
    """What ``flashmoba.moba_route_varlen`` returns.

    Attributes:
        indices: int32 ``[N, HQ, topk]``, selected local block ids, ascending, -1 padded.
        cu_seqlens: the ``[S + 1]`` sequence boundaries the routing was computed for.
        block_size, topk, causal: the routing parameters (``block_size`` at most ``max(N, 16)``: a longer
            block is one block per sequence either way).
        layout: the ``BlockLayout`` (global block numbering, see the module docstring); its fields
            are also attributes: ``cu_blocks``, ``block_seq``, ``num_blocks_max``.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    block_size: int
    topk: int
    causal: bool
    layout: BlockLayout
    _block_index: BlockIndex | None = field(default=None, repr=False)

    @property
    def cu_blocks(self) -> torch.Tensor:
        return self.layout.cu_blocks

    @property
    def block_seq(self) -> torch.Tensor:
        return self.layout.block_seq

    @property
    def num_blocks_max(self) -> int:
        return self.layout.num_blocks_max

    @property
    def block_index(self) -> BlockIndex:
        """The block -> query view (built on first use when the backend did not provide it)."""
        if self._block_index is None:
            self._block_index = build_block_index(self.indices, self.cu_seqlens, self.block_size, self.layout)
        return self._block_index

    def queries_of(self, seq: int, head: int, block: int) -> torch.Tensor:
        """Query tokens (local to sequence ``seq``) that selected local block ``block`` in head ``head``.

        A convenience for inspection (it reads device values on the host).
        """
        bi = self.block_index
        seg = head * (self.num_blocks_max + 1) + int(self.cu_blocks[seq]) + block
        a, b = int(bi.offsets[seg]), int(bi.offsets[seg + 1])
        return bi.tokens()[a:b] - int(self.cu_seqlens[seq])
