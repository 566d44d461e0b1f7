"""Stage 2 of FlashMoBA routing: fused tiled top-k, with no score matrix in memory.

One program owns a tile of ``BLOCK_M`` queries of one sequence and one query head. It streams the
centroid tiles of that sequence, computes the scores on tensor cores, and keeps a running top-k per query in
registers; only the final ``[N, HQ, topk]`` block ids (and, for the block index, their global block ids) are
written, so memory is O(N * HQ * topk).

Scores are compared as int32 *keys* (``_score_keys``): the float bits mapped so that the integer
order is the score order, with the low ``log2(BLOCK_N)`` bits replaced by the inverted column, so that
one integer max gives both a query's best score in the tile and its column. The selection is therefore
exact on scores rounded down to ``23 - log2(BLOCK_N)`` mantissa bits (a relative step of 2**-17 for 64
blocks a tile, 500 times finer than bf16). Once every list of a program holds only non-negative scores
(late in long rows, typically), no negative score can enter again, and the keys skip ordering the
negative ones.

The running list of a query holds, per slot, a key's score part with the slot number in its free low bits,
and the block id. A row's values are therefore distinct, its minimum (the query's *threshold*) is its worst
entry, and one compare finds that entry's slot: no second reduction to break ties. Per centroid tile
(loaded by TMA) every query's best key moves in over its list's worst entry if its score part beats the
threshold's, and further rounds follow while some query's best remaining score still does (random scores
need one or two rounds per tile late in a long sequence, more early on). A round finds the next best key
as the largest one below the key just taken (one subtraction and one unsigned min per score), so the tile
itself is never rewritten. -inf never beats a threshold and NaN keys lie below -inf's, so such blocks are
never selected.

Ties (equal score parts). The scan visits blocks in ascending order and a new block must beat the
threshold strictly, so a later block never displaces an earlier one of equal score: the reference's rule
(the lower block wins). The one departure: when two entries of a list tie for the worst, the lower slot is
evicted, which may be the lower block. Either choice is a valid top-k of the rounded scores, and such a tie
needs two blocks whose scores agree to within one key step, which random inputs rarely produce.

What bounds the kernel: the rounds and the per-tile bookkeeping, integer work on the CUDA cores for every
score of a tile, rather than the tensor cores or memory traffic. So the centroid loads are left as they are
(the software pipeliner skips the tile loop because it contains the round loop, and pipelining them would
only hide time that is not the bottleneck), and a round is a chain of shuffles and CTA barriers whose
latency only other resident programs can hide: the launch (``flashmoba.configs.route_topk``) uses small
programs (one warpgroup, 64 queries) under a register cap that lets more of them share an SM.

Causal tiles are staged as in flash attention: the blocks every query of the tile may see are scanned
without masks, and only the last few tiles (the diagonal) pay for the causal mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from flashmoba import configs
from flashmoba.routing.centroids import block_centroids
from flashmoba.routing.result import BlockIndex, block_index_from_keys, block_key_dtype, block_layout, block_sort_rows

_NO_BLOCK = tl.constexpr(2**30)  # ids of empty slots are _NO_BLOCK + slot: distinct, above every block
_NEG_INF_FLIPPED = tl.constexpr(-2139095041)  # the bits of -inf (0xFF800000), magnitude flipped, as int32
# A key's score part is (flipped bits & -BLOCK_N) + _KEY_OFFSET - BLOCK_N; its column part the low bits.
_KEY_OFFSET = tl.constexpr(0x800000)
_NO_KEY = tl.constexpr(-(2**31))  # below every score key: masked and already merged scores


@triton.jit
def _score_keys(scores, signed, BLOCK_N: tl.constexpr):
    """int32 keys of a ``[BLOCK_M, BLOCK_N]`` float32 score tile: the integer order is the score order
    and the low ``log2(BLOCK_N)`` bits hold the inverted column, so that one integer max gives a row's
    best score and its column (the lowest column among equal scores). NaN keys lie below -inf's.

    ``signed`` (CTA-uniform): order the negative scores too. Without it, every negative score gets a key
    below +0.0's, which is exact for a tile where no list can take a negative score any more."""
    keys = scores.to(tl.int32, bitcast=True)
    if signed:
        keys = keys ^ ((keys >> 31) & 0x7FFFFFFF)  # negative floats: reverse the magnitude order
    # Drop the low bits, then add the inverted column plus an offset that wraps quiet NaNs (every NaN
    # that arithmetic makes; keys >= 0x7FC00000) round to the bottom, while +inf stays on top.
    return (keys & -BLOCK_N) + (0x7FFFFF - tl.arange(0, BLOCK_N))[None, :]  # 0x7FFFFF: _KEY_OFFSET - 1


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _round_state(top, thresh, BLOCK_N: tl.constexpr, SIGN: tl.constexpr):
    """One CTA-wide reduction: bit 0, some query's best remaining score beats its threshold (another
    round); with ``SIGN``, bit 1, some threshold is below +0.0's score part (signed keys needed)."""
    flags = (top > (thresh | (BLOCK_N - 1))).to(tl.int32)
    if SIGN:
        flags |= (thresh < _KEY_OFFSET - BLOCK_N).to(tl.int32) << 1
    return tl.reduce(flags, 0, _bitwise_or)


@triton.jit
def _merge_round(keys, top, block0, vals, ids, thresh, BLOCK_N: tl.constexpr, CLAMP: tl.constexpr):
    """Move every query's best remaining key ``top`` into its list if its score part beats the threshold;
    return the next best key: the largest key below ``top`` (the keys of a row are distinct)."""
    # The worst entry is the one equal to the threshold (list values are distinct in a row); ``top`` beats it
    # if its score part is higher: above the threshold with all of its low (slot) bits set.
    replace = (vals == thresh[:, None]) & (top > (thresh | (BLOCK_N - 1)))[:, None]
    slot = tl.arange(0, vals.shape[1])[None, :]
    vals = tl.where(replace, (top & -BLOCK_N)[:, None] | slot, vals)
    # The column is the inverted low bits; block0 is a multiple of BLOCK_N, so OR adds them.
    ids = tl.where(replace, (block0 | (~top & (BLOCK_N - 1)))[:, None], ids)
    # Keys below ``top`` have ``top - 1 - key`` in [0, 2**32) as unsigned, smallest for the largest one;
    # keys at or above it wrap to above every such gap. One subtraction and one unsigned min per score,
    # with no knock-out pass over the tile. Where no key lies below ``top`` this finds one above it, so
    # ``CLAMP`` turns that into _NO_KEY (see _merge_tile for when it cannot happen).
    below = top - 1
    gap = tl.min((below[:, None] - keys).to(tl.uint32, bitcast=True), axis=1)
    next_top = below - gap.to(tl.int32, bitcast=True)
    if CLAMP:
        next_top = tl.where(next_top < top, next_top, _NO_KEY)
    return next_top, vals, ids, tl.min(vals, axis=1)


@triton.jit
def _merge_tile(keys, block0, vals, ids, thresh, BLOCK_N: tl.constexpr, CLAMP: tl.constexpr):
    """Merge one ``[BLOCK_M, BLOCK_N]`` tile of score keys (blocks ``block0 ...``) into the running lists.

    ``thresh`` is the lowest value of each list (its worst entry). Also returns whether the next tile needs
    signed keys (thresholds only rise, so once every one is at least +0.0's, negative scores never enter
    again; taken from the first round's test alone, it is conservative, and the further rounds skip it).

    When to ``CLAMP``: a row takes a prefix of its keys in descending order, at most PICKS of them (the
    places its list contests; then the list holds only this tile's keys, all above the next one), so every
    round after the first has a row taking a key, there are at most PICKS rounds, and a row walks down at
    most PICKS + 1 keys. With every key of the tile valid (distinct), one always lies below ``top`` when
    PICKS < BLOCK_N; masked tiles (many equal _NO_KEY keys) and wider lists need the clamp."""
    top = tl.max(keys, axis=1)
    # Nearly every tile has a query with a candidate: the first round runs without the CTA-wide test.
    top, vals, ids, thresh = _merge_round(keys, top, block0, vals, ids, thresh, BLOCK_N, CLAMP)
    state = _round_state(top, thresh, BLOCK_N, True)
    signed = (state & 2) != 0
    while (state & 1) != 0:
        top, vals, ids, thresh = _merge_round(keys, top, block0, vals, ids, thresh, BLOCK_N, CLAMP)
        state = _round_state(top, thresh, BLOCK_N, False)
    return vals, ids, thresh, signed


@triton.jit
def _tile_scores(q, C, block, kv_head, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_N]`` scores of ``q`` against the centroids of ``BLOCK_N`` global blocks
    from ``block`` (one TMA tile of one KV head)."""
    cent = C.load([block, kv_head, 0]).reshape(BLOCK_N, BLOCK_D)
    return tl.dot(q, tl.trans(cent), input_precision=PRECISION)


@triton.jit
def _route_topk_kernel(
    Q,
    C,
    Indices,
    BlockKeys,
    QPos,
    cu_seqlens,
    cu_blocks,
    cu_tiles,
    tile_seq,
    stride_qn,
    stride_qh,
    stride_in,
    stride_ih,
    stride_kh,
    num_seqs,
    num_tiles,
    num_blocks_max,
    GROUP,
    key_heads,
    key_base,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    WRITE_KEYS: tl.constexpr,
    POSITIONS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Causal tiles late in a sequence scan the most blocks: launch them first (less tail at the end).
    pid = num_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tile_seq + pid)
    if seq >= num_seqs:
        return
    seq_start = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - seq_start
    first_block = tl.load(cu_blocks + seq)
    num_blocks = tl.load(cu_blocks + seq + 1) - first_block
    tile_start = (pid - tl.load(cu_tiles + seq)) * BLOCK_M

    pos = tile_start + tl.arange(0, BLOCK_M)  # positions local to the sequence
    row_ok = pos < seq_len
    rows = (seq_start + pos).to(tl.int64)
    if POSITIONS:  # the sequence's queries are given rows, at increasing positions QPos of the sequence
        pos = tl.load(QPos + rows, mask=row_ok, other=0).to(tl.int32)
        first_pos = tl.min(tl.where(row_ok, pos, 2**31 - 1), axis=0)
        last_pos = tl.max(tl.where(row_ok, pos, 0), axis=0)
    else:
        first_pos = tile_start
        last_pos = tl.minimum(seq_len, tile_start + BLOCK_M) - 1
    own = pos // BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        Q + rows[:, None] * stride_qn + h * stride_qh + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )

    # Causal: the own block is forced, so only TOPK - 1 places are contested, by blocks before it.
    PICKS: tl.constexpr = TOPK - 1 if CAUSAL else TOPK
    if CAUSAL:
        unmasked_end = tl.minimum(num_blocks, first_pos // BLOCK_SIZE)  # before every row's own block
        scan_end = tl.minimum(num_blocks, last_pos // BLOCK_SIZE)
    else:
        unmasked_end = num_blocks
        scan_end = num_blocks
    if PICKS == 0:
        unmasked_end = 0
        scan_end = 0
    unmasked_end = (unmasked_end // BLOCK_N) * BLOCK_N

    # Running lists, values score part | slot (see the module docstring); they start at -inf's score part,
    # which no score beats strictly. Slots >= PICKS hold the largest value (never the worst, never evicted).
    col = tl.arange(0, K_PAD)
    tl.static_assert(K_PAD <= BLOCK_N, "the slot must fit the low bits of a score part")
    NEG_INF: tl.constexpr = (_NEG_INF_FLIPPED & -BLOCK_N) + _KEY_OFFSET - BLOCK_N  # score part of -inf's keys
    vals = tl.where(col < PICKS, NEG_INF | col, 2**31 - 1)[None, :] + tl.zeros([BLOCK_M, K_PAD], tl.int32)
    ids = col[None, :] + tl.full([BLOCK_M, K_PAD], _NO_BLOCK, tl.int32)
    thresh = tl.min(vals, axis=1)
    signed = tl.min(thresh, axis=0) < _KEY_OFFSET - BLOCK_N  # some list takes negatives (+0.0's score part)
    kv_head = h // GROUP
    blocks = tl.arange(0, BLOCK_N)
    for j0 in range(0, unmasked_end, BLOCK_N):
        scores = _tile_scores(q, C, first_block + j0, kv_head, BLOCK_N, BLOCK_D, PRECISION)
        keys = _score_keys(scores, signed, BLOCK_N)
        vals, ids, thresh, signed = _merge_tile(keys, j0, vals, ids, thresh, BLOCK_N, PICKS >= BLOCK_N)
    for j0 in range(unmasked_end, scan_end, BLOCK_N):  # the diagonal (causal) and the sequence end
        scores = _tile_scores(q, C, first_block + j0, kv_head, BLOCK_N, BLOCK_D, PRECISION)
        valid = ((j0 + blocks) < scan_end)[None, :]
        if CAUSAL:
            valid = valid & ((j0 + blocks)[None, :] < own[:, None])
        keys = tl.where(valid, _score_keys(scores, signed, BLOCK_N), _NO_KEY)
        vals, ids, thresh, signed = _merge_tile(keys, j0, vals, ids, thresh, BLOCK_N, True)

    # Block ids of the picks plus the own block, ascending: repeated minimum extraction (ids are
    # distinct; empty slots hold ids >= _NO_BLOCK and end up as the -1 padding).
    picked = (col[None, :] < PICKS) & ((vals & -BLOCK_N) > NEG_INF)
    ids = tl.where(picked, ids, _NO_BLOCK + col[None, :])
    if CAUSAL:
        ids = tl.where(col[None, :] == PICKS, own[:, None], ids)
    ordered = tl.full([BLOCK_M, K_PAD], -1, dtype=tl.int32)
    for i in range(TOPK):
        smallest = tl.min(ids, axis=1)
        ordered = tl.where((col[None, :] == i) & (smallest < _NO_BLOCK)[:, None], smallest[:, None], ordered)
        ids = tl.where(ids == smallest[:, None], 2**31 - 1, ids)
    out = rows[:, None] * stride_in + h * stride_ih + col[None, :]
    store_ok = row_ok[:, None] & (col[None, :] < TOPK)
    tl.store(Indices + out, ordered, mask=store_ok)
    if WRITE_KEYS:
        # The block index's sort keys, head-major: each pick's global block, placed in its sort row
        # (block_sort_rows in result.py).
        keys = tl.where(ordered >= 0, first_block + ordered, num_blocks_max)
        keys += (h % key_heads) * (num_blocks_max + 1) + key_base
        tl.store(BlockKeys + h * stride_kh + rows[:, None] * TOPK + col[None, :], keys, mask=store_ok)


def route_topk(
    q: torch.Tensor,
    centroids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    layout=None,
    return_block_keys: bool = False,
    query_cu_seqlens: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
):
    """Top-k blocks of every query token from precomputed centroids.

    Args:
        q: ``[N, HQ, D]``; centroids: ``[num_blocks_max, HKV, D]`` in q's dtype, from ``block_centroids``.
        layout: the keys' ``block_layout(cu_seqlens, num_keys, block_size)`` if the caller has it already
            (required with ``query_cu_seqlens``).
        return_block_keys: also return the ``[HQ, N, topk]`` sort keys of the picks' global blocks for
            ``block_index_from_keys``.
        query_cu_seqlens: queries apart from the keys (``flashmoba.reference.route``): sequence ``s``'s
            queries are the rows ``query_cu_seqlens[s]:query_cu_seqlens[s + 1]`` of ``q``.
        query_positions: int32 ``[N]``, with ``query_cu_seqlens``: their increasing positions in the sequence.

    Returns:
        int32 ``[N, HQ, topk]``: local block ids, ascending, -1 padded (and the keys, if asked).
    """
    N, HQ, D = q.shape
    HKV = centroids.shape[1]
    if centroids.dtype != q.dtype:
        raise TypeError(f"centroids must have q's dtype {q.dtype}, got {centroids.dtype}")
    positions = query_cu_seqlens is not None
    if positions and layout is None:
        raise ValueError("query_cu_seqlens needs the keys' layout")
    cu_blocks, _, num_blocks_max = layout or block_layout(cu_seqlens, N, block_size)
    query_cu_seqlens = query_cu_seqlens if positions else cu_seqlens
    # Every row of every sequence is written (cu_seqlens covers [0, N]), padding slots included.
    indices = torch.empty((N, HQ, topk), dtype=torch.int32, device=q.device)
    keys = indices
    if return_block_keys:
        keys = torch.empty((HQ, N, topk), dtype=block_key_dtype(num_blocks_max), device=q.device)
    if N > 0:
        q = q if q.stride(-1) == 1 else q.contiguous()
        K_PAD = triton.next_power_of_2(topk)
        cfg = configs.route_topk(q.dtype, K_PAD, q.device)
        BLOCK_M, BLOCK_N = cfg.block_m, cfg.block_n
        cu_tiles, tile_seq, num_tiles_max = block_layout(query_cu_seqlens, N, BLOCK_M)
        BLOCK_D = triton.next_power_of_2(D)
        # TMA tiles of BLOCK_N centroids of one KV head; reads past the tensor (or past D) give zeros.
        centroid_tiles = TensorDescriptor.from_tensor(centroids.contiguous(), [BLOCK_N, 1, BLOCK_D])
        _route_topk_kernel[(num_tiles_max, HQ)](
            q,
            centroid_tiles,
            indices,
            keys,
            query_positions if positions else indices,
            query_cu_seqlens,
            cu_blocks,
            cu_tiles,
            tile_seq,
            q.stride(0),
            q.stride(1),
            indices.stride(0),
            indices.stride(1),
            keys.stride(0),
            cu_seqlens.numel() - 1,
            num_tiles_max,
            num_blocks_max,
            HQ // HKV,
            *block_sort_rows(HQ, num_blocks_max),
            HEAD_DIM=D,
            BLOCK_SIZE=block_size,
            TOPK=topk,
            K_PAD=K_PAD,
            CAUSAL=causal,
            WRITE_KEYS=return_block_keys,
            POSITIONS=positions,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=configs.dot_precision(q.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            maxnreg=cfg.maxnreg,
        )
    return (indices, keys) if return_block_keys else indices


def route_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    layout=None,
    query_cu_seqlens: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockIndex]:
    """The three routing stages: centroids, fused top-k, block -> query index.

    Args:
        q: ``[N, HQ, D]``; k: ``[N, HKV, D]``; cu_seqlens: int32/int64 ``[S + 1]``.
        layout: the keys' ``block_layout(cu_seqlens, N, block_size)`` if the caller has it already (computed
            once here otherwise and shared by the three stages).
        query_cu_seqlens: queries apart from the keys, as in ``route_topk`` (``q`` is then ``[Nq, HQ, D]``,
            and the block index's entries are its rows' pairs).
        query_positions: their positions, as in ``route_topk``.

    Returns:
        ``(indices int32 [N, HQ, topk], BlockIndex)``; no host synchronisation.
    """
    layout = layout or block_layout(cu_seqlens, k.shape[0], block_size)
    centroids = block_centroids(k, cu_seqlens, block_size, layout)
    indices, keys = route_topk(
        q,
        centroids,
        cu_seqlens,
        block_size,
        topk,
        causal,
        layout,
        return_block_keys=True,
        query_cu_seqlens=query_cu_seqlens,
        query_positions=query_positions,
    )
    return indices, block_index_from_keys(keys, topk, layout[2])
