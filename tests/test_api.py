"""The public API: every bad argument gets a clear error naming it; layouts and backend choice are right.

Validation errors are checked for their type and for the argument they name, on all three entry points
wherever the argument exists. None of these tests needs the Triton kernels: Triton-specific limits are
checked before anything is launched.
"""

import math

import pytest
import torch
from factory import make_packed, rounding_bound

import flashmoba
from flashmoba import reference

VARLEN = flashmoba.moba_attn_varlen
ROUTE = flashmoba.moba_route_varlen
BATCHED = flashmoba.moba_attn


def _varlen_args(dtype=torch.float32):
    """Valid arguments of the varlen entry points: 4 query heads over 2 KV heads, an empty sequence."""
    q, k, v, cu = make_packed((5, 0, 12), 4, 2, 16, dtype=dtype)
    return {"q": q, "k": k, "v": v, "cu_seqlens": cu, "block_size": 4, "topk": 2}


def _batched_args():
    """Valid arguments of ``moba_attn``: the varlen ones without ``cu_seqlens``, as [B=2, T=10, H, D]."""
    q, k, v, _ = make_packed((20,), 4, 2, 16, dtype=torch.float32)
    q, k, v = (x.view(2, 10, *x.shape[1:]) for x in (q, k, v))
    return {"q": q, "k": k, "v": v, "block_size": 4, "topk": 2}


def _call(fn, args):
    """Call an entry point with an argument dict (``moba_route_varlen`` ignores ``v``)."""
    args = dict(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    tensors = (q, k) if fn is ROUTE else (q, k, v)
    if fn is not BATCHED:
        tensors = (*tensors, args.pop("cu_seqlens"))
    return fn(*tensors, **args)


def _with(**changes):
    return lambda args: {**args, **changes}


def _replace(names: str, make):
    """Apply ``make`` to the space-separated named tensors (change k and v together where the error is
    about k, so that it is not reported as v differing from k)."""
    return lambda args: {**args, **{name: make(args[name]) for name in names.split()}}


def _long_batch():
    """q, k, v and cu_seqlens of one sequence of 70 blocks of 16 tokens."""
    q, k, v, cu = make_packed((16 * 70,), 4, 2, 16, dtype=torch.float32)
    return {"q": q, "k": k, "v": v, "cu_seqlens": cu}


def _cu(values, dtype=torch.int32):
    return _with(cu_seqlens=torch.tensor(values, dtype=dtype))


# (id, mutation of valid arguments, error type, pattern the message must contain)
COMMON_ERRORS = [
    ("q-rank", _replace("q", lambda t: t[0]), ValueError, r"\bq must have rank"),
    ("k-rank", _replace("k", lambda t: t[None]), ValueError, r"\bk must have rank"),
    ("q-not-tensor", _replace("q", lambda t: t.tolist()), TypeError, r"\bq must be a torch.Tensor"),
    ("k-token-count", _replace("k v", lambda t: t[:-1]), ValueError, r"\bk must match q"),
    ("k-head-dim", _replace("k v", lambda t: t[..., :8]), ValueError, r"\bk's head dim"),
    (
        "heads-not-multiple",
        _replace("k v", lambda t: t.narrow(-2, 0, 1).repeat_interleave(3, dim=-2)),
        ValueError,
        r"\bq has 4 heads and k has 3",
    ),
    ("head-dim-zero", _replace("q k v", lambda t: t[..., :0]), ValueError, r"head dim must be >= 1"),
    ("k-device", _replace("k", lambda t: t.to("meta")), ValueError, r"\bk is on meta"),
    ("k-dtype", _replace("k", lambda t: t.double()), TypeError, r"\bk has dtype"),
    ("integer-dtype", _replace("q k v", lambda t: t.int()), TypeError, r"\bq must be a floating"),
    ("block-size-zero", _with(block_size=0), ValueError, r"block_size must be >= 1"),
    ("block-size-float", _with(block_size=4.0), TypeError, r"block_size must be an int"),
    ("block-size-bool", _with(block_size=True), TypeError, r"block_size must be an int"),
    ("topk-zero", _with(topk=0), ValueError, r"topk must be >= 1"),
    ("topk-str", _with(topk="2"), TypeError, r"topk must be an int"),
    ("causal-not-bool", _with(causal=1), TypeError, r"causal must be a bool"),
    ("unknown-backend", _with(backend="cuda"), ValueError, r"backend must be one of"),
]

VARLEN_ONLY_ERRORS = [
    ("cu-float", _cu([0.0, 5.0, 5.0, 17.0], torch.float32), TypeError, r"cu_seqlens must be int32 or int64"),
    ("cu-int16", _cu([0, 5, 5, 17], torch.int16), TypeError, r"cu_seqlens must be int32 or int64"),
    ("cu-2d", _cu([[0, 5], [5, 17]]), ValueError, r"cu_seqlens must be 1-D"),
    ("cu-empty", _cu([]), ValueError, r"cu_seqlens must be 1-D with at least one"),
    ("cu-not-tensor", _with(cu_seqlens=[0, 5, 5, 17]), TypeError, r"cu_seqlens must be a torch.Tensor"),
    ("cu-device", _replace("cu_seqlens", lambda t: t.to("meta")), ValueError, r"cu_seqlens is on meta"),
    ("cu-start", _cu([1, 5, 5, 17]), ValueError, r"cu_seqlens must start at 0"),
    ("cu-decreasing", _cu([0, 9, 5, 17]), ValueError, r"cu_seqlens must be non-decreasing"),
    ("cu-short-end", _cu([0, 5, 5, 16]), ValueError, r"cu_seqlens must end at the number of tokens"),
    ("cu-long-end", _cu([0, 5, 5, 18], torch.int64), ValueError, r"cu_seqlens must end at the number of tokens"),
    ("max-seqlen-small", _with(max_seqlen=11), ValueError, r"max_seqlen=11 is smaller"),
    ("max-seqlen-float", _with(max_seqlen=12.0), TypeError, r"max_seqlen must be an int"),
    ("max-seqlen-negative", _with(max_seqlen=-1), ValueError, r"max_seqlen must be >= 0"),
]

ATTENTION_ONLY_ERRORS = [
    ("v-rank", _replace("v", lambda t: t[None]), ValueError, r"\bv must have rank"),
    ("v-shape", _replace("v", lambda t: t[..., :8]), ValueError, r"\bv must have the shape of k"),
    ("v-device", _replace("v", lambda t: t.to("meta")), ValueError, r"\bv is on meta"),
    ("v-dtype", _replace("v", lambda t: t.half()), TypeError, r"\bv has dtype"),
    ("scale-str", _with(softmax_scale="0.1"), TypeError, r"softmax_scale must be a float"),
    ("scale-inf", _with(softmax_scale=math.inf), ValueError, r"softmax_scale must be finite"),
    ("scale-nan", _with(softmax_scale=math.nan), ValueError, r"softmax_scale must be finite"),
    ("scale-zero", _with(softmax_scale=0.0), ValueError, r"softmax_scale must be finite and nonzero"),
    ("deterministic-not-bool", _with(deterministic=None), TypeError, r"deterministic must be a bool"),
]

# Limits of the Triton backend, as mutations of otherwise valid Triton arguments (block_size 16).
TRITON_ERRORS = [
    ("float64", _replace("q k v", lambda t: t.double()), TypeError, r"dtype torch.float64 .* backend='triton'"),
    (
        "bfloat16-interpreted",
        _replace("q k v", lambda t: t.bfloat16()),
        TypeError,
        r"bfloat16 .* backend='triton' under the Triton interpreter",
    ),
    ("head-dim-12", _replace("q k v", lambda t: t[..., :12]), ValueError, r"head dim 12 .* backend='triton'"),
    (
        "head-dim-264",
        _replace("q k v", lambda t: t.repeat(1, 1, 17)[..., :264]),
        ValueError,
        r"head dim 264 .* backend='triton'",
    ),
    ("block-size-8", _with(block_size=8), ValueError, r"block_size 8 .* backend='triton'"),
    # On a batch of more than 65 blocks (a larger topk on fewer blocks means "all of them": no refusal).
    ("topk-65", lambda args: {**args, **_long_batch(), "topk": 65}, ValueError, r"topk 65 .* backend='triton'"),
]


def _cases(table, entry_points):
    return [
        pytest.param(fn, mutate, error, pattern, id=f"{fn.__name__}-{case_id}")
        for case_id, mutate, error, pattern in table
        for fn in entry_points
    ]


@pytest.mark.parametrize(
    "fn, mutate, error, pattern",
    _cases(COMMON_ERRORS, (VARLEN, ROUTE))
    + _cases(VARLEN_ONLY_ERRORS, (VARLEN, ROUTE))
    + _cases(ATTENTION_ONLY_ERRORS, (VARLEN,)),
)
def test_varlen_validation_errors(fn, mutate, error, pattern):
    args = _varlen_args()
    _call(fn, args)  # the unmutated arguments are valid
    with pytest.raises(error, match=pattern):
        _call(fn, mutate(args))


@pytest.mark.parametrize(
    "fn, mutate, error, pattern",
    _cases(COMMON_ERRORS + ATTENTION_ONLY_ERRORS, (BATCHED,)),
)
def test_batched_validation_errors(fn, mutate, error, pattern):
    args = _batched_args()
    _call(fn, args)
    with pytest.raises(error, match=pattern):
        _call(fn, mutate(args))


@pytest.mark.parametrize(
    "args, pattern",
    [
        (_replace("q", lambda t: t[0]), r"\bq must have rank 4"),
        (_replace("k", lambda t: t.flatten(0, 1)), r"\bk must have rank 4"),
        (_replace("v", lambda t: t[None]), r"\bv must have rank 4"),
        (_replace("k v", lambda t: t[:, :-1]), r"\bk must match q"),
    ],
    ids=["q-rank", "k-rank", "v-rank", "k-sequence-length"],
)
def test_batched_shape_errors(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(BATCHED, args(_batched_args()))


@pytest.mark.parametrize("fn, mutate, error, pattern", _cases(TRITON_ERRORS, (VARLEN, ROUTE)))
def test_triton_limits(monkeypatch, fn, mutate, error, pattern):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_args = {**_varlen_args(), "block_size": 16, "backend": "triton"}
    with pytest.raises(error, match=pattern):
        _call(fn, mutate(triton_args))


@pytest.mark.parametrize("fn", [VARLEN, ROUTE, BATCHED], ids=lambda f: f.__name__)
def test_triton_on_cpu_needs_the_interpreter(monkeypatch, fn):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _batched_args() if fn is BATCHED else _varlen_args()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        _call(fn, {**args, "backend": "triton"})


def test_reference_rejects_float8():
    args = _varlen_args()
    float8 = {name: args[name].to(torch.float8_e4m3fn) for name in ("q", "k", "v")}
    with pytest.raises(TypeError, match=r"float8_e4m3fn is not supported by backend='reference'"):
        _call(VARLEN, {**args, **float8, "backend": "reference"})


# ---------------------------------------------------------------------------------------------------
# layouts and backend choice


def test_noncontiguous_inputs_give_the_contiguous_result():
    lens, hq, hkv, d = (23, 0, 40), 4, 2, 16
    q, k, v, cu = make_packed(lens, hq, hkv, d)
    # Views with unusual strides: a head-major transpose, a strided head slice, a strided last dim.
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    k_view = torch.stack([k, torch.randn_like(k)], dim=2).flatten(1, 2)[:, ::2]
    v_view = torch.stack([v, torch.randn_like(v)], dim=-1).flatten(-2)[..., ::2]
    assert not any(x.is_contiguous() for x in (q_view, k_view, v_view))
    assert all(torch.equal(a, b) for a, b in ((q, q_view), (k, k_view), (v, v_view)))

    kwargs = {"block_size": 8, "topk": 3, "return_lse": True, "backend": "reference"}
    out, lse = VARLEN(q, k, v, cu, **kwargs)
    out_view, lse_view = VARLEN(q_view, k_view, v_view, cu, **kwargs)
    out_bound, lse_bound = rounding_bound(q, k, v, cu, torch.float64)
    torch.testing.assert_close(out_view, out, rtol=0, atol=2 * out_bound)
    torch.testing.assert_close(lse_view, lse, rtol=0, atol=2 * lse_bound)
    route_kwargs = {"block_size": 8, "topk": 3, "backend": "reference"}
    indices = ROUTE(q, k, cu, **route_kwargs).indices
    assert torch.equal(ROUTE(q_view, k_view, cu, **route_kwargs).indices, indices)

    # Batched inputs that come from a [B, H, T, D] layout.
    qb, kb, vb = (x[:40].view(2, 20, -1, d) for x in (q, k, v))
    out_b = BATCHED(qb, kb, vb, block_size=8, topk=3, backend="reference")
    views = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (qb, kb, vb))
    torch.testing.assert_close(
        BATCHED(*views, block_size=8, topk=3, backend="reference"), out_b, rtol=0, atol=2 * out_bound
    )


@pytest.mark.parametrize("fn", [VARLEN, BATCHED], ids=lambda f: f.__name__)
def test_auto_uses_the_reference_on_cpu(monkeypatch, fn):
    calls = []
    reference_attention = reference.attention

    def spy(*args, **kwargs):
        calls.append(1)
        return reference_attention(*args, **kwargs)

    monkeypatch.setattr(reference, "attention", spy)
    args = _batched_args() if fn is BATCHED else _varlen_args()
    out = _call(fn, {**args, "backend": "auto"})
    assert calls == [1]
    assert torch.equal(out, _call(fn, {**args, "backend": "reference"}))


def test_route_result_echoes_its_parameters():
    args = _varlen_args()
    routing = _call(ROUTE, {**args, "causal": False, "backend": "reference"})
    assert isinstance(routing, flashmoba.MoBARouting)
    assert routing.indices.dtype == torch.int32 and routing.indices.shape == (17, 4, 2)
    assert (routing.block_size, routing.topk, routing.causal) == (4, 2, False)
    assert torch.equal(routing.cu_seqlens, args["cu_seqlens"])


@pytest.mark.parametrize("dtype, lse_dtype", [(torch.float16, torch.float32), (torch.float64, torch.float64)], ids=str)
def test_lse_dtype_and_shapes(dtype, lse_dtype):
    args = _varlen_args(dtype=dtype)
    out, lse = _call(VARLEN, {**args, "return_lse": True, "backend": "reference"})
    assert out.dtype == dtype and out.shape == args["q"].shape
    assert lse.dtype == lse_dtype and lse.shape == args["q"].shape[:2]


@pytest.mark.parametrize("fn", [VARLEN, BATCHED], ids=["varlen", "batched"])
@pytest.mark.parametrize(
    "huge",
    [dict(block_size=10**9), dict(topk=10**12), dict(block_size=10**12, topk=10**9)],
    ids=["block", "topk", "both"],
)
def test_huge_block_size_or_topk_equals_one_block_or_all_blocks(fn, huge):
    """A block longer than every sequence is one block, and a topk past every block selects them all: the
    result equals the smallest such values, without allocating for the nominal ones."""
    args = _varlen_args() if fn is VARLEN else _batched_args()
    longest = 12 if fn is VARLEN else 10
    same = {
        "block_size": longest if "block_size" in huge else args["block_size"],
        "topk": longest if "topk" in huge else args["topk"],
    }  # topk >= blocks of the longest sequence
    out = _call(fn, {**args, **huge})
    assert torch.equal(out, _call(fn, {**args, **same}))


def test_routing_refuses_a_topk_that_would_only_allocate_padding():
    with pytest.raises(ValueError, match=r"topk must be <= 64 here"):
        _call(ROUTE, {**_varlen_args(), "topk": 10**12})
    routing = _call(ROUTE, {**_varlen_args(), "block_size": 10**9})
    assert routing.block_size == 17 and routing.indices.shape[-1] == 2  # N = 17 tokens: one block each


@pytest.mark.parametrize("fn", [VARLEN, ROUTE, BATCHED], ids=["varlen", "route", "batched"])
def test_numpy_integers_are_ints(fn):
    np = pytest.importorskip("numpy")
    args = _varlen_args() if fn is not BATCHED else _batched_args()
    plain = _call(fn, args)
    typed = _call(fn, {**args, "block_size": np.int64(args["block_size"]), "topk": np.int32(args["topk"])})
    if fn is ROUTE:
        plain, typed = plain.indices, typed.indices
    assert torch.equal(plain, typed)


@pytest.fixture
def remembered_boundaries(monkeypatch):
    """Boundaries remembered as for CUDA tensors, on the CPU; counts the host reads of their values."""
    from flashmoba import _checks

    monkeypatch.setattr(_checks, "keeps_host_copy", lambda t: True)
    monkeypatch.setattr(_checks, "_valid_boundaries", {})
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    return reads


def test_uniform_boundaries_are_known_valid(remembered_boundaries):
    """Boundaries that ``uniform_cu_seqlens`` built are checked without a read; once written, they are read."""
    from flashmoba._checks import check_cu_seqlens
    from flashmoba.nn.varlen import uniform_cu_seqlens

    cu = uniform_cu_seqlens(3, 7, "cpu")
    check_cu_seqlens(cu, 21, cu.device, max_seqlen=7)
    check_cu_seqlens(uniform_cu_seqlens(0, 7, "cpu"), 0, cu.device)
    assert remembered_boundaries == []
    with pytest.raises(ValueError, match=r"max_seqlen=6 is smaller"):
        check_cu_seqlens(cu, 21, cu.device, max_seqlen=6)
    cu[1] = 15
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        check_cu_seqlens(cu, 21, cu.device)
    assert len(remembered_boundaries) == 1


def test_boundaries_are_read_once_per_version(remembered_boundaries):
    """A boundary tensor is read once while unchanged; a write, a new tensor or other totals are checked
    again, so that a remembered check never lets a bad call through."""
    from flashmoba._checks import check_cu_seqlens

    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    check_cu_seqlens(cu, 17, cu.device)
    check_cu_seqlens(cu, 17, cu.device, max_seqlen=12)
    assert len(remembered_boundaries) == 1
    with pytest.raises(ValueError, match=r"max_seqlen=11 is smaller"):
        check_cu_seqlens(cu, 17, cu.device, max_seqlen=11)
    with pytest.raises(ValueError, match=r"cu_seqlens must end at the number of tokens"):
        check_cu_seqlens(cu, 16, cu.device)
    assert len(remembered_boundaries) == 1
    cu[2] = 3  # in place: the version moves
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        check_cu_seqlens(cu, 17, cu.device)
    cu[2] = 5
    check_cu_seqlens(cu, 17, cu.device)
    assert len(remembered_boundaries) == 3
    cu.view(2, 2)[1, 1] = 16  # a view shares the version counter
    with pytest.raises(ValueError, match=r"cu_seqlens must end at the number of tokens"):
        check_cu_seqlens(cu, 17, cu.device)
    fresh = torch.tensor([0, 4], dtype=torch.int32)  # a new tensor, maybe at a dead one's id
    del cu
    check_cu_seqlens(fresh, 4, fresh.device)
    assert len(remembered_boundaries) == 5


def test_common_length():
    """The length every sequence shares, or None (different lengths, an empty sequence, no sequence)."""
    from flashmoba._checks import common_length

    assert common_length(torch.tensor([0, 4, 8, 12])) == 4
    assert common_length(torch.tensor([0, 12])) == 12
    assert common_length(torch.tensor([0, 4, 9, 12])) is None
    assert common_length(torch.tensor([0, 6, 6, 12])) is None  # an empty document
    assert common_length(torch.tensor([0, 0])) is None
    assert common_length(torch.tensor([0])) is None
