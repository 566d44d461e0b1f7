"""A/B the attention kernels' launch choices at one shape (the forward and backward kernels alone).

    python benchmarks/tune_attention.py --T 65536

Each variant overrides the launch configuration (the first is the shipped one) and is timed on the same
routing; prints one line per variant (median ms of ``attn_fwd`` and ``attn_bwd``).
"""

from __future__ import annotations

import argparse
import itertools
from unittest import mock

import torch
import triton

from flashmoba.attention import backward, forward
from flashmoba.routing.result import block_layout
from flashmoba.routing.topk import route_triton


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    args = p.parse_args()
    B, T, H, D = args.batch, args.T, args.heads, args.dim
    N = B * T
    q, k, v, do = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda") * T
    _, bi = route_triton(q, k, cu, args.block, args.topk, True)
    cu_blocks, block_seq, _ = block_layout(cu, N, args.block)
    common = (cu, cu_blocks, block_seq, bi.offsets, bi.entries, args.topk, args.block, True, D**-0.5, False)

    def fwd():
        return forward.attn_fwd(q, k, v, *common)

    out, lse = fwd()

    def bwd():
        return backward.attn_bwd(do, q, k, v, out, lse, *common)

    fwd_configs = [forward._fwd_config(args.block, D, q.dtype), (64, 128, 8, 2), (128, 64, 8, 2)]
    bwd_configs = [backward._bwd_config(args.block, D, q.dtype), (32, 128, 8, 2), (64, 64, 8, 2)]
    for fc, bc in itertools.zip_longest(fwd_configs, bwd_configs):
        line = ""
        if fc:
            with mock.patch.object(forward, "_fwd_config", lambda bs, hd, dt, c=fc: c):
                line += f"fwd{fc}: {triton.testing.do_bench(fwd, warmup=50, rep=300):7.2f} ms   "
        if bc:
            with mock.patch.object(backward, "_bwd_config", lambda bs, hd, dt, c=bc: c):
                line += f"bwd{bc}: {triton.testing.do_bench(bwd, warmup=50, rep=300):7.2f} ms"
        print(line, flush=True)

if __name__ == "__main__":
    main()
