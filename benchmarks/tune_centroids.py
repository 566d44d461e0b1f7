"""Sweep the centroid kernel's launch configs (tile rows, warps, stages) on the GPU.

Times ``_block_centroids_kernel`` (median of ``triton.testing.do_bench``) at one length for every config,
next to a plain device copy of the same bytes (the bandwidth ceiling), and checks each config's centroids
against float64 means (within one bf16/fp16 rounding step plus float32 accumulation error).

    python benchmarks/tune_centroids.py --seqlen 524288
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from flashmoba.routing import centroids as centroid_module
from flashmoba.routing.result import block_layout


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=524288)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    args = p.parse_args()
    B, T, H, D, BS = args.batch, args.seqlen, args.heads, args.dim, args.block
    k = torch.randn(B * T, H, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda") * T
    layout = block_layout(cu, B * T, BS)
    cu_blocks, block_seq, num_blocks_max = layout
    want = k.double().view(B * T // BS, BS, H, D).mean(1)  # T is a multiple of the block here
    tol = 2.0**-8 * want.abs() + 1e-6
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=100, return_mode="median")  # noqa: E731

    rows = []
    for block_t, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
        out = torch.zeros(num_blocks_max, H, D, dtype=k.dtype, device="cuda")

        def launch():
            centroid_module._block_centroids_kernel[(num_blocks_max, H)](
                k,
                out,
                cu,
                cu_blocks,
                block_seq,
                k.stride(0),
                k.stride(1),
                out.stride(0),
                out.stride(1),
                B,
                HEAD_DIM=D,
                BLOCK_SIZE=BS,
                BLOCK_T=block_t,
                BLOCK_D=D,
                num_warps=warps,
                num_stages=stages,
            )

        launch()
        ok = bool(((out[: want.shape[0]].double() - want).abs() <= tol).all())
        ms = bench(launch)
        rows.append((block_t, warps, stages, ms, k.numel() * k.element_size() / ms / 1e6, ok))
    shipped = bench(lambda: centroid_module.block_centroids(k, cu, BS, layout))
    x = torch.empty(k.numel() * k.element_size() // 4, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() * 4 / bench(lambda: y.copy_(x)) / 1e6
    print(f"shipped block_centroids: {shipped:.3f} ms; device copy: {copy_gbs:.0f} GB/s (read + write)")
    print("| BLOCK_T | warps | stages | ms | GB/s read | correct |\n|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r[3]):
        block_t, warps, stages, ms, gbs, ok = r
        print(f"| {block_t} | {warps} | {stages} | {ms:.3f} | {gbs:.0f} | {ok} |")


if __name__ == "__main__":
    main()
