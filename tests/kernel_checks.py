"""Checks shared by the CPU (interpreter) and GPU tests of the Triton backend.

* :func:`assert_routing_valid`: a Triton selection must be a correct top-k of the float64 scores; rows
  whose k-th and (k+1)-th scores are closer than rounding may pick either block.
* :func:`assert_attention_matches`: the FlashAttention test rule: the kernel's error against a float64
  computation is at most 2x the error of the same reference computed in the input's low precision (out,
  lse and every gradient, in norm and in the worst entry), on the kernel's own routing (so routing
  near-ties cannot blur the check).
* :func:`assert_block_index_inverse`: the block -> query index is the exact inverse of ``indices``,
  rebuilt with plain loops.
"""

from __future__ import annotations

import math

import torch

import flashmoba
from flashmoba import reference


def assert_routing_valid(q, k, cu_seqlens, indices, block_size, topk, causal, score_tol):
    """``indices`` (from the kernel) vs float64 scores, sequence by sequence, vectorised."""
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        scores = reference.route_scores(q[a:b], k[a:b], block_size, torch.float64)  # [L, HQ, n]
        L, HQ, n = scores.shape
        dev = scores.device
        sel = indices[a:b].long()
        valid = sel >= 0
        own = (torch.arange(L, device=dev) // block_size)[:, None, None]
        blocks = torch.arange(n, device=dev)
        eligible = (blocks < own) if causal else torch.ones(L, 1, n, dtype=torch.bool, device=dev)
        eligible = eligible.expand(L, HQ, n)
        picks = topk - 1 if causal else topk
        # valid ids first, ascending and distinct
        assert not (~valid[..., :-1] & valid[..., 1:]).any(), "-1 padding must come last"
        assert ((sel[..., 1:] > sel[..., :-1]) | ~valid[..., 1:]).all(), "ids must be ascending"
        routed = valid & ~(sel == own) if causal else valid
        if causal:
            assert ((sel == own) & valid).any(-1).all(), "the own block must be selected"
        num_routed = routed.sum(-1)
        assert torch.equal(num_routed, eligible.sum(-1).clamp(max=picks)), "wrong number of blocks"
        safe = torch.where(routed, sel, 0)
        assert torch.gather(eligible, -1, safe)[routed].all(), "an ineligible block was selected"
        masked = scores.masked_fill(~eligible, -float("inf"))
        ranked = masked.sort(dim=-1, descending=True).values
        kth = torch.gather(ranked, -1, (num_routed - 1).clamp(min=0)[..., None])
        chosen_scores = torch.gather(masked, -1, safe)
        ok = (chosen_scores >= kth - score_tol) | ~routed
        assert ok.all(), f"{int((~ok).sum())} selections are not in the top-k"


def _max_row_norm(t):
    return t.detach().double().norm(dim=-1).max().item() if t.numel() else 0.0


def _magnitudes(q, k, v, dout):
    """Upper bounds (by Cauchy-Schwarz per row) of |out|, |lse|, |dq|, |dk|, |dv| entries."""
    scale = q.shape[-1] ** -0.5
    nq, nk, nv, ndo = (_max_row_norm(t) for t in (q, k, v, dout))
    ds = 2 * ndo * nv  # |p (dp - delta)| <= |dp| + |delta|
    return {
        "out": nv,
        "lse": scale * nq * nk + math.log(max(q.shape[0], 2)),
        "dq": scale * ds * nk,
        "dk": scale * ds * nq,
        "dv": ndo,
    }


def _max_error(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _norm_error(x, ref):
    return (x.double() - ref.double()).norm().item() if x.numel() else 0.0


def assert_attention_matches(q, k, v, cu_seqlens, dout, *, block_size, topk, causal, deterministic=False):
    """Triton forward + backward vs the reference in float64 and in the input dtype (FA rule).

    For out, lse, dq, dk and dv alike, the kernel's error against float64 is at most twice the error of
    the same rows computed by plain PyTorch in the input dtype, both in norm and in the worst entry. The
    only slack is one float32 rounding of the quantity's magnitude, so that a quantity the low-precision
    reference gets exactly (e.g. dq of a row with a single key) does not demand more than float32
    accumulation gives: it is far below any 16-bit error, so a several-fold regression cannot hide in it.
    """
    low = q.dtype
    routing = flashmoba.moba_route_varlen(
        q, k, cu_seqlens, block_size=block_size, topk=topk, causal=causal, backend="triton"
    )
    scale = q.shape[-1] ** -0.5
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashmoba.moba_attn_varlen(
        *leaves,
        cu_seqlens,
        block_size=block_size,
        topk=topk,
        causal=causal,
        return_lse=True,
        backend="triton",
        deterministic=deterministic,
    )
    out.backward(dout)
    results = {}
    for name, dtype in (("exact", torch.float64), ("low", low)):
        ref_leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, l = reference.attention(
            *ref_leaves, cu_seqlens, block_size, topk, causal, scale, indices=routing.indices, compute_dtype=dtype
        )
        o.backward(dout.to(dtype))
        results[name] = (o, l, *[t.grad for t in ref_leaves])
    names = ("out", "lse", "dq", "dk", "dv")
    kernel = dict(zip(names, (out, lse, *[t.grad for t in leaves])))
    exact, lowp = (dict(zip(names, results[key])) for key in ("exact", "low"))
    assert_within_fa_rule(kernel, exact, lowp, q, k, v, dout)
    return routing


def assert_within_fa_rule(kernel: dict, exact: dict, lowp: dict, q, k, v, dout):
    """The rule of :func:`assert_attention_matches` on computed results: ``{name: tensor}`` for "out",
    "lse", "dq", "dk", "dv" from the kernel, from float64 and from PyTorch in the inputs' dtype."""
    eps32 = torch.finfo(torch.float32).eps
    magnitudes = _magnitudes(q, k, v, dout)
    for name, got in kernel.items():
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        floor = eps32 * magnitudes[name]
        for measure, slack in ((_max_error, floor), (_norm_error, floor * math.sqrt(got.numel()))):
            err = measure(got, exact[name])
            ref_err = measure(lowp[name], exact[name])
            assert err <= 2.0 * ref_err + slack, (
                f"{name}: {measure.__name__[1:]} {err:.3g} > 2 x {ref_err:.3g} (PyTorch in {q.dtype}) + {slack:.3g}"
            )


def expected_layout(lens, block_size):
    """(cu_blocks, block_seq of the real blocks) by counting blocks sequence by sequence."""
    cu_blocks, block_seq = [0], []
    for s, n in enumerate(lens):
        blocks = -(-n // block_size)
        cu_blocks.append(cu_blocks[-1] + blocks)
        block_seq += [s] * blocks
    return cu_blocks, block_seq


def _expected_segments(routing, lens):
    """{segment h * (G + 1) + g: [pair positions t * topk + slot, ascending]} from ``indices``; segment
    ``g = G`` (num_blocks_max) of each head holds its -1 slots."""
    indices = routing.indices.tolist()
    num_heads, topk = routing.indices.shape[1], routing.topk
    stride = routing.num_blocks_max + 1
    cu_blocks, _ = expected_layout(lens, routing.block_size)
    segments = {}
    token = 0
    for s, n in enumerate(lens):
        for _ in range(n):
            for h in range(num_heads):
                for slot, j in enumerate(indices[token][h]):
                    g = cu_blocks[s] + j if j >= 0 else routing.num_blocks_max
                    segments.setdefault(h * stride + g, []).append(token * topk + slot)
            token += 1
    return segments


def assert_block_index_inverse(routing, lens):
    """The block index of ``routing`` is the exact inverse of its ``indices`` (rebuilt with plain loops)."""
    bi = routing.block_index
    num_heads, topk, num_blocks = routing.indices.shape[1], routing.topk, routing.num_blocks_max
    num_segments = num_heads * (num_blocks + 1)
    offsets, entries = bi.offsets.tolist(), bi.entries.tolist()
    assert bi.offsets.dtype == torch.int64 and bi.counts.dtype == torch.int32 and bi.entries.dtype == torch.int32
    assert (bi.num_heads, bi.topk, bi.num_blocks_max) == (num_heads, topk, num_blocks)
    assert len(offsets) == num_segments + 1 and bi.counts.shape == (num_heads, num_blocks)
    pairs_per_head = sum(lens) * topk
    assert len(entries) == num_heads * pairs_per_head  # static length
    assert offsets[0] == 0 and offsets[-1] == len(entries)
    for h in range(num_heads):  # each head's pairs fill [h * pairs_per_head, (h + 1) * pairs_per_head)
        assert offsets[h * (num_blocks + 1)] == h * pairs_per_head
    counts = bi.counts.flatten().tolist()
    real = [h * (num_blocks + 1) + g for h in range(num_heads) for g in range(num_blocks)]
    assert all(offsets[i + 1] - offsets[i] == c for i, c in zip(real, counts))
    assert sum(counts) == int((routing.indices >= 0).sum())

    # Every (t, h, slot) is in its segment (a -1 slot in its head's last one), exactly once, in ascending
    # token order.
    expected = _expected_segments(routing, lens)
    tokens = bi.tokens().tolist()
    for segment in range(num_segments):
        got = entries[offsets[segment] : offsets[segment + 1]]
        assert got == expected.get(segment, []), f"segment {segment}"
        seg_tokens = tokens[offsets[segment] : offsets[segment + 1]]
        assert seg_tokens == [p // topk for p in got]
        if segment % (num_blocks + 1) < num_blocks:  # a token selects a block at most once
            assert all(a < b for a, b in zip(seg_tokens, seg_tokens[1:]))
