"""MoBA attention on the GPU: per-stage times, pairs, TFLOP/s and share of the FLOP floor, vs peers.

Default: the FlashMoBA paper's efficiency setting (batch 2, 16 heads, head dim 128, bf16, causal, routing
included) at block:topk 128:8, 64:16 and 32:32 (1024 attended keys per query in each), with SDPA cuDNN
dense attention and fla-core's ``parallel_nsa`` (the same attended keys, 16 query heads on one KV head,
routing excluded; ``pip install flashmoba[bench]``) in the same run, the latter next to flashmoba on the
same shapes. Random normal inputs: every query picks its own random blocks, the worst case for locality.

    python benchmarks/bench_attention.py --graph --out docs/results/attention_h200.json

FLOPs count the attended (query, head, key) triples only, 4 D per triple forward and 2.5x that backward;
the floor is those FLOPs at the bf16 matrix rate measured in the same run. Prints markdown tables; with
``--out`` also writes the JSON, the tables (.md) and a plot (.png) of time and ns per pair vs block size.
``--plot-from results.json`` redraws the plot only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

import flashmoba


def bench_ms(fn, rep_ms: float = 200.0) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def peak_gb(fn, leaves=()) -> tuple[float, float]:
    """Peak memory of one call of ``fn``: ``(total, above what was allocated before it)`` in GB, with the
    gradients of ``leaves`` dropped first; the second leaves out the inputs, as the official FlashMoBA
    numbers in the docs do."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 1e9, (peak - before) / 1e9


def attended_keys(indices: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, causal: bool) -> int:
    """Exact number of (query, head, key) triples MoBA attends (the useful work)."""
    N = indices.shape[0]
    seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(N, device=indices.device), right=True)
    starts = cu_seqlens.long()[seq]
    lens = cu_seqlens.long()[seq + 1] - starts
    pos = (torch.arange(N, device=indices.device) - starts)[:, None, None]
    blk = indices.long()
    block_len = torch.clamp(lens[:, None, None] - blk * block_size, max=block_size)
    keys = torch.where(blk >= 0, block_len, 0)
    if causal:
        own = (pos // block_size) == blk
        keys = torch.where(own, pos - blk * block_size + 1, keys)
    return int(keys.sum())


def matmul_ceiling_tflops(device) -> float:
    """The card's bf16 matrix rate, measured (8192^3 product on random data): the FLOP floor's rate."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, 100.0)
    return 2 * 8192**3 / ms / 1e9


STAGES = (  # kernel-name fragments -> stage, first match wins
    ("_block_centroids", "centroids"),
    ("_route_topk", "topk"),
    ("_attn_fwd_row_ref", "fwd row ref"),
    ("_attn_fwd_prepare", "fwd rescue"),
    ("_attn_fwd_kernel", "fwd main"),
    ("_attn_fwd_finalize", "fwd finalize"),
    ("_attn_bwd_delta", "bwd delta"),
    ("_attn_bwd_kernel", "bwd main"),
    ("Memset", "zero fills"),
    ("fill", "zero fills"),
    ("zero", "zero fills"),
    ("sort", "block index"),
    ("Radix", "block index"),
    ("scan", "block index"),
    ("cumsum", "block index"),
)


def kernel_breakdown(fn, iters: int = 5) -> dict:
    """Device time per stage (ms per call) of ``fn``, from the profiler's kernel records."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    stages: dict[str, float] = {}
    for evt in prof.key_averages():
        ms = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e3 / iters
        if ms <= 0 or evt.key.startswith("ProfilerStep"):
            continue
        stage = next((st for frag, st in STAGES if frag.lower() in evt.key.lower()), "other")
        stages[stage] = stages.get(stage, 0.0) + ms
    return {k: round(v, 4) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}


def graph_ms(fn, rep_ms: float) -> float:
    """Median time of ``fn`` replayed as a CUDA graph (launch gaps removed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay, rep_ms)


def run_moba(T, block, topk, args, dtype, device, ceiling):
    B, H, HKV, D = args.batch, args.heads, args.kv_heads or args.heads, args.dim
    N = B * T
    q = torch.randn(N, H, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(N, HKV, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(N, HKV, D, dtype=dtype, device=device, requires_grad=True)
    cu = torch.arange(B + 1, dtype=torch.int32, device=device) * T
    do = torch.randn_like(q)
    kw = dict(block_size=block, topk=topk, causal=True)
    row = {"T": T, "impl": "flashmoba", "block": block, "topk": topk, "D": D, "H": H, "HKV": HKV}

    def fwd():
        return flashmoba.moba_attn_varlen(q, k, v, cu, max_seqlen=T, backend="triton", **kw)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fwd().backward(do)

    def route():
        return flashmoba.moba_route_varlen(q, k, cu, max_seqlen=T, backend="triton", **kw).block_index

    rep = 200.0 if T <= 65536 else 60.0
    row["route_ms"] = bench_ms(route, rep)
    row["fwd_ms"] = bench_ms(fwd, rep)
    row["fwd_bwd_ms"] = bench_ms(fwd_bwd, rep)
    if args.graph:
        row["fwd_graph_ms"] = graph_ms(fwd, rep)
        row["fwd_bwd_graph_ms"] = graph_ms(fwd_bwd, rep)
    row["peak_gb"], row["peak_above_inputs_gb"] = peak_gb(fwd_bwd, (q, k, v))
    row["stages_ms"] = kernel_breakdown(fwd_bwd)

    with torch.no_grad():
        idx = flashmoba.moba_route_varlen(q.detach(), k.detach(), cu, **kw).indices
        keys = attended_keys(idx, cu, block, True)
        pairs = int((idx >= 0).sum())
    st = row["stages_ms"]
    attn_ms = sum(v for s_, v in st.items() if s_.startswith(("fwd", "bwd")))
    flop_fwd = 4.0 * D * keys  # QK^T and PV over the attended (query, head, key) triples
    row.update(
        pairs=pairs,
        attended_keys=keys,
        useful_tflop_fwd=flop_fwd / 1e12,
        ns_per_pair=attn_ms * 1e6 / pairs,
        fwd_tflops=flop_fwd / row["fwd_ms"] / 1e9,
        bwd_tflops=2.5 * flop_fwd / max(row["fwd_bwd_ms"] - row["fwd_ms"], 1e-9) / 1e9,
        fwd_bwd_tflops=3.5 * flop_fwd / row["fwd_bwd_ms"] / 1e9,
        floor_ms=3.5 * flop_fwd / ceiling / 1e9,
    )
    row["pct_of_floor"] = 100.0 * row["floor_ms"] / row["fwd_bwd_ms"]
    return row


def run_fla_nsa(T, args, dtype, device):
    """fla-core's ``parallel_nsa`` (selected-block attention, routing excluded) at 1024 attended keys:
    blocks of 64, 16 selected (the own block and 15 random past ones), 16 query heads on one KV head."""
    from fla.ops.nsa import parallel_nsa

    B, H, D, BS, S = args.batch, args.heads, args.dim, 64, 16
    q = torch.randn(B, T, H, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, T, 1, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, T, 1, D, dtype=dtype, device=device, requires_grad=True)
    do = torch.randn_like(q)
    nb = T // BS
    own = torch.arange(T, device=device) // BS
    score = torch.rand(B, T, nb, device=device).masked_fill(torch.arange(nb, device=device) >= own[:, None], 2.0)
    past = score.argsort(dim=-1)[..., : S - 1]
    idx = torch.cat([past, own.view(1, T, 1).expand(B, T, 1)], -1).sort(-1).values.view(B, T, 1, S)
    del score
    row = {"T": T, "impl": "fla-parallel_nsa", "block": BS, "topk": S, "D": D, "H": H, "HKV": 1}

    def fwd():
        return parallel_nsa(q, k, v, block_indices=idx, block_counts=S, block_size=BS)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fwd().backward(do)

    rep = 200.0 if T <= 65536 else 60.0
    row["fwd_ms"] = bench_ms(fwd, rep)
    row["fwd_bwd_ms"] = bench_ms(fwd_bwd, rep)
    row["peak_gb"], row["peak_above_inputs_gb"] = peak_gb(fwd_bwd, (q, k, v))
    return row


def run_sdpa(T, args, dtype, device, backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    B, H, D = args.batch, args.heads, args.dim
    q = torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    do = torch.randn_like(q)
    row = {"T": T, "impl": f"sdpa-{backend_name}", "D": D, "H": H}

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        fwd().backward(do)

    rep = 200.0 if T <= 32768 else 40.0
    row["fwd_ms"] = bench_ms(fwd, rep)
    row["fwd_bwd_ms"] = bench_ms(fwd_bwd, rep)
    row["peak_gb"], row["peak_above_inputs_gb"] = peak_gb(fwd_bwd, (q, k, v))
    return row


def run_flex(T, args, dtype, device, variant):
    """FlexAttention with MoBA-like block sparsity (batch and heads as configured).

    ``tile``: every 128-query tile shares one list (its own diagonal block + topk - 1 random past
    blocks): no gather, the block-sparse speed-of-light for this density (not MoBA semantics).
    ``exact``: token-level MoBA from our own routing through a mask_mod; the BlockMask is the union of
    the blocks the tile's queries selected.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, H, D, BS, K = args.batch, args.heads, args.dim, args.block, args.topk
    if BS != 128:
        raise ValueError("the Flex baselines use 128-token tiles: --block must be 128")
    nb = T // BS
    q = torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    do = torch.randn_like(q)
    tiles = torch.arange(nb, device=device)
    diag = tiles.view(1, 1, nb, 1).expand(B, H, nb, 1).to(torch.int32)
    causal = lambda b, h, qi, ki: qi >= ki  # noqa: E731
    if variant == "tile":
        # random distinct past blocks per tile: argsort of random keys restricted to blocks < tile
        r = torch.rand(B, H, nb, nb, device=device).masked_fill(
            tiles[None, None, None, :] >= tiles[None, None, :, None], 2.0
        )
        past = r.argsort(dim=-1)[..., : K - 1].to(torch.int32)
        full_num = torch.clamp(tiles, max=K - 1).view(1, 1, nb).expand(B, H, nb).to(torch.int32).contiguous()
        full_idx = torch.cat([past, torch.zeros(B, H, nb, nb - (K - 1), dtype=torch.int32, device=device)], -1)
        part_idx = torch.cat([diag, torch.zeros(B, H, nb, nb - 1, dtype=torch.int32, device=device)], -1)
        mask = BlockMask.from_kv_blocks(
            torch.ones(B, H, nb, dtype=torch.int32, device=device),
            part_idx,
            full_num,
            full_idx.contiguous(),
            BLOCK_SIZE=BS,
            mask_mod=causal,
        )
    else:
        qp = q.detach().transpose(1, 2).reshape(B * T, H, D)
        kp = k.detach().transpose(1, 2).reshape(B * T, H, D)
        cu = torch.arange(B + 1, dtype=torch.int32, device=device) * T
        idx = flashmoba.moba_route_varlen(qp, kp, cu, block_size=BS, topk=K).indices.view(B, T, H, K)
        sel = torch.zeros(B, H, T, nb + 1, dtype=torch.bool, device=device)
        sel.scatter_(-1, torch.where(idx < 0, nb, idx).long().permute(0, 2, 1, 3), True)
        sel = sel[..., :nb].contiguous()
        union = sel.view(B, H, nb, BS, nb).any(dim=3)  # blocks any query of the tile selected
        num = union.sum(-1).to(torch.int32)
        order = torch.sort((~union).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

        def moba_mod(b, h, qi, ki):
            return sel[b, h, qi, ki // BS] & (qi >= ki)

        mask = BlockMask.from_kv_blocks(num, order, BLOCK_SIZE=BS, mask_mod=moba_mod)
    flex = torch.compile(flex_attention)
    row = {"T": T, "impl": f"flex-{variant}", "D": D, "H": H}

    def fwd():
        return flex(q, k, v, block_mask=mask)

    def fwd_bwd():
        fwd().backward(do)

    fwd_bwd()  # compile
    rep = 200.0 if T <= 32768 else 40.0
    row["fwd_ms"] = bench_ms(fwd, rep)
    row["fwd_bwd_ms"] = bench_ms(fwd_bwd, rep)
    row["peak_gb"], row["peak_above_inputs_gb"] = peak_gb(fwd_bwd, (q, k, v))
    return row


# Official FlashMoBA (CUDA, v2.0.0) on an H200, batch 2, 16 heads, D 128, bf16, causal, forward+backward
# with routing, ms, measured by the team on 2026-12-02/03: drawn as reference points.
FLASHMOBA_ANCHORS = {(128, 8, 8192): 5.94, (128, 8, 65536): 61.5, (64, 16, 8192): 9.58, (64, 16, 65536): 114.0}


def plot(rows, path: Path) -> None:
    """Forward+backward time and ns per (query, head, block) pair vs block size at fixed attended keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    moba = [r for r in rows if r["impl"] == "flashmoba" and r.get("HKV") == r.get("H") and "fwd_bwd_ms" in r]
    for T in sorted({r["T"] for r in moba}):
        pts = sorted((r["block"], r["fwd_bwd_ms"], r["ns_per_pair"]) for r in moba if r["T"] == T)
        line = ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"flashmoba, T={T // 1024}K")[0]
        ax_p.plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=line.get_color(), label=f"T={T // 1024}K")
        anchors = sorted((b, ms) for (b, _, t), ms in FLASHMOBA_ANCHORS.items() if t == T)
        ax_t.plot(
            [a[0] for a in anchors],
            [a[1] for a in anchors],
            "x--",
            color=line.get_color(),
            label=f"official FlashMoBA, T={T // 1024}K",
        )
        dense = [r["fwd_bwd_ms"] for r in rows if r["impl"] == "sdpa-cudnn" and r["T"] == T and "fwd_bwd_ms" in r]
        if dense:
            ax_t.axhline(dense[0], color=line.get_color(), ls=":", label=f"SDPA cuDNN dense, T={T // 1024}K")
    for ax, ylabel in (
        (ax_t, "forward + backward incl. routing (ms)"),
        (ax_p, "attention ns per (query, head, block)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block size (top-k = 1024 / block: same attended keys)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("batch 2, 16 heads, D 128, bf16, causal", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_markdown(rows) -> str:
    cols = [
        "T",
        "impl",
        "block",
        "topk",
        "HKV",
        "route_ms",
        "fwd_ms",
        "fwd_bwd_ms",
        "fwd_graph_ms",
        "fwd_bwd_graph_ms",
        "peak_gb",
        "peak_above_inputs_gb",
        "ns_per_pair",
        "fwd_tflops",
        "bwd_tflops",
        "fwd_bwd_tflops",
        "pct_of_floor",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, "")
            cells.append(f"{x:.3g}" if isinstance(x, float) else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    stage_rows = [r for r in rows if "stages_ms" in r]
    if stage_rows:
        names = sorted({s_ for r in stage_rows for s_ in r["stages_ms"]})
        lines += [
            "",
            "Device time per stage, ms per forward+backward (profiler):",
            "",
            "| T | block:topk | HKV | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 3),
        ]
        for r in stage_rows:
            lines.append(
                f"| {r['T']} | {r['block']}:{r['topk']} | {r['HKV']} | "
                + " | ".join(f"{r['stages_ms'].get(n, 0.0):.3g}" for n in names)
                + " |"
            )
    return "\n".join(lines)


def _config(text: str) -> tuple[int, int]:
    block, topk = text.split(":")
    return int(block), int(topk)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 65536])
    p.add_argument(
        "--configs", type=_config, nargs="+", default=[(128, 8), (64, 16), (32, 32)], help="block:topk pairs"
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--graph", action="store_true", help="also time forward and forward+backward as CUDA graphs")
    p.add_argument(
        "--baselines",
        nargs="*",
        default=["cudnn", "fla-nsa"],
        choices=["cudnn", "flash", "flex-tile", "flex-exact", "fla-nsa"],
    )
    p.add_argument("--baseline-max-t", type=int, default=65536)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-from", type=Path, default=None, help="only redraw the PNG from a saved JSON")
    args = p.parse_args()
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text())["rows"], args.plot_from.with_suffix(".png"))
        return
    dtype = getattr(torch, args.dtype)
    device = "cuda"
    ceiling = matmul_ceiling_tflops(device)
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)
    rows = []
    for T in args.seqlens:
        for block, topk in args.configs:
            t0 = time.time()
            rows.append(run_moba(T, block, topk, args, dtype, device, ceiling))
            print(f"T={T} flashmoba {block}:{topk} done in {time.time() - t0:.1f}s", flush=True)
            torch.cuda.empty_cache()
        if T > args.baseline_max_t:
            continue
        for b in args.baselines:
            try:
                if b == "fla-nsa":
                    rows.append(run_fla_nsa(T, args, dtype, device))
                    kv = argparse.Namespace(**{**vars(args), "kv_heads": 1})
                    rows.append(run_moba(T, 64, 16, kv, dtype, device, ceiling))  # the same shapes
                elif b.startswith("flex-"):
                    rows.append(
                        run_flex(T, argparse.Namespace(**{**vars(args), "block": 128, "topk": 8}), dtype, device, b[5:])
                    )
                else:
                    rows.append(run_sdpa(T, args, dtype, device, b))
            except (torch.cuda.OutOfMemoryError, ImportError) as e:
                rows.append({"T": T, "impl": b, "error": f"{type(e).__name__}: {e}"[:160]})
            print(f"T={T} {b} done", flush=True)
            torch.cuda.empty_cache()
    md = to_markdown(rows)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "matmul_ceiling_tflops": ceiling,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
    }
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md + "\n")
        plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
