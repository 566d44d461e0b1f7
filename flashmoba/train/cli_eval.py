"""``flashmoba eval``: perplexity, needle retrieval and router SNR of a trained run.

    flashmoba eval --run runs/tiny                       (CPU: small lengths and sample counts by default)
    flashmoba eval --run runs/small --samples 200 --lengths 1024 2048 4096 8192 16384 32768

Writes ``RUN/eval.json``, ``RUN/retrieval.png``, ``RUN/perplexity_by_position.png`` and ``RUN/loss.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flashmoba.train.evaluate import EvalConfig, evaluate
from flashmoba.train.needles import TASKS, NeedleFactory
from flashmoba.train.plots import plot_loss_curves, plot_position_perplexity, plot_retrieval
from flashmoba.train.run import load_data, model_classes

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder written by flashmoba train")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="needle sequence lengths (default: 1/2 to 2x the training context on CPU, 1K-32K on GPU)")
    parser.add_argument("--samples", type=int, help="samples per task and length (default 10 on CPU, 100 on GPU)")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--context", type=int, help="perplexity context (default: the training context)")
    parser.add_argument("--ppl-tokens", type=int, help="validation tokens scored (default 32K CPU, 1M GPU)")
    parser.add_argument("--batch-tokens", type=int, help="tokens per forward pass (default: the training batch)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-snr", action="store_true", help="skip the router SNR measurement")
    parser.add_argument("--device", choices=("cuda", "cpu"))


def run(args: argparse.Namespace) -> int:
    if not (args.run / "model").is_dir():
        raise SystemExit(f"{args.run} has no trained model (no model/ folder): train it to the end first")
    stored = json.loads((args.run / "run.json").read_text())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    context = stored["context"]
    config = EvalConfig(
        context=args.context or context,
        ppl_tokens=args.ppl_tokens or (1_000_000 if on_gpu else 32_768),
        batch_tokens=args.batch_tokens or stored["batch_tokens"],
        tasks=tuple(args.tasks),
        lengths=tuple(args.lengths or ((1024, 2048, 4096, 8192, 16384, 32768) if on_gpu else
                                       (context // 2, context, 2 * context))),
        samples=args.samples or (100 if on_gpu else 10),
        seed=args.seed,
        snr=not args.no_snr,
    )
    data = load_data(Path(stored["data_dir"]) if stored["data_dir"] else args.run / "data")
    _, model_cls = model_classes()
    model = model_cls.from_pretrained(str(args.run / "model")).to(device)
    results = evaluate(model, data.val, NeedleFactory(data.tokenizer, data.val), config, device)
    (args.run / "eval.json").write_text(json.dumps(results, indent=2))

    name = args.run.name
    plot_retrieval({name: results["retrieval"]}, args.run / "retrieval.png", train_context=context)
    plot_position_perplexity({name: results["perplexity"]}, args.run / "perplexity_by_position.png")
    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    plot_loss_curves({name: log}, args.run / "loss.png")
    print(f"validation perplexity {results['perplexity']['ppl']:.3f} over {results['perplexity']['tokens']} tokens")
    for row in results["retrieval"]:
        print(f"{row['task']:>14} {row['length']:>6}: {row['correct']:>4}/{row['total']} "
              f"= {row['accuracy']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]")
    if results["router_snr"].get("note"):
        print(results["router_snr"]["note"])
    print(f"results: {args.run / 'eval.json'} and PNGs in {args.run}")
    return 0
