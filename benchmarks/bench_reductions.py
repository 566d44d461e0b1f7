"""Scattered float32 row reductions on the GPU: the merge that the attention engine does per (query, block).

Every program adds a ``[ROWS, D]`` float32 tile into ``ROWS`` random rows of an accumulator, as the
forward adds a gathered tile's ``P @ V`` into the output rows and the backward its ``dS @ K`` into dQ.
Variants: ``tl.atomic_add`` (Triton issues 4-wide float32 vector reductions, ``REDG.E.ADD.F32x4``, for a
row-contiguous tile, as it does in the attention kernels), plain stores and plain loads of the same rows
(no read-modify-write: the ceilings of scattering and of gathering 512-byte rows); each into an
accumulator that fits in L2 and into one that does not.

    python benchmarks/bench_reductions.py --out docs/results/reductions_h200.json

Reports GB/s of tile data merged (4 bytes per element), and checks every variant's sums against a
float64 ``index_add``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(Acc, Rows, Vals, D: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    rows = tl.load(Rows + pid * ROWS + r).to(tl.int64)
    vals = tl.load(Vals + (pid % 64) * ROWS * D + r[:, None] * D + d[None, :])  # 64 distinct tiles, cached
    ptrs = Acc + rows[:, None] * D + d[None, :]
    mask = (r < ROWS)[:, None] & (d < D)[None, :]
    if MODE == 0:
        tl.atomic_add(ptrs, vals, mask=mask, sem="relaxed")
    elif MODE == 1:
        tl.store(ptrs, vals, mask=mask)
    else:  # gather: load the rows, keep the loads alive with one tiny store
        got = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(Acc + pid, tl.sum(tl.sum(got, axis=1), axis=0))


MODES = {"atomic_add": 0, "store": 1, "load": 2}


def run(rows_total: int, D: int, tile_rows: int, tiles: int, mode: str, device) -> dict:
    acc = torch.zeros(rows_total, D, device=device)
    rows = torch.randint(0, rows_total, (tiles * tile_rows,), device=device, dtype=torch.int32)
    vals = torch.randn(64 * tile_rows, D, device=device)

    def launch():
        _merge_kernel[(tiles,)](acc, rows, vals, D=D, ROWS=tile_rows, MODE=MODES[mode], num_warps=4)

    launch()
    torch.cuda.synchronize()
    ok = None
    if mode == "atomic_add":
        want = torch.zeros(rows_total, D, device=device, dtype=torch.float64)
        src = vals.double().view(64, tile_rows, D)[torch.arange(tiles, device=device) % 64].reshape(-1, D)
        want.index_add_(0, rows.long(), src)
        ok = bool(torch.allclose(acc.double(), want, rtol=1e-5, atol=1e-4))
    ms = triton.testing.do_bench(launch, warmup=20, rep=200, return_mode="median")
    gbs = tiles * tile_rows * D * 4 / ms / 1e6
    return {
        "mode": mode,
        "acc_MB": rows_total * D * 4 / 1e6,
        "tile_rows": tile_rows,
        "D": D,
        "ms": ms,
        "GB_per_s": gbs,
        "correct": ok,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tile-rows", type=int, default=64)
    p.add_argument("--merged-gb", type=float, default=2.0, help="tile data merged per launch")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    D = args.dim
    tiles = int(args.merged_gb * 1e9 / (args.tile_rows * D * 4))
    results = []
    for acc_mb in (16, 1024):  # in L2 (60 MB on an H200) / not
        rows_total = int(acc_mb * 1e6 / (D * 4))
        for mode in MODES:
            res = run(rows_total, D, args.tile_rows, tiles, mode, "cuda")
            results.append(res)
            print(
                f"acc {acc_mb:5d} MB  {mode:10s} {res['ms']:8.3f} ms  {res['GB_per_s']:8.0f} GB/s  "
                f"correct={res['correct']}",
                flush=True,
            )
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
