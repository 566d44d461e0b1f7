"""The shared input factory of the test suite: awkward shapes, random packed inputs, an independent oracle.

Import it from any test module as ``from factory import ...`` (``tests/`` is put on ``sys.path`` by
pytest's rootdir-relative import of ``tests/conftest.py``, also under pytest-xdist).

* :class:`Case` / :data:`AWKWARD_CASES`: small problems (N <= 300) over the shapes that break kernels;
  :data:`AWKWARD_CASES_TRITON` is the subset the Triton backend accepts (``block_size >= 16``).
* :func:`make_packed`: fresh random packed ``q, k, v, cu_seqlens``.
* :func:`naive_route` / :func:`naive_attention`: MoBA written per token and head in NumPy float64,
  sharing no code with :mod:`flashmoba.reference`, so that it can check the reference itself.
* :func:`rounding_bound`: a worst-case rounding error bound of one attention computation, from the data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from flashmoba._checks import TRITON_MIN_BLOCK


class Case(NamedTuple):
    """One awkward problem: packed sequence lengths, heads, head dim and routing parameters."""

    lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    block_size: int
    topk: int

    def packed(self, **kwargs):
        """``make_packed`` for this case's shapes (keyword arguments are passed through)."""
        return make_packed(self.lens, self.hq, self.hkv, self.d, **kwargs)

    @property
    def blocks_in_longest(self) -> int:
        """Blocks of the longest sequence (so ``topk >= blocks_in_longest`` selects every block)."""
        return max((-(-n // self.block_size) for n in self.lens), default=0)


def _param(case_id: str, *case_fields) -> pytest.param:
    return pytest.param(Case(*case_fields), id=case_id)


# Each case stresses a few things at once; between them they cover lengths that are not multiples of the
# block, sequences shorter than one block, empty sequences first / in the middle / last, single tokens,
# D in {16, 32, 64, 128}, GQA groups 1 / 2 / 4, block sizes {4, 8, 16, 48} and topk 1 / 2 / 3 / >= blocks.
#            id                          lens                  hq hkv  d   block topk
AWKWARD_CASES = [
    _param("partial-last-block", (37,), 2, 2, 16, 8, 3),
    _param("shorter-than-block-gqa2", (5, 11), 4, 2, 32, 16, 2),
    _param("empty-first-gqa4", (0, 70, 33), 4, 1, 64, 16, 3),
    _param("empty-middle-topk1", (50, 0, 29), 2, 1, 16, 4, 1),
    _param("empty-last-block48-d128", (100, 0), 1, 1, 128, 48, 2),
    _param("single-token", (1,), 2, 1, 32, 16, 1),
    _param("single-tokens-around", (1, 130, 1), 4, 4, 16, 16, 3),
    _param("topk-covers-all", (64, 47), 2, 1, 64, 16, 8),
    _param("many-small-blocks-gqa2", (150, 97), 4, 2, 32, 4, 3),
    _param("block48-partial-gqa4", (200,), 4, 1, 128, 48, 3),
    _param("exact-multiples-topk1", (96, 32), 2, 2, 64, 16, 1),
    _param("many-empties", (0, 0, 20, 0, 9, 0), 2, 1, 16, 8, 2),
]

# The cases the Triton backend accepts (its block size has a lower bound; every D above is supported).
AWKWARD_CASES_TRITON = [p for p in AWKWARD_CASES if p.values[0].block_size >= TRITON_MIN_BLOCK]


def make_packed(
    lens,
    hq: int,
    hkv: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
):
    """Fresh standard-normal packed inputs.

    Args:
        lens: sequence lengths (zeros allowed); hq / hkv: query / KV heads; d: head dim.
        generator: optional CPU ``torch.Generator`` (e.g. seeded by hypothesis); default: the global RNG.

    Returns:
        ``(q [N, hq, d], k [N, hkv, d], v [N, hkv, d], cu_seqlens int32 [S + 1])`` on ``device``, with
        ``N = sum(lens)``; q, k, v are leaf tensors of ``dtype`` (requiring grad if asked).
    """
    num_tokens = sum(lens)
    cu_seqlens = torch.tensor([0, *np.cumsum(lens, dtype=np.int64)], dtype=torch.int32, device=device)

    def normal(heads):
        # Drawn in float32 on the CPU so that every dtype and device sees the same values for one seed.
        x = torch.randn(num_tokens, heads, d, generator=generator)
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return normal(hq), normal(hkv), normal(hkv), cu_seqlens


def _as_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def round_to_dtype(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round float64 values once to ``dtype`` (how MoBA stores centroids), back in float64."""
    return torch.from_numpy(x).to(dtype).to(torch.float64).numpy()


def _sequence_bounds(cu_seqlens: torch.Tensor):
    bounds = [int(x) for x in cu_seqlens.cpu()]
    return list(zip(bounds[:-1], bounds[1:]))


def naive_route(q, k, cu_seqlens, block_size: int, topk: int, causal: bool) -> torch.Tensor:
    """MoBA routing, one query token and head at a time, in float64 (the oracle of ``route``).

    Args:
        q: ``[N, HQ, D]``; k: ``[N, HKV, D]``; cu_seqlens: ``[S + 1]`` (any dtype / device).

    Returns:
        int32 ``[N, HQ, topk]`` on the CPU: local block ids, ascending, -1 padded at the end.
    """
    qn, kn = _as_numpy64(q), _as_numpy64(k)
    num_tokens, num_q_heads, _ = qn.shape
    group = num_q_heads // kn.shape[1]
    selected = np.full((num_tokens, num_q_heads, topk), -1, dtype=np.int32)
    for start, end in _sequence_bounds(cu_seqlens):
        length = end - start
        spans = [(b, min(b + block_size, length)) for b in range(0, length, block_size)]
        # The centroid is the mean over the keys the block really has (the last block may be partial).
        # Stored in the keys' dtype, as MoBA does: round the float64 mean once.
        centroids = [round_to_dtype(kn[start + a : start + b].sum(axis=0) / (b - a), k.dtype) for a, b in spans]
        for t in range(length):
            own = t // block_size
            for h in range(num_q_heads):
                query = qn[start + t, h]
                scores = [float(np.dot(query, c[h // group])) for c in centroids]
                if causal:
                    # The own block is forced and takes one of the topk places; only blocks that end
                    # before it starts compete for the rest.
                    forced, candidates, places = [own], range(own), topk - 1
                else:
                    forced, candidates, places = [], range(len(spans)), topk
                # Highest score first; on equal scores the lower block index first.
                # -inf and NaN gates never win a place.
                ranked = sorted((j for j in candidates if scores[j] > -math.inf), key=lambda j: (-scores[j], j))
                blocks = sorted(forced + ranked[:places])
                selected[start + t, h, : len(blocks)] = blocks
    return torch.from_numpy(selected)


def naive_attention(q, k, v, cu_seqlens, block_size: int, topk: int, causal: bool, softmax_scale=None, indices=None):
    """MoBA attention, one query token and head at a time, in float64 (the oracle of ``attention``).

    Args:
        q: ``[N, HQ, D]``; k, v: ``[N, HKV, D]``; cu_seqlens: ``[S + 1]``.
        softmax_scale: defaults to ``D ** -0.5``.
        indices: optional routing ``[N, HQ, topk]`` to attend with; default: :func:`naive_route`.

    Returns:
        ``(out float64 [N, HQ, D], lse float64 [N, HQ])`` on the CPU (natural-log sum-exp).
    """
    if indices is None:
        indices = naive_route(q, k, cu_seqlens, block_size, topk, causal)
    qn, kn, vn = _as_numpy64(q), _as_numpy64(k), _as_numpy64(v)
    sel = indices.cpu().numpy()
    num_tokens, num_q_heads, head_dim = qn.shape
    group = num_q_heads // kn.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((num_tokens, num_q_heads, vn.shape[-1]))
    lse = np.zeros((num_tokens, num_q_heads))
    for start, end in _sequence_bounds(cu_seqlens):
        length = end - start
        for t in range(length):
            for h in range(num_q_heads):
                keys = [
                    start + s
                    for j in sel[start + t, h]
                    if j >= 0
                    for s in range(j * block_size, min((j + 1) * block_size, length))
                    if not causal or s <= t
                ]
                logits = scale * (kn[keys, h // group] @ qn[start + t, h])
                peak = logits.max()
                weights = np.exp(logits - peak)
                total = weights.sum()
                out[start + t, h] = (weights[:, None] * vn[keys, h // group]).sum(axis=0) / total
                lse[start + t, h] = peak + math.log(total)
    return torch.from_numpy(out), torch.from_numpy(lse)


def rounding_bound(q, k, v, cu_seqlens, compute_dtype, softmax_scale=None) -> tuple[float, float]:
    """Worst-case rounding error of one attention computation carried out in ``compute_dtype``.

    First-order bounds from the data: a logit ``scale * q.k`` is off by at most ``(D + 1) u M`` with
    ``M = scale * max|q| * max|k|`` (Euclidean norms over tokens and heads) and ``u`` the unit roundoff;
    the softmax turns that into a relative error of at most ``2 (D + 1) u M + (2 L + 3) u`` per weight
    (exp, a sum over up to ``L`` keys, a division), and the weighted sum of values adds ``L u``.

    Returns:
        ``(out_bound, lse_bound)``: absolute bounds on the output entries and on the lse.
    """
    unit = torch.finfo(compute_dtype).eps / 2
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else abs(softmax_scale)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    longest = max(lens, default=0)

    def max_norm(t):
        return float(t.detach().double().norm(dim=-1).max()) if t.numel() else 0.0

    logit_bound = scale * max_norm(q) * max_norm(k)
    logit_err = (head_dim + 1) * unit * logit_bound
    max_value = float(v.detach().double().abs().max()) if v.numel() else 0.0
    out_bound = max_value * (2 * logit_err + (3 * longest + 3) * unit)
    lse_bound = logit_err + (longest + 2) * unit + unit * (logit_bound + math.log(max(longest, 1)))
    return out_bound, lse_bound
