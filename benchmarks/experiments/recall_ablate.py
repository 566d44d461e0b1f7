"""Plateau ablations of the recall experiment on the CPU: one dense (or other) run at a small scale, with the
attention of the induction circuit measured at the end.

A dense model solves MQAR with a two-layer circuit: in the sliding-window layer every context value
attends to the token before it (its key) and copies it (a previous-token head); in the global layer the
query (the key, repeated in the query region) matches that copy and reads the value. This script trains
one run of ``recall.py``'s ``train_run`` at the scale of ``BASE`` (256 tokens, 16 single-token pairs,
64 values, hidden 64, window 32, 32 sequences x 1000 steps), with ``--set`` overrides, and appends one JSON
line to ``--out``: the final recall on the evaluation batches, the recall curve, the final answer loss, and

* ``prev_attn``: the sliding-window layer's attention from each context value to the position before it,
  max over heads, mean over the pairs of the first evaluation batch (uniform attention: ``1 / window``);
* ``retr_attn``: the last layer's attention from each query (the position before its answer) to its pair's
  context value, max over heads, mean over the queries (uniform: about ``1 / seq_len``).

    PYTHONPATH=. python benchmarks/experiments/recall_ablate.py --name base --out /tmp/ablations.jsonl
    PYTHONPATH=. python benchmarks/experiments/recall_ablate.py --name lr0.01 --out ... --set lr=0.01
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from recall import GRID_1024, VARIANTS, _autocast, _corpus, _eval_batches, _parse_set, train_run
from recall_metrics import evaluate_model
from recall_task import RecallBatch

from flashmoba._checks import UsageError

BASE = dict(  # the grid's model and optimiser at a quarter of its length
    GRID_1024,
    seq_len=256,
    num_pairs=16,
    num_values=64,
    single_alphabet=256,
    block_scale=8,
    steps=1000,
    ppl_seqs=0,
    corpus_chars=200_000,
    log_every=50,
)


def attention_probs(attn, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """float32 ``[B, H, T, T]`` causal attention probabilities of one layer.

    Args:
        attn: a dense or sliding-window ``MoBAAttention`` (one key head per query head).
        x: ``[B, T, hidden]`` its input (after the layer's input norm).
        window: keys per query of a sliding-window layer (the query included); None: all past keys.
    """
    if attn.num_kv_heads != attn.num_heads:
        raise ValueError("attention_probs takes one key head per query head")
    batch, seq_len = x.shape[:2]
    q, k = attn.qk(x)  # packed [B * T, H, D], rotated where the layer uses RoPE
    q = q.view(batch, seq_len, attn.num_heads, -1).transpose(1, 2).float()
    k = k.view(batch, seq_len, attn.num_heads, -1).transpose(1, 2).float()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i = torch.arange(seq_len, device=x.device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= i[None, :] > i[:, None] - window
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@torch.no_grad()
def circuit_attention(model, batch: RecallBatch, window: int) -> tuple[float, float]:
    """``(prev_attn, retr_attn)`` of the module docstring on ``batch`` (the model's first layer is its
    sliding-window layer, its last a global one)."""
    layers = list(model.model.layers)
    hidden = model.model.embed_tokens(batch.tokens)
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    first = attention_probs(layers[0].self_attn, layers[0].input_layernorm(hidden), window)
    value_pos = batch.value_pos
    prev = first[rows, :, value_pos, value_pos - 1].amax(-1).mean()  # [S, P, H] -> max over heads
    for layer in layers[:-1]:
        hidden = layer(hidden)
    last = attention_probs(layers[-1].self_attn, layers[-1].input_layernorm(hidden), None)
    retr = last[rows, :, batch.answer_pos - 1, value_pos].amax(-1).mean()
    return float(prev), float(retr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recall_ablate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True, help="JSON-lines file the run's record is appended to")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--filler", choices=("text", "random"), default="text", help="random: uniform bytes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        setup = _parse_set(args.set, BASE)
    except UsageError as e:
        print(f"recall_ablate.py: error: {e}", file=sys.stderr)
        return 2
    if VARIANTS[args.variant][0] != "dense":
        print("recall_ablate.py: error: the attention probes take dense global layers", file=sys.stderr)
        return 2
    texts = _corpus(setup)
    if args.filler == "random":
        g = torch.Generator().manual_seed(7)
        texts = tuple(torch.randint(0, 256, (t.numel(),), generator=g, dtype=torch.uint8) for t in texts)
    evals = _eval_batches(setup, texts[1])
    cpu = torch.device("cpu")
    model, log, curve, seconds = train_run(
        args.variant, args.seed, setup, cpu, "reference", texts, evals, max(1, setup["steps"] // 10)
    )
    recall = evaluate_model(model, evals, dict(setup, router_batches=0), None, _autocast(cpu))["recall"]
    model.eval()
    prev, retr = circuit_attention(model, evals[0], setup["swa_window"])
    record = {
        "name": args.name,
        "variant": args.variant,
        "seed": args.seed,
        "filler": args.filler,
        "overrides": args.set,
        "recall": recall["correct"] / recall["total"],
        "curve": [(c["step"], round(c["recall"], 3)) for c in curve],
        "final_loss": log[-1]["loss"],
        "lm_loss": log[-1]["lm_loss"],
        "seconds": round(seconds, 1),
        "prev_attn": round(prev, 3),
        "retr_attn": round(retr, 3),
    }
    print(json.dumps(record))
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
