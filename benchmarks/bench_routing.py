"""Routing alone on the GPU: flashmoba's three fused stages vs a plain PyTorch router (MoBA-style).

The PyTorch router materialises the [tokens x blocks] score matrix per head, masks it causally, forces
the own block and calls torch.topk: what original MoBA does. Both give time (median) and peak memory
above the inputs; the PyTorch one is skipped where it runs out of memory.

    python benchmarks/bench_routing.py --seqlens 8192 32768 65536 131072 524288 --out docs/results/routing.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

import flashmoba


def torch_router(q, k, cu, block_size, topk):
    """[N, H, topk] block ids (unsorted, -1 padded) via a dense fp32 score matrix, sequence by sequence."""
    out = torch.full((q.shape[0], q.shape[1], topk), -1, dtype=torch.int64, device=q.device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        L = b - a
        n = -(-L // block_size)
        pad = n * block_size - L
        kk = torch.nn.functional.pad(k[a:b].float(), (0, 0, 0, 0, 0, pad))
        lens = torch.clamp(L - torch.arange(n, device=q.device) * block_size, max=block_size)
        cent = kk.view(n, block_size, *k.shape[1:]).sum(1) / lens.view(n, 1, 1)
        scores = torch.einsum("thd,nhd->htn", q[a:b].float(), cent)  # [H, L, n]
        own = torch.arange(L, device=q.device) // block_size
        blocks = torch.arange(n, device=q.device)
        scores.masked_fill_(blocks[None, None, :] >= own[None, :, None], -float("inf"))
        scores.scatter_(-1, own.view(1, L, 1).expand(q.shape[1], L, 1), float("inf"))
        vals, idx = scores.topk(min(topk, n), dim=-1)
        idx.masked_fill_(vals == -float("inf"), -1)
        out[a:b, :, : idx.shape[-1]] = idx.permute(1, 0, 2)
    return out


def measure(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
    return ms, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 524288])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for T in args.seqlens:
        N = args.batch * T
        q = torch.randn(N, args.heads, args.dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        cu = torch.arange(args.batch + 1, dtype=torch.int32, device="cuda") * T
        kw = dict(block_size=args.block, topk=args.topk)
        row = {"T": T}
        row["flashmoba_ms"], row["flashmoba_peak_gb"] = measure(
            lambda: flashmoba.moba_route_varlen(q, k, cu, max_seqlen=T, **kw).block_index)
        try:
            row["torch_ms"], row["torch_peak_gb"] = measure(lambda: torch_router(q, k, cu, args.block, args.topk))
        except torch.cuda.OutOfMemoryError:
            row["torch_ms"] = row["torch_peak_gb"] = "OOM"
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    lines = ["| T | flashmoba ms | flashmoba peak GB | PyTorch router ms | PyTorch router peak GB |",
             "|---|---|---|---|---|"]
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['T']} | {fmt(r['flashmoba_ms'])} | {fmt(r['flashmoba_peak_gb'])} | "
                     f"{fmt(r['torch_ms'])} | {fmt(r['torch_peak_gb'])} |")
    md = "\n".join(lines)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "args": {k: v for k, v in vars(args).items() if k != "out"}}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
