"""Sparse MoBA decode vs dense SDPA decode over the same KV cache, and against the bytes-read limit (H100).

One new token per sequence (``--new-tokens`` for speculative / chunked steps) against a cache of
``context`` tokens per sequence: HQ 32, HKV 8, D 128, bf16, block 128, top-k 8 by default. The cache is
head-major ``[B, HKV, T, D]`` (the Hugging Face layout); SDPA reads it directly (``enable_gqa``, the best of
its flash / cuDNN / efficient backends), flashmoba through a ``transpose(1, 2)`` view.

Every step is captured in a CUDA graph and replayed (as a serving loop would run it), so that Python and
launch overheads do not hide the GPU time; the eager flashmoba time (one host synchronisation per call
for argument checks, three launches) is reported too.

The bytes-read limit of a step = the fp32 centroid sums of every complete block + the K and V of the
distinct (sequence, KV head, block) pairs the queries select, over the copy bandwidth measured here.
Per-head routing reads each selected block once per query head (``kernel bytes``; L2 may absorb the
repeats), shared-KV routing once per KV group.

    python benchmarks/bench_decode.py --out docs/results/decode.json

writes decode.json, decode.md (the table, also printed) and decode.png; about two minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import flashmoba
from flashmoba.decode import reference

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def bench_us(fn, rep_ms: float) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up run that compiles its kernels); returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) over a 2 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), 200)
    return 2 * src.numel() / us / 1e3


def distinct_selected_blocks(q, block_sums, context, block_size, topk, shared):
    """Distinct (sequence, KV head, block) pairs the new queries attend, own blocks included."""
    B, Tq, HQ, D = q.shape
    HKV = block_sums.shape[2]
    group = HQ // HKV
    total = 0
    for i in range(Tq):
        own = (context - Tq + i) // block_size
        cent = block_sums[:, :own].float() / block_size  # [B, own, HKV, D]
        scores = torch.einsum("bhgd,bnhd->bhgn", q[:, i].float().view(B, HKV, group, D), cent)
        if shared:
            scores = scores.sum(2, keepdim=True)
        picks = scores.topk(min(topk - 1, own), dim=-1).indices.flatten(2)  # [B, HKV, picks]
        chosen = torch.zeros(B, HKV, own + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, picks, True)
        chosen[..., own] = True
        total += int(chosen.sum())
    return total


def run_config(context, batch, args, bandwidth, check):
    HQ, HKV, D, bs, topk, Tq = args.heads, args.kv_heads, args.dim, args.block, args.topk, args.new_tokens
    dtype = getattr(torch, args.dtype)
    k = torch.randn(batch, HKV, context, D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch, Tq, HQ, D, dtype=dtype, device="cuda")
    seqlens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    num_blocks = -(-context // bs)
    # The sums a MoBAKVCache / accumulate_block_sums would hold, computed in one go for the set-up.
    padded = F.pad(k, (0, 0, 0, num_blocks * bs - context))
    block_sums = padded.view(batch, HKV, num_blocks, bs, D).sum(3, dtype=torch.float32).transpose(1, 2).contiguous()
    del padded
    rep = args.rep_ms
    row = {"context": context, "batch": batch, "new_tokens": Tq}

    cache = flashmoba.MoBAKVCache.from_tensors(
        k.transpose(1, 2), v.transpose(1, 2), seqlens, block_size=bs, block_sums=block_sums
    )

    def moba(shared):
        return lambda: flashmoba.moba_decode(q, cache, topk=topk, shared_kv_routing=shared, backend="triton")

    if check:
        # Triton vs the torch reference on this very cache (the reference is exact fp32 arithmetic).
        out = moba(False)()
        ref, _ = reference.decode(
            q,
            k.transpose(1, 2),
            v.transpose(1, 2),
            seqlens,
            torch.zeros_like(seqlens),
            block_sums,
            bs,
            topk,
            False,
            D**-0.5,
        )
        row["max_abs_diff_vs_reference"] = (out.float() - ref.float()).abs().max().item()
    row["moba_eager_us"] = bench_us(moba(False), rep)
    row["moba_us"] = bench_us(graphed(moba(False)), rep)
    row["moba_shared_us"] = bench_us(graphed(moba(True)), rep)

    q_sdpa = q.transpose(1, 2)  # [B, HQ, Tq, D]
    causal = Tq > 1

    def dense(backend):
        with sdpa_kernel([backend]):
            # Tq > 1: the new tokens are the cache's last rows (bottom-right causal alignment).
            mask = None if not causal else torch.ones(Tq, context, dtype=torch.bool, device="cuda").tril(context - Tq)
            return F.scaled_dot_product_attention(q_sdpa, k, v, attn_mask=mask, enable_gqa=True)

    sdpa = {}
    for name, backend in SDPA_BACKENDS.items():
        try:
            sdpa[name] = bench_us(graphed(lambda backend=backend: dense(backend)), rep)
        except RuntimeError as error:  # a backend that does not take these shapes
            sdpa[name] = None
            row[f"sdpa_{name}_error"] = str(error).splitlines()[0][:120]
    row["sdpa_us_by_backend"] = sdpa
    row["sdpa_us"] = min(t for t in sdpa.values() if t is not None)
    best = min((name for name in sdpa if sdpa[name] is not None), key=sdpa.get)
    row["sdpa_eager_us"] = bench_us(lambda: dense(SDPA_BACKENDS[best]), rep)  # the baseline tool's method
    row["speedup"] = row["sdpa_us"] / row["moba_us"]

    kv_block_bytes = 2 * bs * D * k.element_size()  # K and V of one block of one KV head
    centroid_bytes = batch * ((context - 1) // bs) * HKV * D * 4
    for shared, key in ((False, ""), (True, "_shared")):
        distinct = distinct_selected_blocks(q, block_sums, context, bs, topk, shared)
        min_bytes = centroid_bytes + distinct * kv_block_bytes
        row[f"limit{key}_us"] = min_bytes / bandwidth / 1e3
        row[f"ratio_to_limit{key}"] = row[f"moba{key}_us"] / row[f"limit{key}_us"]
        row[f"min_bytes{key}"] = min_bytes
    kernel_blocks = batch * Tq * HQ * topk  # per-head routing: each query head reads its own blocks
    row["kernel_bytes"] = centroid_bytes * Tq + kernel_blocks * kv_block_bytes
    row["dense_bytes"] = 2 * k.numel() * k.element_size()
    row["sdpa_gbs"] = row["dense_bytes"] / row["sdpa_us"] / 1e3
    return row


def to_markdown(rows, meta) -> str:
    lines = [
        f"Decode step, {meta['new_tokens']} new token(s) per sequence: HQ {meta['heads']}, HKV {meta['kv_heads']}, "
        f"D {meta['dim']}, {meta['dtype']}, block {meta['block']}, top-k {meta['topk']}; {meta['device']}, "
        f"measured copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s. Times in µs per step (CUDA graphs; "
        "median). limit = (centroid sums + distinct selected K/V) / bandwidth.",
        "",
        "| context | batch | SDPA dense | flashmoba | speedup | limit | x limit | shared-KV | shared limit "
        "| x limit | eager SDPA | eager flashmoba |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context'] // 1024}K | {r['batch']} | {r['sdpa_us']:.1f} | {r['moba_us']:.1f} | "
            f"{r['speedup']:.1f}x | {r['limit_us']:.1f} | {r['ratio_to_limit']:.2f} | {r['moba_shared_us']:.1f} | "
            f"{r['limit_shared_us']:.1f} | {r['ratio_to_limit_shared']:.2f} | {r['sdpa_eager_us']:.1f} | "
            f"{r['moba_eager_us']:.1f} |"
        )
    checked = [r for r in rows if "max_abs_diff_vs_reference" in r]
    for r in checked:
        lines.append(
            f"\nTriton vs torch reference at {r['context'] // 1024}K, batch {r['batch']}: "
            f"max |diff| = {r['max_abs_diff_vs_reference']:.2e}"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    batches = sorted({r["batch"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, batch in zip(colors, batches):
        sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
        x = [r["context"] for r in sel]
        ax.plot(x, [r["sdpa_us"] for r in sel], "--", color=color, label=f"SDPA dense, batch {batch}")
        ax.plot(x, [r["moba_us"] for r in sel], "o-", color=color, label=f"flashmoba, batch {batch}")
        ax.plot(x, [r["limit_us"] for r in sel], ":", color=color, label=f"bytes-read limit, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["context"] for r in rows}))
    ax.set_xticklabels([f"{c // 1024}K" for c in sorted({r["context"] for r in rows})])
    ax.set_xlabel("context per sequence (tokens)")
    ax.set_ylabel("µs per decode step")
    ax.set_title("MoBA sparse decode vs dense SDPA decode (CUDA graphs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(batches))
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 262144, 524288])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--max-cache-gb", type=float, default=20.0, help="skip configs whose K+V cache is larger")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=None, help="JSON path; the .md table and .png plot go next to it")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    start = time.time()
    bandwidth = copy_bandwidth_gbs()
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    configs = [
        (c, b)
        for c in args.contexts
        for b in args.batches
        if 2 * b * c * args.kv_heads * args.dim * element <= args.max_cache_gb * 1e9
    ]
    check_at = min(configs, key=lambda cb: (abs(cb[0] - 131072), cb[1]))
    rows = []
    for c, b in tqdm(configs, desc="decode"):
        rows.append(run_config(c, b, args, bandwidth, check=(c, b) == check_at))
        torch.cuda.empty_cache()  # the config's cache is gone with its frame
    meta = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_gbs": bandwidth,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seconds": time.time() - start,
    }
    md = to_markdown(rows, meta)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md)
        plot(rows, args.out.with_suffix(".png"))
        print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
