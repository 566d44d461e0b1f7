"""MoBAAttention: the attention layer of the hybrid model (projections, GQA, key conv, RoPE, KV cache).

One layer type serves the paper's three attentions:

* ``"moba"``: MoBA over blocks of ``block_size`` keys, ``topk`` blocks per query (own block included),
  through ``flashmoba.moba_attn`` / ``flashmoba.moba_attn_varlen``;
* ``"dense"``: causal softmax attention;
* ``"swa"``: causal sliding-window attention, each query sees its ``window`` latest keys (itself
  included: key ``s`` is visible from query ``t`` iff ``t - window < s <= t``).

"dense" and "swa" run ``flashmoba.nn.causal.causal_attention`` (``causal_backend``: FlashAttention's
varlen kernel on CUDA, SDPA elsewhere).

Inputs are batched ``[B, T, hidden]`` or packed ``[N, hidden]`` with ``cu_seqlens``; packed sequences
never see each other. Positions (RoPE) restart at every sequence start and continue from the cache.

Generation: pass a ``MoBAKVCache`` (``MoBAKVCache.growing()``). The first call (empty
cache) runs the normal path and fills the cache; later calls append their new tokens and attend over the
cache through ``flashmoba.decode``: ``moba_decode`` for "moba" (sparse, routed over the
cache's block sums), ``dense_decode`` for "dense" and "swa" (the window's rows only).
"""

from __future__ import annotations

import torch
from torch import nn

import flashmoba
from flashmoba._checks import BACKENDS, check_choice, check_int, common_length, tracing
from flashmoba.decode import MoBAKVCache, dense_decode, moba_decode
from flashmoba.nn.causal import CAUSAL_BACKENDS, batched_causal_attention, causal_attention
from flashmoba.nn.keyconv import KeyConv
from flashmoba.nn.rope import apply_rotary
from flashmoba.nn.varlen import token_positions, token_sequence_ids, uniform_cu_seqlens

__all__ = ["ATTN_TYPES", "MoBAAttention"]

ATTN_TYPES = ("moba", "dense", "swa")


def _append_packed(cache: MoBAKVCache, k, v, cu_seqlens, new_lengths: list[int]) -> None:
    """Append packed ``k, v [N, HKV, D]`` (``new_lengths[s]`` tokens of sequence ``s``) to the cache."""
    width = max(new_lengths, default=0)
    if all(n == width for n in new_lengths):
        shape = (len(new_lengths), width, *k.shape[1:])
        cache.append(k.detach().view(shape), v.detach().view(shape))
        return
    seq = token_sequence_ids(cu_seqlens, k.shape[0])
    slot = token_positions(cu_seqlens, k.shape[0])
    padded = k.new_zeros(len(new_lengths), width, *k.shape[1:])
    k_pad, v_pad = padded, padded.clone()
    k_pad[seq, slot], v_pad[seq, slot] = k.detach(), v.detach()
    cache.append(k_pad, v_pad, torch.tensor(new_lengths, dtype=torch.int32, device=k.device))


class MoBAAttention(nn.Module):
    """Multi-head attention with GQA, optional key convolution and RoPE, MoBA / dense / sliding window.

    Args:
        hidden_size: model width.
        num_heads: query heads, a multiple of ``num_kv_heads``.
        num_kv_heads: KV heads.
        head_dim: D.
        attn_type: "moba", "dense" or "swa" (module docstring).
        block_size: MoBA block size (used by "moba"; kept as an attribute on every layer).
        topk: MoBA blocks per query, the own block included.
        window: keys per query of "swa".
        kconv_size: width W of the key convolution (``KeyConv``), 0 = none.
        rope: rotary embedding on queries and keys (after the key convolution).
        rope_theta: its base.
        layer_idx: the layer's index in its model (informational: shown in ``repr``, read by tools that
            report per layer).
        backend: "auto", "reference" or "triton", for MoBA and the key convolution.
        causal_backend: "auto", "flash" or "sdpa", for "dense" and "swa"
            (``flashmoba.nn.causal.causal_attention``).

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
        causal_backend: str = "auto",
    ):
        super().__init__()
        for name, value, minimum in (
            ("hidden_size", hidden_size, 1),
            ("num_heads", num_heads, 1),
            ("num_kv_heads", num_kv_heads, 1),
            ("head_dim", head_dim, 1),
            ("block_size", block_size, 1),
            ("topk", topk, 1),
            ("window", window, 1),
            ("kconv_size", kconv_size, 0),
        ):
            check_int(name, value, minimum)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_choice("attn_type", attn_type, ATTN_TYPES)
        check_choice("backend", backend, BACKENDS)
        check_choice("causal_backend", causal_backend, CAUSAL_BACKENDS)
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attn_type = attn_type
        self.block_size, self.topk, self.window = block_size, topk, window
        self.rope, self.rope_theta = rope, float(rope_theta)
        self.layer_idx = layer_idx
        self.backend, self.causal_backend = backend, causal_backend
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

    def _attend(self, q, k, v, cu_seqlens, batch_shape, max_seqlen):
        """Attention of a whole batch (no cache): packed ``[N, H, D]`` in and out."""
        if self.attn_type == "moba":
            if batch_shape is not None:
                shape = (*batch_shape, -1, self.head_dim)
                out = flashmoba.moba_attn(
                    q.view(shape),
                    k.view(shape),
                    v.view(shape),
                    block_size=self.block_size,
                    topk=self.topk,
                    backend=self.backend,
                )
                return out.view_as(q)
            return flashmoba.moba_attn_varlen(
                q, k, v, cu_seqlens, block_size=self.block_size, topk=self.topk, backend=self.backend
            )
        if self.attn_type == "dense" and batch_shape is not None and self.causal_backend != "flash":
            # Equal-length sequences: one batched SDPA call (its fused causal kernel), no host sync.
            shape = (*batch_shape, -1, self.head_dim)
            return batched_causal_attention(q.view(shape), k.view(shape), v.view(shape)).reshape_as(q)
        return causal_attention(
            q,
            k,
            v,
            cu_seqlens,
            window=self.window if self.attn_type == "swa" else None,
            max_seqlen=batch_shape[1] if batch_shape is not None else max_seqlen,
            backend=self.causal_backend,
        )

    def decode_attention(self, q: torch.Tensor, cache: MoBAKVCache, new_lengths: list[int]) -> torch.Tensor:
        """Attention of new queries over the cache, which already holds their own keys and values.

        Args:
            q: ``[M, HQ, D]`` packed queries of the new tokens, ``new_lengths[s]`` of them for sequence ``s``
                (the newest tokens of each sequence).

        Returns:
            ``[M, HQ, D]``.
        """
        if self.attn_type == "moba":
            cache.bind_block_size(self.block_size)

        def attend(queries, layer_cache):
            if self.attn_type == "moba":
                return moba_decode(queries, layer_cache, topk=self.topk, backend=self.backend)
            return dense_decode(queries, layer_cache, window=self.window if self.attn_type == "swa" else None)

        width = max(new_lengths, default=0)
        if all(n == width for n in new_lengths):  # every sequence takes the same number of tokens (generation)
            return attend(q.view(len(new_lengths), width, *q.shape[1:]), cache).reshape_as(q)
        # Ragged chunks: one call per sequence, on a one-sequence view of the cache.
        out, start = torch.empty_like(q), 0
        for b, n in enumerate(new_lengths):
            if n:
                one = MoBAKVCache.from_tensors(
                    cache.k[b : b + 1],
                    cache.v[b : b + 1],
                    cache.seqlens[b : b + 1],
                    starts=cache.starts[b : b + 1],
                    block_size=cache.block_size,
                    block_sums=cache.block_sums[b : b + 1] if self.attn_type == "moba" else None,
                )
                out[start : start + n] = attend(q[start : start + n][None], one)[0]
            start += n
        return out

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
        cache: MoBAKVCache | None = None,
        max_seqlen: int | None = None,
        batch_shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Attention output, same shape as ``hidden_states``.

        Args:
            hidden_states: ``[B, T, hidden]`` or packed ``[N, hidden]``.
            cu_seqlens: int32/int64 ``[S + 1]`` for packed input (default: one sequence).
            cache: optional ``MoBAKVCache`` (``MoBAKVCache.growing()``); an empty one is
                filled (prefill), a filled one is extended and attended over (decode: the new tokens
                continue their sequences).
            max_seqlen: optional upper bound of the packed sequences' lengths, known on the host (the
                dense and sliding-window kernels size their grid by it; default: ``N``).
            batch_shape: optional ``(S, L)`` for packed input whose ``S`` sequences all have ``L`` tokens
                (checked against ``cu_seqlens`` when eager): they are attended as an ``[S, L]`` batch,
                whose kernels can be faster (dense layers: SDPA's fused causal kernel, cuDNN's on Hopper,
                instead of FlashAttention-2's varlen kernel). The same attention either way.
        """
        x, cu_seqlens, shape = self._flatten(hidden_states, cu_seqlens)
        if batch_shape is not None:
            if shape is not None:
                raise ValueError("batch_shape goes with packed hidden_states [N, hidden], not with [B, T, hidden]")
            num_seqs, length = batch_shape
            wrong = num_seqs * length != x.shape[0] or num_seqs != cu_seqlens.numel() - 1
            if wrong or (not tracing() and common_length(cu_seqlens) != length):  # read once per tensor
                raise ValueError(
                    f"batch_shape {tuple(batch_shape)} does not describe the packed sequences: {x.shape[0]} "
                    f"tokens in {cu_seqlens.numel() - 1} sequences of one length"
                )
        batch_shape = shape if shape is not None else batch_shape
        num_tokens = x.shape[0]
        if cache is not None and not isinstance(cache, MoBAKVCache):
            raise TypeError(f"cache must be a flashmoba.MoBAKVCache, got {type(cache).__name__}")
        decoding = cache is not None and not cache.is_empty
        num_seqs = cu_seqlens.numel() - 1
        if decoding and num_seqs != cache.batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} sequences but the input has {num_seqs}")
        positions = None
        if self.rope:
            positions = token_positions(cu_seqlens, num_tokens)
            if decoding:
                positions = positions + cache.seqlens.long()[token_sequence_ids(cu_seqlens, num_tokens)]
        q, k = self._queries_keys(x, cu_seqlens, positions, cache)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if cache is not None:
            if batch_shape is not None:
                new_lengths = [batch_shape[1]] * batch_shape[0]
            else:
                bounds = cu_seqlens.tolist()
                new_lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            _append_packed(cache, k, v, cu_seqlens, new_lengths)
        if decoding:
            out = self.decode_attention(q, cache, new_lengths)
        else:
            out = self._attend(q, k, v, cu_seqlens, batch_shape, max_seqlen)
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
