"""Randomised property test of the Triton router (interpreter on CPU, compiled on a GPU).

For random packed shapes, block sizes, top-k, GQA and both modes, the Triton selection must be a valid
top-k of the float64 scores (near-ties may go either way) and its block index the exact inverse.
"""

import math

import pytest
import torch
from factory import make_packed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_block_index_inverse, assert_routing_valid

import flashmoba
from flashmoba import reference
from flashmoba.routing.centroids import block_centroids

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
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=block_size, topk=topk, causal=causal,
                                          backend="triton")
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
