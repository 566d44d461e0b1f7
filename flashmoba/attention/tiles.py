"""What a key-tile program of the attention engine sees: its keys, and the queries that selected them.

Forward and backward share one schedule: a program owns one key tile (``BLOCK_N`` keys of one global
block, one KV head) and walks the block -> query index (``flashmoba.routing.result``) of the query
heads that read this KV head, gathering ``BLOCK_M`` of those queries at a time into a dense tile. These
helpers decode that index; they hold no policy of either pass.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_bounds(Offsets, h, g, num_blocks_max):
    """``[start, end)`` in the entries of segment (query head ``h``, global block ``g``), head-major."""
    seg = h * (num_blocks_max + 1) + g.to(tl.int64)
    return tl.load(Offsets + seg), tl.load(Offsets + seg + 1)


@triton.jit
def gathered_queries(Entries, e, row_ok, h, HQ: tl.constexpr, TOPK: tl.constexpr):
    """Query tokens and pair ids of entries ``e`` of head ``h``: entries are the head's pair positions
    ``t * TOPK + slot``, and per-pair scratch rows are indexed by pair id ``(t * HQ + h) * TOPK + slot``."""
    pos = tl.load(Entries + e, mask=row_ok, other=0).to(tl.int64)
    t = pos // TOPK
    return t, (t * HQ + h) * TOPK + (pos - t * TOPK)


@triton.jit
def key_tile_of_program(
    g, split, cu_seqlens, cu_blocks, block_seq, num_seqs, BLOCK_SIZE, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """The keys of program (global block ``g``, key tile ``split``).

    Returns ``(active, block_start, key_offset, key_ok, num_own)``: ``active`` is false for programs past
    the real blocks (the grid is sized from shapes only) and past the end of a partial last block;
    ``key_offset`` [BLOCK_N] counts from the block start; ``num_own`` is the number of the block's own
    queries at the head of each of its segments (causal: they always select their block and are the
    smallest tokens that do) or 0.
    """
    seq = tl.load(block_seq + g)
    active = seq < num_seqs
    seq = tl.where(active, seq, 0)
    seq_end = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    block_start = tl.load(cu_seqlens + seq).to(tl.int64) + (g - tl.load(cu_blocks + seq)) * BLOCK_SIZE
    block_end = tl.minimum(block_start + BLOCK_SIZE, seq_end)
    active = active & (block_start + split * BLOCK_N < block_end)
    key_offset = split * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = block_start + key_offset < block_end
    if CAUSAL:
        num_own = block_end - block_start
    else:
        num_own = tl.zeros_like(block_end)
    return active, block_start, key_offset, key_ok, num_own
