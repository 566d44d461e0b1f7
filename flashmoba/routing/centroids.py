"""Stage 1 of FlashMoBA routing: the mean key (centroid) of every block, varlen-aware.

One program per (global block, KV head); the block's keys are summed in float32 in tiles of ``BLOCK_T``
tokens and divided by the block's real length, so a partial last block gets its true mean. The mean is
stored in the keys' dtype (rounded once, as MoBA and FlashMoBA store it), which is what the top-k's
tensor cores read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmoba import configs
from flashmoba.routing.result import block_layout


@triton.jit
def _block_centroids_kernel(
    K,
    C,
    cu_seqlens,
    cu_blocks,
    block_seq,
    stride_kn,
    stride_kh,
    stride_cg,
    stride_ch,
    num_seqs,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(block_seq + g)
    if seq >= num_seqs:  # past the real blocks (the grid is sized from shapes only)
        return
    seq_start = tl.load(cu_seqlens + seq).to(tl.int64)
    seq_end = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    start = seq_start + (g - tl.load(cu_blocks + seq)).to(tl.int64) * BLOCK_SIZE
    end = tl.minimum(start + BLOCK_SIZE, seq_end)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, BLOCK_SIZE, BLOCK_T):
        rows = start + t0 + tl.arange(0, BLOCK_T)
        ptrs = K + rows[:, None] * stride_kn + h * stride_kh + d[None, :]
        keys = tl.load(ptrs, mask=(rows < end)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(keys.to(tl.float32), axis=0)
    acc = acc / (end - start).to(tl.float32)
    tl.store(C + g.to(tl.int64) * stride_cg + h * stride_ch + d, acc.to(C.dtype.element_ty), mask=d_ok)


def block_centroids(k: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, layout=None) -> torch.Tensor:
    """Mean key of every block of every sequence.

    Args:
        k: ``[N, HKV, D]`` packed keys (fp16/bf16/fp32; the last dim contiguous).
        cu_seqlens: int32/int64 ``[S + 1]``.
        block_size: tokens per block.
        layout: ``block_layout(cu_seqlens, N, block_size)`` if the caller has it already.

    Returns:
        ``[num_blocks_max, HKV, D]`` in k's dtype, indexed by global block id (see
        ``flashmoba.routing.result``); rows past the real blocks are left at zero.
    """
    N, HKV, D = k.shape
    cu_blocks, block_seq, num_blocks_max = layout or block_layout(cu_seqlens, N, block_size)
    centroids = torch.zeros(num_blocks_max, HKV, D, dtype=k.dtype, device=k.device)
    if num_blocks_max == 0 or N == 0:
        return centroids
    k = k if k.stride(-1) == 1 else k.contiguous()
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_T, num_warps = configs.centroids(block_size, D, k.device)
    _block_centroids_kernel[(num_blocks_max, HKV)](
        k,
        centroids,
        cu_seqlens,
        cu_blocks,
        block_seq,
        k.stride(0),
        k.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        cu_seqlens.numel() - 1,
        HEAD_DIM=D,
        BLOCK_SIZE=block_size,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return centroids
