"""Evaluation: validation perplexity (overall and by position), needle retrieval, router SNR.

* Perplexity: the validation documents cut into sequences of the evaluation context, packed, scored with
  teacher forcing; also per bucket of the predicted token's position inside its sequence (does the model
  use long context?).
* Retrieval: the S-NIAH analogues of ``flashmoba.train.needles`` at each length (also past the
  training context); a sample counts as correct when greedy decoding reproduces the whole answer; every
  cell reports its counts and a Wilson 95% interval.
* Router SNR per MoBA layer, from ``flashmoba.theory.measure_router_snr`` on needle sequences (skipped,
  with the reason recorded, when it is unavailable or the model has no MoBA layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from flashmoba._checks import check_int
from flashmoba.theory.simulate import RetrievalEstimate
from flashmoba.train.data import TokenizedCorpus
from flashmoba.train.needles import TASKS, NeedleFactory, answer_correct
from flashmoba.train.packing import PackedBatch, pack_sequences, sequence_chunks

# Needle sequences of the evaluation context measured for the router SNR (it loops over sequences and heads).
SNR_SEQUENCES = 2
# The reference MoBA attention holds float32 logits, their masked copy and the probabilities of one sequence,
# [HQ, L, L] each, and two boolean masks of that shape at once.
_REFERENCE_BYTES_PER_SCORE = 3 * 4 + 2
# The float32 logits [N, V] of a packed row and one working copy of them (log-softmax, bfloat16 -> float32).
_BYTES_PER_LOGIT = 2 * 4

__all__ = [
    "EvalConfig",
    "perplexity",
    "needle_retrieval",
    "router_snr",
    "evaluate",
    "estimate_memory",
    "uses_reference_attention",
]


@dataclass
class EvalConfig:
    """What to evaluate and how much of it."""

    context: int = 4096
    ppl_tokens: int = 1_000_000
    batch_tokens: int = 32768
    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    samples: int = 100
    seed: int = 1234
    snr: bool = True

    def __post_init__(self):
        for name in ("context", "ppl_tokens", "batch_tokens", "samples"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {tuple(TASKS)}, got {self.tasks}")
        if not self.lengths:
            raise ValueError(f"lengths must be positive ints, got {self.lengths}")
        self.lengths = tuple(check_int(f"lengths[{i}]", n, 1) for i, n in enumerate(self.lengths))


def uses_reference_attention(model_config: dict, device: torch.device) -> bool:
    """Whether the model's MoBA layers run the reference attention, which builds ``[HQ, L, L]`` matrices:
    on CPU tensors (``attn_backend="auto"`` picks it there) or with ``attn_backend="reference"``."""
    if model_config.get("global_attn", "moba") != "moba":
        return False  # dense layers run causal SDPA, whose fused kernels hold no [L, L] matrix
    return torch.device(device).type != "cuda" or model_config.get("attn_backend", "auto") == "reference"


def estimate_memory(model_config: dict, longest: int, row_tokens: int, device: torch.device) -> int:
    """Bytes the largest forward pass of an evaluation holds at its peak, roughly (weights, activations of
    size ``[N, hidden]`` and the needle bookkeeping are small next to it and not counted).

    Args:
        model_config: the model's ``config.json`` as a dict (``num_heads``, ``vocab_size``, ``global_attn``,
            ``attn_backend``).
        longest: L, the longest sequence evaluated. row_tokens: N, the tokens of the largest packed row.
        device: where the model runs.

    Returns:
        ``HQ * L^2`` score bytes when the reference attention runs (``uses_reference_attention``),
        plus ``N * V`` logit bytes.
    """
    heads = model_config.get("num_heads", model_config.get("num_attention_heads"))
    scores = heads * longest**2 * _REFERENCE_BYTES_PER_SCORE if uses_reference_attention(model_config, device) else 0
    return scores + row_tokens * model_config["vocab_size"] * _BYTES_PER_LOGIT


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def _logits(model, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """``[N, V]`` float32 logits of one packed row."""
    batch = batch.to(device)
    with _autocast(device):
        out = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens)
    return out.logits[0].float()


def _position_edges(context: int) -> list[int]:
    """Bucket edges 0, 64, 128, ... (doubling) up to ``context``."""
    edges, edge = [0], 64
    while edge < context:
        edges.append(edge)
        edge *= 2
    return edges + [context]


@torch.no_grad()
def perplexity(model, corpus: TokenizedCorpus, config: EvalConfig, device: torch.device) -> dict:
    """Validation perplexity over sequences of ``config.context`` tokens.

    Returns:
        ``{"loss", "ppl", "tokens", "by_position": [{"start", "end", "loss", "ppl", "tokens"}]}``; a
        token's position is its index inside its sequence (the first token of a sequence is never scored).
    """
    starts, lengths = sequence_chunks(corpus, config.context)
    # A fixed random subset of sequences within the token budget, the same for every model.
    order = np.random.default_rng(config.seed).permutation(len(starts))
    budget = np.cumsum(lengths[order])
    chosen = order[: max(1, int(np.searchsorted(budget, config.ppl_tokens, side="right")))]
    sequences = [corpus.tokens[starts[c] : starts[c] + lengths[c]].astype(np.int64) for c in np.sort(chosen)]
    edges = _position_edges(config.context)
    nll_sum = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    for batch in tqdm(pack_sequences(sequences, config.batch_tokens), desc="perplexity", leave=False):
        logits = _logits(model, batch, device)
        ids = batch.input_ids[0].to(device)
        cu = batch.cu_seqlens.to(device).long()
        n = ids.shape[0]
        seq = torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True)
        position = torch.arange(n, device=device) - cu[seq]
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
        scored = position[1:] > 0  # the target starts no new sequence
        bucket = torch.bucketize(position[1:][scored], torch.tensor(edges[1:-1], device=device), right=True)
        nll_sum += (
            torch.zeros(len(counts), dtype=torch.float64, device=device)
            .index_add_(0, bucket, nll[scored].double())
            .cpu()
            .numpy()
        )
        counts += torch.bincount(bucket, minlength=len(counts)).cpu().numpy()
    total = float(nll_sum.sum() / counts.sum())
    by_position = [
        {"start": a, "end": b, "tokens": int(c), "loss": float(s / c), "ppl": math.exp(s / c)}
        for a, b, s, c in zip(edges[:-1], edges[1:], nll_sum, counts)
        if c > 0
    ]
    return {"loss": total, "ppl": math.exp(total), "tokens": int(counts.sum()), "by_position": by_position}


@torch.no_grad()
def needle_retrieval(model, factory: NeedleFactory, config: EvalConfig, device: torch.device) -> list[dict]:
    """Retrieval accuracy of every (task, length), with counts and Wilson 95% intervals."""
    rows = []
    cells = [(task, length) for task in config.tasks for length in config.lengths]
    for task, length in tqdm(cells, desc="needles", leave=False):
        samples = factory.eval_samples(task, length, config.samples, config.seed)
        correct, cursor = 0, 0
        for batch in pack_sequences([s.tokens for s in samples], max(config.batch_tokens, length)):
            predicted = _logits(model, batch, device).argmax(-1).cpu().numpy()
            cu = batch.cu_seqlens.tolist()
            for a, b in zip(cu[:-1], cu[1:]):
                correct += answer_correct(predicted[a:b], samples[cursor])
                cursor += 1
        low, high = RetrievalEstimate(hits=correct, trials=len(samples)).interval()  # Wilson, 95%
        rows.append(
            {
                "task": task,
                "length": length,
                "correct": correct,
                "total": len(samples),
                "accuracy": correct / len(samples),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def router_snr(model, factory: NeedleFactory, config: EvalConfig, device: torch.device) -> dict:
    """Router SNR of every MoBA layer (``flashmoba.theory.measure_router_snr``) on needle sequences.

    Returns:
        ``{"layers": {layer name: RouterSNR fields}}``, or ``{"layers": None, "note": why}`` when the
        measurement is unavailable or does not apply (e.g. a dense model has no MoBA layer).
    """
    try:
        from flashmoba.theory import measure_router_snr
    except ImportError as e:
        return {"layers": None, "note": f"router SNR skipped: flashmoba.theory.measure_router_snr unavailable ({e})"}
    samples = factory.eval_samples("niah_single_2", config.context, SNR_SEQUENCES, config.seed)
    batch = pack_sequences([s.tokens for s in samples], SNR_SEQUENCES * config.context)[0].to(device)
    try:
        with _autocast(device):
            layers = measure_router_snr(model, batch.input_ids, cu_seqlens=batch.cu_seqlens)
    except ValueError as e:  # no MoBA layer, or sequences too short for its blocks
        return {"layers": None, "note": f"router SNR skipped: {e}"}
    return {"layers": {name: asdict(stats) for name, stats in layers.items()}}


def evaluate(model, val: TokenizedCorpus, factory: NeedleFactory, config: EvalConfig, device: torch.device) -> dict:
    """All three evaluations of one model (in eval mode, on ``device``).

    Returns:
        ``{"perplexity": ..., "retrieval": [...], "router_snr": {...}, "config": {...}}``.
    """
    model.eval()
    results = {
        "perplexity": perplexity(model, val, config, device),
        "retrieval": needle_retrieval(model, factory, config, device),
        "router_snr": router_snr(model, factory, config, device) if config.snr else {"layers": None, "note": "off"},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
    }
    return results
