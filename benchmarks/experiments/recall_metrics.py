"""What ``recall.py`` measures on a trained model: recall by distance, router recall, router SNR, perplexity.

* Recall: a query is correct when the argmax over the whole vocabulary at the position before its answer
  is the answer. Counted by key-query distance (the tokens from the pair's value in the context to the
  query's answer) and by key kind (single-token / multi-token keys), with Wilson 95 % intervals.
* Router recall, per MoBA layer: over the queries whose pair lies in a *fully past* block (not the
  query's own block, which is always attended), the share of (query, query head) whose router selects
  that block. Chance: a router choosing its ``topk - 1`` past blocks at random selects it with probability
  ``(topk - 1) / n``, ``n`` the query's fully past blocks; the chance level is that, averaged the same way.
* Router SNR, per MoBA layer, at the same (query, head) pairs, the signal block being the pair's block
  (not, as :func:`flashmoba.theory.measure_router_snr` takes it, the block of the most-attended key):
  float64 dot products ``a_u = q . k_u`` with every fully past key; noise keys are those outside the
  signal block, ``mu_noise`` and ``sigma^2`` their mean and unbiased variance; ``delta_mu_eff =
  B (mean of a over the signal block - mu_noise)``. The averages give the paper's SNR through
  :func:`flashmoba.theory.router_snr`, and :func:`flashmoba.theory.retrieval_probability` (top ``topk - 1``
  of ``n`` past blocks, averaged over the queries' ``n``) the router recall the theory predicts from it.
* Perplexity of held-out natural text (bytes of held-out Python packages), full-vocabulary softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from recall_task import RecallBatch

import flashmoba
from flashmoba.theory import RetrievalEstimate, measure_router_snr, retrieval_probability, router_snr

__all__ = ["distance_edges", "wilson", "evaluate_model"]


def distance_edges(seq_len: int) -> list[int]:
    """Bucket edges of the key-query distance: 0, T/16, T/8, T/4, T/2, T."""
    return [0] + [seq_len // d for d in (16, 8, 4, 2, 1)]


def wilson(correct: int, total: int) -> list[float] | None:
    """The Wilson 95 % interval of ``correct / total`` (None when ``total`` is 0)."""
    if total == 0:
        return None
    return list(RetrievalEstimate(hits=int(correct), trials=int(total)).interval())


def _moba_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if getattr(m, "attn_type", None) == "moba"}


def _hidden(model, tokens, autocast):
    with autocast:
        return model.model(input_ids=tokens).last_hidden_state


def _answers(model, batch: RecallBatch, autocast) -> torch.Tensor:
    """bool ``[S, P]``: is each query's argmax prediction its answer."""
    hidden = _hidden(model, batch.tokens, autocast)
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    with autocast:
        logits = model.lm_head(hidden[rows, batch.answer_pos - 1])
    return logits.argmax(-1) == batch.values


def _recall_counts(correct, batch: RecallBatch, seq_len: int) -> dict:
    edges = distance_edges(seq_len)
    distance, single = batch.distance, batch.key_len == 1
    by_distance = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (distance >= lo) & (distance < hi)
        by_distance.append({"lo": lo, "hi": hi, "correct": int(correct[inside].sum()), "total": int(inside.sum())})
    kinds = {}
    for kind, mask in (("single", single), ("multi", ~single)):
        kinds[kind] = {"correct": int(correct[mask].sum()), "total": int(mask.sum())}
    return {"correct": int(correct.sum()), "total": correct.numel(), "by_distance": by_distance, "by_key": kinds}


def _router_sums(module, hidden, batch: RecallBatch, autocast) -> dict:
    """Sums behind the router recall, chance and SNR of one MoBA layer at one batch's answer queries."""
    num_seqs, seq_len = hidden.shape[:2]
    bs, topk = module.block_size, module.topk
    with autocast:
        q, k = module.qk(hidden)
    cu = torch.arange(num_seqs + 1, dtype=torch.int32, device=hidden.device) * seq_len
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=bs, topk=topk, backend=module.backend)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    q, k = q.view(num_seqs, seq_len, heads, -1), k.view(num_seqs, seq_len, kv_heads, -1)
    indices = routing.indices.view(num_seqs, seq_len, heads, -1)
    query_pos = batch.answer_pos - 1
    target, own = batch.value_pos // bs, query_pos // bs
    measured = target < own  # the pair is in a fully past block: a routing decision
    key_block = torch.arange(seq_len, device=hidden.device) // bs
    sums = {"block_size": bs, "topk": topk, "queries": 0, "hits": torch.zeros(heads, dtype=torch.float64)}
    sums.update(chance=0.0, dme=0.0, var=0.0, past_blocks=[])
    for s in range(num_seqs):
        p, t, n = query_pos[s][measured[s]], target[s][measured[s]], own[s][measured[s]]
        if p.numel() == 0:
            continue
        sums["queries"] += p.numel()
        sums["past_blocks"] += n.tolist()
        sums["hits"] += (indices[s, p] == t[:, None, None]).any(-1).double().sum(0).cpu()
        sums["chance"] += float(((topk - 1) / n.double()).clamp(max=1.0).sum())
        signal = key_block[None] == t[:, None]  # [m, T]
        noise = (key_block[None] < n[:, None]) & ~signal
        count = noise.sum(1)
        for kv in range(kv_heads):
            rows = q[s, p, kv * group : (kv + 1) * group].double()  # [m, group, D]
            dots = rows @ k[s, :, kv].double().T  # [m, group, T]
            mu = (dots * noise[:, None]).sum(-1) / count[:, None]
            var = ((dots - mu[..., None]).square() * noise[:, None]).sum(-1) / (count[:, None] - 1)
            sums["dme"] += float(((dots * signal[:, None]).sum(-1) - bs * mu).sum())
            sums["var"] += float(var.sum())
    return sums


def _router_finish(parts: list[dict]) -> dict:
    """Router recall, chance, SNR and the theory's router recall from the sums of several batches."""
    queries = sum(p["queries"] for p in parts)
    if queries == 0 or parts[0]["topk"] < 2:
        return {"queries": queries}
    bs, topk = parts[0]["block_size"], parts[0]["topk"]
    hits = sum(p["hits"] for p in parts) / queries
    rows = queries * hits.numel()
    delta_mu_eff, noise_var = sum(p["dme"] for p in parts) / rows, sum(p["var"] for p in parts) / rows
    snr = router_snr(delta_mu_eff, bs, noise_variance=noise_var)
    past = torch.tensor([n for p in parts for n in p["past_blocks"]])
    values, counts = torch.unique(past, return_counts=True)
    predicted = sum(c * retrieval_probability(snr, int(n), topk - 1) for n, c in zip(values.tolist(), counts.tolist()))
    return {
        "block_size": bs,
        "topk": topk,
        "queries": queries,
        "router_recall": float(hits.mean()),
        "router_recall_by_head": hits.tolist(),
        "router_chance": sum(p["chance"] for p in parts) / queries,
        "delta_mu_eff": delta_mu_eff,
        "noise_variance": noise_var,
        "snr": snr,
        "predicted_router_recall": predicted / queries,
    }


def _router_stats(model, batch: RecallBatch, autocast) -> dict:
    """``{layer name: sums}`` of every MoBA layer on one batch (its inputs captured by forward pre-hooks)."""
    layers = _moba_layers(model)
    captured = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0]))
        for name, m in layers.items()
    ]
    try:
        _hidden(model, batch.tokens, autocast)
    finally:
        for handle in handles:
            handle.remove()
    return {name: _router_sums(layers[name], captured[name], batch, autocast) for name in layers}


def _perplexity(model, text: torch.Tensor, num_seqs: int, seq_len: int, autocast, chunk: int) -> dict:
    """Byte-level perplexity of ``num_seqs`` evenly spaced windows of the held-out ``text``."""
    starts = torch.linspace(0, text.numel() - seq_len - 1, num_seqs).long()
    device = next(model.parameters()).device
    windows = text.long()[starts[:, None] + torch.arange(seq_len + 1)].to(device)
    total, count = 0.0, 0
    for part in windows.split(chunk):
        hidden = _hidden(model, part[:, :-1], autocast)
        with autocast:
            logits = model.lm_head(hidden)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), part[:, 1:].flatten(), reduction="sum"))
        count += part[:, 1:].numel()
    loss = total / count
    return {"ppl": math.exp(loss), "bits_per_byte": loss / math.log(2), "tokens": count}


@torch.no_grad()
def evaluate_model(model, batches: list[RecallBatch], setup: dict, val_text: torch.Tensor, autocast) -> dict:
    """Every metric of one model on the fixed evaluation batches.

    Args:
        model: a MoBAHybridForCausalLM, on its device.
        batches: evaluation batches (same for every run); the first ``router_batches`` of them also give
            the router statistics, the first one the layer-wide :func:`measure_router_snr`.
        setup: the experiment setup (``seq_len``, ``router_batches``, ``ppl_seqs``, ``eval_chunk``).
        val_text: held-out filler bytes for the perplexity (None: skipped).
        autocast: the autocast context the model trains under.

    Returns:
        ``{"recall": counts, "router": {layer: stats}, "router_snr_layerwide": {...}, "perplexity": ...}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = setup["seq_len"]
    batches = [b.to(device) for b in batches]
    correct = torch.cat([_answers(model, b, autocast) for b in batches])
    merged = RecallBatch(**{f: torch.cat([getattr(b, f) for b in batches]) for f in vars(batches[0])})
    out = {"recall": _recall_counts(correct, merged, seq_len), "router": {}, "router_snr_layerwide": {}}
    if _moba_layers(model) and setup["router_batches"]:
        per_batch = [_router_stats(model, b, autocast) for b in batches[: setup["router_batches"]]]
        out["router"] = {name: _router_finish([stats[name] for stats in per_batch]) for name in per_batch[0]}
        with autocast:
            wide = measure_router_snr(model, batches[0].tokens[: setup["snr_seqs"]])
        out["router_snr_layerwide"] = {name: vars(stats) for name, stats in wide.items()}
    if val_text is not None and setup["ppl_seqs"]:
        out["perplexity"] = _perplexity(model, val_text, setup["ppl_seqs"], seq_len, autocast, setup["eval_chunk"])
    model.train(was_training)
    return out
