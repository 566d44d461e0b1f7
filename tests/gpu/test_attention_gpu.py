"""The Triton backend on a real GPU: bf16/fp16 at realistic shapes, CUDA graphs, torch.compile.

Skipped where no GPU exists. Run with ``make test-gpu`` (or ``pytest tests/gpu``) on an H100.
"""

import pytest
import torch
from factory import make_packed
from kernel_checks import assert_attention_matches, assert_routing_valid

import flashmoba

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#          lens                  hq hkv   d  block topk
SHAPES = [
    ((2048, 1000, 0, 3), 8, 2, 128, 128, 4),
    ((4096,), 4, 4, 64, 64, 8),
    ((1500, 700), 4, 1, 96, 48, 6),
    ((1024,), 2, 2, 256, 128, 3),
    ((777, 2100), 8, 8, 32, 16, 16),
    ((3000,), 2, 1, 128, 512, 2),
    ((300, 0, 1200), 4, 2, 64, 32, 64),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens, hq, hkv, d, block_size, topk", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference(lens, hq, hkv, d, block_size, topk, dtype, causal):
    q, k, v, cu = make_packed(lens, hq, hkv, d, dtype=dtype, device="cuda")
    dout = torch.randn_like(q)
    routing = assert_attention_matches(q, k, v, cu, dout, block_size=block_size, topk=topk, causal=causal)
    # Scores against the stored (dtype-rounded) centroids with fp32 accumulation, as the oracle computes
    # them: a 1e-3 gap is far above their rounding
    assert_routing_valid(q, k, cu, routing.indices, block_size, topk, causal, score_tol=1e-3)


def test_deterministic_is_bitwise_reproducible():
    q, k, v, cu = make_packed((3000, 1000), 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = flashmoba.moba_attn_varlen(*leaves, cu, block_size=64, topk=4, deterministic=True)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_cuda_graph_capture_forward_backward():
    q, k, v, cu = make_packed((2048, 1000), 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        for t in leaves:
            t.grad = None
        out = flashmoba.moba_attn_varlen(*leaves, cu, max_seqlen=2048, block_size=64, topk=4)
        out.backward(dout)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile kernels, allocate
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step()
    # new inputs, replay, compare with eager
    for src, dst in zip(make_packed((2048, 1000), 4, 2, 64, dtype=torch.bfloat16, device="cuda")[:3], leaves):
        dst.data.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    captured = [out_static.detach().clone()] + [t.grad.clone() for t in leaves]
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = flashmoba.moba_attn_varlen(*eager_leaves, cu, block_size=64, topk=4, deterministic=True)
    out.backward(dout)
    for a, b in zip(captured, [out] + [t.grad for t in eager_leaves]):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_routing_cuda_graph_capture():
    q, k, _, cu = make_packed((4096, 333), 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    flashmoba.moba_route_varlen(q, k, cu, block_size=128, topk=8)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routing = flashmoba.moba_route_varlen(q, k, cu, max_seqlen=4096, block_size=128, topk=8)
        offsets = routing.block_index.offsets
    q2, k2, _, _ = make_packed((4096, 333), 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    q.copy_(q2)
    k.copy_(k2)
    graph.replay()
    eager = flashmoba.moba_route_varlen(q, k, cu, block_size=128, topk=8)
    assert torch.equal(routing.indices, eager.indices)
    assert torch.equal(offsets, eager.block_index.offsets)


def test_torch_compile_fullgraph_forward_backward():
    B, T, HQ, HKV, D = 2, 1024, 4, 2, 64
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(q, k, v):
        return flashmoba.moba_attn(q, k, v, block_size=64, topk=4, deterministic=True).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lens, hq, hkv, d, block_size, topk", [SHAPES[0], SHAPES[3]])
def test_float32_inputs(lens, hq, hkv, d, block_size, topk):
    """float32 runs exact (IEEE) products in smaller tiles: a correctness path, checked like the others."""
    q, k, v, cu = make_packed(lens, hq, hkv, d, dtype=torch.float32, device="cuda")
    dout = torch.randn_like(q)
    routing = assert_attention_matches(q, k, v, cu, dout, block_size=block_size, topk=topk, causal=True)
    assert_routing_valid(q, k, cu, routing.indices, block_size, topk, True, score_tol=1e-3)


def test_router_sort_keys_in_rows_of_some_heads():
    # 4 heads of 2 x 140K tokens in 16-token blocks: too many segments for one 16-bit sort row, so the
    # router's keys place 2 heads a row. Its block index must be the one built from its own indices.
    from flashmoba.routing.result import block_sort_rows, build_block_index

    q, k, _, cu = make_packed((140_000, 140_000), 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=16, topk=4, causal=True, backend="triton")
    assert block_sort_rows(4, routing.num_blocks_max) == (2, -(2**15))
    built = build_block_index(routing.indices, cu, 16)
    assert torch.equal(routing.block_index.offsets, built.offsets)
    assert torch.equal(routing.block_index.entries, built.entries)
