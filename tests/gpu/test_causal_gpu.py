"""The dense and sliding-window layers' flash path on a real GPU, against float64 (FlashAttention rule).

``causal_attention(backend="flash")`` (FlashAttention's varlen kernel) must be within 2x the error of the
same attention computed by plain PyTorch SDPA in the same dtype (``backend="sdpa"``), against the float64
SDPA result, for the output and every gradient. Skipped where no GPU exists.
"""

import pytest
import torch
from factory import make_packed

from flashmoba.nn import causal_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#          lens                 hq hkv   d
SHAPES = [
    ((2048, 1000, 0, 3), 8, 2, 128),
    ((4096,), 4, 4, 64),
    ((1500, 1, 700), 8, 1, 128),
]


def _run(q, k, v, cu, dout, dtype, window, backend):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = causal_attention(*leaves, cu, window=window, backend=backend)
    out.backward(dout.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 1, 100, 512])
@pytest.mark.parametrize("lens, hq, hkv, d", SHAPES)
def test_flash_within_twice_sdpa_error(lens, hq, hkv, d, window, dtype):
    q, k, v, cu = make_packed(lens, hq, hkv, d, dtype=dtype, device="cuda")
    dout = torch.randn_like(q)
    flash = _run(q, k, v, cu, dout, dtype, window, "flash")
    low = _run(q, k, v, cu, dout, dtype, window, "sdpa")
    exact = _run(q, k, v, cu, dout, torch.float64, window, "sdpa")
    for name, got, lo, ex in zip(("out", "dq", "dk", "dv"), flash, low, exact):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        floor = torch.finfo(torch.float32).eps * float(ex.abs().max())
        for measure in (lambda x: float((x.double() - ex).abs().max()), lambda x: float((x.double() - ex).norm())):
            err, ref = measure(got), measure(lo)
            assert err <= 2 * ref + floor, f"{name}: flash error {err:.3g} > 2 x sdpa error {ref:.3g}"
