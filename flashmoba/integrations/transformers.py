"""MoBA in Hugging Face transformers: ``attn_implementation="moba"`` for models on the standard attention interface.

Usage (Llama, Qwen2/3, Mistral families and any model that calls ``ALL_ATTENTION_FUNCTIONS``)::

    from flashmoba.integrations.transformers import MoBACache, register
    register(block_size=128, topk=8, dense_layers=(-1, -2, -3))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    out = model.generate(**inputs, past_key_values=MoBACache())

Settings in the model config (``moba_block_size``, ``moba_topk``, ``moba_dense_layers``,
``moba_shared_kv_routing``) override those given to ``register``. Dense layers (negative indices count
from the last layer; MoBA keeps the last layers dense) run PyTorch's scaled-dot-product attention.

How a forward pass is served:

* the "moba" mask function builds no ``[T x T]`` mask: it turns the 2-D padding mask into a
  ``MoBAPadding`` (token indices and sequence bounds), once per forward for all layers;
* prefill (no cached tokens): padded batches are unpadded, packed batches are split by the
  ``cu_seq_lens_q/k`` kwargs or by restarting ``position_ids``, and ``flashmoba.moba_attn_varlen``
  runs MoBA on the packed tokens, GQA without repeating K/V;
* with cached tokens (generation, chunked prefill, speculative verification):
  ``flashmoba.moba_decode`` routes over the cached block centroids; left padding is supported, as
  generation needs.

Where the centroids live: each layer of ``MoBACache`` (a ``DynamicCache``) is a ``MoBACacheLayer``
that stores its keys and values in a ``flashmoba.MoBAKVCache``, the project's one cache type, whose
block key sums fold in only the new tokens' keys at each step; beam reordering, batch selection and cropping
go through it. Attention functions are not handed the cache, only its keys; each ``MoBACacheLayer``
therefore registers the keys tensor it returns from ``update`` and the attention function looks its layer
up by that very tensor. With any other cache (e.g. the plain ``DynamicCache`` that ``generate`` makes when
none is passed) the sums are rebuilt from all cached keys at every step: the same results, at the cost of
reading the whole cache. Not supported: torch.compile of the model, static caches, offloading, and sliding
windows (MoBA's block selection replaces them; a warning says so).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from flashmoba._checks import BACKENDS, check_bool, check_choice, check_routing_args
from flashmoba.api import moba_attn_varlen
from flashmoba.decode import MoBAKVCache, dense_decode, moba_decode

__all__ = ["MoBAPadding", "MoBACacheLayer", "MoBACache", "moba_mask", "moba_attention_forward", "register"]

IMPLEMENTATION = "moba"


@dataclass(frozen=True)
class _Settings:
    block_size: int
    topk: int
    dense_layers: tuple[int, ...]
    shared_kv_routing: bool
    backend: str


_registered: _Settings | None = None


def _validated_settings(block_size, topk, dense_layers, shared_kv_routing, backend, source: str) -> _Settings:
    block_size, topk = check_routing_args(block_size, topk, True)
    if isinstance(dense_layers, (str, bytes)) or not hasattr(dense_layers, "__iter__"):
        raise TypeError(f"{source}dense_layers must be a sequence of layer indices, got {dense_layers!r}")
    dense_layers = tuple(dense_layers)
    for index in dense_layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{source}dense_layers must hold ints, got {index!r}")
    check_bool(f"{source}shared_kv_routing", shared_kv_routing)
    check_choice("backend", backend, BACKENDS)
    return _Settings(block_size, topk, dense_layers, shared_kv_routing, backend)


def _layer_settings(module) -> tuple[_Settings, bool]:
    """The settings of one attention module (config fields override register()) and whether it is dense."""
    if _registered is None:
        raise RuntimeError(
            "call flashmoba.integrations.transformers.register() before using attn_implementation='moba'"
        )
    config = module.config

    def field(name, default):
        value = getattr(config, f"moba_{name}", None)
        return default if value is None else value

    settings = _validated_settings(
        field("block_size", _registered.block_size),
        field("topk", _registered.topk),
        field("dense_layers", _registered.dense_layers),
        field("shared_kv_routing", _registered.shared_kv_routing),
        _registered.backend,
        source="config.moba_",
    )
    if not settings.dense_layers:
        return settings, False
    num_layers = config.num_hidden_layers
    for index in settings.dense_layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"dense layer index {index} is out of range for {num_layers} layers")
    return settings, module.layer_idx in {index % num_layers for index in settings.dense_layers}


# ----------------------------------------------------------------------------------------------------
# the mask function: padding layout instead of a dense mask


@dataclass
class MoBAPadding:
    """What the "moba" mask function hands every attention layer in place of a 4-D mask.

    Attributes (``Tk`` = cached + new tokens):
        indices: int64 ``[N]``, flat ``b * Tk + t`` indices of the real tokens (to unpad a prefill).
        cu_seqlens: int32 ``[B + 1]``, sequence bounds of the unpadded tokens.
        max_seqlen: the longest row.
        starts: int32 ``[B]``, the first real token of each row, or None unless the rows are left padded.
        starts_host: ``starts`` as a tuple of ints (None when ``starts`` is).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    starts: torch.Tensor | None
    starts_host: tuple[int, ...] | None


def moba_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> MoBAPadding | None:
    """The "moba" entry of transformers' AttentionMaskInterface: None when nothing is padded, else a MoBAPadding.

    MoBA is causal by construction and packing is read from the attention kwargs, so only padding matters here.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    if bool(mask.all()):
        return None
    lengths = mask.sum(1, dtype=torch.int32)
    starts = kv_length - lengths
    left_padded = bool((mask == (torch.arange(kv_length, device=mask.device)[None, :] >= starts[:, None])).all())
    if kv_length > q_length:
        if not left_padded:
            raise ValueError(
                "MoBA decoding over a cache needs left padding (every row: padding, then its tokens); got a mask "
                "with padding after real tokens. Use tokenizer.padding_side = 'left' for generation."
            )
        if int(lengths.min()) < q_length:
            raise ValueError(
                f"with cached tokens, all {q_length} new tokens of every row must be real (not padding); a row "
                f"holds only {int(lengths.min())} real tokens"
            )
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return MoBAPadding(
        indices=mask.flatten().nonzero().squeeze(1),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        starts=starts if left_padded else None,
        starts_host=tuple(starts.tolist()) if left_padded else None,
    )


# ----------------------------------------------------------------------------------------------------
# the cache: a DynamicLayer that also keeps the running block key sums


_layer_of_keys: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id(keys tensor) -> its layer


class MoBACacheLayer(DynamicLayer):
    """A cache layer whose keys and values live in a ``flashmoba.MoBAKVCache``.

    ``keys`` / ``values`` are ``[B, HKV, T, D]`` views of the cache's buffers (every row, padding included,
    as transformers expects). The attention function tells the cache the rows' left padding at prefill and
    binds its block size at the first MoBA step; a dense layer never builds block sums.

    Attributes:
        cache: the ``flashmoba.MoBAKVCache`` (``None`` until the first update).
        padding: the rows' left padding the cache was told (host tuple), or ``None``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cache: MoBAKVCache | None = None
        self.padding: tuple[int, ...] | None = None  # the left padding the cache was told, per row

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.cache = MoBAKVCache.growing(block_size=None)
        self.is_initialized = True

    def _expose(self) -> None:
        """Point ``keys`` / ``values`` at the rows in use, and register the keys view for the attention."""
        if self.keys is not None:
            _layer_of_keys.pop(id(self.keys), None)
        rows = self.cache.max_rows
        self.keys = self.cache.k[:, :rows].transpose(1, 2)
        self.values = self.cache.v[:, :rows].transpose(1, 2)
        _layer_of_keys[id(self.keys)] = self

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states.transpose(1, 2), value_states.transpose(1, 2))
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.cache is None or self.cache.is_empty else self.cache.max_rows

    def _reorder(self, index: torch.Tensor) -> None:
        """Sequence ``i`` becomes the old sequence ``index[i]``, its padding record included."""
        if self.get_seq_length() > 0:
            index = index.cpu()
            self.cache.reorder(index)
            if self.padding is not None:
                self.padding = tuple(self.padding[i] for i in index.tolist())
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._reorder(torch.arange(self.cache.batch_size)[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._reorder(torch.arange(self.cache.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        length = self.get_seq_length()
        if tokens_to_remove > 0:  # the legacy form: the length to keep
            tokens_to_remove = max(length - tokens_to_remove, 0)
        if length and tokens_to_remove:
            self.cache.crop(min(abs(tokens_to_remove), length))
            self._expose()

    def reset(self) -> None:
        if self.keys is not None:
            _layer_of_keys.pop(id(self.keys), None)
        self.keys = self.values = None
        self.cache, self.padding = None, None
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("MoBACache layers cannot be offloaded")


class MoBACache(DynamicCache):
    """A ``DynamicCache`` of ``MoBACacheLayer``: pass it as ``past_key_values`` to ``generate``.

    Every layer keeps all tokens (MoBA replaces sliding windows), created lazily at its first update.
    """

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = MoBACacheLayer


def _cache_layer_of(keys: torch.Tensor) -> MoBACacheLayer | None:
    layer = _layer_of_keys.get(id(keys))
    return layer if layer is not None and layer.keys is keys else None


# ----------------------------------------------------------------------------------------------------
# the attention function


def _dense_varlen(q, k, v, cu_seqlens, causal, scale):
    """Dense attention of packed sequences, one SDPA call each. q ``[N, HQ, D]``, k/v ``[N, HKV, D]``."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                is_causal=causal,
                scale=scale,
                enable_gqa=True,
            ).transpose(0, 1)
    return out


def _prefill(q, k, v, padding, settings, dense, causal, scale, kwargs):
    """Attention without cached tokens. q ``[B, T, HQ, D]``, k/v ``[B, T, HKV, D]`` -> ``[B, T, HQ, D]``."""
    B, T, HQ, D = q.shape
    cu_seqlens, max_seqlen, indices = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"), None
    position_ids = kwargs.get("position_ids")
    if cu_seqlens is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if B != 1 or padding is not None or (cu_k is not None and not torch.equal(cu_k, cu_seqlens)):
            raise ValueError(
                "packed inputs (cu_seq_lens_q/k) need batch size 1, no padding mask and cu_seq_lens_k == cu_seq_lens_q"
            )
    elif padding is not None:
        indices, cu_seqlens, max_seqlen = padding.indices, padding.cu_seqlens, padding.max_seqlen
    elif (
        B == 1
        and position_ids is not None
        and position_ids.dim() == 2
        and bool((torch.diff(position_ids[0]) != 1).any())
    ):
        (cu_seqlens, _), (max_seqlen, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    else:
        cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=q.device) * T
        max_seqlen = T
    max_seqlen = None if max_seqlen is None else int(max_seqlen)

    def packed(x):
        x = x.reshape(B * T, x.shape[2], D)
        return x if indices is None else x[indices]

    qp, kp, vp = packed(q), packed(k), packed(v)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if dense:
        out = _dense_varlen(qp, kp, vp, cu_seqlens, causal, scale)
    else:
        out = moba_attn_varlen(
            qp,
            kp,
            vp,
            cu_seqlens,
            max_seqlen=max_seqlen,
            block_size=settings.block_size,
            topk=settings.topk,
            causal=causal,
            softmax_scale=scale,
            backend=settings.backend,
        )
    if indices is None:
        return out.view(B, T, HQ, D)
    full = out.new_zeros(B * T, HQ, D)
    full[indices] = out
    return full.view(B, T, HQ, D)


def _starts(padding: MoBAPadding | None, batch: int, device) -> tuple[torch.Tensor, tuple[int, ...]]:
    if padding is None:
        return torch.zeros(batch, dtype=torch.int32, device=device), (0,) * batch
    return padding.starts, padding.starts_host


def _decode_cache(layer: MoBACacheLayer | None, k, v, padding: MoBAPadding | None) -> MoBAKVCache:
    """The cache the new queries attend over: the layer's, told its rows' left padding, or (any other cache
    class) one over the given keys and values, whose block sums are then summed from every row."""
    starts, starts_host = _starts(padding, k.shape[0], k.device)
    if layer is None:
        return MoBAKVCache.from_tensors(k, v, k.shape[1] - starts, starts=starts, block_size=None)
    if layer.padding != starts_host:
        layer.cache.mark_left_padding(starts)
        layer.padding = starts_host
    return layer.cache


def moba_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MoBAPadding | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The "moba" entry of transformers' AttentionInterface.

    Args:
        module: the attention module (its ``config`` and ``layer_idx`` pick the settings).
        query: ``[B, HQ, Tq, D]``; key, value: ``[B, HKV, Tk, D]``, every cached token included.
        attention_mask: what ``moba_mask`` returned.
        scaling: softmax scale (default ``D ** -0.5``).

    Returns:
        ``(out [B, Tq, HQ, D], None)`` (no attention weights).
    """
    if dropout:
        raise ValueError(f"MoBA attention has no dropout: set config.attention_dropout = 0.0 (got {dropout})")
    if attention_mask is not None and not isinstance(attention_mask, MoBAPadding):
        raise TypeError(
            f"attention_mask must come from the 'moba' mask function, got {type(attention_mask).__name__} "
            "(was the mask built for another attn_implementation?)"
        )
    if kwargs.get("sliding_window") is not None:
        warnings.warn(
            "attn_implementation='moba' ignores the model's sliding window: MoBA's block selection replaces it",
            stacklevel=2,
        )
    settings, dense = _layer_settings(module)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, T, H, D] views
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    layer = _cache_layer_of(key)
    if Tk == Tq:
        out = _prefill(q, k, v, attention_mask, settings, dense, causal, scaling, kwargs)
        if layer is not None and (attention_mask is None or attention_mask.starts is not None):
            _decode_cache(layer, k, v, attention_mask)  # the rows' left padding, for the steps that follow
        return out, None
    if not causal:
        raise ValueError("attention over cached tokens is causal; this module is not (is_causal=False)")
    if kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError("packed inputs (cu_seq_lens_q/k) cannot be combined with cached tokens")
    cache = _decode_cache(layer, k, v, attention_mask)
    if dense:
        return dense_decode(q, cache, softmax_scale=scaling), None
    if layer is None:
        warnings.warn(
            "MoBA decoding without a MoBACache rebuilds the block centroids from every cached key at each step; "
            "pass past_key_values=flashmoba.integrations.transformers.MoBACache() to keep them incrementally",
            stacklevel=2,
        )
    cache.bind_block_size(settings.block_size)
    out = moba_decode(
        q,
        cache,
        topk=settings.topk,
        shared_kv_routing=settings.shared_kv_routing,
        softmax_scale=scaling,
        backend=settings.backend,
    )
    return out, None


def register(
    block_size: int = 128,
    topk: int = 8,
    dense_layers=(),
    *,
    shared_kv_routing: bool = False,
    backend: str = "auto",
) -> None:
    """Make ``attn_implementation="moba"`` available to transformers models (calling it again updates the defaults).

    Args:
        block_size: tokens per MoBA block.
        topk: blocks attended per query and head, the own block included.
        dense_layers: indices of layers kept dense (negative ones count from the last layer).
        shared_kv_routing: cached decoding selects one set of blocks per KV group (see
            ``flashmoba.moba_decode``); prefill always routes per query head.
        backend: "auto", "reference" or "triton", as in ``flashmoba.moba_attn_varlen``.

    Each may be overridden per model by ``config.moba_block_size``, ``moba_topk``, ``moba_dense_layers``,
    ``moba_shared_kv_routing``.
    """
    global _registered
    _registered = _validated_settings(block_size, topk, dense_layers, shared_kv_routing, backend, source="")
    AttentionInterface.register(IMPLEMENTATION, moba_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, moba_mask)
