"""The paper's six-variant experiment at small scale: train each variant, evaluate it, write tables and plots.

Variants (FlashMoBA section 6, all MoBA variants at the same k * B = 1024 keys per query): dense;
MoBA-512/k2; MoBA-256/k4; MoBA-128/k8; MoBA-128/k8 + kconv3; MoBA-128/k8 + kconv5. Every variant gets
the same data, tokens, seed and hyperparameters; only the global layers' attention differs.

On an H100 (roughly 1.5-2 minutes per variant with the defaults, not measured yet; at most 10 minutes per
call, so split; each variant prints its train and eval seconds):

    PYTHONPATH=. python3 benchmarks/experiments/moba_variants.py --out $OUT/a \
        --variants dense moba512_k2 moba256_k4
    PYTHONPATH=. python3 benchmarks/experiments/moba_variants.py --out $OUT/b \
        --variants moba128_k8 moba128_k8_kconv3 moba128_k8_kconv5

then, on any machine, merge the parts into the tables and plots of docs/experiments.md:

    python benchmarks/experiments/moba_variants.py --merge a/results.json b/results.json --out docs/experiments

--out receives at most 5 files (results.json, results.md, loss.png, retrieval.png, perplexity_by_position.png),
rewritten after every variant so that an interrupted call still returns what it finished. The run
folders (data, checkpoints, models) go to --work-dir. A CPU smoke test of the whole script:

    python benchmarks/experiments/moba_variants.py --out /tmp/exp --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import zlib
from pathlib import Path

import torch

from flashmoba.train import cli_eval, cli_train
from flashmoba.train.data import TokenizedCorpus
from flashmoba.train.needles import TASKS
from flashmoba.train.plots import plot_loss_curves, plot_position_perplexity, plot_retrieval
from flashmoba.train.run import model_classes

# name -> overrides of the global (even) layers
VARIANTS = {
    "dense": dict(global_attn="dense"),
    "moba512_k2": dict(global_attn="moba", block_size=512, topk=2),
    "moba256_k4": dict(global_attn="moba", block_size=256, topk=4),
    "moba128_k8": dict(global_attn="moba", block_size=128, topk=8),
    "moba128_k8_kconv3": dict(global_attn="moba", block_size=128, topk=8, kconv=3),
    "moba128_k8_kconv5": dict(global_attn="moba", block_size=128, topk=8, kconv=5),
}
GPU_SETUP = dict(
    preset="small",
    context=4096,
    batch_tokens=32768,
    steps=250,
    lr=1.5e-3,
    warmup=25,
    vocab_size=8192,
    max_corpus_mb=64.0,
    needle_fraction=0.4,
    lengths=[1024, 2048, 4096, 8192, 16384, 32768],
    samples=40,
    ppl_tokens=500_000,
)
# The whole pipeline in a few CPU minutes (tiny model, short sequences, block sizes scaled down by 8).
CPU_SMOKE = dict(
    preset="tiny",
    context=512,
    batch_tokens=1024,
    steps=6,
    lr=3e-3,
    warmup=2,
    vocab_size=512,
    max_corpus_mb=0.5,
    needle_fraction=0.25,
    lengths=[512, 1024],
    samples=3,
    ppl_tokens=4096,
)
RESULT_FILES = ("results.json", "results.md", "loss.png", "retrieval.png", "perplexity_by_position.png")


def _variant_flags(overrides: dict, scale: int) -> list[str]:
    flags = ["--global-attn", overrides["global_attn"]]
    if "block_size" in overrides:
        flags += ["--block-size", str(overrides["block_size"] // scale), "--topk", str(overrides["topk"])]
    flags += ["--kconv", str(overrides.get("kconv", 0))]
    return flags


def _train_and_evaluate(name: str, seed: int, setup: dict, work_dir: Path, scale: int) -> dict:
    run_dir = work_dir / f"{name}_s{seed}"
    train_flags = [
        "--out",
        str(run_dir),
        "--data-dir",
        str(work_dir / "data"),
        "--preset",
        setup["preset"],
        "--context",
        str(setup["context"]),
        "--batch-tokens",
        str(setup["batch_tokens"]),
        "--steps",
        str(setup["steps"]),
        "--lr",
        str(setup["lr"]),
        "--warmup",
        str(setup["warmup"]),
        "--vocab-size",
        str(setup["vocab_size"]),
        "--max-corpus-mb",
        str(setup["max_corpus_mb"]),
        "--needle-fraction",
        str(setup["needle_fraction"]),
        "--seed",
        str(seed),
        "--log-every",
        "5",
        "--eval-every",
        str(max(1, setup["steps"] // 5)),
        "--checkpoint-every",
        str(setup["steps"]),
        *_variant_flags(VARIANTS[name], scale),
    ]
    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    start = time.perf_counter()
    cli_train.run(parser.parse_args(train_flags))
    train_seconds = time.perf_counter() - start

    parser = argparse.ArgumentParser()
    cli_eval.add_arguments(parser)
    start = time.perf_counter()
    cli_eval.run(
        parser.parse_args(
            [
                "--run",
                str(run_dir),
                "--samples",
                str(setup["samples"]),
                "--ppl-tokens",
                str(setup["ppl_tokens"]),
                "--lengths",
                *map(str, setup["lengths"]),
            ]
        )
    )
    eval_seconds = time.perf_counter() - start
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    model_config = json.loads((run_dir / "model_config.json").read_text())
    return {
        "variant": name,
        "seed": seed,
        "data": _data_fingerprint(work_dir / "data"),
        "model_config": model_config,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "log": log,
        "eval": json.loads((run_dir / "eval.json").read_text()),
    }


def _data_fingerprint(data_dir: Path) -> dict:
    """What identifies the training data, to check that runs made in separate calls saw the same."""
    return {
        "tokenizer_crc32": zlib.crc32((data_dir / "tokenizer" / "tokenizer.json").read_bytes()),
        **{
            f"{split}_tokens": int(TokenizedCorpus.load(data_dir / f"{split}.npz").offsets[-1])
            for split in ("train", "val")
        },
    }


def _environment() -> dict:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }


def _mean_snr(run: dict):
    layers = run["eval"]["router_snr"]["layers"]
    if not layers:
        return None
    return {
        key: sum(layer[key] for layer in layers.values()) / len(layers)
        for key in ("snr", "snr_blocks", "delta_mu_eff", "block_correlation", "selected_rate")
    }


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(results: dict) -> str:
    runs = results["runs"]
    setups = {json.dumps(r["setup"], sort_keys=True) for r in runs.values()}
    lines = ["# MoBA variants: results", ""]
    for setup in sorted(setups):
        lines += [f"Setup: `{setup}`", ""]
    for env in sorted({json.dumps(r["environment"], sort_keys=True) for r in runs.values()}):
        lines += [f"Environment: `{env}`", ""]
    for data in sorted({json.dumps(r.get("data"), sort_keys=True) for r in runs.values()}):
        lines += [f"Data: `{data}`", ""]
    lines += [
        "## Language modelling, router statistics, cost",
        "",
        "Validation perplexity on held-out packages (natural text only; needle sequences are not scored here), "
        "overall and for tokens at positions >= half the context. Router SNR: mean over the MoBA layers of "
        "`flashmoba.theory.measure_router_snr` (snr: the paper's formula with measured sigma; snr_blocks: from "
        "the observed spread of block scores; selected: how often the router picks the block of the key "
        "the query attends most). Retrieval average: mean accuracy over all tasks and lengths.",
        "",
        "| run | params | final train loss | val ppl | val ppl (late positions) | retrieval avg | "
        "snr | snr_blocks | delta_mu_eff | selected | train s | tok/s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in runs.items():
        ppl = run["eval"]["perplexity"]
        half = run["setup"]["context"] // 2
        late = [b for b in ppl["by_position"] if b["start"] >= half]
        late_loss = sum(b["loss"] * b["tokens"] for b in late) / max(1, sum(b["tokens"] for b in late))
        retrieval = run["eval"]["retrieval"]
        avg = sum(r["accuracy"] for r in retrieval) / len(retrieval)
        snr = _mean_snr(run) or {}
        tail = run["log"][-5:]
        throughput = sum(r["tokens_per_s"] for r in run["log"][1:]) / max(1, len(run["log"]) - 1)
        lines.append(
            f"| {key} | {run['params'] / 1e6:.1f}M | {sum(r['loss'] for r in tail) / len(tail):.3f} | "
            f"{ppl['ppl']:.3f} | "
            f"{math.exp(late_loss):.3f} | {100 * avg:.1f} | {_fmt(snr.get('snr'))} | {_fmt(snr.get('snr_blocks'))} | "
            f"{_fmt(snr.get('delta_mu_eff'))} | {_fmt(snr.get('selected_rate'))} | {run['train_seconds']:.0f} | "
            f"{throughput:,.0f} | {run['eval_seconds']:.0f} |"
        )
    lengths = sorted({r["length"] for run in runs.values() for r in run["eval"]["retrieval"]})
    for task in TASKS:
        lines += [
            "",
            f"## Retrieval, {task}: accuracy % [Wilson 95% interval] (correct/total)",
            "",
            "| run | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for key, run in runs.items():
            cells = {r["length"]: r for r in run["eval"]["retrieval"] if r["task"] == task}
            lines.append(
                f"| {key} | "
                + " | ".join(
                    f"{100 * c['accuracy']:.0f} [{100 * c['ci_low']:.0f}, {100 * c['ci_high']:.0f}] "
                    f"({c['correct']}/{c['total']})"
                    if (c := cells.get(n))
                    else "-"
                    for n in lengths
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path) -> None:
    """results.json, results.md and the three PNGs into ``out`` (all runs in one figure each)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(_markdown(results))
    plot_loss_curves({k: r["log"] for k, r in runs.items()}, out / "loss.png")
    contexts = {r["setup"]["context"] for r in runs.values()}
    plot_retrieval(
        {k: r["eval"]["retrieval"] for k, r in runs.items()},
        out / "retrieval.png",
        train_context=contexts.pop() if len(contexts) == 1 else None,
    )
    plot_position_perplexity({k: r["eval"]["perplexity"] for k, r in runs.items()}, out / "perplexity_by_position.png")


def merge(paths: list[Path]) -> dict:
    """One results dict from several results.json files (a later file wins on a repeated run), runs in
    the order of :data:`VARIANTS`, seed by seed."""
    runs = {}
    for path in paths:
        runs.update(json.loads(Path(path).read_text())["runs"])
    fingerprints = {json.dumps(run.get("data"), sort_keys=True) for run in runs.values()}
    if len(fingerprints) > 1:
        print(f"warning: the merged runs were trained on different data: {sorted(fingerprints)}", file=sys.stderr)
    order = list(VARIANTS)
    return {"runs": dict(sorted(runs.items(), key=lambda item: (item[1]["seed"], order.index(item[1]["variant"]))))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the (at most 5) result files")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per variant and seed")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/flashmoba_experiment"),
        help="run folders (shared data, checkpoints, models)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="only merge these results.json files into --out (no training)",
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, few steps: test the script on a CPU")
    for key, value in GPU_SETUP.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=kind,
            nargs="+" if isinstance(value, list) else None,
            help=f"default {value} (GPU), {CPU_SMOKE[key]} with --cpu-smoke",
        )
    args = parser.parse_args(argv)
    if args.merge:
        write_outputs(merge(args.merge), args.out)
        return 0
    defaults = CPU_SMOKE if args.cpu_smoke else GPU_SETUP
    setup = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
    scale = 8 if args.cpu_smoke else 1  # block sizes of the tiny smoke model
    _, model_cls = model_classes()
    results = {"runs": {}}
    for seed in args.seeds:
        for name in args.variants:
            print(f"=== {name} (seed {seed}) ===", flush=True)
            run = _train_and_evaluate(name, seed, setup, args.work_dir, scale)
            run["setup"] = setup
            run["environment"] = _environment()
            run["params"] = model_cls.from_pretrained(str(args.work_dir / f"{name}_s{seed}" / "model")).num_parameters()
            results["runs"][f"{name}_s{seed}"] = run
            write_outputs(results, args.out)  # after every run: an interrupted call keeps what it finished
            print(
                f"=== {name} (seed {seed}): trained in {run['train_seconds']:.0f} s, evaluated in "
                f"{run['eval_seconds']:.0f} s ===",
                flush=True,
            )
    print(f"results in {args.out}: {', '.join(RESULT_FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
