"""Context-parallel MoBA: the communication model (any machine) and measured throughput (several GPUs).

Model (``--model``, alias ``--dry-run``; no GPU, no process group). Bytes each rank receives per attention
layer, forward plus backward, for one sequence of ``T`` tokens over ``W`` ranks (``s`` bytes per element,
``HKV`` KV heads of dim ``D``, blocks of ``bs``, ``topk`` blocks per query, ``G = HQ / HKV``):

* all-gather (what ``flashmoba.distributed`` does): K and V gathered in the forward, their gradients
  reduce-scattered in the backward, each moving ``(W - 1) / W`` of the sequence:
  ``4 * (W - 1) / W * T * HKV * D * s``;
* selective fetch: the block centroids all-gathered (``(W - 1) / W * T / bs * HKV * D * s``), then only
  the remote blocks some local query selected, K and V forward and their gradients back:
  ``4 * F * bs * D * s`` for ``F`` selected remote (block, KV head) pairs. ``F`` under uniform routing (every
  query head picks its ``topk - 1`` past blocks uniformly among all of them, causal): a remote block ``j``
  of one KV head is missed by every query ``t`` after it with probability
  ``prod_t (1 - (topk - 1) / own(t)) ** G`` (``own(t)``: the number of blocks before ``t``'s own; a query
  with at most ``topk - 1`` of them takes all). Real routing favours some blocks, which lowers ``F``; the
  model is the uniform case, computed exactly for each rank of the zigzag layout (the busiest is shown).

Also reported: the intensity ``attention FLOPs / all-gather bytes`` of a rank (forward ``4 * D`` FLOPs per
(query head, attended key), backward 2.5x that, ``topk * bs`` keys per query), which is independent of
``T``: ``3.5 * G * topk * bs / ((W - 1) * s)`` when every query attends ``topk * bs`` keys.

Throughput (under ``torchrun``, one process per GPU, NCCL): forward + backward of
``context_parallel_moba_attn_varlen`` on one sequence of each ``--seqlens``
length, sharded over the ranks; also the all-gather of K and V and the reduce-scatter of their gradients
alone. Median of ``--reps`` CUDA-event timings after warm-up, each rank timed, the slowest reported.

    python benchmarks/bench_context_parallel.py --model
    torchrun --nproc_per_node 8 benchmarks/bench_context_parallel.py --seqlens 131072 524288 1048576 \\
        --out docs/results/context_parallel_h200x8.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

# model grid: (T, W, block, topk, HQ, HKV, D)
MODEL_SEQLENS = (131072, 1048576)
MODEL_WORLD_SIZES = (2, 8, 64)
MODEL_ROUTING = ((128, 8), (16, 2))
MODEL_HEADS = ((16, 16, 64), (32, 4, 128))  # the 340M preset (MHA, D 64); a GQA layer (G = 8, D 128)
ELEMENT_BYTES = 2  # bf16


def zigzag_blocks(num_blocks: int, world_size: int, rank: int, block_size: int, seqlen: int) -> np.ndarray:
    """Per block: the number of rank ``rank``'s queries whose own block it is (zigzag layout)."""
    chunk = seqlen // (2 * world_size)
    counts = np.zeros(num_blocks)
    for c in (rank, 2 * world_size - 1 - rank):
        first, last = c * chunk, (c + 1) * chunk  # positions [first, last)
        starts = np.arange(num_blocks) * block_size
        counts += np.clip(np.minimum(starts + block_size, last) - np.maximum(starts, first), 0, None)
    return counts


def selected_remote_fraction(seqlen, world_size, rank, block_size, topk, group) -> tuple[float, int]:
    """``(expected fraction of the remote blocks selected, number of remote blocks)`` of one KV head, for
    rank ``rank`` under uniform causal routing (module docstring)."""
    n = -(-seqlen // block_size)
    queries = zigzag_blocks(n, world_size, rank, block_size, seqlen)  # rank's queries per own block
    own = np.arange(n)  # a query in block i has i blocks before its own
    # log P(a given block before i is missed by one query head of block i): it takes all with i <= topk - 1
    miss = np.full(n, -np.inf)
    many = own > topk - 1
    miss[many] = np.log1p(-(topk - 1) / own[many])
    # ... by all of the rank's queries of block i, over the G query heads of the KV head
    log_miss = np.zeros(n)
    log_miss[queries > 0] = group * queries[queries > 0] * miss[queries > 0]
    # block j is missed by every query of every block i > j
    suffix = np.concatenate([np.cumsum(log_miss[::-1])[::-1][1:], [0.0]])
    p_selected = 1.0 - np.exp(suffix)
    remote = queries == 0  # blocks holding none of the rank's queries (the zigzag chunks are block-aligned)
    return float(p_selected[remote].sum() / max(remote.sum(), 1)), int(remote.sum())


def model_row(seqlen, world_size, block_size, topk, hq, hkv, d, s=ELEMENT_BYTES) -> dict:
    """One row of the communication model (bytes per rank per layer, forward + backward)."""
    group = hq // hkv
    gather = 4 * (world_size - 1) / world_size * seqlen * hkv * d * s
    centroids = (world_size - 1) / world_size * seqlen / block_size * hkv * d * s
    worst = max(
        (selected_remote_fraction(seqlen, world_size, r, block_size, topk, group) for r in range(world_size)),
        key=lambda x: x[0] * x[1],
    )
    fraction, remote_blocks = worst
    fetch = 4 * fraction * remote_blocks * hkv * block_size * d * s
    flops = 3.5 * 4 * d * hq * (seqlen / world_size) * topk * block_size
    return {
        "T": seqlen,
        "W": world_size,
        "block": block_size,
        "topk": topk,
        "HQ": hq,
        "HKV": hkv,
        "D": d,
        "all_gather_GB": gather / 1e9,
        "selective_GB": (centroids + fetch) / 1e9,
        "selected_fraction": fraction,
        "gathered_kv_GB": 2 * seqlen * hkv * d * s / 1e9,
        "flops_per_byte": flops / gather if gather else math.inf,
    }


def model_table(rows) -> str:
    lines = [
        "| T | W | block x topk | HQ / HKV x D | all-gather GB | selective GB | remote blocks selected "
        "| gathered K+V GB | FLOPs / byte |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T'] // 1024}K | {r['W']} | {r['block']} x {r['topk']} | {r['HQ']} / {r['HKV']} x {r['D']} "
            f"| {r['all_gather_GB']:.3g} | {r['selective_GB']:.3g} | {100 * r['selected_fraction']:.1f}% "
            f"| {r['gathered_kv_GB']:.3g} | {r['flops_per_byte']:.0f} |"
        )
    return "\n".join(lines)


def run_model() -> list[dict]:
    rows = [
        model_row(t, w, bs, k, hq, hkv, d)
        for hq, hkv, d in MODEL_HEADS
        for t in MODEL_SEQLENS
        for w in MODEL_WORLD_SIZES
        for bs, k in MODEL_ROUTING
    ]
    print(model_table(rows))
    return rows


# ----------------------------------------------------------------------------------------------------
# throughput (torchrun, NCCL)


def _time_ms(fn, reps):
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.distributed.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def run_throughput(args) -> list[dict]:
    import torch
    import torch.distributed as dist

    from flashmoba.distributed import context_parallel_moba_attn_varlen, shard_sequence
    from flashmoba.distributed.comm import gather_keys_values

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for seqlen in args.seqlens:
        gen = torch.Generator(device="cuda").manual_seed(0)
        shape_q, shape_kv = (seqlen, args.hq, args.d), (seqlen, args.hkv, args.d)
        q, dout = (torch.randn(*shape_q, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        k, v = (torch.randn(*shape_kv, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
        leaves = [shard_sequence(t, 0).detach().requires_grad_() for t in (q, k, v)]
        local_dout = shard_sequence(dout, 0)
        del q, k, v, dout

        def step(leaves=leaves, local_dout=local_dout, cu=cu):
            out = context_parallel_moba_attn_varlen(*leaves, cu, block_size=args.block_size, topk=args.topk)
            out.backward(local_dout)

        def comm(leaves=leaves):
            k_full, v_full = gather_keys_values(leaves[1], leaves[2], 0, "zigzag", None)
            torch.autograd.backward([k_full, v_full], [k_full, v_full])

        total = _time_ms(step, args.reps)
        comm_ms = _time_ms(comm, args.reps)
        slowest = [None] * world_size
        dist.all_gather_object(slowest, (total, comm_ms))
        total, comm_ms = max(t for t, _ in slowest), max(c for _, c in slowest)
        rows.append(
            {
                "T": seqlen,
                "W": world_size,
                "fwd_bwd_ms": total,
                "comm_only_ms": comm_ms,
                "tokens_per_s": seqlen / (total / 1e3),
                "model": model_row(seqlen, world_size, args.block_size, args.topk, args.hq, args.hkv, args.d)
                if seqlen % (2 * world_size * args.block_size) == 0
                else None,
            }
        )
        del leaves, local_dout
        torch.cuda.empty_cache()
    if rank == 0:
        print("| T | W | fwd+bwd ms | all-gather + reduce-scatter alone ms | tokens/s |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['T']} | {r['W']} | {r['fwd_bwd_ms']:.2f} | {r['comm_only_ms']:.2f} | {r['tokens_per_s']:,.0f} |"
            )
    dist.destroy_process_group()
    return rows if rank == 0 else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--dry-run", action="store_true", help="print the communication model")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--hq", type=int, default=16)
    parser.add_argument("--hkv", type=int, default=16)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="JSON results")
    args = parser.parse_args(argv)
    rows = run_model() if args.model else run_throughput(args)
    if args.out and rows:
        import platform

        meta = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(), "host": platform.node()}
        if not args.model:
            import torch

            meta.update(card=torch.cuda.get_device_name(), torch=torch.__version__)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
