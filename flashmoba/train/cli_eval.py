"""``flashmoba eval``: perplexity, needle retrieval and router SNR of a trained run.

    flashmoba eval --run runs/tiny                       (CPU: small lengths and sample counts by default)
    flashmoba eval --run runs/small --samples 200 --lengths 1024 2048 4096 8192 16384 32768

Writes ``RUN/eval.json``, ``RUN/retrieval.png``, ``RUN/perplexity_by_position.png`` and ``RUN/loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from flashmoba._checks import UsageError, check_device, check_int, check_option
from flashmoba.train.evaluate import SNR_SEQUENCES, EvalConfig, estimate_memory, evaluate, uses_reference_attention
from flashmoba.train.needles import TASKS, NeedleFactory
from flashmoba.train.plots import plot_loss_curves, plot_position_perplexity, plot_retrieval
from flashmoba.train.run import load_data, model_classes

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder written by flashmoba train")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="needle sequence lengths (default: 1/2 to 2x the training context on CPU, 1K-32K on GPU)",
    )
    parser.add_argument("--samples", type=int, help="samples per task and length (default 10 on CPU, 100 on GPU)")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--context", type=int, help="perplexity context (default: the training context)")
    parser.add_argument("--ppl-tokens", type=int, help="validation tokens scored (default 32K CPU, 1M GPU)")
    parser.add_argument("--batch-tokens", type=int, help="tokens per forward pass (default: the training batch)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-snr", action="store_true", help="skip the router SNR measurement")
    parser.add_argument("--device", choices=("cuda", "cpu"))


def _check_arguments(args: argparse.Namespace) -> torch.device:
    """A UsageError naming the option for a value or run folder that cannot be evaluated; returns the device."""
    for option in ("--samples", "--context", "--ppl-tokens", "--batch-tokens"):
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            check_option(check_int, option, value, 1)
    for length in args.lengths or ():
        check_option(check_int, "--lengths", length, 1)
    check_option(check_int, "--seed", args.seed, 0)
    device = check_device("--device", args.device)
    if not args.run.is_dir():
        raise UsageError(f"--run {args.run} is not a folder")
    if not (args.run / "run.json").is_file():
        raise UsageError(f"--run {args.run} is not a run folder (no run.json)")
    if not (args.run / "model" / "config.json").is_file():
        raise UsageError(f"--run {args.run} has no trained model (no model/ folder): train it to the end first")
    return device


def _memory_of(device: torch.device) -> int | None:
    """Bytes of memory of ``device`` (the machine's physical memory for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf, or no such name on this system
        return None


def _check_memory(model_config: dict, config: EvalConfig, device: torch.device) -> None:
    """A UsageError before the evaluation starts when its largest forward pass cannot fit in memory."""
    available = _memory_of(device)
    if available is None:
        return
    # Needle rows hold one sequence of each length (or several up to --batch-tokens); perplexity rows hold
    # --batch-tokens, the router SNR one row of SNR_SEQUENCES sequences of the context.
    snr_rows = SNR_SEQUENCES * config.context if config.snr else config.context
    for option, longest, row in (
        ("--lengths", max(config.lengths), max(config.batch_tokens, max(config.lengths))),
        ("--context", config.context, max(config.batch_tokens, snr_rows)),
    ):
        need = estimate_memory(model_config, longest, row, device)
        if need <= available:
            continue
        where = "memory of this machine" if device.type == "cpu" else f"memory of GPU {device}"
        reference = uses_reference_attention(model_config, device)
        what = (
            f"the reference MoBA attention's [{model_config.get('num_heads')} heads, L, L] score matrices "
            "and the logits"
            if reference
            else "the [N, vocabulary] logits"
        )
        how = f"with a smaller {option}"
        if reference:
            how = f"on a GPU with the Triton backend (--device cuda), or {how}"
            if model_config.get("attn_backend") == "reference":
                how += " (the model was saved with attn_backend 'reference': set 'auto' in its config.json)"
        raise UsageError(
            f"{option} {longest}: a {longest}-token sequence needs about {need / 1e9:.1f} GB for {what}, "
            f"more than the {available / 1e9:.1f} GB of {where}; run it {how}"
        )


def _check_needles(needles: NeedleFactory, config: EvalConfig) -> None:
    """A UsageError naming --lengths before any model work when a needle sample cannot be built at one of
    them (too short for the needle and its query, or longer than the held-out text)."""
    rng = np.random.default_rng(0)
    for task in config.tasks:
        for length in config.lengths:
            try:
                needles.eval_sample(task, length, 0.5, rng)
            except ValueError as err:
                raise UsageError(f"--lengths {length}: {err}") from None


def run(args: argparse.Namespace) -> int:
    device = _check_arguments(args)
    stored = json.loads((args.run / "run.json").read_text())
    model_config = json.loads((args.run / "model" / "config.json").read_text())
    on_gpu = device.type == "cuda"
    context = stored["context"]
    # An option given as 0 is refused above: None alone means "the default".
    config = EvalConfig(
        context=context if args.context is None else args.context,
        ppl_tokens=(1_000_000 if on_gpu else 32_768) if args.ppl_tokens is None else args.ppl_tokens,
        batch_tokens=stored["batch_tokens"] if args.batch_tokens is None else args.batch_tokens,
        tasks=tuple(args.tasks),
        lengths=tuple(
            args.lengths or ((1024, 2048, 4096, 8192, 16384, 32768) if on_gpu else (context // 2, context, 2 * context))
        ),
        samples=(100 if on_gpu else 10) if args.samples is None else args.samples,
        seed=args.seed,
        snr=not args.no_snr,
    )
    _check_memory(model_config, config, device)
    data_dir = Path(stored["data_dir"]) if stored["data_dir"] else args.run / "data"
    if not (data_dir / "data.json").is_file():
        raise UsageError(f"--run {args.run}: its data folder {data_dir} holds no prepared data (no data.json)")
    data = load_data(data_dir)
    needles = NeedleFactory(data.tokenizer, data.val)
    _check_needles(needles, config)
    _, model_cls = model_classes()
    model = model_cls.from_pretrained(str(args.run / "model")).to(device)
    results = evaluate(model, data.val, needles, config, device)
    (args.run / "eval.json").write_text(json.dumps(results, indent=2))

    name = args.run.name
    plot_retrieval({name: results["retrieval"]}, args.run / "retrieval.png", train_context=context)
    plot_position_perplexity({name: results["perplexity"]}, args.run / "perplexity_by_position.png")
    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    plot_loss_curves({name: log}, args.run / "loss.png")
    print(f"validation perplexity {results['perplexity']['ppl']:.3f} over {results['perplexity']['tokens']} tokens")
    for row in results["retrieval"]:
        print(
            f"{row['task']:>14} {row['length']:>6}: {row['correct']:>4}/{row['total']} "
            f"= {row['accuracy']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
        )
    if results["router_snr"].get("note"):
        print(results["router_snr"]["note"])
    print(f"results: {args.run / 'eval.json'} and PNGs in {args.run}")
    return 0
