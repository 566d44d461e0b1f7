"""``flashmoba train``: train a hybrid MoBA language model on packed text with needle sequences mixed in.

CPU, minutes:     flashmoba train --preset tiny --out runs/tiny
GPU:              flashmoba train --preset small --out runs/small --steps 600
several GPUs:     torchrun --nproc_per_node 2 -m flashmoba.cli train --preset small --out runs/small2
long contexts:    torchrun --nproc_per_node 8 -m flashmoba.cli train ... --context-parallel 4   (2 x 4 mesh)
resume:           flashmoba train --out runs/tiny --resume      (the run's own arguments are reused)

Defaults that depend on the preset (context, batch, steps, vocabulary, corpus size, learning rate) come
from :data:`PRESET_DEFAULTS` ("tiny" for CPUs, anything else for GPUs) unless given on the command line.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from flashmoba._checks import UsageError, check_device, check_float, check_int, check_option
from flashmoba.train.data import reads_with_datasets
from flashmoba.train.loop import CHECKPOINT, TrainConfig, init_distributed, train
from flashmoba.train.needles import NeedleFactory
from flashmoba.train.packing import PackedStream, pack_sequences, sequence_chunks
from flashmoba.train.run import check_prepared_data, load_data, model_classes, prepare_data
from flashmoba.train.tokenizer import MIN_VOCAB_SIZE, save_tokenizer

__all__ = ["PRESET_DEFAULTS", "add_arguments", "run"]

PRESET_DEFAULTS = {
    "tiny": dict(context=512, batch_tokens=2048, steps=150, vocab_size=1024, max_corpus_mb=4.0, lr=3e-3, warmup=20),
    "gpu": dict(context=4096, batch_tokens=32768, steps=1000, vocab_size=8192, max_corpus_mb=64.0, lr=1e-3, warmup=50),
}
# Arguments that shape the model or the data; ``--resume`` takes them from run.json.
_MODEL_OVERRIDES = {
    "global_attn": "global_attn",
    "block_size": "moba_block_size",
    "topk": "moba_topk",
    "kconv": "kconv_size",
    "backend": "attn_backend",
}
VAL_LOSS_BATCHES = 2
# Integer options -> their minimum (an option left at None takes its default later)
_INT_OPTIONS = {
    "--context": 2,
    "--batch-tokens": 2,
    "--grad-accum": 1,
    "--steps": 1,
    "--warmup": 0,
    "--seed": 0,
    "--log-every": 1,
    "--eval-every": 0,
    "--checkpoint-every": 1,
    "--stop-at": 1,
    "--context-parallel": 1,
}
# The shortest needle sequence of the training mix (an eighth of the context when that is longer).
_MIN_NEEDLE_LENGTH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--preset", default="tiny", help="model preset: tiny (CPU), small (GPU), ...")
    model = parser.add_argument_group("model (overrides of the preset)")
    model.add_argument("--global-attn", choices=("moba", "dense"))
    model.add_argument("--block-size", type=int, help="MoBA block size")
    model.add_argument("--topk", type=int, help="MoBA top-k (the own block counts)")
    model.add_argument("--kconv", type=int, help="key convolution width (0 = off)")
    model.add_argument("--backend", choices=("auto", "reference", "triton"))
    model.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="any other config field, e.g. num_hidden_layers=4 (values parsed as JSON)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="python",
        help="'python' (this installation's source), a folder, .txt/.jsonl/.parquet, or a datasets name",
    )
    data.add_argument("--text-field", default="text")
    data.add_argument(
        "--data-dir", type=Path, help="tokenizer + tokenized data (default OUT/data; share it across runs)"
    )
    data.add_argument("--max-corpus-mb", type=float, help="character budget of the default corpus, in millions")
    data.add_argument("--tokenizer", choices=("bpe", "bytes"), default="bpe")
    data.add_argument("--vocab-size", type=int)
    data.add_argument(
        "--needle-fraction",
        type=float,
        default=0.2,
        help="share of training tokens in synthetic key-value retrieval sequences",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--context", type=int, help="training context (longest sequence)")
    opt.add_argument("--batch-tokens", type=int, help="tokens per micro-batch and process")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--steps", type=int)
    opt.add_argument("--lr", type=float)
    opt.add_argument("--warmup", type=int)
    opt.add_argument("--min-lr-ratio", type=float, default=0.1)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--activation-checkpointing", action="store_true")
    opt.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decoder layers (default: on with CUDA, off with --fsdp or --context-parallel)",
    )
    opt.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (several processes)")
    opt.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split every micro-batch over N processes (a divisor of the number of processes; "
        "--batch-tokens divisible by 2 N)",
    )
    opt.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    log = parser.add_argument_group("bookkeeping")
    log.add_argument("--log-every", type=int, default=10)
    log.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0 = at the end only)")
    log.add_argument("--checkpoint-every", type=int, default=200)
    log.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this step; --resume continues")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    defaults = PRESET_DEFAULTS["tiny" if args.preset == "tiny" else "gpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# model config fields the run derives from other options (--set of them would be overwritten)
_SET_BY_OPTIONS = {
    "vocab_size": "the tokenizer (--vocab-size)",
    "max_position_embeddings": "--context",
}


def _model_config(args: argparse.Namespace, vocab_size: int):
    """The model configuration; a UsageError naming the options behind a field it refuses."""
    config_cls, _ = model_classes()
    options = {_option(arg): field for arg, field in _MODEL_OVERRIDES.items() if getattr(args, arg) is not None}
    overrides = {field: getattr(args, arg) for arg, field in _MODEL_OVERRIDES.items() if getattr(args, arg) is not None}
    own, generic = config_cls.field_names()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set takes KEY=VALUE items, got {item!r}")
        if key not in own and key not in generic:
            raise UsageError(f"--set {item}: unknown model config field {key!r}; the fields are {', '.join(own)}")
        options[f"--set {key}"] = key
        overrides[key] = _parse_value(value)
    overrides["vocab_size"] = -(-vocab_size // 64) * 64  # a multiple of 64 for tensor cores
    overrides["max_position_embeddings"] = args.context
    options.setdefault("--context", "max_position_embeddings")
    try:
        return config_cls.from_preset(args.preset, **overrides)
    except (TypeError, ValueError) as e:
        named = [option for option, field in options.items() if re.search(rf"\b{field}\b", str(e))]
        raise UsageError(f"{', '.join(named) or f'--preset {args.preset}'}: {e}") from None


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_tokens=args.batch_tokens,
        grad_accum=args.grad_accum,
        max_seqlen=args.context,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup,
        seed=args.seed,
        log_every=args.log_every,
        eval_every=args.eval_every or args.steps,
        checkpoint_every=args.checkpoint_every,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        fsdp=args.fsdp,
        context_parallel=args.context_parallel,
    )


def _resumed_arguments(args: argparse.Namespace) -> argparse.Namespace:
    stored = json.loads((args.out / "run.json").read_text())
    kept = {"out": args.out, "resume": True, "stop_at": args.stop_at, "device": args.device}
    restored = argparse.Namespace(**{"context_parallel": 1, **stored, **kept})
    if restored.data_dir is not None:
        restored.data_dir = Path(restored.data_dir)
    return restored


def _check_out(args: argparse.Namespace) -> None:
    """--out must be a new (or empty of runs) folder, or with --resume a run folder with a checkpoint."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run folder")
    if args.resume:
        if not (out / "run.json").is_file():
            raise UsageError(f"--resume: {out} is not a run folder (no run.json)")
        if not (out / CHECKPOINT).is_file():
            raise UsageError(f"--resume: {out} has no {CHECKPOINT} to resume from")
    elif (out / "run.json").exists() or (out / CHECKPOINT).exists():
        raise UsageError(f"--out {out} already holds a run: pass --resume to continue it, or choose another folder")


def _check_arguments(args: argparse.Namespace) -> None:
    """A UsageError naming the option for any value the run cannot use (cheap: before any data is read)."""
    from flashmoba.models.config import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    for option, minimum in _INT_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            check_option(check_int, option, value, minimum)
    if args.tokenizer == "bpe":
        check_option(check_int, "--vocab-size", args.vocab_size, MIN_VOCAB_SIZE)
    for option in ("--max-corpus-mb", "--lr"):
        check_option(check_float, option, getattr(args, option[2:].replace("-", "_")), positive=True)
    if int(args.max_corpus_mb * 1e6) < 1:
        raise UsageError(f"--max-corpus-mb must be >= 1e-6 (one character), got {args.max_corpus_mb}")
    if not 0 <= check_option(check_float, "--min-lr-ratio", args.min_lr_ratio) <= 1:
        raise UsageError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 <= check_option(check_float, "--needle-fraction", args.needle_fraction) < 1:
        raise UsageError(f"--needle-fraction must be in [0, 1), got {args.needle_fraction}")
    if args.batch_tokens % (2 * args.context_parallel):
        raise UsageError(
            f"--batch-tokens ({args.batch_tokens}) must be divisible by 2 x --context-parallel "
            f"({2 * args.context_parallel}): each process takes two equal chunks of every micro-batch"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % args.context_parallel:
        raise UsageError(
            f"--context-parallel {args.context_parallel} must divide the number of processes ({world_size})"
        )
    if args.context > args.batch_tokens:
        raise UsageError(f"--context ({args.context}) must not exceed --batch-tokens ({args.batch_tokens})")
    for item in args.set:
        key = item.partition("=")[0]
        if key in _SET_BY_OPTIONS:
            raise UsageError(f"--set {item}: {key} is set by {_SET_BY_OPTIONS[key]}; use that instead")
    if args.needle_fraction > 0 and args.context < _MIN_NEEDLE_LENGTH:
        raise UsageError(
            f"--context must be >= {_MIN_NEEDLE_LENGTH} for needle sequences, got {args.context} "
            "(or pass --needle-fraction 0)"
        )
    if reads_with_datasets(args.data) and importlib.util.find_spec("datasets") is None:
        raise UsageError(
            f"--data {args.data}: reading it needs datasets (not installed): pip install 'flashmoba[train]'"
        )
    check_device("--device", args.device)
    # The vocabulary is known once the tokenizer is trained: any size checks the other fields now.
    _model_config(args, MIN_VOCAB_SIZE)


def run(args: argparse.Namespace) -> int:
    _check_out(args)
    if args.resume:
        args = _resumed_arguments(args)
    args = _fill_defaults(args)
    _check_arguments(args)
    data_dir = args.data_dir or args.out / "data"
    recipe = dict(
        source=args.data,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        max_chars=int(args.max_corpus_mb * 1e6),
        text_field=args.text_field,
    )
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} is a file, not a folder")
    try:
        check_prepared_data(data_dir, **recipe)
    except ValueError as e:
        raise UsageError(f"--data-dir: {e}") from None
    where = init_distributed(args.device)
    if where.is_main:  # one process trains the tokenizer, the others read what it wrote
        data = prepare_data(data_dir, **recipe)
    if where.world_size > 1:
        torch.distributed.barrier()
    if not where.is_main:
        data = load_data(data_dir)

    config = _train_config(args)
    model_config = _model_config(args, data.tokenizer.get_vocab_size())
    if where.is_main and not args.resume:
        args.out.mkdir(parents=True, exist_ok=True)
        stored = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.out / "run.json").write_text(json.dumps(stored, indent=2))
        model_config.to_json_file(str(args.out / "model_config.json"))
    torch.manual_seed(args.seed)
    _, model_cls = model_classes()
    model = model_cls(model_config)
    if where.is_main:
        print(
            f"flashmoba train: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{len(data.train.tokens) / 1e6:.1f}M training tokens, {where.world_size} process(es) on {where.device}"
        )

    needles = NeedleFactory(data.tokenizer, data.train)
    mix = (
        functools.partial(
            needles.training_sequences,
            seed=args.seed,
            token_budget=int(args.needle_fraction * args.batch_tokens),
            min_length=max(_MIN_NEEDLE_LENGTH, args.context // 8),
            max_length=args.context,
        )
        if args.needle_fraction > 0
        else None
    )
    stream = PackedStream(data.train, args.batch_tokens, args.context, seed=args.seed, extra_sequences=mix)
    starts, lengths = sequence_chunks(data.val, args.context)
    val_sequences = [data.val.tokens[s : s + n] for s, n in zip(starts, lengths)]
    # Every process scores the same few batches (FSDP needs all of them in every forward anyway).
    val_batches = pack_sequences(val_sequences, args.batch_tokens)[:VAL_LOSS_BATCHES]

    train(
        model,
        stream,
        config,
        args.out,
        where=where,
        resume=args.resume,
        stop_at_step=args.stop_at,
        val_batches=val_batches,
    )
    if where.is_main and (args.out / "model").exists():
        save_tokenizer(data.tokenizer, args.out / "model")
        print(
            f"flashmoba train: model and tokenizer in {args.out / 'model'}; "
            f"evaluate with: flashmoba eval --run {args.out}"
        )
    if where.world_size > 1:
        torch.distributed.destroy_process_group()
    return 0
