"""Sparse decode over a KV cache: decoding token t gives the full causal MoBA pass's output at position t.

* the running block sums of :class:`flashmoba.MoBAKVCache` / ``accumulate_block_sums`` equal the block key
  sums of the cached sequences, whatever the chunking of the appends and the left padding;
* the reference decode equals ``moba_attn_varlen(backend="reference")`` on the full sequences and the
  per-token oracle of ``factory``; shared-KV routing equals an oracle written here;
* the Triton kernels (TRITON_INTERPRET=1 on CPU, fp16/fp32; also bf16 on a GPU) equal the oracle within
  a rounding bound derived from the data.

Problems are full random sequences; the cache holds each one (placed after random left padding, with
garbage in unused rows) and the queries are its last ``new`` tokens.
"""

from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import DEVICE
from factory import (
    _as_numpy64,
    _sequence_bounds,
    make_packed,
    naive_attention,
    naive_route,
    round_to_dtype,
    rounding_bound,
)

import flashmoba
from flashmoba.decode import MoBAKVCache, accumulate_block_sums, block_sums_dtype, dense_decode
from flashmoba.decode.kernels import decode_fwd


class DecodeCase(NamedTuple):
    """Full sequence lengths, heads, head dim, routing parameters and the number of new (query) tokens."""

    lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    block_size: int
    topk: int
    new: int


def _case(case_id, *fields):
    return pytest.param(DecodeCase(*fields), id=case_id)


#          id                          lens           hq hkv  d  block topk new
DECODE_CASES = [
    _case("gqa2-partial-last-block", (37, 8, 64), 4, 2, 16, 8, 3, 1),
    _case("mha-odd-block-new-spans", (23, 4, 41), 3, 3, 8, 5, 2, 4),
    _case("mqa-topk1", (50, 17), 6, 1, 12, 16, 1, 2),
    _case("topk-covers-all", (30, 9), 2, 1, 16, 4, 20, 3),
    _case("many-blocks-gqa4", (150, 97), 4, 1, 32, 4, 3, 5),
]

# Triton: block >= 16, D a multiple of 8 >= 16; small grids, the interpreter runs one program at a time.
TRITON_CASES = [
    _case("gqa2-routed-new2", (70, 33), 4, 2, 16, 16, 3, 2),
    _case("mha-d24-topk1", (40, 17), 2, 2, 24, 16, 1, 1),
    _case("two-route-tiles", (1100,), 2, 1, 16, 16, 3, 1),
    _case("gqa2-topk-covers-all", (45, 60), 2, 1, 32, 16, 5, 2),
]
TRITON_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _decode_problem(case, dtype=torch.float64, left_pad=True, head_major=False):
    """Full sequences and the cache that holds them.

    Returns a dict: ``q, k, v, cu`` packed full sequences; ``q_new [B, new, HQ, D]`` their last tokens'
    queries; ``rows`` the packed rows of those tokens; ``k_cache, v_cache [B, S, HKV, D]`` (a transposed
    ``[B, HKV, S, D]`` buffer when ``head_major``); ``seqlens, starts`` int32 ``[B]``; ``block_sums``.
    """
    q, k, v, cu = make_packed(case.lens, case.hq, case.hkv, case.d, dtype=dtype, device=DEVICE)
    B = len(case.lens)
    starts = [int(x) for x in torch.randint(0, 7, (B,))] if left_pad else [0] * B
    S = max(s + n for s, n in zip(starts, case.lens)) + 3
    shape = (B, case.hkv, S, case.d) if head_major else (B, S, case.hkv, case.d)
    # Garbage in the rows outside the sequences: reading them would show.
    k_cache, v_cache = (100 * torch.randn(shape, device=DEVICE).to(dtype) for _ in range(2))
    if head_major:
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    rows = []
    for b, (a, e) in enumerate(_sequence_bounds(cu)):
        k_cache[b, starts[b] : starts[b] + e - a] = k[a:e]
        v_cache[b, starts[b] : starts[b] + e - a] = v[a:e]
        rows.extend(range(e - case.new, e))
    seqlens = torch.tensor(case.lens, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    num_blocks = -(-S // case.block_size)
    block_sums = torch.zeros(B, num_blocks, case.hkv, case.d, dtype=block_sums_dtype(dtype), device=DEVICE)
    accumulate_block_sums(block_sums, k_cache, starts, torch.zeros_like(seqlens), seqlens, case.block_size, S)
    rows = torch.tensor(rows, device=DEVICE)
    return dict(
        q=q,
        k=k,
        v=v,
        cu=cu,
        q_new=q[rows].view(B, case.new, case.hq, case.d),
        rows=rows,
        k_cache=k_cache,
        v_cache=v_cache,
        seqlens=seqlens,
        starts=starts,
        block_sums=block_sums,
    )


def _cache(p, block_size):
    return MoBAKVCache.from_tensors(
        p["k_cache"], p["v_cache"], p["seqlens"], starts=p["starts"], block_size=block_size, block_sums=p["block_sums"]
    )


def _decode(p, case, **kwargs):
    return flashmoba.moba_decode(p["q_new"], _cache(p, case.block_size), topk=case.topk, return_lse=True, **kwargs)


def _assert_close(actual, expected, bound):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=0, atol=bound)


def naive_shared_route(q, k, cu_seqlens, block_size: int, topk: int) -> torch.Tensor:
    """Causal MoBA routing with one selection per KV group (scores summed over the group's query heads),
    per token in NumPy float64. Returns int32 ``[N, HQ, topk]`` like ``factory.naive_route``."""
    qn, kn = _as_numpy64(q), _as_numpy64(k)
    num_tokens, num_q_heads, _ = qn.shape
    num_kv_heads = kn.shape[1]
    group = num_q_heads // num_kv_heads
    selected = np.full((num_tokens, num_q_heads, topk), -1, dtype=np.int32)
    for start, end in _sequence_bounds(cu_seqlens):
        length = end - start
        spans = [(b, min(b + block_size, length)) for b in range(0, length, block_size)]
        centroids = [round_to_dtype(kn[start + a : start + b].sum(axis=0) / (b - a), k.dtype) for a, b in spans]
        for t in range(length):
            own = t // block_size
            for g in range(num_kv_heads):
                scores = [
                    sum(float(np.dot(qn[start + t, h], c[g])) for h in range(g * group, (g + 1) * group))
                    for c in centroids
                ]
                ranked = sorted(range(own), key=lambda j: (-scores[j], j))
                blocks = sorted([own] + ranked[: topk - 1])
                selected[start + t, g * group : (g + 1) * group, : len(blocks)] = blocks
    return torch.from_numpy(selected)


def _kernel_bound(q, k, v, cu, dtype):
    """Rounding bound of the Triton kernels against the exact result: they compute logits, softmax and
    accumulators in float32 and round only the softmax weights (for the P.V product) and the output to
    ``dtype``, each a relative error of at most one unit roundoff of the values."""
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float32)
    unit = torch.finfo(dtype).eps / 2
    return out_bound + 2 * unit * float(v.abs().max()), lse_bound


# ---------------------------------------------------------------------------------------------------
# the running block sums


@pytest.mark.parametrize("left_pad", [False, True], ids=["aligned", "left-padded"])
def test_block_sums_equal_block_key_sums_whatever_the_appends(left_pad):
    lens, hkv, d, block_size = (61, 1, 40), 2, 8, 8
    _, k, v, cu = make_packed(lens, 2, hkv, d, device=DEVICE)
    bounds = _sequence_bounds(cu)
    B = len(lens)
    cache = MoBAKVCache(B, 64, hkv, d, block_size=block_size, dtype=torch.float64, device=DEVICE)
    # Appends of random ragged chunks (0 .. 19 tokens each) until every sequence is complete.
    held = [0] * B
    while held != list(lens):
        take = [min(int(torch.randint(0, 20, ())), n - h) for n, h in zip(lens, held)]
        chunk = max(take)
        k_new = torch.randn(B, chunk, hkv, d, dtype=torch.float64, device=DEVICE)  # garbage past each take
        v_new = torch.randn_like(k_new)
        for b, (a, _) in enumerate(bounds):
            k_new[b, : take[b]] = k[a + held[b] : a + held[b] + take[b]]
            v_new[b, : take[b]] = v[a + held[b] : a + held[b] + take[b]]
        cache.append(k_new, v_new, lengths=torch.tensor(take, device=DEVICE))
        held = [h + t for h, t in zip(held, take)]
    assert cache.seqlens.tolist() == list(lens)

    if left_pad:  # the same sums through accumulate_block_sums, from a left-padded head-major buffer
        starts = torch.tensor([3, 0, 5], dtype=torch.int32, device=DEVICE)
        buffer = torch.randn(B, hkv, 70, d, dtype=torch.float64, device=DEVICE).transpose(1, 2)
        for b, (a, e) in enumerate(bounds):
            buffer[b, int(starts[b]) : int(starts[b]) + e - a] = k[a:e]
        sums = torch.zeros_like(cache.block_sums)
        accumulate_block_sums(sums, buffer, starts, torch.zeros_like(starts), cache.seqlens, block_size, 70)
    else:
        sums = cache.block_sums
    for b, (a, e) in enumerate(bounds):
        kn = _as_numpy64(k[a:e])
        expected = np.zeros(tuple(sums.shape[1:]))
        for j in range(0, e - a, block_size):
            expected[j // block_size] = kn[j : j + block_size].sum(axis=0)
        # Summing up to block_size terms of size <= max|k|, on both sides.
        bound = 2 * block_size**2 * torch.finfo(torch.float64).eps * float(k.abs().max())
        _assert_close(sums[b], torch.from_numpy(expected), bound)
        assert torch.equal(cache.k[b, : e - a], k[a:e]) and torch.equal(cache.v[b, : e - a], v[a:e])


# ---------------------------------------------------------------------------------------------------
# the reference decode


@pytest.mark.parametrize("case", DECODE_CASES)
def test_reference_decode_equals_the_full_moba_pass(case):
    p = _decode_problem(case)
    out, lse = _decode(p, case, backend="reference")
    full_out, full_lse = flashmoba.moba_attn_varlen(
        p["q"],
        p["k"],
        p["v"],
        p["cu"],
        block_size=case.block_size,
        topk=case.topk,
        return_lse=True,
        backend="reference",
    )
    naive_out, naive_lse = naive_attention(p["q"], p["k"], p["v"], p["cu"], case.block_size, case.topk, True)
    out_bound, lse_bound = rounding_bound(p["q"], p["k"], p["v"], p["cu"], torch.float64)
    assert out.dtype == torch.float64 and out.shape == p["q_new"].shape and lse.shape == p["q_new"].shape[:3]
    rows = p["rows"].cpu()
    for expected_out, expected_lse in ((full_out[p["rows"]], full_lse[p["rows"]]), (naive_out[rows], naive_lse[rows])):
        _assert_close(out.flatten(0, 1), expected_out, 2 * out_bound)
        _assert_close(lse.flatten(0, 1), expected_lse, 2 * lse_bound)


def test_decode_through_a_cache_filled_step_by_step():
    """Prefill a prompt, then decode one token at a time: every step equals the full pass at its position."""
    case = DecodeCase((45, 29), 4, 2, 16, 4, 3, 1)
    q, k, v, cu = make_packed(case.lens, case.hq, case.hkv, case.d, device=DEVICE)
    full_out = flashmoba.moba_attn_varlen(q, k, v, cu, block_size=4, topk=3, backend="reference")
    bounds = _sequence_bounds(cu)
    prompt = 20
    cache = MoBAKVCache(2, 64, case.hkv, case.d, block_size=4, dtype=torch.float64, device=DEVICE)
    cache.append(
        torch.stack([k[a : a + prompt] for a, _ in bounds]), torch.stack([v[a : a + prompt] for a, _ in bounds])
    )
    out_bound, _ = rounding_bound(q, k, v, cu, torch.float64)
    for step in range(prompt, max(case.lens)):
        # Sequences that are done re-append their last token's slot with lengths 0.
        live = torch.tensor([step < n for n in case.lens], device=DEVICE)
        idx = [a + min(step, e - a - 1) for a, e in bounds]
        cache.append(k[idx][:, None], v[idx][:, None], lengths=live.int())
        out = flashmoba.moba_decode(q[idx][:, None], cache, topk=3, backend="reference")
        for b, i in enumerate(idx):
            if live[b]:
                _assert_close(out[b, 0], full_out[i], 2 * out_bound)


@pytest.mark.parametrize("case", [DECODE_CASES[0], DECODE_CASES[4]])
def test_shared_kv_routing_equals_its_oracle(case):
    p = _decode_problem(case)
    out, lse = _decode(p, case, backend="reference", shared_kv_routing=True)
    indices = naive_shared_route(p["q"], p["k"], p["cu"], case.block_size, case.topk)
    naive_out, naive_lse = naive_attention(
        p["q"], p["k"], p["v"], p["cu"], case.block_size, case.topk, True, indices=indices
    )
    out_bound, lse_bound = rounding_bound(p["q"], p["k"], p["v"], p["cu"], torch.float64)
    rows = p["rows"].cpu()
    _assert_close(out.flatten(0, 1), naive_out[rows], 2 * out_bound)
    _assert_close(lse.flatten(0, 1), naive_lse[rows], 2 * lse_bound)
    # The option changes the selection for some query head here (else this test would prove little).
    per_head = naive_route(p["q"], p["k"], p["cu"], case.block_size, case.topk, True)
    assert not torch.equal(per_head[rows], indices[rows])


def test_shared_kv_routing_without_groups_is_per_head_routing():
    case = DECODE_CASES[1].values[0]  # HQ == HKV
    p = _decode_problem(case)
    assert torch.equal(
        _decode(p, case, backend="reference", shared_kv_routing=True)[0], _decode(p, case, backend="reference")[0]
    )


# ---------------------------------------------------------------------------------------------------
# the Triton kernels


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_decode_equals_the_oracle(case, dtype):
    p = _decode_problem(case, dtype=dtype, head_major=case.hq > case.hkv)
    out, lse = _decode(p, case, backend="triton")
    naive_out, naive_lse = naive_attention(p["q"], p["k"], p["v"], p["cu"], case.block_size, case.topk, True)
    out_bound, lse_bound = _kernel_bound(p["q"], p["k"], p["v"], p["cu"], dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == p["q_new"].shape
    rows = p["rows"].cpu()
    _assert_close(out.flatten(0, 1), naive_out[rows], out_bound)
    _assert_close(lse.flatten(0, 1), naive_lse[rows], lse_bound)
    # ... and the torch reference decode on the same cache (it rounds only its output to dtype).
    ref_out, ref_lse = _decode(p, case, backend="reference")
    unit = torch.finfo(dtype).eps / 2
    _assert_close(out, ref_out, out_bound + unit * float(p["v"].abs().max()))
    _assert_close(lse, ref_lse, 2 * lse_bound)


@pytest.mark.parametrize("case", [TRITON_CASES[0], TRITON_CASES[3]])
def test_triton_shared_kv_routing_equals_its_oracle(case):
    p = _decode_problem(case, dtype=torch.float16)
    out, lse = _decode(p, case, backend="triton", shared_kv_routing=True)
    indices = naive_shared_route(p["q"], p["k"], p["cu"], case.block_size, case.topk)
    naive_out, naive_lse = naive_attention(
        p["q"], p["k"], p["v"], p["cu"], case.block_size, case.topk, True, indices=indices
    )
    out_bound, lse_bound = _kernel_bound(p["q"], p["k"], p["v"], p["cu"], torch.float16)
    rows = p["rows"].cpu()
    _assert_close(out.flatten(0, 1), naive_out[rows], out_bound)
    _assert_close(lse.flatten(0, 1), naive_lse[rows], lse_bound)


@pytest.mark.parametrize("splits", [2, 3])
def test_triton_splitting_blocks_over_programs_keeps_the_result(splits):
    """Each selected block shared by several programs (3 does not divide the block: a short last share)."""
    case = TRITON_CASES[2].values[0]
    p = _decode_problem(case, dtype=torch.float32)
    out, lse = decode_fwd(
        p["q_new"],
        p["k_cache"],
        p["v_cache"],
        p["seqlens"],
        p["starts"],
        p["block_sums"],
        case.block_size,
        case.topk,
        False,
        case.d**-0.5,
        splits_per_block=splits,
    )
    naive_out, naive_lse = naive_attention(p["q"], p["k"], p["v"], p["cu"], case.block_size, case.topk, True)
    out_bound, lse_bound = _kernel_bound(p["q"], p["k"], p["v"], p["cu"], torch.float32)
    rows = p["rows"].cpu()
    _assert_close(out.flatten(0, 1), naive_out[rows], out_bound)
    _assert_close(lse.flatten(0, 1), naive_lse[rows], lse_bound)


# ---------------------------------------------------------------------------------------------------
# bad input


def _valid_args():
    case = DecodeCase((20, 9), 4, 2, 16, 16, 2, 1)
    p = _decode_problem(case, dtype=torch.float32, left_pad=False)
    return dict(
        q=p["q_new"],
        k=p["k_cache"],
        v=p["v_cache"],
        seqlens=p["seqlens"],
        starts=None,
        block_sums=p["block_sums"],
        cache_block_size=16,
        topk=2,
    )


BAD_INPUTS = [
    ("q-rank", lambda a: a.update(q=a["q"][0]), ValueError, "q must have rank 4"),
    ("cache-dtype", lambda a: a.update(k=a["k"].half(), v=a["v"].half()), TypeError, "the cache holds torch.float16"),
    ("v-shape", lambda a: a.update(v=a["v"][:, :-1]), ValueError, "v must match k"),
    ("heads", lambda a: a.update(q=torch.cat([a["q"], a["q"][:, :, :1]], 2)), ValueError, "multiple of the number"),
    ("sums-blocks", lambda a: a.update(block_sums=a["block_sums"][:, :1]), ValueError, "block_sums must have shape"),
    ("sums-dtype", lambda a: a.update(block_sums=a["block_sums"].double()), TypeError, "block_sums must be"),
    ("seqlens-shape", lambda a: a.update(seqlens=a["seqlens"][:1]), ValueError, "seqlens must be an int32"),
    ("seqlens-short", lambda a: a.update(q=a["q"].expand(-1, 10, -1, -1)), ValueError, "cache.seqlens >= Tq"),
    ("starts-out", lambda a: a.update(starts=torch.full_like(a["seqlens"], 20)), ValueError, "inside the cache rows"),
    ("topk", lambda a: a.update(topk=0), ValueError, "topk must be >= 1"),
    ("shared", lambda a: a.update(shared_kv_routing=1), TypeError, "shared_kv_routing must be a bool"),
    ("backend", lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
    # The cache carries its block size: another one would route over sums of other blocks.
    ("block-size", lambda a: a.update(block_size=32), ValueError, "does not match the cache's block size 16"),
]


@pytest.mark.parametrize("mutate, error, match", [pytest.param(*x[1:], id=x[0]) for x in BAD_INPUTS])
def test_bad_input_is_named(mutate, error, match):
    args = _valid_args()
    mutate(args)
    with pytest.raises(error, match=match):
        cache = MoBAKVCache.from_tensors(
            args.pop("k"),
            args.pop("v"),
            args.pop("seqlens"),
            starts=args.pop("starts"),
            block_size=args.pop("cache_block_size"),
            block_sums=args.pop("block_sums"),
        )
        flashmoba.moba_decode(args.pop("q"), cache, backend=args.pop("backend", "reference"), **args)


def test_decode_refuses_what_is_not_a_routing_cache():
    args = _valid_args()
    with pytest.raises(TypeError, match="cache must be a flashmoba.MoBAKVCache"):
        flashmoba.moba_decode(args["q"], args["k"], topk=2)
    dense_only = MoBAKVCache.from_tensors(args["k"], args["v"], args["seqlens"], block_size=None)
    with pytest.raises(ValueError, match="keeps no block sums"):
        flashmoba.moba_decode(args["q"], dense_only, topk=2)


def test_cache_refuses_to_overflow_and_bad_shapes():
    cache = MoBAKVCache(2, 10, 1, 8, block_size=4, dtype=torch.float32, device=DEVICE)
    kv = torch.randn(2, 6, 1, 8, device=DEVICE)
    cache.append(kv, kv)
    with pytest.raises(ValueError, match="max_seqlen=10"):
        cache.append(kv, kv)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(kv[:, :, :, :4], kv[:, :, :, :4])
    with pytest.raises(ValueError, match="lengths must lie in"):
        cache.append(kv[:, :2], kv[:, :2], lengths=torch.tensor([3, 0], device=DEVICE))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        MoBAKVCache(2, 10, 1, 8, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        MoBAKVCache(2, 10, 1, 8, block_size=4.0)
    # Keys of another dtype are refused, not cast: the cache holds what attention reads.
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        cache.append(kv[:, :2].double(), kv[:, :2].double())
    assert cache.seqlens.tolist() == [6, 6]  # nothing was written by the refused appends


def test_a_growing_cache_equals_a_preallocated_one():
    """MoBAKVCache.growing() takes its shapes from the first append and doubles its rows when they run out."""
    kv = torch.randn(2, 40, 2, 8, dtype=torch.float64, device=DEVICE)
    fixed = MoBAKVCache(2, 40, 2, 8, block_size=4, dtype=torch.float64, device=DEVICE)
    growing = MoBAKVCache.growing(block_size=4)
    assert growing.is_empty
    for a, b in ((0, 3), (3, 4), (4, 17), (17, 40)):
        for cache in (fixed, growing):
            cache.append(kv[:, a:b], kv[:, a:b] + 1)
    assert growing.k.shape[1] >= 40 and torch.equal(growing.k[:, :40], fixed.k)
    assert torch.equal(growing.v[:, :40], fixed.v) and torch.equal(growing.seqlens, fixed.seqlens)
    torch.testing.assert_close(growing.block_sums[:, :10], fixed.block_sums)


@pytest.fixture
def decode_host_reads(monkeypatch):
    """The cache keeps host copies as it does for CUDA tensors (also on the CPU); records every host read
    of a tensor's values made by the code of ``flashmoba.decode``."""
    import os
    import sys

    from flashmoba.decode import cache as cache_module

    monkeypatch.setattr(cache_module, "keeps_host_copy", lambda t: True)
    reads, inside = [], os.sep + os.path.join("flashmoba", "decode") + os.sep

    def counting(name, original):
        def counted(t, *args, **kwargs):
            if inside in sys._getframe(1).f_code.co_filename:
                reads.append(name)
            return original(t, *args, **kwargs)

        return counted

    for name in ("tolist", "item", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return reads


def test_decode_steps_read_nothing_back_from_the_device(decode_host_reads):
    """A decode step (append one token per sequence, then moba_decode and dense_decode) reads no tensor
    value back: the cache keeps its lengths on the host in step with its own appends. A write it did not
    make moves the tensors' versions and is read again, so a check never passes on stale lengths."""
    B, hq, hkv, d = 2, 2, 1, 16
    cache = MoBAKVCache.growing(block_size=16)
    prompt = torch.randn(B, 37, hkv, d, device=DEVICE)
    cache.append(prompt, prompt + 1, torch.tensor([37, 20], dtype=torch.int32, device=DEVICE))  # ragged: reads
    decode_host_reads.clear()
    steps = [torch.randn(B, 1, hkv + hq, d, device=DEVICE) for _ in range(3)]
    if DEVICE == "cuda":  # on a GPU, also no synchronisation of any kind
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            kv, q = step[:, :, :hkv], step[:, :, hkv:]
            cache.append(kv, kv)
            flashmoba.moba_decode(q, cache, topk=2, backend="triton")
            dense_decode(q, cache, window=8)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert decode_host_reads == []
    assert cache.host_lengths() == ([40, 23], [0, 0]) == (cache.seqlens.tolist(), cache.starts.tolist())
    assert cache.max_rows == 40
    cache.seqlens.zero_()  # not the cache's own write
    with pytest.raises(ValueError, match="every sequence must hold its 1 new token"):
        dense_decode(q, cache)
    cache.seqlens.fill_(23)
    cache.crop(3)  # the cache's in-place edits are read again too
    assert cache.host_lengths() == ([20, 20], [0, 0])


def test_dense_decode_equals_full_causal_and_window_attention():
    """dense_decode over a left-padded cache equals SDPA over each whole sequence, with and without a window."""
    lens, new, hq, hkv, d = (23, 9), 3, 4, 2, 8
    p = _decode_problem(DecodeCase(lens, hq, hkv, d, 4, 2, new))
    cache = MoBAKVCache.from_tensors(p["k_cache"], p["v_cache"], p["seqlens"], starts=p["starts"], block_size=None)
    for window in (None, 5):
        out = dense_decode(p["q_new"], cache, window=window)
        for b, (a, e) in enumerate(_sequence_bounds(p["cu"])):
            pos = torch.arange(e - a, device=DEVICE)
            allowed = pos[:, None] >= pos[None, :]
            if window is not None:
                allowed &= pos[:, None] - pos[None, :] < window
            full = torch.nn.functional.scaled_dot_product_attention(
                p["q"][a:e].transpose(0, 1),
                p["k"][a:e].transpose(0, 1),
                p["v"][a:e].transpose(0, 1),
                attn_mask=allowed,
                enable_gqa=True,
            ).transpose(0, 1)
            torch.testing.assert_close(out[b], full[-new:])


# ---------------------------------------------------------------------------------------------------
# on a GPU: long contexts at realistic head counts, bf16, a captured decode step (skipped without a GPU)

needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (the H100 suite)")


def _long_problem(lens, hq, hkv, d, block_size, new, dtype):
    """A left-padded head-major (Hugging Face layout) cache of long sequences.

    Each block's keys share a random offset, so that centroid scores are far apart compared with float32
    rounding: the kernel (fp32 scores) and the float64 oracle then route alike, even over many blocks.
    """
    B = len(lens)
    starts = torch.randint(0, 64, (B,), device=DEVICE, dtype=torch.int32)
    S = int((starts + torch.tensor(lens, device=DEVICE)).max())
    k = torch.randn(B, hkv, S, d, device=DEVICE)
    local = (torch.arange(S, device=DEVICE)[None, :] - starts[:, None].long()).clamp(min=0) // block_size
    offsets = 2 * torch.randn(B, hkv, int(local.max()) + 1, d, device=DEVICE)
    k += torch.gather(offsets, 2, local[:, None, :, None].expand(B, hkv, S, d))
    k_cache = k.to(dtype).transpose(1, 2)
    v_cache = torch.randn(B, hkv, S, d, device=DEVICE, dtype=dtype).transpose(1, 2)
    seqlens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    block_sums = torch.zeros(B, -(-S // block_size), hkv, d, device=DEVICE)
    accumulate_block_sums(block_sums, k_cache, starts, torch.zeros_like(seqlens), seqlens, block_size, S)
    q = torch.randn(B, new, hq, d, device=DEVICE, dtype=dtype)
    return q, k_cache, v_cache, seqlens, starts, block_sums


@needs_gpu
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared-kv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_decode_on_gpu_at_realistic_shapes(dtype, shared):
    """The FlashAttention rule: the kernel's error against float64 is at most twice that of the reference
    computed in the input dtype (on the same blocks), plus one rounding of the quantity's magnitude."""
    from flashmoba.decode import reference

    block_size, topk = 128, 8
    q, k, v, seqlens, starts, sums = _long_problem((40_000, 5_000, 300), 32, 8, 128, block_size, 4, dtype)
    cache = MoBAKVCache.from_tensors(k, v, seqlens, starts=starts, block_size=block_size, block_sums=sums)
    out, lse = flashmoba.moba_decode(q, cache, topk=topk, shared_kv_routing=shared, return_lse=True, backend="triton")
    args = (seqlens, starts, sums, block_size, topk, shared, 128**-0.5)
    exact = reference.decode(q.double(), k.double(), v.double(), *args)
    low = reference.decode(q, k, v, *args, compute_dtype=dtype)
    eps = torch.finfo(dtype).eps
    for kernel, want, lowp, magnitude in (
        (out, exact[0], low[0], v.abs().max()),
        (lse, exact[1], low[1], exact[1].abs().max()),
    ):
        err = (kernel.double() - want).abs().max().item()
        ref_err = (lowp.double() - want).abs().max().item()
        assert err <= 2 * ref_err + eps * float(magnitude), f"error {err:.3g} vs reference error {ref_err:.3g}"


@needs_gpu
def test_a_captured_decode_step_replays_like_eager_steps():
    """append + moba_decode captured once in a CUDA graph, replayed over new tokens, equals eager steps."""
    B, hkv, d, block_size = 2, 8, 128, 128
    caches = [MoBAKVCache(B, 4096, hkv, d, block_size=block_size, device=DEVICE) for _ in range(2)]
    prompt = torch.randn(B, 2 * 3000, hkv, d, device=DEVICE, dtype=torch.bfloat16)
    for cache in caches:
        cache.append(prompt[:, :3000], prompt[:, 3000:])
    q, k_new, v_new = (torch.randn(B, 1, h, d, device=DEVICE, dtype=torch.bfloat16) for h in (32, hkv, hkv))

    def step(cache):
        cache.append(k_new, v_new)
        return flashmoba.moba_decode(q, cache, topk=8)

    graphed, eager = caches
    # Warm up (compiles the kernels) on a throw-away copy, then capture on the graphed cache.
    spare = MoBAKVCache(B, 4096, hkv, d, block_size=block_size, device=DEVICE)
    spare.append(prompt[:, :3000], prompt[:, 3000:])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(spare)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(graphed)
    for _ in range(300):  # crosses block boundaries: 3001 .. 3300 tokens
        for t in (q, k_new, v_new):
            t.normal_()
        graph.replay()
        assert torch.equal(out_static, step(eager))
    assert torch.equal(graphed.seqlens, eager.seqlens) and torch.equal(graphed.block_sums, eager.block_sums)
