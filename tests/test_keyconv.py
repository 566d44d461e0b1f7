"""KeyConv: both backends against the naive per-lag loop in float64 (forward and gradients), sequence
isolation, decoding with the rolling state, the identity init, argument checks, and that the package
imports and runs without triton.

Tolerances follow the FlashAttention rule: a backend computing in ``dtype`` may be off from the float64
oracle by at most twice what the naive loop itself loses when run in ``dtype``, plus a floor for summing
in another order: one unit roundoff of the largest value per square root of the number of summed terms
(a random walk of roundings; W lags for the keys, N tokens for the weight and bias gradients).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

from flashmoba.nn import KeyConv, key_conv, key_conv_naive

BACKENDS = ["reference", "triton"]

# Sequence lengths with empty sequences first / middle / last and sequences shorter than the kernel;
# channel counts that are not multiples of the kernel's channel tile, token counts that cross tiles.
#            id                         lens                  C   W  bias   state
CASES = [
    pytest.param((37,), 8, 1, False, False, id="one-seq-w1"),
    pytest.param((0, 5, 1, 2, 70, 0), 20, 3, True, False, id="short-and-empty-w3-bias"),
    pytest.param((0, 5, 1, 2, 70, 0), 20, 5, True, True, id="short-and-empty-w5-bias-state"),
    pytest.param((64, 65, 3), 72, 3, False, True, id="tile-edges-w3-state"),
]


def _inputs(lens, channels, width, bias, dtype, with_state):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(sum(lens), channels, dtype=torch.float64)
    weight = torch.randn(channels, width, dtype=torch.float64) / width**0.5
    b = torch.randn(channels, dtype=torch.float64) if bias else None
    state = torch.randn(len(lens), width - 1, channels, dtype=torch.float64) if with_state else None
    return k, weight, b, cu, state


def _leaves(tensors, dtype, device="cpu"):
    return [None if t is None else t.detach().to(device, dtype).requires_grad_() for t in tensors]


def _run(fn, k, weight, bias, grad_out):
    """Output and the gradients wrt (k, weight, bias) for the upstream gradient ``grad_out``."""
    out = fn(k, weight, bias)
    inputs = [t for t in (k, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out))
    return [t.detach().cpu() for t in (out, *grads)]


def _max_abs(t):
    return float(t.abs().max()) if t.numel() else 0.0


def _assert_close_fa(got, low, ref, dtype, terms):
    for name, g, lo, r, n in zip(("out", "dk", "dweight", "dbias"), got, low, ref, terms):
        r = r.double()
        tol = 2 * _max_abs(lo.double() - r) + n**0.5 * torch.finfo(dtype).eps * _max_abs(r)
        err = _max_abs(g.double() - r)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


def _assert_same_keys(got, want, width):
    """Equal up to reordering the W-term sums (the backends need not sum in one order)."""
    torch.testing.assert_close(got, want, rtol=0, atol=width * torch.finfo(want.dtype).eps * _max_abs(want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens,channels,width,bias,with_state", CASES)
def test_matches_naive_forward_and_gradients(backend, lens, channels, width, bias, with_state):
    dtypes = [torch.float32]
    if backend == "triton" and width == 3:
        # The interpreter handles bfloat16 poorly, so bfloat16 only on the GPU.
        dtypes += [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    k64, w64, b64, cu, state64 = _inputs(lens, channels, width, bias, torch.float64, with_state)
    grad_out = torch.randn_like(k64)

    def naive(dtype):
        state = None if state64 is None else state64.to(dtype)
        return _run(lambda k, w, b: key_conv_naive(k, w, b, cu, state), *_leaves((k64, w64, b64), dtype), grad_out)

    ref = naive(torch.float64)
    for dtype in dtypes:
        state = None if state64 is None else state64.to(DEVICE, dtype)
        got = _run(
            lambda k, w, b: key_conv(k, w, b, cu_seqlens=cu.to(DEVICE), state=state, backend=backend),
            *_leaves((k64, w64, b64), dtype, DEVICE),
            grad_out,
        )
        num_tokens = k64.shape[0]
        _assert_close_fa(got, naive(dtype), ref, dtype, terms=(width, width + 1, num_tokens, num_tokens))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_never_see_each_other(backend):
    lens = (30, 2, 41)
    k, weight, _, cu, _ = _inputs(lens, 16, 4, False, torch.float32, False)
    k, weight, cu = k.to(DEVICE, torch.float32), weight.to(DEVICE, torch.float32), cu.to(DEVICE)
    out = key_conv(k, weight, cu_seqlens=cu, backend=backend)
    perturbed = k.clone()
    perturbed[30:32] += 10.0  # the middle sequence only
    out2 = key_conv(perturbed, weight, cu_seqlens=cu, backend=backend)
    assert torch.equal(out[:30], out2[:30]) and torch.equal(out[32:], out2[32:])
    assert not torch.equal(out[30:32], out2[30:32])
    # Each sequence alone gives its rows of the packed result.
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        _assert_same_keys(key_conv(k[a:b], weight, backend=backend), out[a:b], 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 3, 5])
def test_decoding_with_state_equals_full_pass(backend, width):
    lens = (23, 9, 0, 17)
    conv = KeyConv(12, width, bias=True, backend=backend).to(DEVICE)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    k, _, _, cu, _ = _inputs(lens, 12, width, False, torch.float32, False)
    k = k.to(DEVICE, torch.float32)
    with torch.no_grad():
        full = conv(k, cu.to(DEVICE))
        state = conv.initial_state(len(lens))
        # Pieces of 0, 1, < W - 1 and longer tokens, different per sequence.
        done = [0] * len(lens)
        pieces = {s: [] for s in range(len(lens))}
        chunk_plans = [(0, 1, 2, 5, 100), (3, 0, 1, 100), (100,), (1, 1, 0, 7, 100)]
        for step in range(5):
            sizes = [min(plan[min(step, len(plan) - 1)], n - d) for plan, n, d in zip(chunk_plans, lens, done)]
            starts = [cu[s].item() + done[s] for s in range(len(lens))]
            chunk = torch.cat([k[a : a + n] for a, n in zip(starts, sizes)])
            chunk_cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
            out = conv(chunk, chunk_cu, state)
            for s, (a, b) in enumerate(zip(chunk_cu[:-1].tolist(), chunk_cu[1:].tolist())):
                pieces[s].append(out[a:b])
            done = [d + n for d, n in zip(done, sizes)]
    assert done == list(lens)
    decoded = torch.cat([torch.cat(pieces[s]) for s in range(len(lens))])
    _assert_same_keys(decoded, full, width)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_equals_packed(backend):
    conv = KeyConv(10, 3, backend=backend).to(DEVICE)
    with torch.no_grad():
        conv.weight.normal_()
    k = torch.randn(3, 20, 10, device=DEVICE)
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE) * 20
    state = conv.initial_state(3)
    with torch.no_grad():
        batched = conv(k, state=state)
        packed = conv(k.reshape(60, 10), cu)
    _assert_same_keys(batched.reshape(60, 10), packed, 3)
    torch.testing.assert_close(state, k[:, -2:])  # the state keeps the last W - 1 raw keys


def test_fresh_keyconv_is_the_identity():
    conv = KeyConv(24, 5, bias=True)
    k = torch.randn(2, 13, 24)
    assert torch.equal(conv(k), k)
    # ... and it learns: the weight gradient is not zero.
    conv(k).pow(2).sum().backward()
    assert conv.weight.grad.abs().sum() > 0


def test_bad_arguments():
    conv = KeyConv(8, 3)
    with pytest.raises(ValueError, match="k must be"):
        conv(torch.randn(5, 7))
    with pytest.raises(ValueError, match="cu_seqlens goes with packed"):
        conv(torch.randn(1, 5, 8), torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        conv(torch.randn(5, 8), torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="state must be"):
        conv(torch.randn(2, 5, 8), state=torch.zeros(2, 3, 8))
    with pytest.raises(TypeError, match="state must match"):
        conv(torch.randn(2, 5, 8), state=torch.zeros(2, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        key_conv(torch.randn(5, 8), conv.weight, backend="cuda")
    with pytest.raises(ValueError, match="kernel_size"):
        KeyConv(8, 0)
    with pytest.raises(ValueError, match="backend"):  # at construction, not at the first forward
        KeyConv(8, 3, backend="cuda")
    with pytest.raises(TypeError, match="bias"):
        KeyConv(8, 3, bias="yes")


def test_imports_and_runs_without_triton():
    """``import flashmoba.nn`` and KeyConv's reference path need no triton; the Triton backend says why not."""
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
import flashmoba.nn
from flashmoba.nn import KeyConv, key_conv, key_conv_naive

conv = KeyConv(6, 3, bias=True)
with torch.no_grad():
    conv.weight.normal_()
    conv.bias.normal_()
k = torch.randn(2, 9, 6, requires_grad=True)
state = conv.initial_state(2)
out = conv(k, state=state)
out.sum().backward()
want = torch.cat([key_conv_naive(k[b].detach(), conv.weight.detach(), conv.bias.detach()) for b in range(2)])
torch.testing.assert_close(out.detach().reshape(18, 6), want)
assert k.grad is not None and conv.weight.grad is not None
torch.testing.assert_close(state, k.detach()[:, -2:])
assert "flashmoba.nn.keyconv.kernels" not in sys.modules
try:
    key_conv(k.detach(), conv.weight, backend="triton")
except ValueError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")
"""
    root = Path(__file__).resolve().parents[1]
    # The environment is inherited (conftest sets TRITON_INTERPRET=1 without CUDA, so backend="triton"
    # on CPU tensors gets as far as the missing package).
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
