"""The Triton backend (routing + attention, forward and backward) under the Triton interpreter.

Small awkward shapes from the shared factory, fp16 and fp32 (the 3.6 interpreter's bf16 dot is wrong;
bf16 is checked on the GPU in tests/gpu). Kernels are compared with float64 computations.
"""

import math
import os

import pytest
import torch
from factory import AWKWARD_CASES_TRITON, make_packed
from kernel_checks import assert_attention_matches, assert_routing_valid

import flashmoba
from flashmoba import configs, reference
from flashmoba.attention.forward import max_weight_log2

# CPU tensors through the interpreter; on a GPU machine tests/gpu checks the compiled kernels.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter tests")

NON_CAUSAL_CASES = [p for p in AWKWARD_CASES_TRITON if p.id in ("empty-first-gqa4", "block48-partial-gqa4")]


@pytest.mark.parametrize(
    "case, dtype, causal",
    [pytest.param(p.values[0], torch.float16, True, id=f"fp16-causal-{p.id}") for p in AWKWARD_CASES_TRITON]
    + [pytest.param(p.values[0], torch.float32, False, id=f"fp32-noncausal-{p.id}") for p in NON_CAUSAL_CASES],
)
def test_attention_matches_reference(case, dtype, causal):
    q, k, v, cu = case.packed(dtype=dtype)
    dout = torch.randn_like(q)
    routing = assert_attention_matches(q, k, v, cu, dout, block_size=case.block_size, topk=case.topk, causal=causal)
    assert_routing_valid(q, k, cu, routing.indices, case.block_size, case.topk, causal, score_tol=1e-4)


@pytest.mark.parametrize("block_size, topk", [(96, 2), (256, 2)])
def test_block_sizes_beyond_one_key_tile(block_size, topk):
    """A block size that is not a power of two, and blocks of several key tiles."""
    q, k, v, cu = make_packed((300, 41), 2, 1, 32, dtype=torch.float16)
    dout = torch.randn_like(q)
    assert_attention_matches(q, k, v, cu, dout, block_size=block_size, topk=topk, causal=True)


def test_deterministic_mode_is_bitwise_reproducible_and_correct():
    q, k, v, cu = make_packed((70, 0, 37), 2, 1, 16, dtype=torch.float16)
    dout = torch.randn_like(q)
    assert_attention_matches(q, k, v, cu, dout, block_size=16, topk=3, causal=True, deterministic=True)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = flashmoba.moba_attn_varlen(*leaves, cu, block_size=16, topk=3, backend="triton", deterministic=True)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_routing_block_index_is_the_inverse():
    q, k, _, cu = make_packed((70, 0, 45), 4, 2, 16, dtype=torch.float16)
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=3, backend="triton")
    ref = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=3, backend="reference")
    ref.indices = routing.indices  # same selection, reference CSR construction
    ref._block_index = None
    for field in ("offsets", "counts", "entries"):
        assert torch.equal(getattr(routing.block_index, field), getattr(ref.block_index, field))


def test_batched_api_equals_varlen():
    q, k, v, _ = make_packed((2 * 50,), 2, 1, 32, dtype=torch.float16)
    shape = lambda t: t.view(2, 50, t.shape[1], t.shape[2])  # noqa: E731
    out_b = flashmoba.moba_attn(shape(q), shape(k), shape(v), block_size=16, topk=2, backend="triton")
    cu = torch.tensor([0, 50, 100], dtype=torch.int32)
    out_v = flashmoba.moba_attn_varlen(q, k, v, cu, block_size=16, topk=2, backend="triton")
    assert torch.equal(out_b.view_as(out_v), out_v)


def test_future_perturbation_never_changes_the_past():
    q, k, v, cu = make_packed((90,), 2, 2, 16, dtype=torch.float32)
    out = flashmoba.moba_attn_varlen(q, k, v, cu, block_size=16, topk=2, backend="triton")
    cut = 53
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[cut:] += 100 * torch.randn_like(t[cut:])
    out2 = flashmoba.moba_attn_varlen(q2, k2, v2, cu, block_size=16, topk=2, backend="triton")
    assert torch.equal(out[:cut], out2[:cut])
    assert not torch.equal(out[cut:], out2[cut:])


@pytest.mark.parametrize(
    "dtype, causal, deterministic",
    [(torch.float16, True, False), (torch.float32, True, True), (torch.float32, False, False)],
    ids=["fp16-causal", "fp32-causal-deterministic", "fp32-noncausal"],
)
def test_rows_far_above_their_reference_are_recomputed_exactly(dtype, causal, deterministic):
    """The forward weighs keys against each row's diagonal logit; rows whose keys lie too far above it
    (or, without the causal diagonal, too far below) are recomputed by the exact rescue. Large logits on
    every other query make many such rows, next to ordinary ones."""
    q, k, v, cu = make_packed((70, 45), 4, 2, 16, dtype=dtype)
    q[::2] *= 6
    k *= 6
    dout = torch.randn_like(q)
    # Rows whose best key beats the diagonal by more than any weight may (P_MAX, in natural units, plus
    # the log of the key count) must have been rescued: make sure the inputs have some.
    _, lse = reference.attention(q.double(), k.double(), v.double(), cu, 16, 3, causal, 0.25)
    diag = 0.25 * (q.double() * k.double().repeat_interleave(2, dim=1)).sum(-1)
    p_max = max_weight_log2(dtype) * math.log(2)
    assert ((lse - diag) > p_max + math.log(48)).sum() >= 10
    assert_attention_matches(q, k, v, cu, dout, block_size=16, topk=3, causal=causal, deterministic=deterministic)


@pytest.mark.parametrize("block_m, deterministic", [(16, False), (32, False), (16, True)])
def test_forward_with_several_query_tiles_per_block(block_m, deterministic):
    """Small query tiles, so that a block's routed queries take several tiles: the forward's walk over
    full, partial and last tiles of one key block's queries."""
    q, k, v, cu = make_packed((300, 77), 4, 2, 32, dtype=torch.float16)
    dout = torch.randn_like(q)
    with configs.override(attn_fwd=configs.TileConfig(block_m, 16, 4, 1)):
        assert_attention_matches(q, k, v, cu, dout, block_size=16, topk=4, causal=True, deterministic=deterministic)
