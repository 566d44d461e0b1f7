"""Check multi-GPU training on one host: 1 GPU x 2 accumulated micro-batches vs 2 GPUs with DDP and FSDP2.

All three runs see the same global batches (``flashmoba/train/loop.py``), so their loss curves must agree
up to bf16 noise. On a machine with two GPUs:

    PYTHONPATH=. python3 benchmarks/experiments/multi_gpu_check.py --out $OUT/multi_gpu

writes ``multi_gpu.json`` (every run's log) and ``multi_gpu.md`` (largest loss difference to the 1-GPU run,
tokens/s of each run). Run folders go to --work-dir. On a CPU (2 gloo processes), for a quick look:

    python benchmarks/experiments/multi_gpu_check.py --out /tmp/mg --preset tiny --context 256 \
        --batch-tokens 512 --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# name -> (launcher prefix, extra train flags)
RUNS = {
    "1gpu_accum2": ([sys.executable, "-m", "flashmoba.cli"], ["--grad-accum", "2"]),
    "2gpu_ddp": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flashmoba.cli"], []),
    "2gpu_fsdp2": (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flashmoba.cli"],
        ["--fsdp"],
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/flashmoba_multi_gpu"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch-tokens", type=int, default=16384, help="per micro-batch and GPU")
    parser.add_argument("--max-corpus-mb", type=float, default=16.0)
    args = parser.parse_args(argv)
    common = [
        "train",
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--log-every",
        "1",
        "--checkpoint-every",
        str(args.steps),
        "--max-corpus-mb",
        str(args.max_corpus_mb),
        "--data-dir",
        str(args.work_dir / "data"),
        "--context",
        str(args.context),
        "--batch-tokens",
        str(args.batch_tokens),
        "--kconv",
        "3",
    ]
    logs = {}
    for name, (launcher, extra) in RUNS.items():
        run_dir = args.work_dir / name
        subprocess.run([*launcher, *common, "--out", str(run_dir), *extra], check=True)
        logs[name] = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    reference = [r["loss"] for r in logs["1gpu_accum2"]]
    lines = [
        "| run | max abs loss difference to 1gpu_accum2 | final loss | tokens/s (after step 1) |",
        "|---|---|---|---|",
    ]
    for name, log in logs.items():
        diff = max(abs(r["loss"] - ref) for r, ref in zip(log, reference))
        speed = sum(r["tokens_per_s"] for r in log[1:]) / max(1, len(log) - 1)
        lines.append(f"| {name} | {diff:.4f} | {log[-1]['loss']:.4f} | {speed:,.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(logs, indent=1))
    (args.out / "multi_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
