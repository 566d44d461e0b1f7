"""Context parallelism on GPUs: the Triton kernels with queries at key rows, and NCCL process groups.

* one GPU: the engine's routing and attention of a rank's queries (the zigzag shard of several ranks, in
  packed documents) against the whole attention, bf16, under the FlashAttention rule; and the op on a
  one-rank NCCL group;
* several GPUs (skipped unless ``torch.cuda.device_count() >= 2``): every rank of an NCCL group runs
  :func:`~flashmoba.distributed.context_parallel_moba_attn_varlen` on its GPU; the gathered results pass
  the FlashAttention rule against float64 on the single-GPU routing, which they must reproduce exactly.

Run with ``make test-gpu`` (or ``pytest tests/gpu/test_distributed_gpu.py``).
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from kernel_checks import assert_within_fa_rule

import flashmoba
from flashmoba import api, reference
from flashmoba.distributed import context_parallel_moba_attn_varlen, shard_sequence, unshard_sequence
from flashmoba.distributed.attention import varlen_queries
from flashmoba.distributed.layout import local_positions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#        lens                       hq hkv   d  block topk
SHAPES = [
    ((5000, 1000, 0, 2192), 8, 2, 128, 128, 8),
    ((8192,), 4, 4, 64, 64, 16),
    ((3001, 5191), 4, 1, 96, 48, 6),
]


def _packed(lens, hq, hkv, d, dtype, seed=0):
    """``q, k, v, cu_seqlens`` and an output gradient, the same wherever they are drawn (every rank)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lens)
    q, dout = (torch.randn(total, hq, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(total, hkv, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
    return q, k, v, cu, dout


def _expected(q, k, v, cu, rows, dout, block_size, topk, causal):
    """Routing of the whole batch; float64 and low-precision reference rows (dk, dv of these rows alone)."""
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=block_size, topk=topk, causal=causal)
    results = {}
    for name, dtype in (("exact", torch.float64), ("low", q.dtype)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse = reference.attention(
            *leaves, cu, block_size, topk, causal, q.shape[-1] ** -0.5, indices=routing.indices, compute_dtype=dtype
        )
        grad = torch.zeros_like(o)
        grad[rows] = dout.to(dtype)
        o.backward(grad)
        results[name] = dict(out=o[rows], lse=lse[rows], dq=leaves[0].grad[rows], dk=leaves[1].grad, dv=leaves[2].grad)
    return routing.indices, results


@pytest.mark.parametrize("lens, hq, hkv, d, block_size, topk", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_rank_queries_match_the_whole_attention(lens, hq, hkv, d, block_size, topk, causal):
    """Rank 1 of 4 in the zigzag layout: its routing is the whole routing's rows, and its out, lse, dq and
    the dk / dv of its queries pass the FlashAttention rule (2x PyTorch's bf16 error against float64)."""
    q, k, v, cu, dout = _packed(lens, hq, hkv, d, torch.bfloat16)
    rows = local_positions(q.shape[0], 4, 1, "zigzag", "cuda")
    query_cu, positions = varlen_queries(cu, rows)
    dout = dout[rows]
    kw = dict(block_size=block_size, topk=topk, causal=causal)
    leaves = [t.detach().clone().requires_grad_() for t in (q[rows], k, v)]
    routing = api.route_queries(leaves[0].detach(), k, cu, query_cu, positions, backend="triton", **kw)
    out, lse = api.attend_queries(*leaves, cu, query_cu, positions, routing, softmax_scale=None, return_lse=True)
    out.backward(dout)
    indices, expected = _expected(q, k, v, cu, rows, dout, **kw)
    assert torch.equal(routing.indices, indices[rows])
    got = dict(out=out, lse=lse, dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    assert_within_fa_rule(got, expected["exact"], expected["low"], q[rows], k, v, dout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context_parallel_results(shapes) -> dict:
    """Every shape's op on this rank's shard, gathered: ``{(shape index, causal): [out, lse, dq, dk, dv]}``."""
    results = {}
    for i, (lens, hq, hkv, d, block_size, topk) in enumerate(shapes):
        for causal in (True, False):
            q, k, v, cu, dout = _packed(lens, hq, hkv, d, torch.bfloat16, seed=i)  # the same on every rank
            leaves = [shard_sequence(t, 0).detach().requires_grad_() for t in (q, k, v)]
            out, lse = context_parallel_moba_attn_varlen(
                *leaves, cu, block_size=block_size, topk=topk, causal=causal, return_lse=True
            )
            out.backward(shard_sequence(dout, 0))
            gathered = [unshard_sequence(t.detach(), 0) for t in (out, lse, *(t.grad for t in leaves))]
            results[(i, causal)] = [t.cpu() for t in gathered]
    return results


def _assert_results(shapes, results):
    for i, (lens, hq, hkv, d, block_size, topk) in enumerate(shapes):
        for causal in (True, False):
            q, k, v, cu, dout = _packed(lens, hq, hkv, d, torch.bfloat16, seed=i)
            rows = torch.arange(q.shape[0], device="cuda")
            _, expected = _expected(q, k, v, cu, rows, dout, block_size, topk, causal)
            got = dict(zip(("out", "lse", "dq", "dk", "dv"), (t.cuda() for t in results[(i, causal)]), strict=True))
            assert_within_fa_rule(got, expected["exact"], expected["low"], q, k, v, dout)


def test_one_rank_nccl_group_runs_the_kernels(tmp_path):
    """The op on a one-rank NCCL group (the whole sequence on this GPU): the FlashAttention rule."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        results = _context_parallel_results(SHAPES[:1])
    finally:
        dist.destroy_process_group()
    _assert_results(SHAPES[:1], results)


def _nccl_rank(rank, world_size, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = _context_parallel_results(SHAPES)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="an NCCL group needs a GPU per rank")
def test_nccl_group_matches_one_gpu(tmp_path):
    world_size = min(torch.cuda.device_count(), 4)
    torch.multiprocessing.spawn(_nccl_rank, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size)
    _assert_results(SHAPES, torch.load(tmp_path / "results.pt"))
