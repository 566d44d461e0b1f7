"""Context parallelism of a whole model: every attention layer of a packed batch split over a group.

``ContextParallel`` shards each packed training batch (``[1, N]`` tokens with ``cu_seqlens``) over
the ranks of a group and makes every ``flashmoba.nn.MoBAAttention`` layer of the model attend the
rank's tokens over the whole batch. Everything else in a decoder (embedding, norms, MLPs, LM head) works
token by token and runs on the rank's tokens as it is. An attention layer under context parallelism

* projects q, k, v of its tokens, all-gathers the raw keys and values (their gradients reduce-scattered
  back, ``flashmoba.distributed.comm``), and applies the key convolution to the whole sequence: each
  rank convolves all keys (a depthwise filter of a few taps, cheap next to attention), so no convolution
  window is cut at a rank boundary;
* rotates its queries and the keys at their positions in their documents (RoPE layers);
* attends: "moba" through the library's routing and attention of queries at positions (the same as
  ``context_parallel_moba_attn_varlen``), "dense" and "swa" as causal softmax
  attention of the rank's runs of consecutive positions over the keys they can see (SDPA with the band).

The loss follows the model contract of ``flashmoba.train``: token ``t`` predicts token ``t + 1`` of its
sequence. A rank's targets come from the whole batch (a target may be the first token of the next rank's
part), and ``ContextParallel.loss`` divides the rank's summed cross entropy by the whole batch's
number of targets, so the ranks' losses add up to the batch's mean loss and their gradients to its
gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from flashmoba import api
from flashmoba._checks import check_choice, check_tensor
from flashmoba.distributed.attention import varlen_queries
from flashmoba.distributed.comm import gather_keys_values, group_rank
from flashmoba.distributed.layout import LAYOUTS, check_length, local_positions
from flashmoba.nn import MoBAAttention
from flashmoba.nn.rope import apply_rotary
from flashmoba.nn.varlen import next_token_targets, token_positions

__all__ = ["ContextParallel", "ShardedBatch"]


class ShardedBatch(NamedTuple):
    """This rank's part of a packed batch, as the model takes it.

    Attributes:
        input_ids: ``[1, N / W]`` the rank's tokens.
        cu_seqlens: int32 ``[S + 1]``: the rank's tokens of sequence ``s`` are ``cu_seqlens[s]:cu_seqlens[s + 1]``
            (the model's own view; the attention layers see the whole batch).
        targets: ``[N / W]`` next-token targets of the rank's tokens (-100: none).
        num_targets: the whole batch's number of targets (the loss's denominator).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    num_targets: int


class _Batch(NamedTuple):
    """What the attention layers need of the current batch."""

    cu_seqlens: torch.Tensor  # [S + 1] the whole batch
    query_cu_seqlens: torch.Tensor  # [S + 1] the rank's tokens per sequence (ShardedBatch.cu_seqlens)
    query_positions: torch.Tensor  # [n] the rank's tokens' positions in their sequences
    key_positions: torch.Tensor  # [N] every token's position in its sequence
    runs: list  # [(seq, row start, row end, first position)]: the rank's runs of consecutive positions
    starts: list  # cu_seqlens on the host (read once per batch, not per layer)


def _runs(query_cu: torch.Tensor, query_pos: torch.Tensor) -> list:
    """The rank's tokens as runs of consecutive positions of one sequence (at most 2 per sequence)."""
    runs = []
    bounds, pos = query_cu.tolist(), query_pos.tolist()
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        start = a
        for i in range(a + 1, b + 1):
            if i == b or pos[i] != pos[i - 1] + 1:
                runs.append((s, start, i, pos[start]))
                start = i
    return runs


def _causal_attention(q, k, v, batch: _Batch, window: int | None):
    """Causal (``window=None``) or sliding-window softmax attention of the rank's queries over all keys.

    Each run of consecutive positions ``p0 .. p1`` of sequence ``s`` attends keys ``max(0, p0 - window + 1)
    .. p1`` of ``s`` under the band ``p - window < key <= p``: SDPA on the run's rows only.
    """
    starts = batch.starts
    group = q.shape[1] // k.shape[1]
    pieces = []  # the runs cover the rank's rows in order
    for s, a, b, p0 in batch.runs:
        p1 = p0 + (b - a)  # one past the run's last position
        lo = 0 if window is None else max(0, p0 - window + 1)
        keys = slice(starts[s] + lo, starts[s] + p1)
        q_pos = torch.arange(p0, p1, device=q.device)
        k_pos = torch.arange(lo, p1, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        kk, vv = (t[keys].repeat_interleave(group, dim=1).transpose(0, 1)[None] for t in (k, v))
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], kk, vv, attn_mask=allowed)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces) if pieces else torch.zeros_like(q)


def _attention_forward(layer: MoBAAttention, cp: ContextParallel, hidden_states, cu_seqlens=None, cache=None, **_):
    """``MoBAAttention.forward`` of the rank's tokens under context parallelism (module docstring)."""
    batch = cp._batch
    if cache is not None:
        raise ValueError("context parallelism runs training and scoring forwards: cache must be None")
    if batch is None or cu_seqlens is not batch.query_cu_seqlens:
        raise ValueError(
            "cu_seqlens: under context parallelism the model takes the ShardedBatch of ContextParallel.shard_batch"
        )
    n = hidden_states.shape[0]
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(hidden_states).view(n, heads, dim)
    k, v = gather_keys_values(layer.k_proj(hidden_states), layer.v_proj(hidden_states), 0, cp.layout, cp.group)
    if layer.key_conv is not None:
        k = layer.key_conv(k, batch.cu_seqlens)
    k, v = k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)
    if layer.rope:
        q = apply_rotary(q, batch.query_positions, layer.rope_theta)
        k = apply_rotary(k, batch.key_positions, layer.rope_theta)
    if layer.attn_type == "moba":
        layout = (batch.cu_seqlens, batch.query_cu_seqlens, batch.query_positions)
        routing = api.route_queries(
            q.detach(),
            k.detach(),
            *layout,
            block_size=layer.block_size,
            topk=layer.topk,
            causal=True,
            backend=layer.backend,
        )
        out = api.attend_queries(q, k, v, *layout, routing, softmax_scale=None, return_lse=False)
    else:
        out = _causal_attention(q, k, v, batch, layer.window if layer.attn_type == "swa" else None)
    return layer.o_proj(out.reshape(n, -1))


class ContextParallel:
    """Context parallelism of a model over the ranks of ``group`` (module docstring).

    Args:
        group: the process group whose ranks share each batch (None: the default group).
        layout: "zigzag" (causal load balance; batches of a multiple of ``2 * W`` tokens) or "contiguous"
            (a multiple of ``W``); ``flashmoba.distributed.layout``.

    Use: ``cp.apply(model)`` once (before wrapping it in DDP / FSDP), then per batch
    ``part = cp.shard_batch(input_ids, cu_seqlens)``, ``logits = model(input_ids=part.input_ids,
    cu_seqlens=part.cu_seqlens).logits`` and ``loss = cp.loss(logits, part)``: the ranks' losses sum to
    the batch's mean loss (sum them, or scale by ``W`` where gradients are averaged over the group).
    """

    def __init__(self, group=None, *, layout: str = "zigzag"):
        self.group = group
        self.layout = check_choice("layout", layout, LAYOUTS)
        self.world_size, self.rank = group_rank(group)
        self._batch: _Batch | None = None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make every ``MoBAAttention`` of ``model`` attend under this context parallelism
        (its parameters and state dict are unchanged). Returns ``model``."""
        layers = [m for m in model.modules() if isinstance(m, MoBAAttention)]
        if not layers:
            raise ValueError("model: no flashmoba.nn.MoBAAttention layer to run under context parallelism")
        for layer in layers:
            layer.forward = functools.partial(_attention_forward, layer, self)
        return model

    def shard_batch(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ShardedBatch:
        """This rank's part of the packed batch ``input_ids [1, N]`` (the same on every rank of the group).

        Args:
            input_ids: ``[1, N]``, ``N`` divisible by ``2 * W`` (zigzag) or ``W`` (contiguous).
            cu_seqlens: ``[S + 1]`` the batch's sequence boundaries.
            labels: ``[1, N]`` (default: ``input_ids``), shifted as the model contract says.

        The attention layers of the model read this batch until the next call.
        """
        check_tensor("input_ids", input_ids, dim=2)
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be one packed row [1, N], got {tuple(input_ids.shape)}")
        total = check_length("input_ids (the packed batch)", input_ids.shape[1], self.world_size, self.layout)
        device = input_ids.device
        positions = local_positions(total, self.world_size, self.rank, self.layout, device)
        query_cu, query_pos = varlen_queries(cu_seqlens, positions)
        targets = next_token_targets((input_ids if labels is None else labels)[0], cu_seqlens)
        self._batch = _Batch(
            cu_seqlens,
            query_cu,
            query_pos,
            token_positions(cu_seqlens, total),
            _runs(query_cu, query_pos),
            cu_seqlens.tolist(),
        )
        return ShardedBatch(input_ids[:, positions], query_cu, targets[positions], int((targets != -100).sum()))

    def loss(self, logits: torch.Tensor, part: ShardedBatch) -> torch.Tensor:
        """This rank's share of the batch's mean next-token loss: its summed cross entropy over the whole
        batch's number of targets (``logits [1, N / W, V]`` of the rank's tokens)."""
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), part.targets, reduction="sum")
        return total / max(part.num_targets, 1)
