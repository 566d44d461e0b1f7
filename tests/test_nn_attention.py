"""MoBAAttention and causal_attention against independent float64 oracles.

The oracles are the shared per-token loops of ``factory`` (MoBA, and dense causal attention as MoBA
with topk covering every block) and a per-token sliding-window loop here. Tolerances: twice the
worst-case rounding bound of one attention computation (``factory.rounding_bound``), carried through the
output projection by the largest absolute row sum of its weight.
"""

import math

import numpy as np
import pytest
import torch
from factory import AWKWARD_CASES, naive_attention, rounding_bound

import flashmoba
from flashmoba import MoBAKVCache
from flashmoba.nn import MoBAAttention, causal_attention


def naive_sliding_window(q, k, v, cu_seqlens, window):
    """Query t attends keys t - window < s <= t of its own sequence; one token and head at a time."""
    qn, kn, vn = (x.detach().double().numpy() for x in (q, k, v))
    group = qn.shape[1] // kn.shape[1]
    out = np.zeros(qn.shape[:2] + vn.shape[-1:])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for t in range(start, end):
            keys = list(range(max(start, t - window + 1), t + 1))
            for h in range(qn.shape[1]):
                logits = kn[keys, h // group] @ qn[t, h] / math.sqrt(qn.shape[-1])
                weights = np.exp(logits - logits.max())
                out[t, h] = weights @ vn[keys, h // group] / weights.sum()
    return torch.from_numpy(out)


def _layer(attn_type, *, hq=4, hkv=2, d=16, kconv=0, rope=False, block_size=8, topk=3, window=12):
    layer = MoBAAttention(
        hq * d // 2,
        hq,
        hkv,
        d,
        attn_type=attn_type,
        block_size=block_size,
        topk=topk,
        window=window,
        kconv_size=kconv,
        rope=rope,
        backend="reference",
    ).double()
    if kconv:
        with torch.no_grad():
            layer.key_conv.weight.normal_(std=0.5)  # the zero init is the identity: make it do something
    return layer


def _oracle(layer, x, cu_seqlens):
    """The layer's output from its own q / k (``qk``) and v, through a naive attention loop."""
    q, k = layer.qk(x, cu_seqlens)
    v = layer.v_proj(x).view(x.shape[0], layer.num_kv_heads, layer.head_dim)
    if layer.attn_type == "swa":
        attn = naive_sliding_window(q, k, v, cu_seqlens, layer.window)
    else:
        topk = layer.topk if layer.attn_type == "moba" else x.shape[0]  # dense: every block
        attn, _ = naive_attention(q, k, v, cu_seqlens, layer.block_size, topk, causal=True)
    return layer.o_proj(attn.reshape(x.shape[0], -1)), rounding_bound(q, k, v, cu_seqlens, torch.float64)[0]


def _assert_layer_close(got, want, layer, attention_bound):
    got, want = got.detach(), want.detach()
    row_sum = float(layer.o_proj.weight.detach().abs().sum(1).max())
    tol = 2 * attention_bound * row_sum + torch.finfo(torch.float64).eps * float(want.abs().max())
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= tol, f"error {err:.3g} > tolerance {tol:.3g}"


def _cu(lens):
    return torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)


@pytest.mark.parametrize("window", [1, 5, 16, 300])
@pytest.mark.parametrize("case", AWKWARD_CASES[:8])
def test_sliding_window_matches_naive(case, window):
    q, k, v, cu = case.packed()
    got = causal_attention(q, k, v, cu, window=window)
    err = float((got - naive_sliding_window(q, k, v, cu, window)).abs().max())
    assert err <= 2 * rounding_bound(q, k, v, cu, torch.float64)[0]


@pytest.mark.parametrize("case", AWKWARD_CASES[:8])
def test_full_causal_attention_matches_naive(case):
    q, k, v, cu = case.packed()
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    err = float((causal_attention(q, k, v, cu) - naive_sliding_window(q, k, v, cu, max(longest, 1))).abs().max())
    assert err <= 2 * rounding_bound(q, k, v, cu, torch.float64)[0]


def test_causal_attention_refuses_what_it_cannot_run():
    q, k, v = torch.randn(8, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16)
    cu = _cu((3, 5))
    with pytest.raises(ValueError, match='backend="flash" cannot run: it needs CUDA'):
        causal_attention(q, k, v, cu, backend="flash")
    with pytest.raises(ValueError, match="backend"):
        causal_attention(q, k, v, cu, backend="triton")
    with pytest.raises(ValueError, match="window"):
        causal_attention(q, k, v, cu, window=0)
    with pytest.raises(ValueError, match="max_seqlen"):
        causal_attention(q, k, v, cu, max_seqlen=-1)


@pytest.mark.parametrize(
    "attn_type,kconv,rope",
    [("moba", 0, False), ("moba", 3, False), ("moba", 5, True), ("dense", 3, False), ("swa", 0, True)],
)
def test_layer_matches_naive_attention(attn_type, kconv, rope):
    lens = (37, 0, 1, 70, 16)
    layer = _layer(attn_type, kconv=kconv, rope=rope)
    x = torch.randn(sum(lens), 32, dtype=torch.float64)
    cu = _cu(lens)
    want, bound = _oracle(layer, x, cu)
    _assert_layer_close(layer(x, cu), want, layer, bound)


@pytest.mark.parametrize("kconv", [0, 3])
def test_moba_with_topk_covering_all_blocks_equals_dense(kconv):
    lens = (45, 3, 64)
    moba = _layer("moba", kconv=kconv, block_size=8, topk=8)  # 64 tokens = 8 blocks
    dense = _layer("dense", kconv=kconv)
    dense.load_state_dict(moba.state_dict())
    x = torch.randn(sum(lens), 32, dtype=torch.float64)
    cu = _cu(lens)
    _, bound = _oracle(moba, x, cu)
    _assert_layer_close(moba(x, cu), dense(x, cu), moba, bound)
    xb = torch.randn(2, 64, 32, dtype=torch.float64)
    _, bound = _oracle(moba, xb.reshape(128, 32), _cu((64, 64)))
    _assert_layer_close(moba(xb), dense(xb), moba, bound)
    # and the same gradients, of the input and of every parameter (the key convolution's included)
    grads = []
    for layer in (moba, dense):
        xg = xb.clone().requires_grad_()
        layer.zero_grad()
        (layer(xg) * torch.cos(xb)).sum().backward()
        grads.append({"x": xg.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("attn_type", ["moba", "dense", "swa"])
def test_batched_equals_packed(attn_type):
    layer = _layer(attn_type, kconv=3, rope=True)
    x = torch.randn(3, 29, 32, dtype=torch.float64)
    packed_x = x.reshape(87, 32)
    _, bound = _oracle(layer, packed_x, _cu((29, 29, 29)))
    _assert_layer_close(layer(x).reshape(87, 32), layer(packed_x, _cu((29, 29, 29))), layer, bound)


@pytest.mark.parametrize(
    "attn_type,kconv,rope", [("moba", 3, False), ("moba", 0, True), ("dense", 5, False), ("swa", 0, True)]
)
def test_decoding_with_cache_equals_full_pass(attn_type, kconv, rope):
    """Prefill, then one token per sequence, then uneven chunks (some empty): every output equals the
    full pass over the whole sequences (MoBA routes over many blocks here: 8-token blocks, topk 3)."""
    lens = [61, 20, 44]
    layer = _layer(attn_type, kconv=kconv, rope=rope)
    x = [torch.randn(n, 32, dtype=torch.float64) for n in lens]
    cu = _cu(lens)
    full_x = torch.cat(x)
    full = layer(full_x, cu)
    _, bound = _oracle(layer, full_x, cu)
    cache = MoBAKVCache.growing(block_size=None)
    plan = [[30, 1, 17], [1, 1, 1], [0, 13, 5], [30, 5, 21]]  # tokens per sequence per call
    done = [0, 0, 0]
    outputs = [[] for _ in lens]
    with torch.no_grad():
        for sizes in plan:
            chunk = torch.cat([x[s][done[s] : done[s] + n] for s, n in enumerate(sizes)])
            out = layer(chunk, _cu(sizes), cache)
            for s, (a, b) in enumerate(zip(_cu(sizes)[:-1].tolist(), _cu(sizes)[1:].tolist())):
                outputs[s].append(out[a:b])
            done = [d + n for d, n in zip(done, sizes)]
    assert done == lens and cache.seqlens.tolist() == lens
    _assert_layer_close(torch.cat([torch.cat(o) for o in outputs]), full, layer, bound)


def test_qk_gives_the_keys_attention_uses():
    layer = _layer("moba", kconv=3, rope=True)
    x = torch.randn(50, 32, dtype=torch.float64)
    cu = _cu((50,))
    q, k = layer.qk(x, cu)
    assert q.shape == (50, 4, 16) and k.shape == (50, 2, 16)
    raw = layer.k_proj(x).view(50, 2, 16)
    assert not torch.allclose(k, raw)  # convolved and rotated
    v = layer.v_proj(x).view(50, 2, 16)
    attn = flashmoba.moba_attn_varlen(q, k, v, cu, block_size=layer.block_size, topk=layer.topk)
    torch.testing.assert_close(layer(x, cu), layer.o_proj(attn.reshape(50, -1)), rtol=0, atol=0)


@pytest.mark.parametrize("attn_type", ["dense", "swa", "moba"])
def test_batch_shape_hint_gives_the_varlen_result(attn_type):
    """Packed sequences of one length with ``batch_shape``: the batched kernels, the same output."""
    layer = _layer(attn_type, kconv=3 if attn_type == "moba" else 0, rope=attn_type == "swa")
    x = torch.randn(3 * 20, 32, dtype=torch.float64)
    cu = _cu((20, 20, 20))
    torch.testing.assert_close(layer(x, cu, batch_shape=(3, 20)), layer(x, cu), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(attn_type="sparse"), ValueError, "attn_type"),
        (dict(num_heads=3), ValueError, "multiple of num_kv_heads"),
        (dict(topk=0), ValueError, "topk"),
        (dict(window=0), ValueError, "window"),
        (dict(kconv_size=-1), ValueError, "kconv_size"),
        (dict(block_size=2.0), TypeError, "block_size must be an int"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(rope=True, head_dim=15), ValueError, "even head_dim"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        MoBAAttention(
            args.pop("hidden_size"), args.pop("num_heads"), args.pop("num_kv_heads"), args.pop("head_dim"), **args
        )


def test_bad_inputs():
    layer = _layer("dense")
    with pytest.raises(ValueError, match="cu_seqlens goes with packed"):
        layer(torch.randn(2, 5, 32, dtype=torch.float64), _cu((5, 5)))
    with pytest.raises(ValueError, match="hidden_states must be"):
        layer(torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch_shape \(2, 4\) does not describe the packed sequences: 10"):
        layer(torch.randn(10, 32, dtype=torch.float64), _cu((5, 5)), batch_shape=(2, 4))
    with pytest.raises(ValueError, match=r"batch_shape \(2, 5\) does not describe"):  # the counts fit, not cu
        layer(torch.randn(10, 32, dtype=torch.float64), _cu((4, 6)), batch_shape=(2, 5))
    with pytest.raises(ValueError, match="batch_shape goes with packed"):
        layer(torch.randn(2, 5, 32, dtype=torch.float64), batch_shape=(2, 5))
    cache = MoBAKVCache.growing(block_size=None)
    layer(torch.randn(10, 32, dtype=torch.float64), _cu((4, 6)), cache)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        layer(torch.randn(3, 32, dtype=torch.float64), _cu((1, 1, 1)), cache)
