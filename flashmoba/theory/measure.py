"""Measure the router SNR of a real model's MoBA layers (to see, e.g., what key convolution changes).

A MoBA layer is any module with integer ``block_size`` and ``topk`` attributes and a method
``qk(hidden_states, cu_seqlens=None) -> (q [N, HQ, D], k [N, HKV, D])`` returning the exact (convolved,
rotated) queries and keys it routes with, and, if it has an ``attn_type``, ``attn_type == "moba"``
(``flashmoba.nn.MoBAAttention`` is one). Forward pre-hooks capture each layer's input during one
forward pass; the layer's ``qk`` then recomputes its queries and keys. Routing is causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import flashmoba
from flashmoba._checks import check_int, check_tensor

__all__ = ["RouterSNR", "measure_router_snr"]

# Query rows per chunk of the [rows, past keys] float64 logits (bounded at ~32 MB per chunk).
_LOGITS_PER_CHUNK = 1 << 22
# Per-pair statistics summed over the measured (query token, head) pairs; "n" counts the pairs.
_SUMS = ("n", "delta_mu", "delta_mu_eff", "noise_var", "block_var", "selected")


@dataclass(frozen=True)
class RouterSNR:
    """Router statistics of one MoBA layer, averaged over its measured (query token, query head) pairs.

    Attributes:
        block_size, topk: the layer's routing parameters.
        num_queries: measured (token, head) pairs.
        delta_mu: mean of ``q.k* - mu_noise``.
        cluster_term: mean of ``sum over the other keys of the signal block of (q.k - mu_noise)``, the
            paper's ``(m - 1)(mu_cluster - mu_noise)`` without having to choose ``m``.
        delta_mu_eff: ``delta_mu + cluster_term`` (= ``B * (signal block score - mu_noise)``).
        noise_variance: mean over queries of the variance of ``q.k`` over the noise keys (``sigma^2``).
        block_variance: mean over queries of the variance of the noise blocks' router scores.
        snr: the paper's formula with the measured ``sigma^2``: ``delta_mu_eff / sqrt(2 B sigma^2)``
            (assumes independent dot products).
        snr_blocks: ``(delta_mu_eff / B) / sqrt(2 * block_variance)``, from the observed spread of block
            scores (no independence assumption).
        block_correlation: the within-block correlation ``rho`` implied by the two variances,
            ``(block_variance / noise_variance - 1/B) / (1 - 1/B)`` (0 when the paper's assumption holds).
        selected_rate: fraction of pairs whose router selection contains the signal block.
    """

    block_size: int
    topk: int
    num_queries: int
    delta_mu: float
    cluster_term: float
    delta_mu_eff: float
    noise_variance: float
    block_variance: float
    snr: float
    snr_blocks: float
    block_correlation: float
    selected_rate: float


def _is_moba_layer(module: nn.Module) -> bool:
    return (
        callable(getattr(module, "qk", None))
        and isinstance(getattr(module, "block_size", None), int)
        and isinstance(getattr(module, "topk", None), int)
        and getattr(module, "attn_type", "moba") == "moba"
    )


def _packed_cu_seqlens(hidden_states: torch.Tensor, cu_seqlens, num_tokens: int) -> torch.Tensor:
    """The sequence boundaries of the packed ``qk`` output."""
    if hidden_states.dim() == 3:
        batch, seq_len = hidden_states.shape[:2]
        return torch.arange(batch + 1, dtype=torch.int32, device=hidden_states.device) * seq_len
    if cu_seqlens is None:
        return torch.tensor([0, num_tokens], dtype=torch.int32, device=hidden_states.device)
    return cu_seqlens


def _sequence_sums(q, k, chosen, block_size: int, min_past_blocks: int) -> dict[str, float]:
    """Statistics of one sequence and one query head, summed over its measured queries.

    Args:
        q: ``[L, D]``; k: ``[L, D]`` keys of the head's KV head; chosen: ``[L, topk]`` routed blocks.

    Returns:
        ``{name: sum}`` for the names of ``_SUMS``.
    """
    bs = block_size
    own_blocks = torch.arange(q.shape[0], device=q.device) // bs
    rows = torch.nonzero(own_blocks >= min_past_blocks).flatten()
    sums = dict.fromkeys(_SUMS, 0.0)
    if rows.numel() == 0:
        return sums
    past_blocks = int(own_blocks[rows].max())
    keys = k[: past_blocks * bs].double()
    chunk = max(1, _LOGITS_PER_CHUNK // keys.shape[0])
    blocks = torch.arange(past_blocks, device=q.device)
    for part in rows.split(chunk):
        own = own_blocks[part]  # [R]: number of past (full) blocks of each query
        logits = (q[part].double() @ keys.T).view(-1, past_blocks, bs)  # [R, n, B]
        past = blocks[None, :] < own[:, None]  # [R, n]
        flat = logits.masked_fill(~past[..., None], -math.inf).flatten(1)
        signal_key = flat.argmax(1)  # first maximum: the lower key wins ties
        signal_block = signal_key // bs
        noise_blocks = past.clone()
        noise_blocks[torch.arange(part.numel()), signal_block] = False
        block_sums = logits.sum(-1)  # [R, n]
        noise_keys = noise_blocks.sum(1) * bs
        mu_noise = (block_sums * noise_blocks).sum(1) / noise_keys
        deviation = (logits - mu_noise[:, None, None]) * noise_blocks[..., None]
        noise_var = deviation.square().sum((1, 2)) / (noise_keys - 1)
        block_dev = (block_sums / bs - mu_noise[:, None]) * noise_blocks
        block_var = block_dev.square().sum(1) / (noise_blocks.sum(1) - 1)
        signal_logit = flat.gather(1, signal_key[:, None]).squeeze(1)
        signal_sum = block_sums.gather(1, signal_block[:, None]).squeeze(1)
        sums["n"] += part.numel()
        sums["delta_mu"] += float((signal_logit - mu_noise).sum())
        sums["delta_mu_eff"] += float((signal_sum - bs * mu_noise).sum())
        sums["noise_var"] += float(noise_var.sum())
        sums["block_var"] += float(block_var.sum())
        sums["selected"] += float((chosen[part] == signal_block[:, None]).any(1).sum())
    return sums


def _layer_snr(q, k, cu_seqlens, block_size, topk, min_past_blocks, backend) -> RouterSNR:
    routing = flashmoba.moba_route_varlen(
        q, k, cu_seqlens, block_size=block_size, topk=topk, causal=True, backend=backend
    )
    num_heads, group = q.shape[1], q.shape[1] // k.shape[1]
    total = dict.fromkeys(_SUMS, 0.0)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for head in range(num_heads):
            sums = _sequence_sums(
                q[start:end, head],
                k[start:end, head // group],
                routing.indices[start:end, head],
                block_size,
                min_past_blocks,
            )
            for name, value in sums.items():
                total[name] += value
    n = total["n"]
    if n == 0:
        raise ValueError(
            f"no query has {min_past_blocks} full blocks before its own (block_size {block_size}): use longer input_ids"
        )
    mean = {name: value / n for name, value in total.items()}
    bs = block_size
    return RouterSNR(
        block_size=bs,
        topk=topk,
        num_queries=int(n),
        delta_mu=mean["delta_mu"],
        cluster_term=mean["delta_mu_eff"] - mean["delta_mu"],
        delta_mu_eff=mean["delta_mu_eff"],
        noise_variance=mean["noise_var"],
        block_variance=mean["block_var"],
        snr=mean["delta_mu_eff"] / math.sqrt(2 * bs * mean["noise_var"]),
        snr_blocks=mean["delta_mu_eff"] / bs / math.sqrt(2 * mean["block_var"]),
        block_correlation=(mean["block_var"] / mean["noise_var"] - 1 / bs) / (1 - 1 / bs),
        selected_rate=mean["selected"],
    )


def measure_router_snr(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    min_past_blocks: int = 3,
    backend: str = "auto",
    **forward_kwargs,
) -> dict[str, RouterSNR]:
    """Estimate ``delta_mu_eff`` and the router SNR of every MoBA layer of ``model`` on ``input_ids``.

    Definitions, for one layer, one sequence, one query head ``h`` and one query token ``t`` whose own
    block ``t // B`` has at least ``min_past_blocks`` full blocks before it (the routing candidates);
    dot products ``a_u = <q[t, h], k[u, h // (HQ / HKV)]>`` (unscaled, float64) over those past keys:

    * signal key ``u* = argmax_u a_u``: the key the query's attention weights favour most among the
      routable keys (softmax is monotone); the signal block ``j* = u* // B``;
    * noise keys: the past keys outside ``j*``; ``mu_noise`` their mean dot product and ``sigma^2``
      their (unbiased) variance;
    * ``delta_mu = a_{u*} - mu_noise``; ``delta_mu_eff = sum over the keys u of j* of (a_u - mu_noise)``
      (the signal key plus every other key of its block: the clustering term without choosing ``m``);
    * noise block scores: the router scores (block means of ``a``) of the past blocks other than ``j*``,
      and their (unbiased) variance;
    * selected: whether the layer's causal router (own block plus ``topk - 1`` past blocks) picks ``j*``.

    Each quantity is averaged over all measured (t, h) pairs of all sequences; see ``RouterSNR``
    for the SNRs built from the averages.

    Args:
        model: a torch module containing MoBA layers (module docstring); call ``model.eval()`` first
            if it has dropout.
        input_ids: passed to ``model(input_ids, **forward_kwargs)`` under ``torch.no_grad()``.
        min_past_blocks: queries need at least this many full past blocks (>= 3: the signal block and
            two noise blocks, for the noise block variance).
        backend: router backend for the ``selected`` statistic.

    Returns:
        ``{module name: RouterSNR}`` in module order, one entry per MoBA layer that ran.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_tensor("input_ids", input_ids)
    min_past_blocks = check_int("min_past_blocks", min_past_blocks, 3)
    layers = {name: module for name, module in model.named_modules() if _is_moba_layer(module)}
    if not layers:
        raise ValueError("model has no MoBA layer (a module with block_size, topk and qk(...))")

    captured: dict[str, tuple] = {}

    def capture(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cu_seqlens = args[1] if len(args) > 1 else kwargs.get("cu_seqlens")
            captured[name] = (hidden, cu_seqlens)

        return hook

    handles = [m.register_forward_pre_hook(capture(n), with_kwargs=True) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(input_ids, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()

    results = {}
    with torch.no_grad():
        for name, module in layers.items():
            if name not in captured:
                continue
            hidden, cu_seqlens = captured[name]
            q, k = module.qk(hidden, cu_seqlens=cu_seqlens) if cu_seqlens is not None else module.qk(hidden)
            cu = _packed_cu_seqlens(hidden, cu_seqlens, q.shape[0])
            results[name] = _layer_snr(q, k, cu, module.block_size, module.topk, min_past_blocks, backend)
    return results
