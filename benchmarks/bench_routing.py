"""Routing alone on the GPU: flashmoba's three fused stages vs a plain PyTorch router (MoBA-style).

The PyTorch router materialises the [tokens x blocks] score matrix per head, masks it causally, forces
the own block and calls torch.topk: what original MoBA does. Both give time (median) and peak memory
above the inputs; the PyTorch one is skipped where it runs out of memory. ``graph_ms`` replays flashmoba's
routing as a CUDA graph (device time: no launch overhead). Also reported: each stage's time and the rate
of the top-k's score products (2 * D FLOPs per causal (query, earlier block) pair). ``--tune`` times the
top-k stage under other tile configs instead (each checked to pick the shipped config's blocks).

    python benchmarks/bench_routing.py --seqlens 8192 32768 65536 131072 524288 --out docs/results/routing.json
    python benchmarks/bench_routing.py --seqlens 65536 524288 --tune 128,64,8,2 128,32,8,3 64,64,4,3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

import flashmoba
from flashmoba import configs
from flashmoba.routing.centroids import block_centroids
from flashmoba.routing.result import block_index_from_keys, block_layout
from flashmoba.routing.topk import route_topk


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
    return bench(fn), peak


def bench(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


def bench_graph(fn):
    """Median of CUDA-graph replays of ``fn``: device time without launch overhead or host syncs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up (compiles kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=100, return_mode="median")


def causal_score_count(T: int, block_size: int) -> int:
    """Scores the causal router computes per (sequence, head): every query against the blocks before its own."""
    full, rest = divmod(T, block_size)
    return block_size * full * (full - 1) // 2 + rest * full


def stages(q, k, cu, block_size, topk):
    """Times of the three stages on the same inputs (ms)."""
    layout = block_layout(cu, q.shape[0], block_size)
    cent = block_centroids(k, cu, block_size, layout)
    _, keys = route_topk(q, cent, cu, block_size, topk, True, layout, return_block_keys=True)
    return {
        "centroids_ms": bench(lambda: block_centroids(k, cu, block_size, layout)),
        "topk_ms": bench(lambda: route_topk(q, cent, cu, block_size, topk, True, layout, return_block_keys=True)),
        "block_index_ms": bench(lambda: block_index_from_keys(keys, topk, layout[2])),
    }


def _topk_config(text: str) -> configs.TopkConfig:
    """``BM,BN,WARPS,STAGES[,MAXNREG]`` -> the top-k's launch (no register cap unless given)."""
    fields = [int(x) for x in text.split(",")]
    if len(fields) not in (4, 5):
        raise SystemExit(f"--tune: expected BM,BN,WARPS,STAGES[,MAXNREG], got {text!r}")
    return configs.TopkConfig(*fields, *([None] * (5 - len(fields))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 524288])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--no-torch", action="store_true", help="skip the plain PyTorch router")
    p.add_argument(
        "--tune",
        nargs="*",
        metavar="BM,BN,WARPS,STAGES[,MAXNREG]",
        help="time the top-k stage with these tile configs instead (the shipped one first)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for T in args.seqlens:
        N = args.batch * T
        q = torch.randn(N, args.heads, args.dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        cu = torch.arange(args.batch + 1, dtype=torch.int32, device="cuda") * T
        kw = dict(block_size=args.block, topk=args.topk)
        flop = 2.0 * args.dim * args.batch * args.heads * causal_score_count(T, args.block)
        if args.tune is not None:
            layout = block_layout(cu, N, args.block)
            cent = block_centroids(k, cu, args.block, layout)
            shipped_indices = None
            for cfg in [None, *args.tune]:
                chosen = {} if cfg is None else {"route_topk": _topk_config(cfg)}
                with configs.override(**chosen):
                    ms = stages(q, k, cu, args.block, args.topk)["topk_ms"]
                    indices = route_topk(q, cent, cu, args.block, args.topk, True, layout)
                shipped_indices = indices if shipped_indices is None else shipped_indices
                same = bool(torch.equal(indices, shipped_indices))  # an exact top-k: the tiles change nothing
                row = {"T": T, "config": cfg or "shipped", "topk_ms": ms, "score_tflops": flop / ms / 1e9, "same": same}
                rows.append(row)
                print(row, flush=True)
            continue
        row = {"T": T}
        row["flashmoba_ms"], row["flashmoba_peak_gb"] = measure(
            lambda: flashmoba.moba_route_varlen(q, k, cu, max_seqlen=T, **kw).block_index
        )
        row["graph_ms"] = bench_graph(lambda: flashmoba.moba_route_varlen(q, k, cu, max_seqlen=T, **kw).block_index)
        row.update(stages(q, k, cu, args.block, args.topk))
        row["score_tflops"] = flop / row["topk_ms"] / 1e9
        if args.no_torch:
            row["torch_ms"] = row["torch_peak_gb"] = "-"
        else:
            try:
                row["torch_ms"], row["torch_peak_gb"] = measure(lambda: torch_router(q, k, cu, args.block, args.topk))
            except torch.cuda.OutOfMemoryError:
                row["torch_ms"] = row["torch_peak_gb"] = "OOM"
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    if args.tune is not None:
        cols = ["T", "config", "topk_ms", "score_tflops", "same"]
    else:
        cols = [
            "T",
            "flashmoba_ms",
            "graph_ms",
            "centroids_ms",
            "topk_ms",
            "block_index_ms",
            "score_tflops",
            "flashmoba_peak_gb",
            "torch_ms",
            "torch_peak_gb",
        ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    md = "\n".join(lines)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "args": {k: v for k, v in vars(args).items() if k != "out"},
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
