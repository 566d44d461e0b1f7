"""Randomised property test of the Triton router (interpreter on CPU, compiled on a GPU).

For random packed shapes, block sizes, top-k, GQA and both modes, the Triton selection must be a valid
top-k of the float64 scores (near-ties may go either way) and its block index the exact inverse. Plus the
gate rules (-inf, NaN, +inf), negative scores, and the invariants of the top-k's integer score keys.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from factory import make_packed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_block_index_inverse, assert_routing_valid

import flashmoba
from flashmoba import reference
from flashmoba.routing.centroids import block_centroids
from flashmoba.routing.topk import _score_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 150), min_size=1, max_size=3),
    block_size=st.sampled_from([16, 24, 32, 48]),
    topk=st.integers(1, 6),
    group=st.sampled_from([1, 2]),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_routing_properties(lens, block_size, topk, group, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, _, cu = make_packed(lens, 2 * group, 2, 16, dtype=torch.float16, device=DEVICE, generator=generator)
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=block_size, topk=topk, causal=causal, backend="triton")
    assert routing.indices.shape == (sum(lens), 2 * group, topk)
    assert_routing_valid(q, k, cu, routing.indices, block_size, topk, causal, score_tol=1e-3)
    assert_block_index_inverse(routing, lens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_centroids_are_the_block_means_in_the_key_dtype(dtype):
    lens = (0, 37, 64, 5)
    _, k, _, cu = make_packed(lens, 2, 2, 24, dtype=dtype, device=DEVICE)
    got = block_centroids(k, cu, 16)
    assert got.dtype == dtype
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            continue
        first = sum(-(-n // 16) for n in lens[:s])
        want = reference.block_centroids(k[a:b], 16, torch.float64)  # rounded once to dtype
        # One unit in the last place of dtype (the float32 mean may round the other way near a tie),
        # plus the float32 accumulation error of a 16-term mean.
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-30))))
        accumulation = 16 * 2.0**-24 * k[a:b].double().abs().max()
        assert ((got[first : first + want.shape[0]].double() - want).abs() <= ulp + accumulation).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_minus_inf_and_nan_gates_are_never_selected(causal):
    # As in the reference test: block 1's gate is -inf, block 2's NaN; only blocks 0 and 3 may be routed.
    q, k, _, cu = make_packed((64,), 1, 1, 16, dtype=torch.float16, device=DEVICE)
    q[:, :, 0] = -1.0
    k[16, 0, 0] = math.inf
    k[33, 0, 3] = math.nan
    kw = dict(block_size=16, topk=4, causal=causal)
    idx = flashmoba.moba_route_varlen(q, k, cu, backend="triton", **kw).indices
    assert torch.equal(idx, flashmoba.moba_route_varlen(q, k, cu, backend="reference", **kw).indices)
    assert idx[48:, 0].tolist() == [[0, 3, -1, -1]] * 16  # block 3: own (causal) or best (non-causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_plus_inf_gates_are_always_selected(causal):
    # The score keys put +inf on top (and NaN, block 2 here, at the bottom): block 1's +inf gate wins
    # in every row that may see it.
    q, k, _, cu = make_packed((64,), 1, 1, 16, dtype=torch.float16, device=DEVICE)
    q[:, :, 0] = 1.0
    k[16, 0, 0] = math.inf
    k[33, 0, 3] = math.nan
    kw = dict(block_size=16, topk=2, causal=causal)
    idx = flashmoba.moba_route_varlen(q, k, cu, backend="triton", **kw).indices
    assert torch.equal(idx, flashmoba.moba_route_varlen(q, k, cu, backend="reference", **kw).indices)
    sees_block_1 = slice(32, 64) if causal else slice(0, 64)
    assert (idx[sees_block_1, 0] == 1).any(-1).all()
    not_own_2 = slice(48, 64) if causal else slice(0, 64)  # rows where block 2 is not the own block
    assert not (idx[not_own_2] == 2).any()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_negative_scores_are_ordered_while_some_list_needs_them(causal):
    # The top-k drops the sign ordering of its keys once every list of a program holds only
    # non-negative scores. Here odd rows see only negative scores (they must pick the least negative
    # blocks) next to even rows with positive ones, in every program; 100 blocks, so that late rows scan
    # several centroid tiles (the sign decision is made between tiles).
    q, k, _, cu = make_packed((1600,), 1, 1, 16, dtype=torch.float16, device=DEVICE)
    k[:, :, 0] = 2.0 + k[:, :, 0].abs()
    q[:, :, 0] = torch.where(torch.arange(1600, device=DEVICE) % 2 == 0, 3.0, -3.0).to(q.dtype)[:, None]
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=4, causal=causal, backend="triton")
    assert_routing_valid(q, k, cu, routing.indices, 16, 4, causal, score_tol=1e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_topk_as_wide_as_a_centroid_tile(causal):
    # topk = 64 over 70 blocks: non-causal rows take every key of the first 64-block tile, so the merge
    # rounds must find that no key is left below the last one taken (and take none twice).
    q, k, _, cu = make_packed((70 * 16,), 1, 1, 16, dtype=torch.float16, device=DEVICE)
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=64, causal=causal, backend="triton")
    assert_routing_valid(q, k, cu, routing.indices, 16, 64, causal, score_tol=1e-3)
    assert_block_index_inverse(routing, (70 * 16,))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_exactly_tied_blocks(causal):
    # Five key blocks repeated over 90 blocks: every score has many exact ties, so lists hold several
    # entries tied for the worst. Each must still be a valid top-k with distinct blocks (a list slot
    # breaks the tie; the selection count and order checks catch a slot taken twice).
    q, k, _, cu = make_packed((90 * 16,), 1, 1, 16, dtype=torch.float16, device=DEVICE)
    k.view(90, 16, 1, 16)[:] = k.view(90, 16, 1, 16)[:5].repeat(18, 1, 1, 1)
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=6, causal=causal, backend="triton")
    assert_routing_valid(q, k, cu, routing.indices, 16, 6, causal, score_tol=1e-3)


def test_float32_topk_wider_than_its_default_tile():
    # A list slot lives in the low bits of a score part, so a list wider than float32's 32-block tiles
    # (topk 33: 64 slots) needs 64-block tiles.
    q, k, _, cu = make_packed((40 * 16,), 1, 1, 16, dtype=torch.float32, device=DEVICE)
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=33, causal=False, backend="triton")
    assert_routing_valid(q, k, cu, routing.indices, 16, 33, False, score_tol=1e-3)


@triton.jit
def _score_keys_of(Scores, Keys, signed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(Keys + offs, _score_keys(tl.load(Scores + offs), signed, BLOCK_N))


@pytest.mark.parametrize("block_n", [32, 64])
def test_score_keys_order_scores_and_hold_the_column(block_n):
    # The invariants the top-k relies on, over every exponent range: score parts never decrease as the
    # score grows and differ once scores are two key steps apart (2**(log2(block_n) - 23) relative), NaN
    # lies below -inf, +inf on top, and the low bits hold the inverted column. Without sign ordering,
    # non-negative scores keep their keys and every negative one drops below +0.0's.
    g = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.empty(4096).uniform_(-126, 127, generator=g)) * (1 + torch.rand(4096, generator=g))
    step = 2.0 ** (math.log2(block_n) - 23)  # the largest relative key step
    clusters = (mags[:128, None].double() * (1 + 2.5 * step * torch.arange(16))).flatten()  # 2.5 steps apart
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 3.4e38, -3.4e38, 1e-45, -1e-45])
    values = torch.cat([mags, -mags, clusters, -clusters, special]).float()
    values = torch.cat([values, torch.zeros((-values.numel()) % (64 * block_n))])
    tiles = values.view(-1, 64, block_n).to(DEVICE)
    keys = {}
    for signed in (True, False):
        out = torch.empty(tiles.shape, dtype=torch.int32, device=DEVICE)
        for tile, key in zip(tiles, out):
            _score_keys_of[(1,)](tile, key, int(signed), BLOCK_M=64, BLOCK_N=block_n)
        keys[signed] = out.cpu().flatten().long()
    scores = tiles.cpu().flatten()
    columns = torch.arange(scores.numel()) % block_n
    part = {s: k & -block_n for s, k in keys.items()}
    assert torch.equal(keys[True] & (block_n - 1), block_n - 1 - columns)
    assert torch.equal(keys[False] & (block_n - 1), block_n - 1 - columns)

    finite = ~scores.isnan()
    ordinal = scores.double()
    ordinal[(scores == 0) & torch.signbit(scores)] = -5e-324  # -0.0 keys lie just below +0.0's
    order = ordinal[finite].argsort()
    ranked_scores, ranked_parts = ordinal[finite][order], part[True][finite][order]
    assert (ranked_parts[1:] >= ranked_parts[:-1]).all(), "score parts must follow the scores"
    apart = ranked_scores[1:] - ranked_scores[:-1] > step * ranked_scores[1:].abs().clamp(min=1e-30) * 2
    assert (ranked_parts[1:] > ranked_parts[:-1])[apart].all(), "scores a step apart must differ"
    neg_inf = part[True][scores == -math.inf].max()
    assert (part[True][scores.isnan()] <= neg_inf).all() and (part[True][finite] >= neg_inf).all()
    assert (part[True][scores == math.inf] >= part[True][finite]).all()

    non_negative = finite & ~torch.signbit(scores)
    assert torch.equal(keys[False][non_negative], keys[True][non_negative])
    zero = part[True][(scores == 0) & ~torch.signbit(scores)].min()
    assert (part[False][torch.signbit(scores)] < zero).all()
