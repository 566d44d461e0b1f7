"""A/B the attention kernels' tile configurations at one shape (forward and backward kernels alone).

    python benchmarks/tune_attention.py --T 65536 --block 64 --topk 16 \
        --fwd 128,64,8,2 64,64,4,2 --bwd 64,64,8,2 32,64,4,2

Each configuration (``block_m,block_n,num_warps,num_stages``) is tried through
:func:`flashmoba.configs.override` on the same routing, after the shipped one; prints the median ms of
``attn_fwd`` and ``attn_bwd`` per configuration, and checks each against the shipped one's output (a
configuration that computes something else is reported, not timed).
"""

from __future__ import annotations

import argparse

import torch
import triton

from flashmoba import configs
from flashmoba.attention.backward import attn_bwd
from flashmoba.attention.forward import attn_fwd
from flashmoba.routing.result import block_layout
from flashmoba.routing.topk import route_triton


def _tile(text: str) -> configs.TileConfig:
    return configs.TileConfig(*(int(x) for x in text.split(",")))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--fwd", type=_tile, nargs="*", default=[], help="forward configs to try")
    p.add_argument("--bwd", type=_tile, nargs="*", default=[], help="backward configs to try")
    args = p.parse_args()
    B, T, H, D = args.batch, args.T, args.heads, args.dim
    HKV = args.kv_heads or H
    N = B * T
    q, do = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(N, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda") * T
    _, bi = route_triton(q, k, cu, args.block, args.topk, True)
    cu_blocks, block_seq, _ = block_layout(cu, N, args.block)
    common = (cu, cu_blocks, block_seq, bi.offsets, bi.entries, args.topk, args.block, True, D**-0.5, False)
    out, stats = attn_fwd(q, k, v, *common)
    grads = attn_bwd(do, q, k, v, out, stats, *common)
    shipped_fwd = configs.attn_fwd(args.block, D, q.dtype, q.device)
    shipped_bwd = configs.attn_bwd(args.block, D, q.dtype, q.device)

    for name, family, tried, run, want in (
        ("fwd", "attn_fwd", [shipped_fwd, *args.fwd], lambda: attn_fwd(q, k, v, *common)[0], out),
        ("bwd", "attn_bwd", [shipped_bwd, *args.bwd], lambda: attn_bwd(do, q, k, v, out, stats, *common)[0], grads[0]),
    ):
        for i, cfg in enumerate(tried):
            with configs.override(**{family: cfg}):
                try:
                    got = run()
                except Exception as e:  # e.g. out of shared memory
                    print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                if err > 2e-2:
                    print(f"{name} {cfg}: differs from the shipped config (rel. {err:.2e})", flush=True)
                    continue
                ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
                print(f"{name} {cfg}: {ms:7.3f} ms{'  (shipped)' if i == 0 else ''}", flush=True)


if __name__ == "__main__":
    main()
