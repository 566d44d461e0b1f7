"""MoBAAttention: the attention layer of the hybrid model (projections, GQA, key conv, RoPE, KV cache).

One layer type serves the paper's three attentions:

* ``"moba"``: MoBA over blocks of ``block_size`` keys, ``topk`` blocks per query (own block included),
  through :func:`flashmoba.moba_attn` / :func:`flashmoba.moba_attn_varlen`;
* ``"dense"``: causal softmax attention (SDPA), one call per sequence of a packed batch;
* ``"swa"``: causal sliding-window attention, each query sees its ``window`` latest keys (itself
  included: key ``s`` is visible from query ``t`` iff ``t - window < s <= t``). Computed chunk-wise:
  queries in chunks of ``window`` tokens attend their own and the previous chunk under a band mask, so
  cost and memory grow linearly with the length (no ``[T, T]`` mask), on any device.

Inputs are batched ``[B, T, hidden]`` or packed ``[N, hidden]`` with ``cu_seqlens``; packed sequences
never see each other. Positions (RoPE) restart at every sequence start and continue from the cache.

Generation: pass a :class:`~flashmoba.nn.KVCache`. The first call (empty cache) runs the normal path and
fills the cache; later calls attend their new tokens over the cache in :meth:`MoBAAttention.decode_attention`,
which computes the exact semantics of the layer (MoBA routing over the cached block centroids included) as
masked dense attention: correct, but it reads the whole cache. It is the one method to replace with the
sparse decode of :mod:`flashmoba.decode`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import flashmoba
from flashmoba.api import BACKENDS
from flashmoba.nn.cache import KVCache
from flashmoba.nn.keyconv import KeyConv
from flashmoba.nn.rope import apply_rotary
from flashmoba.nn.varlen import token_positions, token_sequence_ids, uniform_cu_seqlens
from flashmoba.routing.result import block_layout

__all__ = ["ATTN_TYPES", "MoBAAttention", "sliding_window_attention"]

ATTN_TYPES = ("moba", "dense", "swa")


def _sdpa(q, k, v, *, attn_mask=None, is_causal=False):
    """SDPA of ``q [B, HQ, L, D]`` over ``k, v [B, HKV, S, D]``, KV heads repeated for GQA (this keeps the
    fused kernels available: not all of them take ``enable_gqa``)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def _dense_causal_attention(q, k, v, cu_seqlens):
    """Causal attention of every packed sequence on its own: ``[N, H, D]`` in and out."""
    bounds = cu_seqlens.tolist()
    pieces = [
        _sdpa(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
              is_causal=True)[0].transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(pieces) if pieces else torch.zeros_like(q)


def sliding_window_attention(q, k, v, cu_seqlens, window: int):
    """Causal sliding-window attention of packed sequences, chunk by chunk.

    Args:
        q: ``[N, HQ, D]``; k, v: ``[N, HKV, D]``; cu_seqlens: ``[S + 1]``; window: keys per query.

    Returns:
        ``[N, HQ, D]``: query ``t`` attends keys ``t - window < s <= t`` of its own sequence.
    """
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return torch.zeros_like(q)
    # Chunks of `window` queries, numbered globally as routing blocks are (static shapes, no host sync).
    cu_chunks, chunk_seq, num_chunks = block_layout(cu_seqlens, num_tokens, window)
    num_seqs = cu_seqlens.numel() - 1
    real = chunk_seq < num_seqs
    seq = chunk_seq.long().clamp(max=num_seqs - 1)
    start = cu_seqlens.long()[seq]
    length = cu_seqlens.long()[seq + 1] - start
    first_pos = (torch.arange(num_chunks, device=q.device) - cu_chunks.long()[seq]) * window  # [G]
    slots = torch.arange(window, device=q.device)
    q_pos = first_pos[:, None] + slots  # [G, window]
    k_pos = first_pos[:, None] - window + torch.arange(2 * window, device=q.device)  # previous + own chunk
    q_ok = real[:, None] & (q_pos < length[:, None])
    k_ok = real[:, None] & (k_pos >= 0) & (k_pos < length[:, None])
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = k_ok[:, None, :] & (delta >= 0) & (delta < window)
    # A padding query keeps one key (its own slot) so that its softmax stays finite; it is dropped below.
    allowed |= (~q_ok)[:, :, None] & (slots[:, None] + window == torch.arange(2 * window, device=q.device))
    last = num_tokens - 1
    q_tok = (start[:, None] + q_pos).clamp(0, last)
    k_tok = (start[:, None] + k_pos).clamp(0, last)
    out = _sdpa(q[q_tok].permute(0, 2, 1, 3), k[k_tok].permute(0, 2, 1, 3), v[k_tok].permute(0, 2, 1, 3),
                attn_mask=allowed[:, None])  # [G, HQ, window, D]
    pos = token_positions(cu_seqlens, num_tokens)
    chunk = cu_chunks.long()[token_sequence_ids(cu_seqlens, num_tokens)] + pos // window
    return out[chunk, :, pos % window]


class MoBAAttention(nn.Module):
    """Multi-head attention with GQA, optional key convolution and RoPE, MoBA / dense / sliding window.

    Args:
        hidden_size: model width. num_heads / num_kv_heads: query / KV heads (``num_heads % num_kv_heads
            == 0``). head_dim: D.
        attn_type: "moba", "dense" or "swa" (module docstring).
        block_size, topk: MoBA routing (used by "moba"; kept as attributes on every layer).
        window: keys per query of "swa".
        kconv_size: width W of the key convolution (:class:`KeyConv`), 0 = none.
        rope: rotary embedding on queries and keys (after the key convolution); rope_theta: its base.
        layer_idx: the layer's index in its model (informational: shown in ``repr``, read by tools that
            report per layer).
        backend: "auto", "reference" or "triton", for MoBA and the key convolution.

    Shapes: ``forward(hidden [B, T, hidden_size] or packed [N, hidden_size], cu_seqlens=None, cache=None)``
    returns the same shape.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        attn_type: str = "moba",
        block_size: int = 128,
        topk: int = 8,
        window: int = 256,
        kconv_size: int = 0,
        rope: bool = False,
        rope_theta: float = 10000.0,
        layer_idx: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value, minimum in (
            ("hidden_size", hidden_size, 1), ("num_heads", num_heads, 1), ("num_kv_heads", num_kv_heads, 1),
            ("head_dim", head_dim, 1), ("block_size", block_size, 1), ("topk", topk, 1),
            ("window", window, 1), ("kconv_size", kconv_size, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attn_type = attn_type
        self.block_size, self.topk, self.window = block_size, topk, window
        self.rope, self.rope_theta = rope, float(rope_theta)
        self.layer_idx = layer_idx
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.key_conv = KeyConv(num_kv_heads * head_dim, kconv_size, backend=backend) if kconv_size else None

    # ------------------------------------------------------------------------------------------------
    # pieces

    def _queries_keys(self, x, cu_seqlens, positions, cache):
        """Packed ``x [N, hidden]`` -> ``q [N, HQ, D]``, ``k [N, HKV, D]`` as attention uses them."""
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x)
        if self.key_conv is not None:
            state = None
            if cache is not None:
                if cache.conv_state is None:
                    cache.conv_state = self.key_conv.initial_state(
                        cu_seqlens.numel() - 1, device=k.device, dtype=k.dtype
                    )
                state = cache.conv_state
            k = self.key_conv(k, cu_seqlens, state)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.rope:
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)
        return q, k

    def _attend(self, q, k, v, cu_seqlens, batch_shape):
        """Attention of a whole batch (no cache): packed ``[N, H, D]`` in and out."""
        if self.attn_type == "moba":
            if batch_shape is not None:
                shape = (*batch_shape, -1, self.head_dim)
                out = flashmoba.moba_attn(q.view(shape), k.view(shape), v.view(shape), block_size=self.block_size,
                                          topk=self.topk, backend=self.backend)
                return out.view_as(q)
            return flashmoba.moba_attn_varlen(q, k, v, cu_seqlens, block_size=self.block_size, topk=self.topk,
                                              backend=self.backend)
        if self.attn_type == "swa":
            return sliding_window_attention(q, k, v, cu_seqlens, self.window)
        if batch_shape is not None:
            shape = (*batch_shape, -1, self.head_dim)
            out = _sdpa(*(t.view(shape).transpose(1, 2) for t in (q, k, v)), is_causal=True)
            return out.transpose(1, 2).reshape_as(q)
        return _dense_causal_attention(q, k, v, cu_seqlens)

    def _routed_key_mask(self, q_pad, q_pos, keys):
        """MoBA selection over cached keys as a mask ``[S, HQ, L, capacity]``: the own block plus the
        ``topk - 1`` best-scoring blocks that end before it (ties: lower block), as in the prefill."""
        num_seqs, capacity, num_kv_heads, head_dim = keys.shape
        num_heads = q_pad.shape[2]
        bs = self.block_size
        full_blocks = capacity // bs  # only complete blocks can precede a query's own block
        compute = torch.promote_types(q_pad.dtype, torch.float32)
        centroids = keys[:, : full_blocks * bs].to(compute).view(num_seqs, full_blocks, bs, num_kv_heads, head_dim)
        centroids = centroids.mean(2).to(keys.dtype).to(compute)  # rounded to the keys' dtype, as in prefill
        centroids = centroids.repeat_interleave(num_heads // num_kv_heads, dim=2)
        scores = torch.einsum("slhd,sbhd->shlb", q_pad.to(compute), centroids)
        own = (q_pos.clamp(min=0) // bs)[:, None, :, None]  # [S, 1, L, 1]
        eligible = (torch.arange(full_blocks, device=keys.device) < own).expand_as(scores)
        order = torch.sort(scores.masked_fill(~eligible, -math.inf), dim=-1, descending=True, stable=True).indices
        order = order[..., : min(self.topk - 1, full_blocks)]
        num_blocks = -(-capacity // bs)
        chosen = torch.where(torch.gather(eligible, -1, order), order, num_blocks)
        selected = torch.zeros(*scores.shape[:3], num_blocks + 1, dtype=torch.bool, device=keys.device)
        selected.scatter_(-1, chosen, True)
        selected.scatter_(-1, own.expand(*scores.shape[:3], 1), True)
        return selected[..., torch.arange(capacity, device=keys.device) // bs]

    def decode_attention(self, q, cache: KVCache, cu_seqlens, positions, new_lengths):
        """Attention of new queries over the cache, which already holds their own keys and values.

        Exact layer semantics (causal; "swa" window; "moba" routing over the cached block centroids) as
        one masked dense SDPA over ``[S, HQ, max(new_lengths), capacity]``: it reads the whole cache and its
        mask grows with new tokens x capacity, so it suits decoding a few tokens per step, not chunked
        prefill of long prompts. The place for the sparse decode of :mod:`flashmoba.decode`.

        Args:
            q: ``[M, HQ, D]`` packed queries of the new tokens; cu_seqlens: ``[S + 1]`` their boundaries;
            positions: int64 ``[M]`` their positions in their sequences; new_lengths: host ``M`` per sequence.

        Returns:
            ``[M, HQ, D]``.
        """
        num_new = q.shape[0]
        keys, values = cache.keys, cache.values
        num_seqs, capacity = keys.shape[:2]
        width = max(new_lengths, default=0)
        seq = token_sequence_ids(cu_seqlens, num_new)
        slot = token_positions(cu_seqlens, num_new)
        q_pad = q.new_zeros(num_seqs, width, *q.shape[1:])
        q_pad[seq, slot] = q
        q_pos = torch.full((num_seqs, width), -1, dtype=torch.long, device=q.device)
        q_pos[seq, slot] = positions
        k_pos = torch.arange(capacity, device=q.device)
        delta = q_pos[..., None] - k_pos  # [S, L, capacity]
        allowed = (delta >= 0) & (q_pos >= 0)[..., None]
        if self.attn_type == "swa":
            allowed &= delta < self.window
        allowed = allowed[:, None]
        if self.attn_type == "moba":
            allowed = allowed & self._routed_key_mask(q_pad, q_pos, keys)
        # Padding query rows keep key 0 so that their softmax stays finite; they are dropped below.
        allowed = allowed | ((q_pos < 0)[:, None, :, None] & (k_pos == 0))
        out = _sdpa(q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed)
        return out.transpose(1, 2)[seq, slot]

    # ------------------------------------------------------------------------------------------------
    # public

    def qk(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """The queries and keys this layer routes and attends with (no cache).

        Args:
            hidden_states: ``[B, T, hidden]`` or packed ``[N, hidden]``; cu_seqlens: optional ``[S + 1]``.

        Returns:
            ``(q [N, HQ, D], k [N, HKV, D])`` packed (batched inputs flattened ``N = B * T``); keys
            convolved and, with ``rope``, rotated.
        """
        x, cu_seqlens, _ = self._flatten(hidden_states, cu_seqlens)
        return self._queries_keys(x, cu_seqlens, token_positions(cu_seqlens, x.shape[0]), None)

    def _flatten(self, hidden_states, cu_seqlens):
        if hidden_states.dim() == 3:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens goes with packed hidden_states [N, hidden], not with [B, T, hidden]")
            batch, seq_len = hidden_states.shape[:2]
            cu = uniform_cu_seqlens(batch, seq_len, hidden_states.device)
            return hidden_states.reshape(batch * seq_len, -1), cu, (batch, seq_len)
        if hidden_states.dim() != 2:
            raise ValueError(f"hidden_states must be [B, T, hidden] or [N, hidden], got {tuple(hidden_states.shape)}")
        if cu_seqlens is None:
            cu_seqlens = uniform_cu_seqlens(1, hidden_states.shape[0], hidden_states.device)
        return hidden_states, cu_seqlens, None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attention output, same shape as ``hidden_states``.

        Args:
            hidden_states: ``[B, T, hidden]`` or packed ``[N, hidden]``.
            cu_seqlens: int32/int64 ``[S + 1]`` for packed input (default: one sequence).
            cache: optional :class:`KVCache`; an empty one is filled (prefill), a filled one is extended
                and attended over (decode: the new tokens continue their sequences).
        """
        x, cu_seqlens, batch_shape = self._flatten(hidden_states, cu_seqlens)
        num_tokens = x.shape[0]
        decoding = cache is not None and not cache.is_empty
        if decoding and cu_seqlens.numel() - 1 != cache.num_seqs:
            raise ValueError(f"the cache holds {cache.num_seqs} sequences but the input has {cu_seqlens.numel() - 1}")
        positions = token_positions(cu_seqlens, num_tokens)
        if decoding:
            positions = positions + cache.lengths_tensor(x.device)[token_sequence_ids(cu_seqlens, num_tokens)]
        q, k = self._queries_keys(x, cu_seqlens, positions, cache)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if cache is not None:
            bounds = cu_seqlens.tolist()
            new_lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            cache.append(k, v, cu_seqlens, new_lengths)
        if decoding:
            out = self.decode_attention(q, cache, cu_seqlens, positions, new_lengths)
        else:
            out = self._attend(q, k, v, cu_seqlens, batch_shape)
        out = self.o_proj(out.reshape(num_tokens, -1))
        return out.view(*hidden_states.shape[:-1], -1)

    def extra_repr(self) -> str:
        parts = [f"attn_type={self.attn_type!r}", f"heads={self.num_heads}/{self.num_kv_heads}x{self.head_dim}"]
        if self.attn_type == "moba":
            parts.append(f"block_size={self.block_size}, topk={self.topk}")
        if self.attn_type == "swa":
            parts.append(f"window={self.window}")
        parts.append(f"rope={self.rope}")
        if self.layer_idx is not None:
            parts.append(f"layer_idx={self.layer_idx}")
        return ", ".join(parts)
