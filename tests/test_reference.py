"""The reference backend computes exactly the MoBA definition.

Checked against the independent per-token oracle of ``factory`` and against dense / block-diagonal
attention from ``torch.nn.functional.scaled_dot_product_attention``, plus the invariants of the definition.
Everything goes through the public API with ``backend="reference"``; comparisons are in float64 with
tolerances from :func:`factory.rounding_bound` (both sides of a comparison round, so the bounds add up).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from factory import AWKWARD_CASES, make_packed, naive_attention, naive_route, rounding_bound

import flashmoba
from flashmoba import reference

REF = {"backend": "reference"}


def _attn(q, k, v, cu_seqlens, block_size, topk, causal=True, softmax_scale=None):
    return flashmoba.moba_attn_varlen(
        q,
        k,
        v,
        cu_seqlens,
        block_size=block_size,
        topk=topk,
        causal=causal,
        softmax_scale=softmax_scale,
        return_lse=True,
        **REF,
    )


def _route(q, k, cu_seqlens, block_size, topk, causal=True):
    return flashmoba.moba_route_varlen(q, k, cu_seqlens, block_size=block_size, topk=topk, causal=causal, **REF).indices


def _assert_close(actual, expected, bound):
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound)


def _sequences(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------------
# the reference against the per-token oracle


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", AWKWARD_CASES)
def test_matches_naive_oracle(case, causal):
    q, k, v, cu = case.packed()
    expected_idx = naive_route(q, k, cu, case.block_size, case.topk, causal)
    assert torch.equal(_route(q, k, cu, case.block_size, case.topk, causal), expected_idx)

    out, lse = _attn(q, k, v, cu, case.block_size, case.topk, causal)
    expected_out, expected_lse = naive_attention(q, k, v, cu, case.block_size, case.topk, causal)
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float64)
    assert out.dtype == lse.dtype == torch.float64
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    _assert_close(out, expected_out, 2 * out_bound)
    _assert_close(lse, expected_lse, 2 * lse_bound)


def test_softmax_scale_is_applied():
    q, k, v, cu = make_packed((45, 20), 2, 1, 16)
    scale = 0.37
    out, lse = _attn(q, k, v, cu, 8, 3, softmax_scale=scale)
    expected_out, expected_lse = naive_attention(q, k, v, cu, 8, 3, True, softmax_scale=scale)
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float64, softmax_scale=scale)
    _assert_close(out, expected_out, 2 * out_bound)
    _assert_close(lse, expected_lse, 2 * lse_bound)


# ---------------------------------------------------------------------------------------------------
# the two limits: every block selected, or only the own block


def _sdpa_per_sequence(q, k, v, cu_seqlens, mask_of_length):
    """SDPA over each sequence; ``mask_of_length(L)`` gives ``(attn_mask, is_causal)``. Returns [N, HQ, D]."""
    out = torch.zeros_like(q)
    for a, b in _sequences(cu_seqlens):
        if b > a:
            attn_mask, is_causal = mask_of_length(b - a)
            heads_first = [x[a:b].transpose(0, 1) for x in (q, k, v)]  # [H, L, D]
            o = F.scaled_dot_product_attention(*heads_first, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
            out[a:b] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", AWKWARD_CASES)
def test_topk_covering_all_blocks_is_dense_attention(case, causal):
    q, k, v, cu = case.packed()
    topk = max(case.blocks_in_longest, 1)
    out, _ = _attn(q, k, v, cu, case.block_size, topk, causal)
    expected = _sdpa_per_sequence(q, k, v, cu, lambda n: (None, causal))
    out_bound, _ = rounding_bound(q, k, v, cu, torch.float64)
    _assert_close(out, expected, 2 * out_bound)


@pytest.mark.parametrize("case", AWKWARD_CASES)
def test_topk_one_is_block_diagonal_causal(case):
    """topk = 1 keeps only the own block: block-diagonal causal, NOT full causal attention."""
    q, k, v, cu = case.packed()

    def block_diagonal_causal(n):
        pos = torch.arange(n)
        same_block = (pos[:, None] // case.block_size) == (pos[None, :] // case.block_size)
        return same_block & (pos[:, None] >= pos[None, :]), False

    out, _ = _attn(q, k, v, cu, case.block_size, 1)
    expected = _sdpa_per_sequence(q, k, v, cu, block_diagonal_causal)
    out_bound, _ = rounding_bound(q, k, v, cu, torch.float64)
    _assert_close(out, expected, 2 * out_bound)
    if max(case.lens) > case.block_size:  # otherwise block-diagonal and full causal coincide
        full_causal = _sdpa_per_sequence(q, k, v, cu, lambda n: (None, True))
        assert (out - full_causal).abs().max() > 2 * out_bound


# ---------------------------------------------------------------------------------------------------
# layouts and head sharing


@pytest.mark.parametrize("case", AWKWARD_CASES)
def test_varlen_equals_loop_over_sequences(case):
    q, k, v, cu = case.packed()
    out, lse = _attn(q, k, v, cu, case.block_size, case.topk)
    idx = _route(q, k, cu, case.block_size, case.topk)
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float64)
    for a, b in _sequences(cu):
        one = torch.tensor([0, b - a], dtype=torch.int32)
        out_s, lse_s = _attn(q[a:b], k[a:b], v[a:b], one, case.block_size, case.topk)
        assert torch.equal(idx[a:b], _route(q[a:b], k[a:b], one, case.block_size, case.topk))
        _assert_close(out[a:b], out_s, 2 * out_bound)
        _assert_close(lse[a:b], lse_s, 2 * lse_bound)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_batched_equals_varlen_per_batch_element(causal):
    batch, length, hq, hkv, d, block_size, topk = 3, 37, 4, 2, 16, 8, 3
    q, k, v, _ = make_packed([batch * length], hq, hkv, d)
    q, k, v = (x.view(batch, length, -1, d) for x in (q, k, v))
    out, lse = flashmoba.moba_attn(q, k, v, block_size=block_size, topk=topk, causal=causal, return_lse=True, **REF)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    one = torch.tensor([0, length], dtype=torch.int32)
    out_bound, lse_bound = rounding_bound(q, k, v, one, torch.float64)
    for b in range(batch):
        out_b, lse_b = _attn(q[b], k[b], v[b], one, block_size, topk, causal)
        _assert_close(out[b], out_b, 2 * out_bound)
        _assert_close(lse[b], lse_b, 2 * lse_bound)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", [p for p in AWKWARD_CASES if p.values[0].hq != p.values[0].hkv])
def test_gqa_equals_repeated_kv_heads(case, causal):
    """Query head h reads KV head h // (HQ // HKV): the same as repeating every KV head HQ // HKV times."""
    q, k, v, cu = case.packed()
    group = case.hq // case.hkv
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    assert torch.equal(
        _route(q, k, cu, case.block_size, case.topk, causal),
        _route(q, k_rep, cu, case.block_size, case.topk, causal),
    )
    out, lse = _attn(q, k, v, cu, case.block_size, case.topk, causal)
    out_rep, lse_rep = _attn(q, k_rep, v_rep, cu, case.block_size, case.topk, causal)
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float64)
    _assert_close(out, out_rep, 2 * out_bound)
    _assert_close(lse, lse_rep, 2 * lse_bound)


# ---------------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("case", AWKWARD_CASES)
def test_future_perturbation_changes_nothing_at_or_before_t(case):
    """Rewriting every token after a cut t (per sequence) leaves routing and outputs up to t untouched.

    The equality is exact: masked keys contribute exactly 0 and the unmasked logits are computed from
    unchanged operands. The perturbation is large, so a leak through routing or attention would show.
    """
    q, k, v, cu = case.packed()
    keep = torch.zeros(q.shape[0], dtype=torch.bool)
    for a, b in _sequences(cu):
        if b > a:
            cut = int(torch.randint(0, b - a, ()))
            keep[a : a + cut + 1] = True
    q2, k2, v2 = (torch.where(keep[:, None, None], x, 100 * torch.randn_like(x)) for x in (q, k, v))

    idx, idx2 = (_route(*x, cu, case.block_size, case.topk) for x in ((q, k), (q2, k2)))
    (out, lse), (out2, lse2) = (_attn(*x, cu, case.block_size, case.topk) for x in ((q, k, v), (q2, k2, v2)))
    assert torch.equal(idx[keep], idx2[keep])
    assert torch.equal(out[keep], out2[keep])
    assert torch.equal(lse[keep], lse2[keep])
    if not keep.all():  # the perturbation is real: the tokens after the cut do change
        assert not torch.equal(out[~keep], out2[~keep])


# ---------------------------------------------------------------------------------------------------
# hand-computed cases


def test_hand_computed_routing_and_output():
    # One sequence of 8 tokens, D = 2, block_size 2 -> 4 blocks, topk 2 (own block + one past block).
    # Keys and their block centroids:
    #   block 0: k0 = (1, 0),  k1 = (1, 0)   -> c0 = (1, 0)
    #   block 1: k2 = (0, 1),  k3 = (0, 3)   -> c1 = (0, 2)
    #   block 2: k4 = (-1, 0), k5 = (-3, 0)  -> c2 = (-2, 0)
    #   block 3: k6 = (1, 1),  k7 = (0, 0)   -> c3 = (0.5, 0.5)
    # Routing (own block forced; best block that ends before the own block):
    #   t = 0, 1 (block 0): no past block            -> [0, -1]
    #   t = 2, 3 (block 1): only block 0 is past     -> [0, 1]
    #   t = 4, q = (1, -1):  c0: 1,  c1: -2          -> [0, 2]
    #   t = 5, q = (-1, 1):  c0: -1, c1: 2           -> [1, 2]
    #   t = 6, q = (-1, 0):  c0: -1, c1: 0,  c2: 2   -> [2, 3]
    #   t = 7, q = (1, 1):   c0: 1,  c1: 2,  c2: -2  -> [1, 3]
    # Output of t = 7 with softmax_scale = ln 2: keys 2, 3 (block 1) and 6, 7 (block 3, causal: <= 7);
    #   q.k = 1, 3, 2, 0 -> weights 2^1, 2^3, 2^2, 2^0 = 2, 8, 4, 1 (sum 15), lse = ln 15;
    #   values v2 = (15, 0), v3 = (0, 15), v6 = (0, 0), v7 = (15, 15)
    #   -> out = (2 * 15 + 1 * 15, 8 * 15 + 1 * 15) / 15 = (3, 9).
    keys = [(1, 0), (1, 0), (0, 1), (0, 3), (-1, 0), (-3, 0), (1, 1), (0, 0)]
    queries = [(0, 1), (1, 0), (2, 1), (-1, 2), (1, -1), (-1, 1), (-1, 0), (1, 1)]
    values = [(1, 2), (3, 4), (15, 0), (0, 15), (5, 6), (7, 8), (0, 0), (15, 15)]
    q, k, v = (torch.tensor(x, dtype=torch.float64).view(8, 1, 2) for x in (queries, keys, values))
    cu = torch.tensor([0, 8], dtype=torch.int32)

    expected_idx = [[0, -1], [0, -1], [0, 1], [0, 1], [0, 2], [1, 2], [2, 3], [1, 3]]
    assert _route(q, k, cu, 2, 2).view(8, 2).tolist() == expected_idx
    out, lse = _attn(q, k, v, cu, 2, 2, softmax_scale=math.log(2))
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float64, softmax_scale=math.log(2))
    _assert_close(out[7, 0], torch.tensor([3.0, 9.0], dtype=torch.float64), out_bound)
    _assert_close(lse[7, 0], torch.tensor(math.log(15), dtype=torch.float64), lse_bound)


def test_noncausal_can_skip_the_own_block():
    # Two blocks of 4 tokens, D = 2. Block 0 keys point to (-1, *), block 1 keys to (1, *), and every query
    # is (5, 0): block 1 scores 5, block 0 scores -5. Non-causal top-1 picks block 1 for every token,
    # including the tokens of block 0, which then attend to (future) block 1 only; causal forces block 0.
    k = torch.randn(8, 1, 2, dtype=torch.float64)
    k[:4, 0, 0], k[4:, 0, 0] = -1.0, 1.0
    q = torch.tensor([5.0, 0.0], dtype=torch.float64).expand(8, 1, 2).contiguous()
    v = torch.randn(8, 1, 2, dtype=torch.float64)
    cu = torch.tensor([0, 8], dtype=torch.int32)

    assert (_route(q, k, cu, 4, 1, causal=False) == 1).all()
    assert _route(q, k, cu, 4, 1, causal=True).view(8).tolist() == [0] * 4 + [1] * 4
    out, _ = _attn(q, k, v, cu, 4, 1, causal=False)
    expected = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k[4:], v[4:]))).transpose(0, 1)
    out_bound, _ = rounding_bound(q, k, v, cu, torch.float64)
    _assert_close(out, expected, 2 * out_bound)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_ties_go_to_the_lower_block_index(causal):
    # Blocks 1 and 3 get bitwise identical keys, hence identical centroids and exactly equal scores, and
    # every query points along their centroid while the other blocks' keys are tiny: 1 and 3 tie for the
    # best score. Queries in block 4 have blocks 0-3 in the past: causal top-2 = own block + one of the
    # tied pair, non-causal top-1 = one of the tied pair. The documented rule says block 1.
    block_size, d = 4, 8
    k = 0.01 * torch.randn(5 * block_size, 1, d, dtype=torch.float64)
    tied = torch.randn(block_size, 1, d, dtype=torch.float64)
    k[1 * block_size : 2 * block_size] = tied
    k[3 * block_size : 4 * block_size] = tied
    q = 10 * tied.mean(0, keepdim=True).expand(5 * block_size, 1, d).contiguous()
    cu = torch.tensor([0, 5 * block_size], dtype=torch.int32)

    topk = 2 if causal else 1
    idx = _route(q, k, cu, block_size, topk, causal)[4 * block_size :, 0]
    expected = [1, 4] if causal else [1]
    assert idx.tolist() == [expected] * block_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_centroids_are_rounded_once_to_the_key_dtype(dtype):
    # Keys whose float32 block mean falls between two representable values: the gate must use the mean
    # rounded to the keys' dtype (as MoBA and FlashMoBA store it), not the exact mean.
    k = torch.randn(10, 2, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    cent = reference.block_centroids(k, 4)
    exact = torch.stack([k[a : a + 4].double().mean(0) for a in (0, 4, 8)])
    assert cent.dtype == torch.float32
    assert torch.equal(cent, exact.to(dtype).float())
    assert not torch.equal(cent.double(), exact)  # the rounding is visible on these keys


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_minus_inf_and_nan_gates_are_never_selected(causal):
    # Block 1's centroid is +inf along d=0 (q is negative there: gate -inf), block 2's has a NaN; with
    # room for every block, only the finite ones may be picked.
    block_size, d = 4, 8
    q, k, _, cu = make_packed((16,), 1, 1, d, dtype=torch.float32)
    q[:, :, 0] = -1.0
    k[4, 0, 0] = math.inf
    k[9, 0, 3] = math.nan
    idx = _route(q, k, cu, block_size, 4, causal)
    routed = idx != (torch.arange(16) // block_size).view(16, 1, 1) if causal else idx >= 0
    assert not (routed & ((idx == 1) | (idx == 2))).any()
    assert idx[12:, 0].tolist() == [[0, 3, -1, -1]] * 4  # block 3: own (causal) or best (non-causal)
    assert torch.equal(idx, naive_route(q, k, cu, block_size, 4, causal))


def test_gradcheck_in_float64():
    q, k, v, cu = make_packed((6, 0, 9), 2, 1, 4, requires_grad=True)

    def moba(q, k, v):
        return _attn(q, k, v, cu, 3, 2)

    assert torch.autograd.gradcheck(moba, (q, k, v))


def test_empty_batch():
    q, k, v, cu = make_packed((0, 0), 2, 1, 16)
    out, lse = _attn(q, k, v, cu, 8, 2)
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)


# ---------------------------------------------------------------------------------------------------
# low-precision inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", AWKWARD_CASES)
def test_low_precision_inputs(case, dtype):
    """Output in the input dtype, lse in float32, both within fp32 rounding + one rounding to ``dtype``.

    Routing is taken from the router on the same inputs (its fp32 gate may legitimately break a
    near-tie differently from a float64 oracle); routing itself is checked in float64 above.
    """
    q, k, v, cu = case.packed(dtype=dtype)
    out, lse = _attn(q, k, v, cu, case.block_size, case.topk)
    assert out.dtype == dtype and lse.dtype == torch.float32
    idx = _route(q, k, cu, case.block_size, case.topk)
    expected_out, expected_lse = naive_attention(q, k, v, cu, case.block_size, case.topk, True, indices=idx)
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float32)
    oracle_out_bound, oracle_lse_bound = rounding_bound(q, k, v, cu, torch.float64)
    # The fp32 result y is rounded once to dtype: |round(y) - y| <= u |y| <= u (|expected| + error).
    unit = torch.finfo(dtype).eps / 2
    torch.testing.assert_close(out.double(), expected_out, rtol=unit, atol=(1 + unit) * (out_bound + oracle_out_bound))
    _assert_close(lse.double(), expected_lse, lse_bound + oracle_lse_bound)
