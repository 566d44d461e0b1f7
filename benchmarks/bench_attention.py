"""MoBA attention on the GPU: routing, forward, forward+backward and peak memory vs dense baselines.

Default config = the FlashMoBA paper's efficiency figure: batch 2, 16 heads, head dim 128, bf16, causal,
block 128, top-k 8, routing included. Random normal inputs (routing on random data is the worst case for
locality: every query picks its own random blocks).

    python benchmarks/bench_attention.py --seqlens 8192 32768 65536 --out docs/results/attention.json

Prints a markdown table; ``--out`` also writes the JSON, the table (.md) and a plot of latency and memory
vs T (.png) next to it; ``--plot-from results.json`` redraws the plot only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import triton

import flashmoba
from flashmoba.attention.backward import attn_bwd
from flashmoba.attention.forward import attn_fwd
from flashmoba.routing.centroids import block_centroids
from flashmoba.routing.result import block_index_from_keys, block_layout
from flashmoba.routing.topk import route_topk


def bench_ms(fn, rep_ms: float = 200.0) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


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


def run_moba(T, args, dtype, device):
    B, H, HKV, D = args.batch, args.heads, args.kv_heads or args.heads, args.dim
    N = B * T
    q = torch.randn(N, H, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(N, HKV, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(N, HKV, D, dtype=dtype, device=device, requires_grad=True)
    cu = torch.arange(B + 1, dtype=torch.int32, device=device) * T
    do = torch.randn_like(q)
    kw = dict(block_size=args.block, topk=args.topk, causal=True)
    row = {"T": T, "impl": "flashmoba", "block": args.block, "topk": args.topk, "D": D, "H": H, "HKV": HKV}

    def fwd():
        return flashmoba.moba_attn_varlen(q, k, v, cu, max_seqlen=T, backend="triton", **kw)

    def fwd_bwd():
        out = fwd()
        out.backward(do)

    def route():
        return flashmoba.moba_route_varlen(q, k, cu, max_seqlen=T, backend="triton", **kw).block_index

    rep = 200.0 if T <= 65536 else 60.0
    row["route_ms"] = bench_ms(route, rep)
    row["fwd_ms"] = bench_ms(fwd, rep)
    row["fwd_bwd_ms"] = bench_ms(fwd_bwd, rep)
    q.grad = k.grad = v.grad = None
    row["peak_gb"] = peak_gb(fwd_bwd)

    # Stage breakdown on the same inputs.
    with torch.no_grad():
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        layout = block_layout(cu, N, args.block)
        cu_blocks, block_seq, num_blocks_max = layout
        cent = block_centroids(kd, cu, args.block, layout)
        idx, block_keys = route_topk(qd, cent, cu, args.block, args.topk, True, layout, return_block_keys=True)
        bi = block_index_from_keys(block_keys, args.topk, num_blocks_max)
        scale = D ** -0.5
        out, lse = attn_fwd(qd, kd, vd, cu, cu_blocks, block_seq, bi.offsets, bi.entries, args.topk,
                            args.block, True, scale, False)
        row["centroids_ms"] = bench_ms(lambda: block_centroids(kd, cu, args.block, layout), rep)
        row["topk_ms"] = bench_ms(lambda: route_topk(qd, cent, cu, args.block, args.topk, True, layout,
                                                     return_block_keys=True), rep)
        row["block_index_ms"] = bench_ms(lambda: block_index_from_keys(block_keys, args.topk, num_blocks_max),
                                         rep)
        row["attn_fwd_ms"] = bench_ms(lambda: attn_fwd(qd, kd, vd, cu, cu_blocks, block_seq, bi.offsets,
                                                         bi.entries, args.topk, args.block, True, scale,
                                                         False), rep)
        row["attn_bwd_ms"] = bench_ms(lambda: attn_bwd(do, qd, kd, vd, out, lse, cu, cu_blocks, block_seq,
                                                         bi.offsets, bi.entries, args.topk, args.block, True,
                                                         scale, False), rep)
        keys = attended_keys(idx, cu, args.block, True)
    flop_fwd = 4.0 * D * keys  # QK^T and PV over the attended (query, head, key) triples
    row["useful_tflop_fwd"] = flop_fwd / 1e12
    row["fwd_tflops"] = flop_fwd / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * flop_fwd / row["fwd_bwd_ms"] / 1e9
    # Routing scores: one D-dot per (query, candidate block), causal halves the candidates.
    nblk = math.ceil(T / args.block)
    row["route_tflops"] = 2.0 * B * H * T * (nblk / 2) * D / row["topk_ms"] / 1e9
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
    row["peak_gb"] = peak_gb(fwd_bwd)
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
        r = torch.rand(B, H, nb, nb, device=device).masked_fill(tiles[None, None, None, :] >= tiles[None, None, :, None], 2.0)
        past = r.argsort(dim=-1)[..., : K - 1].to(torch.int32)
        full_num = torch.clamp(tiles, max=K - 1).view(1, 1, nb).expand(B, H, nb).to(torch.int32).contiguous()
        full_idx = torch.cat([past, torch.zeros(B, H, nb, nb - (K - 1), dtype=torch.int32, device=device)], -1)
        part_idx = torch.cat([diag, torch.zeros(B, H, nb, nb - 1, dtype=torch.int32, device=device)], -1)
        mask = BlockMask.from_kv_blocks(torch.ones(B, H, nb, dtype=torch.int32, device=device), part_idx,
                                        full_num, full_idx.contiguous(), BLOCK_SIZE=BS, mask_mod=causal)
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
    row["peak_gb"] = peak_gb(fwd_bwd)
    return row


# Official FlashMoBA (CUDA, v2.0.0) on an H100 80GB HBM3, same config, measured 2026-11-26 by the team
# (shared/anchors.md): forward+backward ms and peak GB, drawn as a reference line in the plot.
FLASHMOBA_ANCHORS = {8192: (5.62, 0.64), 32768: (25.7, 2.54), 65536: (63.2, 5.08), 131072: (173, 10.2),
                     262144: (508, 20.3), 524288: (1573, 40.6)}


def plot(rows, path: Path) -> None:
    """Latency and peak memory of forward+backward vs sequence length, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    impls = sorted({r["impl"] for r in rows if "fwd_bwd_ms" in r}, key=lambda x: (x != "flashmoba", x))
    for impl in impls:
        pts = sorted((r["T"], r["fwd_bwd_ms"], r["peak_gb"]) for r in rows if r["impl"] == impl and "fwd_bwd_ms" in r)
        ts = [p[0] for p in pts]
        ax_t.plot(ts, [p[1] for p in pts], "o-", label=impl)
        ax_m.plot(ts, [p[2] for p in pts], "o-", label=impl)
    ts = sorted(FLASHMOBA_ANCHORS)
    ax_t.plot(ts, [FLASHMOBA_ANCHORS[t][0] for t in ts], "k--", label="official FlashMoBA (anchor)")
    ax_m.plot(ts, [FLASHMOBA_ANCHORS[t][1] for t in ts], "k--", label="official FlashMoBA (anchor)")
    for ax, ylabel in ((ax_t, "forward + backward (ms)"), (ax_m, "peak memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (batch 2, 16 heads, D 128, bf16, block 128, top-8)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_markdown(rows) -> str:
    cols = ["T", "impl", "route_ms", "fwd_ms", "fwd_bwd_ms", "peak_gb", "centroids_ms", "topk_ms",
            "block_index_ms", "attn_fwd_ms", "attn_bwd_ms", "fwd_tflops", "fwd_bwd_tflops", "route_tflops"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, "")
            cells.append(f"{x:.3g}" if isinstance(x, float) else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--baselines", nargs="*", default=["cudnn", "flash", "flex-tile", "flex-exact"],
                   choices=["cudnn", "flash", "flex-tile", "flex-exact"])
    p.add_argument("--baseline-max-t", type=int, default=65536)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-from", type=Path, default=None, help="only redraw the PNG from a saved JSON")
    args = p.parse_args()
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text())["rows"], args.plot_from.with_suffix(".png"))
        return
    dtype = getattr(torch, args.dtype)
    device = "cuda"
    rows = []
    for T in args.seqlens:
        t0 = time.time()
        rows.append(run_moba(T, args, dtype, device))
        print(f"T={T} flashmoba done in {time.time() - t0:.1f}s", flush=True)
        torch.cuda.empty_cache()
        if T <= args.baseline_max_t:
            for b in args.baselines:
                try:
                    if b.startswith("flex-"):
                        rows.append(run_flex(T, args, dtype, device, b[5:]))
                    else:
                        rows.append(run_sdpa(T, args, dtype, device, b))
                except torch.cuda.OutOfMemoryError as e:
                    rows.append({"T": T, "impl": b, "error": f"OOM: {e}"[:120]})
                print(f"T={T} {b} done", flush=True)
                torch.cuda.empty_cache()
    md = to_markdown(rows)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md + "\n")
        plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
