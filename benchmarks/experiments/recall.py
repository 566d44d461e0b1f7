"""Associative recall where routing decides the answer: the paper's two prescriptions at small scale.

Task (``recall_task.py``): multi-query associative recall over natural-text filler; the loss is on the
answer tokens (plus, with weight ``lm_weight``, next-byte prediction on the filler, so that held-out
perplexity means something). Two setups (``--setup``):

* ``1024`` (the grid that ran, the default): 1024-token sequences with 64 single-token pairs, blocks
  scaled down by 4, hidden 64, 4000 updates of 32 sequences, no curriculum;
* ``4096`` (the first pilot's): 4096-token sequences with single- and multi-token keys, hidden 256, and a
  length curriculum (``curriculum``: the first steps see an eighth, a quarter, a half of the length, with
  as many more sequences per step, the last 40 % full length); dense learned no retrieval in it.

Model: the hybrid decoder of :mod:`flashmoba.models` with one sliding-window layer (RoPE)
and one global layer (no positional encoding), so the global layer is the only way to reach a pair more
than a window back: with MoBA, its router decides whether the answer can be found.

Variants (named at scale 1, where every MoBA variant attends 1024 of 4096 keys; ``block_scale`` divides
the blocks): dense; MoBA 512/k2, 256/k4, 128/k8, 64/k16; 128/k8 + kconv3; dense + kconv3 (control).
Every variant and seed sees the same data and settings; the seed sets the initialisation and the data
stream. After each dense run the trained weights are
also run, without retraining, with MoBA global layers of every block size (the training-free switch;
dense + kconv3 with MoBA + kconv3), so that the block size is the only difference between them.

Measured per run (``recall_metrics.py``): recall by key-query distance with Wilson intervals, router
recall and its chance level, the router SNR against the router recall the theory predicts, the learned
key-convolution weights, held-out perplexity. ``recall_report.py`` turns results.json into results.md
and the plots.

GPU, in calls of at most 10 minutes that resume from each other (each run is written as it finishes);
the grid ran as one process per variant, seven side by side on one GPU:

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/experiments/recall.py --setup 1024 --out $OUT/dense \\
        --variants dense --seeds 0 1 2 --time-limit 545

CPU smoke test of the whole pipeline (tiny model, every variant, the switch, the report):

    python benchmarks/experiments/recall.py --cpu-smoke --out /tmp/recall
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from recall_metrics import evaluate_model
from recall_task import TaskSpec, make_batch, text_bytes

from flashmoba._checks import UsageError
from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM
from flashmoba.nn import KeyConv
from flashmoba.train.data import python_source_corpus
from flashmoba.train.loop import TrainConfig, learning_rate, make_optimizer

# name -> global layer: attention, MoBA block size (at scale 1) and top-k, key-convolution width
VARIANTS = {
    "dense": ("dense", None, None, 0),
    "moba512_k2": ("moba", 512, 2, 0),
    "moba256_k4": ("moba", 256, 4, 0),
    "moba128_k8": ("moba", 128, 8, 0),
    "moba64_k16": ("moba", 64, 16, 0),
    "moba128_k8_kconv3": ("moba", 128, 8, 3),
    "dense_kconv3": ("dense", None, None, 3),
    # only as targets of the training-free switch (not trained by default)
    "moba512_k2_kconv3": ("moba", 512, 2, 3),
    "moba256_k4_kconv3": ("moba", 256, 4, 3),
    "moba64_k16_kconv3": ("moba", 64, 16, 3),
}
GRID = ("dense", "moba512_k2", "moba256_k4", "moba128_k8", "moba64_k16", "moba128_k8_kconv3", "dense_kconv3")
# trained variant -> the MoBA variants its weights are run with, unchanged: every block size at the same
# attended keys, so that block size is the only difference
SWITCH = {
    "dense": ("moba512_k2", "moba256_k4", "moba128_k8", "moba64_k16"),
    "dense_kconv3": ("moba512_k2_kconv3", "moba256_k4_kconv3", "moba128_k8_kconv3", "moba64_k16_kconv3"),
}
TASK_FIELDS = ("seq_len", "num_pairs", "num_values", "single_alphabet", "multi_alphabet", "key_lengths")
MODEL_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "swa_window")
GPU_SETUP = dict(
    seq_len=4096,
    num_pairs=256,
    num_values=2048,
    single_alphabet=5744,
    multi_alphabet=16,
    key_lengths=[1, 2, 3, 4],
    hidden_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=64,
    intermediate_size=704,
    swa_window=256,
    block_scale=1,
    batch_seqs=8,
    steps=1600,
    curriculum=[[0.2, 8], [0.2, 4], [0.2, 2], [0.4, 1]],
    lr=3e-3,
    warmup=80,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    lm_weight=0.1,
    lm_stride=4,
    eval_seqs=64,
    eval_chunk=16,
    router_batches=1,
    snr_seqs=2,
    ppl_seqs=32,
    corpus_chars=4_000_000,
    log_every=25,
)
# The grid that ran (docs/experiments.md): 1024-token sequences, blocks scaled down by 4 (so every MoBA
# variant attends a quarter of the sequence, as 1024 of 4096 keys), single-token keys and a small model,
# where dense + kconv3 leaves the plateau within 4000 updates in some seeds.
GRID_1024 = dict(
    GPU_SETUP,
    seq_len=1024,
    num_pairs=64,
    num_values=256,
    single_alphabet=1024,
    multi_alphabet=4,
    key_lengths=[1],
    hidden_size=64,
    num_heads=2,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=128,
    swa_window=32,
    block_scale=4,
    batch_seqs=32,
    steps=4000,
    curriculum=[],
    warmup=50,
    eval_seqs=64,
    eval_chunk=32,
    ppl_seqs=8,
    corpus_chars=1_000_000,
    log_every=100,
)
SETUPS = {"4096": GPU_SETUP, "1024": GRID_1024}
# The same pipeline in about a minute on 2 CPU cores: sequences and block sizes scaled down by 8.
CPU_SMOKE = dict(
    GPU_SETUP,
    seq_len=512,
    num_pairs=16,
    num_values=64,
    single_alphabet=256,
    multi_alphabet=4,
    hidden_size=32,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=64,
    swa_window=32,
    block_scale=8,
    batch_seqs=4,
    steps=4,
    lr=3e-3,
    warmup=1,
    eval_seqs=8,
    eval_chunk=4,
    snr_seqs=2,
    ppl_seqs=2,
    corpus_chars=200_000,
    log_every=2,
)
EVAL_SEED = 1_000_003  # the evaluation batches: one fixed set for every run


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setup_id(setup: dict) -> str:
    """A short fingerprint of a setup: runs are comparable only within one."""
    return f"{zlib.crc32(json.dumps(setup, sort_keys=True).encode()):08x}"


def task_spec(setup: dict, divisor: int = 1) -> TaskSpec:
    """The task at ``seq_len / divisor`` tokens with ``num_pairs / divisor`` pairs (the same density)."""
    fields = {k: tuple(setup[k]) if k == "key_lengths" else setup[k] for k in TASK_FIELDS}
    fields.update(seq_len=setup["seq_len"] // divisor, num_pairs=max(1, setup["num_pairs"] // divisor))
    return TaskSpec(**fields)


def curriculum(setup: dict) -> list[int]:
    """The length divisor of every training step: ``setup["curriculum"]`` lists ``[share of the steps,
    divisor]`` phases in order (sequences ``seq_len / divisor`` long, ``divisor`` times as many per step,
    so every step has the same tokens); the last phase takes the steps left over."""
    steps, phases = setup["steps"], []
    for share, divisor in setup["curriculum"]:
        phases += [divisor] * round(share * steps)
    last = setup["curriculum"][-1][1] if setup["curriculum"] else 1
    return (phases + [last] * steps)[:steps]


def model_config(variant: str, setup: dict, backend: str) -> MoBAHybridConfig:
    """The hybrid config of ``variant``: only the global layer's attention type, block, top-k and kconv vary."""
    attn, block, topk, kconv = VARIANTS[variant]
    moba = {} if block is None else {"moba_block_size": block // setup["block_scale"], "moba_topk": topk}
    return MoBAHybridConfig(
        vocab_size=task_spec(setup).vocab_size,
        **{k: setup[k] for k in MODEL_FIELDS},
        global_attn=attn,
        kconv_size=kconv,
        max_position_embeddings=setup["seq_len"],
        tie_word_embeddings=True,
        attn_backend=backend,
        **moba,
    )


def _corpus(setup: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out filler bytes: this interpreter's Python source, split by package."""
    splits = python_source_corpus(max_chars=setup["corpus_chars"])
    return text_bytes(splits.train), text_bytes(splits.val)


def _eval_batches(setup: dict, val_text: torch.Tensor) -> list:
    g = torch.Generator().manual_seed(EVAL_SEED)
    spec, chunk = task_spec(setup), setup["eval_chunk"]
    return [make_batch(spec, chunk, val_text, g) for _ in range(max(1, setup["eval_seqs"] // chunk))]


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kconv_weights(model) -> list[dict]:
    """Every key convolution's learned weight: per lag (0 = the current key) its mean, mean |w| and max |w|."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, KeyConv):
            w = module.weight.detach().double().cpu().flip(1)  # column l: the key l tokens back
            out.append(
                {
                    "layer": name,
                    "mean_by_lag": w.mean(0).tolist(),
                    "abs_mean_by_lag": w.abs().mean(0).tolist(),
                    "abs_max_by_lag": w.abs().amax(0).tolist(),
                    "norm": float(w.norm()),
                }
            )
    return out


def _loss(model, batch, setup, lm_positions, autocast):
    """Answer cross entropy, and the filler next-token cross entropy at ``lm_positions``."""
    with autocast:
        hidden = model.model(input_ids=batch.tokens).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        answer_logits = model.lm_head(hidden[rows, batch.answer_pos - 1])
        answer = F.cross_entropy(answer_logits.float().flatten(0, 1), batch.values.flatten())
        if not setup["lm_weight"]:
            return answer, torch.zeros_like(answer)
        lm_logits = model.lm_head(hidden[:, lm_positions])
        ce = F.cross_entropy(
            lm_logits.float().flatten(0, 1), batch.tokens[:, lm_positions + 1].flatten(), reduction="none"
        )
        mask = batch.text_mask[:, lm_positions].flatten()
        return answer, (ce * mask).sum() / mask.sum().clamp(min=1)


def train_run(variant, seed, setup, device, backend, texts, eval_batches, curve_every=0):
    """Train one (variant, seed); returns ``(model, log, curve, train_seconds)``."""
    torch.manual_seed(seed)
    model = MoBAHybridForCausalLM(model_config(variant, setup, backend)).to(device)
    config = TrainConfig(
        steps=setup["steps"],
        batch_tokens=setup["batch_seqs"] * setup["seq_len"],
        max_seqlen=setup["seq_len"],
        lr=setup["lr"],
        warmup_steps=setup["warmup"],
        min_lr_ratio=setup["min_lr_ratio"],
        weight_decay=setup["weight_decay"],
    )
    optimizer = make_optimizer(model, config)
    g, autocast = torch.Generator().manual_seed(seed), _autocast(device)
    phases = curriculum(setup)
    specs = {d: task_spec(setup, d) for d in set(phases)}
    stride, tokens_per_step = setup["lm_stride"], setup["batch_seqs"] * setup["seq_len"]
    log, curve, train_seconds = [], [], 0.0
    model.train()
    _sync(device)
    start = time.perf_counter()
    for step in range(setup["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        divisor = phases[step]
        batch = make_batch(specs[divisor], setup["batch_seqs"] * divisor, texts[0], g)
        offset = int(torch.randint(0, stride, (), generator=g))
        if device.type == "cuda":
            batch = batch.pin().to(device)
        lm_positions = torch.arange(offset, specs[divisor].seq_len - 1, stride, device=device)
        answer, lm = _loss(model, batch, setup, lm_positions, autocast)
        (answer + setup["lm_weight"] * lm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % setup["log_every"] == 0 or done == setup["steps"]:
            log.append(
                {
                    "step": done,
                    "tokens": done * tokens_per_step,
                    "loss": float(answer.detach()),
                    "lm_loss": float(lm.detach()),
                }
            )
        if curve_every and (done % curve_every == 0 or done == setup["steps"]):
            _sync(device)
            train_seconds += time.perf_counter() - start
            counts = evaluate_model(model, eval_batches[:1], dict(setup, ppl_seqs=0, router_batches=0), None, autocast)
            recall = counts["recall"]
            curve.append(
                {
                    "step": done,
                    "tokens": done * tokens_per_step,
                    "recall": recall["correct"] / recall["total"],
                    **{k: v["correct"] / max(1, v["total"]) for k, v in recall["by_key"].items()},
                }
            )
            print(
                f"    step {done} ({done * tokens_per_step / 1e6:.1f}M tokens, {train_seconds:.1f} s): recall "
                f"{curve[-1]['recall']:.4f}, answer loss {float(answer.detach()):.3f}",
                flush=True,
            )
            start = time.perf_counter()
    _sync(device)
    train_seconds += time.perf_counter() - start
    return model, log, curve, train_seconds


def _record(variant, seed, setup, metrics, extra) -> dict:
    """One results.json record (the issue's keys first, then the details)."""
    _, block, topk, kconv = VARIANTS[variant]
    recall = metrics["recall"]
    layers = metrics["router"]
    first = next(iter(layers.values()), {})  # the model's one global layer
    return {
        "variant": variant,
        "seed": seed,
        "block_size": None if block is None else block // setup["block_scale"],
        "topk": topk,
        "kconv": kconv,
        "tokens": setup["steps"] * setup["batch_seqs"] * setup["seq_len"],
        "recall": recall["correct"] / recall["total"],
        "recall_by_distance": recall["by_distance"],
        "router_recall": first.get("router_recall"),
        "router_chance": first.get("router_chance"),
        "snr_measured": first.get("snr"),
        "train_seconds": extra.pop("train_seconds", None),
        "setup_id": setup_id(setup),
        "correct": recall["correct"],
        "total": recall["total"],
        "recall_by_key": recall["by_key"],
        "router_layers": layers,
        "router_snr_layerwide": metrics["router_snr_layerwide"],
        "perplexity": metrics.get("perplexity"),
        **extra,
    }


def _switch(model, variant, seed, setup, backend, eval_batches, autocast) -> list[dict]:
    """The trained ``variant``'s weights run with each of its MoBA variants (no retraining)."""
    records = []
    state = model.state_dict()
    for target in SWITCH.get(variant, ()):
        switched = MoBAHybridForCausalLM(model_config(target, setup, backend)).to(next(model.parameters()).device)
        switched.load_state_dict(state, strict=True)  # same parameter names: only the attention type differs
        metrics = evaluate_model(switched, eval_batches, dict(setup, ppl_seqs=0), None, autocast)
        records.append(_record(target, seed, setup, metrics, {"source": variant}))
    return records


def _environment(device) -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        # a snapshot of the repository run elsewhere names its commit in a COMMIT file
        "commit": Path("COMMIT").read_text().strip() if Path("COMMIT").is_file() else None,
    }


def _load(paths) -> dict:
    results = {"setups": {}, "environments": [], "runs": [], "switch": [], "probes": []}
    for path in paths or ():
        part = json.loads(Path(path).read_text())
        for key in results:
            if key == "setups":
                results[key].update(part.get(key, {}))
            else:
                results[key] += [r for r in part.get(key, []) if r not in results[key]]
    return results


def _write(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")  # never a half-written file


def _probe(variants, setup, device, backend, texts, steps) -> list[dict]:
    """Seconds per training step of every variant (``steps`` steps; the first, with compilation, apart)."""
    probes = []
    for variant in variants:
        probe_setup = dict(setup, steps=steps, log_every=steps)
        _sync(device)
        start = time.perf_counter()
        train_run(variant, 0, dict(probe_setup, steps=1), device, backend, texts, [])
        first = time.perf_counter() - start
        _, _, _, seconds = train_run(variant, 0, probe_setup, device, backend, texts, [])
        probes.append(
            {"variant": variant, "first_run_s": first, "step_s": seconds / steps, "setup_id": setup_id(setup)}
        )
        print(f"probe {variant}: {1000 * seconds / steps:.1f} ms/step (first call {first:.1f} s)", flush=True)
    return probes


def _parse_set(items, setup) -> dict:
    setup = dict(setup)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in setup:
            raise UsageError(f"--set takes KEY=VALUE with KEY one of {', '.join(setup)}; got {item!r}")
        try:
            setup[key] = json.loads(value)
        except json.JSONDecodeError:
            raise UsageError(f"--set {item}: the value must be JSON (a number, a list, ...)") from None
    try:
        for _, divisor in setup["curriculum"] or [[1, 1]]:
            task_spec(setup, divisor)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--set: {e}") from None
    return setup


def _arguments(argv):
    parser = _Parser(prog="recall.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json (and the report)")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(GRID))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="none: only --probe-steps")
    parser.add_argument("--resume", type=Path, nargs="+", help="results.json files whose runs are kept and skipped")
    parser.add_argument("--time-limit", type=float, default=0.0, help="start no run that would end past it (s)")
    parser.add_argument(
        "--setup", choices=tuple(SETUPS), default="1024", help="the setup (sequence length) that --set edits"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a setup entry")
    parser.add_argument("--curve-every", type=int, default=0, help="recall on one eval batch every N steps")
    parser.add_argument("--probe-steps", type=int, default=0, help="first time N training steps of every variant")
    parser.add_argument("--no-switch", action="store_true", help="skip the training-free switch")
    parser.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny setup on the CPU, then the report")
    parser.add_argument(
        "--report", type=Path, nargs="+", help="only merge these results.json into --out and write the report"
    )
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    for path in args.resume or []:
        if not path.is_file():
            raise UsageError(f"--resume {path}: no such file")
    if any(s < 0 for s in args.seeds) or args.curve_every < 0 or args.probe_steps < 0 or args.time_limit < 0:
        raise UsageError("--seeds, --curve-every, --probe-steps and --time-limit must be >= 0")
    return args


def run(args) -> int:
    """Train (or resume) the requested runs, writing results.json after each; see the module docstring."""
    from recall_report import write_report

    if args.report:
        for path in args.report:
            if not path.is_file():
                raise UsageError(f"--report {path}: no such file")
        merged = _load(args.report)
        args.out.mkdir(parents=True, exist_ok=True)
        _write(merged, args.out)  # the merged results.json next to its report
        write_report(merged, args.out)
        return 0
    call_start = time.perf_counter()
    setup = _parse_set(args.set, CPU_SMOKE if args.cpu_smoke else SETUPS[args.setup])
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
    results = _load(args.resume)
    results["setups"][setup_id(setup)] = setup
    results["environments"].append(_environment(device))
    args.out.mkdir(parents=True, exist_ok=True)
    texts = _corpus(setup)
    eval_batches = _eval_batches(setup, texts[1])
    autocast = _autocast(device)
    for variant in args.variants if args.probe_steps else ():
        results["probes"] += _probe([variant], setup, device, backend, texts, args.probe_steps)
        _write(results, args.out)
    done = {(r["variant"], r["seed"], r["setup_id"]) for r in results["runs"]}
    durations = []
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed, setup_id(setup)) in done:
                continue
            elapsed = time.perf_counter() - call_start
            if args.time_limit and durations and elapsed + 1.1 * max(durations) + 10 > args.time_limit:
                print(f"stopping at {elapsed:.0f} s: the next run would pass --time-limit", flush=True)
                return 0
            run_start = time.perf_counter()
            model, log, curve, train_seconds = train_run(
                variant, seed, setup, device, backend, texts, eval_batches, args.curve_every
            )
            eval_start = time.perf_counter()
            metrics = evaluate_model(model, eval_batches, setup, texts[1], autocast)
            extra = {"train_seconds": train_seconds, "log": log, "kconv_weights": _kconv_weights(model)}
            extra.update(params=model.num_parameters(), curve=curve or None)
            record = _record(variant, seed, setup, metrics, extra)
            record["eval_seconds"] = time.perf_counter() - eval_start
            results["runs"].append(record)
            if not args.no_switch:
                results["switch"] += _switch(model, variant, seed, setup, backend, eval_batches, autocast)
            _write(results, args.out)
            durations.append(time.perf_counter() - run_start)
            print(
                f"{variant} seed {seed}: recall {record['recall']:.3f}, router {record['router_recall']}, "
                f"train {train_seconds:.1f} s, run {durations[-1]:.1f} s, "
                f"call {time.perf_counter() - call_start:.0f} s",
                flush=True,
            )
    _write(results, args.out)
    if args.cpu_smoke and results["runs"]:
        write_report(results, args.out)
    return 0


def main(argv=None) -> int:
    try:
        return run(_arguments(argv))
    except UsageError as e:
        print(f"recall.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
