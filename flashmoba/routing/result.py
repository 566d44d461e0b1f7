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
    head-major, so that the segments come from sorts of 16-bit keys over a few heads at a time (half the
    radix passes of a flat sort by (block, head) at long lengths; :func:`block_index_from_keys`).
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

import torch

__all__ = ["BlockIndex", "MoBARouting", "block_index_from_keys", "block_key_dtype", "block_layout",
           "build_block_index", "entries_dtype", "max_num_blocks"]


def max_num_blocks(num_tokens: int, block_size: int, num_seqs: int) -> int:
    """``num_blocks_max``: a bound on the blocks of ``num_seqs`` sequences of ``num_tokens`` tokens in all,
    from the shapes alone."""
    return num_tokens // block_size + num_seqs


def entries_dtype(pairs_per_head: int) -> torch.dtype:
    """dtype of ``BlockIndex.entries``, per-head pair positions below ``pairs_per_head = N * topk``."""
    return torch.int32 if pairs_per_head < 2**31 else torch.int64


def block_layout(cu_seqlens: torch.Tensor, num_tokens: int, block_size: int):
    """Global block bookkeeping of a packed batch, with static shapes.

    Returns:
        ``(cu_blocks int32 [S + 1], block_seq int32 [num_blocks_max], num_blocks_max)``.
    """
    num_seqs = cu_seqlens.numel() - 1
    num_blocks_max = max_num_blocks(num_tokens, block_size, num_seqs)
    device = cu_seqlens.device
    blocks = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + (block_size - 1), block_size, rounding_mode="floor")
    # Few launches on purpose: this runs on every routing call, and at 8K tokens the host is the bottleneck.
    cu_blocks = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    torch.cumsum(blocks, 0, dtype=torch.int32, out=cu_blocks[1:])
    g = torch.arange(num_blocks_max, dtype=torch.int32, device=device)
    block_seq = torch.searchsorted(cu_blocks[1:], g, right=True, out_int32=True)
    return cu_blocks, block_seq, num_blocks_max


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


def _heads_per_sort_row(num_heads: int, num_blocks_max: int, key_dtype: torch.dtype) -> int:
    """How many heads share one row of the block-index sort: the most (a divisor of ``num_heads``) whose
    segment ids all fit one 16-bit key. Few long rows sort faster than many short ones (4 rows of 33M
    pairs: 2.8 ms, 16 rows of 8.4M: 3.3 ms on an H200); 32-bit keys keep a row per head."""
    if key_dtype != torch.int16:
        return 1
    fits = 2**16 // (num_blocks_max + 1)
    return max(d for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= max(fits, 1))


def block_index_from_keys(keys: torch.Tensor, topk: int, num_blocks_max: int) -> BlockIndex:
    """The block view from the global block of every pair, head-major.

    Args:
        keys: ``[HQ, N, topk]`` of :func:`block_key_dtype`: the global block ``g`` of head ``h``'s pair
            ``(t, slot)``, or ``num_blocks_max`` where ``indices`` is -1.

    A stable sort keeps each segment in ascending pair-position order, which is ascending token order; the
    sort's permutation gives the entries, and a binary search of the sorted keys the offsets (no atomics).
    Heads are sorted in rows of several (:func:`_heads_per_sort_row`): a head's segment ids within its row,
    ``(h % heads_per_row) * (num_blocks_max + 1) + g``, shifted into the signed range, stay 16-bit keys.
    """
    num_heads = keys.shape[0]
    stride = num_blocks_max + 1  # segments per head
    keys = keys.reshape(num_heads, -1)
    pairs_per_head = keys.shape[1]
    device = keys.device
    per_row = _heads_per_sort_row(num_heads, num_blocks_max, keys.dtype)
    head_in_row = torch.arange(num_heads, device=device).view(-1, 1) % per_row
    first_id = 0
    if per_row > 1:  # in int16 throughout: every id lies in [-2**15, 2**15)
        first_id = -(2**15)
        keys = keys + (head_in_row * stride + first_id).to(keys.dtype)
    sorted_ids, order = torch.sort(keys.reshape(num_heads // per_row, -1), dim=-1, stable=True)
    bounds = torch.arange(per_row * stride, device=device) + first_id
    starts = torch.searchsorted(sorted_ids, bounds.to(keys.dtype).expand(sorted_ids.shape[0], -1).contiguous())
    row_base = torch.arange(sorted_ids.shape[0], device=device).view(-1, 1) * (per_row * pairs_per_head)
    total = torch.full((1,), num_heads * pairs_per_head, dtype=torch.int64, device=device)
    # Row positions -> per-head pair positions; the subtraction runs after the narrowing copy (fewer bytes).
    positions = order.view(num_heads, pairs_per_head).to(entries_dtype(pairs_per_head))
    if per_row > 1:
        positions -= (head_in_row * pairs_per_head).to(positions.dtype)
    return BlockIndex(offsets=torch.cat([(starts + row_base).flatten(), total]), entries=positions.flatten(),
                      num_heads=num_heads, topk=topk)


def build_block_index(
    indices: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, layout=None
) -> BlockIndex:
    """Invert ``indices [N, HQ, topk]`` into the block view (no host sync).

    ``layout``: ``block_layout(...)`` if the caller has it already. The Triton router writes the block
    keys itself and calls :func:`block_index_from_keys` directly.
    """
    N, HQ, topk = indices.shape
    device = indices.device
    cu_blocks, _, num_blocks_max = layout or block_layout(cu_seqlens, N, block_size)
    token_seq = torch.searchsorted(
        cu_seqlens[1:].long(), torch.arange(N, device=device), right=True
    )
    g = cu_blocks[token_seq].view(N, 1, 1) + indices
    keys = torch.where(indices >= 0, g, num_blocks_max).to(block_key_dtype(num_blocks_max))
    return block_index_from_keys(keys.permute(1, 0, 2), topk, num_blocks_max)


@dataclass
class MoBARouting:
    """What :func:`flashmoba.moba_route_varlen` returns.

    Attributes:
        indices: int32 ``[N, HQ, topk]``, selected local block ids, ascending, -1 padded.
        cu_seqlens: the ``[S + 1]`` sequence boundaries the routing was computed for.
        block_size, topk, causal: the routing parameters.
        cu_blocks: int32 ``[S + 1]``, global block numbering (see the module docstring).
        block_seq: int32 ``[num_blocks_max]``, the sequence of each global block (``S`` = padding).
        num_blocks_max: static upper bound on the number of blocks.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    block_size: int
    topk: int
    causal: bool
    cu_blocks: torch.Tensor
    block_seq: torch.Tensor
    num_blocks_max: int
    _block_index: BlockIndex | None = field(default=None, repr=False)

    @property
    def block_index(self) -> BlockIndex:
        """The block -> query view (built on first use when the backend did not provide it)."""
        if self._block_index is None:
            layout = (self.cu_blocks, self.block_seq, self.num_blocks_max)
            self._block_index = build_block_index(self.indices, self.cu_seqlens, self.block_size, layout)
        return self._block_index

    def queries_of(self, seq: int, head: int, block: int) -> torch.Tensor:
        """Query tokens (local to sequence ``seq``) that selected local block ``block`` in head ``head``.

        A convenience for inspection (it reads device values on the host).
        """
        bi = self.block_index
        seg = head * (self.num_blocks_max + 1) + int(self.cu_blocks[seq]) + block
        a, b = int(bi.offsets[seg]), int(bi.offsets[seg + 1])
        return bi.tokens()[a:b] - int(self.cu_seqlens[seq])
