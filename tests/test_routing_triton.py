"""Randomised property test of the Triton router (interpreter on CPU, compiled on a GPU).

For random packed shapes, block sizes, top-k, GQA and both modes, the Triton selection must be a valid
top-k of the float64 scores (near-ties may go either way) and its block index the exact inverse.
"""

import torch
from factory import make_packed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_block_index_inverse, assert_routing_valid

import flashmoba

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
