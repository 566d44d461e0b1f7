"""The fused, chunked LM-head cross entropy against PyTorch's on full logits, in float64."""

import pytest
import torch
import torch.nn.functional as F

from flashmoba.models.loss import linear_cross_entropy


def _inputs(n, h, v, ignored, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[ignored] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("n, chunk", [(50, 7), (50, 50), (50, 4096), (1, 3), (0, 4)])
def test_matches_cross_entropy_of_full_logits(n, chunk):
    hidden, weight, targets = _inputs(n, 12, 33, ignored=slice(3, 9))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    grads = torch.autograd.grad(2.5 * got, (hidden, weight)) if n else (None, None)
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if n:
        for g, w in zip(grads, torch.autograd.grad(2.5 * want, (hidden, weight))):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_every_row_ignored_gives_zero_loss_and_gradient():
    hidden, weight, targets = _inputs(10, 4, 5, ignored=slice(None))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    loss.backward()
    assert float(loss.detach()) == 0 and not hidden.grad.any() and not weight.grad.any()


def test_refuses_bad_shapes():
    hidden, weight, targets = _inputs(6, 4, 5, ignored=[])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:4])
