"""The routing result: global block numbering and the block -> query CSR view, the inverse of ``indices``.

Expected values are rebuilt here with plain Python loops over tokens, heads and slots, independent of
the vectorised code in :mod:`flashmoba.routing.result`.
"""

import pytest
import torch
from factory import make_packed
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_block_index_inverse, expected_layout

import flashmoba
from flashmoba.routing import block_layout
from flashmoba.routing.result import MoBARouting, block_key_dtype, block_sort_rows

HEADS = [(1, 1), (2, 1), (4, 2), (3, 3), (4, 1)]  # (HQ, HKV): GQA groups 1, 2, 4


def _route(lens, hq, hkv, block_size, topk, causal, generator=None):
    q, k, _, cu = make_packed(lens, hq, hkv, 8, generator=generator)
    return flashmoba.moba_route_varlen(q, k, cu, block_size=block_size, topk=topk, causal=causal, backend="reference")


def _check_indices(routing, lens, num_blocks_of):
    """Rows are ascending, distinct, -1 padded, and hold as many blocks as the rule allows."""
    bs, topk = routing.block_size, routing.topk
    rows = routing.indices.tolist()
    token = 0
    for n in lens:
        for t in range(n):
            for row in rows[token]:
                valid = [j for j in row if j >= 0]
                assert row == valid + [-1] * (topk - len(valid))
                assert all(a < b for a, b in zip(valid, valid[1:]))
                own = t // bs
                if routing.causal:
                    assert own in valid and max(valid) == own
                    assert len(valid) == 1 + min(topk - 1, own)
                else:
                    assert len(valid) == min(topk, num_blocks_of(n)) and max(valid) < num_blocks_of(n)
            token += 1


@settings(max_examples=150, deadline=None)
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    heads=st.sampled_from(HEADS),
    block_size=st.integers(1, 9),
    topk=st.integers(1, 6),
    causal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_index_is_the_inverse_of_indices(lens, heads, block_size, topk, causal, seed):
    routing = _route(lens, *heads, block_size, topk, causal, torch.Generator().manual_seed(seed))
    _check_indices(routing, lens, lambda n: -(-n // block_size))
    assert_block_index_inverse(routing, lens)

    cu_blocks, block_seq = expected_layout(lens, block_size)
    assert routing.cu_blocks.dtype == routing.block_seq.dtype == torch.int32
    assert routing.cu_blocks.tolist() == cu_blocks
    assert routing.num_blocks_max >= len(block_seq)
    padding = [len(lens)] * (routing.num_blocks_max - len(block_seq))
    assert routing.block_seq.tolist() == block_seq + padding


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.integers(0, 30), min_size=1, max_size=3),
    heads=st.sampled_from(HEADS),
    block_size=st.integers(1, 6),
    topk=st.integers(1, 4),
    causal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_queries_of(lens, heads, block_size, topk, causal, seed):
    routing = _route(lens, *heads, block_size, topk, causal, torch.Generator().manual_seed(seed))
    starts = [sum(lens[:s]) for s in range(len(lens))]
    for s, n in enumerate(lens):
        for h in range(heads[0]):
            for j in range(-(-n // block_size)):
                expected = [t for t in range(n) if j in routing.indices[starts[s] + t, h].tolist()]
                assert routing.queries_of(s, h, j).tolist() == expected


def test_own_block_queries_come_first_in_causal_mode():
    lens, hq, block_size = (45, 0, 33), 4, 8
    routing = _route(lens, hq, 2, block_size, 3, True)
    for s, n in enumerate(lens):
        for h in range(hq):
            for j in range(-(-n // block_size)):
                queries = routing.queries_of(s, h, j).tolist()
                own = list(range(j * block_size, min((j + 1) * block_size, n)))
                # Every token of block j selects it (forced); later tokens that route to it follow.
                assert queries[: len(own)] == own
                assert all(t >= (j + 1) * block_size for t in queries[len(own) :])


def test_block_layout_by_hand():
    # lens 0, 5, 16, 0, 17 with block_size 8: 0, 1, 2, 0 and 3 blocks -> cu_blocks 0 0 1 3 3 6.
    # N = 38, S = 5: num_blocks_max = 38 // 8 + 5 = 9, the last 3 global blocks are padding (seq S = 5).
    cu_seqlens = torch.tensor([0, 0, 5, 21, 21, 38], dtype=torch.int32)
    cu_blocks, block_seq, num_blocks_max = block_layout(cu_seqlens, 38, 8)
    assert cu_blocks.tolist() == [0, 0, 1, 3, 3, 6]
    assert block_seq.tolist() == [1, 2, 2, 4, 4, 4, 5, 5, 5]
    assert num_blocks_max == 9


@pytest.mark.parametrize(
    "lens, heads, key_dtype, heads_per_row",
    [
        ([12000, 0, 8000], 4, torch.int16, 2),
        ([14000, 0, 9000], 3, torch.int16, 1),
        ([20000, 0, 13000], 2, torch.int32, 1),
    ],
)
def test_block_index_of_many_blocks(lens, heads, key_dtype, heads_per_row):
    # One-token blocks: past 2**16 segments, so the sort takes rows of fewer heads than all (the small cases
    # above sort every head in one row): two of four heads a row, a row per head (3 heads, 2 would fit), and
    # int32 keys past 2**15 blocks. Random in-range selections stand in for a routing (the index inverts any).
    topk, N = 3, sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    layout = block_layout(cu, N, 1)
    g = torch.Generator().manual_seed(0)
    own = torch.cat([torch.arange(n) for n in lens])
    picks = (torch.rand(N, heads, topk, generator=g) * (own[:, None, None] + 1)).long().sort(-1).values
    repeated = torch.cat([torch.zeros_like(picks[..., :1], dtype=torch.bool), picks[..., 1:] == picks[..., :-1]], -1)
    indices = torch.where(repeated | (torch.rand(picks.shape, generator=g) < 0.2), -1, picks).to(torch.int32)
    routing = MoBARouting(indices, cu, 1, topk, False, layout)
    assert block_key_dtype(routing.num_blocks_max) == key_dtype
    assert block_sort_rows(heads, routing.num_blocks_max)[0] == heads_per_row
    assert_block_index_inverse(routing, lens)
