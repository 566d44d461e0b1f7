"""Timed ablations of the MoBA forward kernel: what its float32 merge costs (a CUDA GPU machine).

Nsight Compute cannot read the counters on every machine, so the merge's share is measured by taking it
away: each variant is a copy of the ``flashmoba`` package with one edit of
``flashmoba/attention/forward.py``, timed in a process of its own on the same routing as the shipped
kernel (random bf16 inputs, causal; ``attn_fwd`` alone, with its row-reference, zero-fill and finalize
kernels). The variants compute wrong outputs on purpose; only their time means something.

* ``shipped``: the kernel as it is;
* ``no-rescue``: rows never fail their reference (on random inputs none does: the control of the others,
  which break the row sums that the rescue checks);
* ``no-merge``: the accumulator and row-sum atomics masked off (a mask the compiler cannot prove false);
* ``l2-merge``: the atomics go to 4096 tokens' rows (32 MB at 16 heads x 128, which the 50 MB L2 holds);
* ``store-merge``: plain stores instead of atomics, to the real rows;
* ``head-programs``: a design candidate, correct (``tests/test_ablate_attention.py`` runs it against the
  reference): one program per query head instead of per KV head, so that with GQA a program walks one
  head's queries (its K and V tile read once per query head) instead of its group's one after the other
  (``--kv-heads`` below 16 times it; with one KV head the shipped kernel spills, ``compile_stats.py``).

    python benchmarks/ablate_attention.py --T 65536 --configs 128:8 64:16 32:32 --out runs/ablate.json

An edit that no longer matches the kernel's source stops the script: update the edit with the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_NO_RESCUE = (
    "failed = r_ok & (((recorded > 0) & (top > P_MAX)) | ~(row_sum >= 0.5))",
    "failed = r_ok & (r < 0)",
)
_ACC = 'tl.atomic_add(Acc + row[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask, sem="relaxed")'
_SUM = 'tl.atomic_add(RowSum + row, row_sum, mask=row_ok, sem="relaxed")'
VARIANTS = {
    "shipped": [],
    "no-rescue": [_NO_RESCUE],
    "no-merge": [
        _NO_RESCUE,
        (_ACC, _ACC.replace("mask=io_mask", "mask=io_mask & (t < 0)[:, None]")),
        (_SUM, _SUM.replace("mask=row_ok", "mask=row_ok & (t < 0)")),
    ],
    "l2-merge": [
        _NO_RESCUE,
        (_ACC, _ACC.replace("row[:, None]", "((t % 4096) * HQ + h)[:, None]")),
        (_SUM, _SUM.replace("RowSum + row", "RowSum + (t % 4096) * HQ + h")),
    ],
    "store-merge": [
        _NO_RESCUE,
        (_ACC, "tl.store(Acc + row[:, None] * HEAD_DIM + d[None, :], acc, mask=io_mask)"),
        (_SUM, "tl.store(RowSum + row, row_sum, mask=row_ok)"),
    ],
    "head-programs": [
        (
            "    g = tl.program_id(0)\n    kvh = tl.program_id(1)\n",
            "    g = tl.program_id(0)\n    kvh = tl.program_id(1) // GROUP\n",
        ),
        (
            "        for hh in range(GROUP):\n            h = kvh * GROUP + hh\n            seg_start, seg_end",
            "        for hh in range(1):\n            h = tl.program_id(1)\n            seg_start, seg_end",
        ),
        ("_attn_fwd_kernel[(num_blocks_max, HKV, key_splits)](", "_attn_fwd_kernel[(num_blocks_max, HQ, key_splits)]("),
    ],
}


def time_forward(T: int, configs: list[str], batch: int, heads: int, kv_heads: int, dim: int) -> dict[str, float]:
    """Median ms of ``attn_fwd`` per ``block:topk`` config (runs in the variant's process)."""
    import torch
    import triton

    from flashmoba.attention.forward import attn_fwd
    from flashmoba.routing.result import block_layout
    from flashmoba.routing.topk import route_triton

    times = {}
    for config in configs:
        block, topk = (int(x) for x in config.split(":"))
        torch.manual_seed(0)
        q = torch.randn(batch * T, heads, dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch * T, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * T
        layout = block_layout(cu, q.shape[0], block)
        _, index = route_triton(q, k, cu, block, topk, True, layout)
        args = (q, k, v, cu, layout[0], layout[1], index.offsets, index.entries, topk, block, True, dim**-0.5, False)
        times[config] = triton.testing.do_bench(lambda: attn_fwd(*args), warmup=30, rep=300, return_mode="median")
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=65536, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--configs", nargs="+", default=["128:8", "64:16", "32:32"], help="block:topk")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    p.add_argument("--time-in-this-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    shape = (args.T, args.configs, args.batch, args.heads, args.kv_heads, args.dim)
    if args.time_in_this_process:  # a variant's child process
        print(json.dumps(time_forward(*shape)))
        return None

    package = Path(__file__).resolve().parents[1] / "flashmoba"
    results = {}
    for name in args.variants:
        with tempfile.TemporaryDirectory() as root:
            shutil.copytree(package, Path(root) / "flashmoba")
            forward = Path(root) / "flashmoba" / "attention" / "forward.py"
            source = forward.read_text()
            for old, new in VARIANTS[name]:
                if source.count(old) != 1:
                    raise SystemExit(f"variant {name}: the edit no longer matches forward.py: {old!r}")
                source = source.replace(old, new)
            forward.write_text(source)
            child = subprocess.run(
                [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--time-in-this-process"],
                env={**os.environ, "PYTHONPATH": root},
                capture_output=True,
                text=True,
                check=True,
            )
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:12s} " + "  ".join(f"{c} {ms:7.3f} ms" for c, ms in results[name].items()), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "fwd_ms": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
