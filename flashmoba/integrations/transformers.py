"""MoBA in Hugging Face transformers: ``attn_implementation="moba"`` for models on the standard attention interface.

Usage (Llama, Qwen2/3, Mistral families and any model that calls ``ALL_ATTENTION_FUNCTIONS``)::

    from flashmoba.integrations.transformers import MoBACache, register
    register(block_size=128, topk=8, dense_layers=(-1, -2, -3))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    out = model.generate(**inputs, past_key_values=MoBACache())

Settings in the model config (``moba_block_size``, ``moba_topk``, ``moba_dense_layers``,
``moba_shared_kv_routing``) override those given to :func:`register`. Dense layers (negative indices count
from the last layer; MoBA keeps the last layers dense) run PyTorch's scaled-dot-product attention.

How a forward pass is served:

* the "moba" mask function builds no ``[T x T]`` mask: it turns the 2-D padding mask into a
  :class:`MoBAPadding` (token indices and sequence bounds), once per forward for all layers;
* prefill (no cached tokens): padded batches are unpadded, packed batches are split by the
  ``cu_seq_lens_q/k`` kwargs or by restarting ``position_ids``, and :func:`flashmoba.moba_attn_varlen`
  runs MoBA on the packed tokens, GQA without repeating K/V;
* with cached tokens (generation, chunked prefill, speculative verification):
  :func:`flashmoba.moba_decode` routes over the cached block centroids; left padding is supported, as
  generation needs.

Where the centroids live: the running block key sums are kept per layer in :class:`MoBACacheLayer`, the
layers of :class:`MoBACache` (a ``DynamicCache``), so that beam reordering, batch selection and cropping
keep them consistent. Attention functions are not handed the cache, only its keys; each
:class:`MoBACacheLayer` therefore registers the keys tensor it returns from ``update`` and the attention
function looks its layer up by that very tensor. Each step folds in only the new tokens' keys. With
any other cache (e.g. the plain ``DynamicCache`` that ``generate`` makes when none is passed) the sums are
rebuilt from all cached keys at every step: the same results, at the cost of reading the whole cache.
Not supported: torch.compile of the model, static caches, and sliding windows (MoBA's block selection
replaces them; a warning says so).
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

from flashmoba.api import BACKENDS, _check_common, moba_attn_varlen
from flashmoba.decode.api import _moba_decode
from flashmoba.decode.cache import accumulate_block_sums, block_sums_dtype

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
    _check_common(block_size, topk, True)
    if isinstance(dense_layers, (str, bytes)) or not hasattr(dense_layers, "__iter__"):
        raise TypeError(f"{source}dense_layers must be a sequence of layer indices, got {dense_layers!r}")
    dense_layers = tuple(dense_layers)
    for index in dense_layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{source}dense_layers must hold ints, got {index!r}")
    if not isinstance(shared_kv_routing, bool):
        raise TypeError(f"{source}shared_kv_routing must be a bool, got {type(shared_kv_routing).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _Settings(block_size, topk, dense_layers, shared_kv_routing, backend)


def _layer_settings(module) -> tuple[_Settings, bool]:
    """The settings of one attention module (config fields override register()) and whether it is dense."""
    if _registered is None:
        raise RuntimeError("call flashmoba.integrations.transformers.register() before using attn_implementation='moba'")
    config = module.config

    def field(name, default):
        value = getattr(config, f"moba_{name}", None)
        return default if value is None else value

    settings = _validated_settings(
        field("block_size", _registered.block_size), field("topk", _registered.topk),
        field("dense_layers", _registered.dense_layers), field("shared_kv_routing", _registered.shared_kv_routing),
        _registered.backend, source="config.moba_",
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
    """A ``DynamicLayer`` that also holds the running block key sums of a MoBA layer.

    The sums are filled by the attention function (it alone knows the padding); this class keeps them
    consistent when the cache is reordered, subset or repeated, and drops them when it is cropped or reset
    (they are then rebuilt from the cached keys at the next step).

    Attributes:
        block_sums: ``[B, NB, HKV, D]`` sums (float32; float64 for float64 keys), or None.
        sums_rows: cache rows already folded into ``block_sums``.
        sums_starts: first real row of each sequence (its left padding) the sums were built with.
        sums_block_size: the block size the sums were built with.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._drop_sums()

    def _drop_sums(self):
        self.block_sums: torch.Tensor | None = None
        self.sums_rows = 0
        self.sums_starts: tuple[int, ...] = ()
        self.sums_block_size = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is not None:
            _layer_of_keys.pop(id(self.keys), None)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        _layer_of_keys[id(keys)] = self
        return keys, values

    def _select_sums(self, index) -> None:
        if self.block_sums is not None:
            rows = torch.arange(len(self.sums_starts))[index].tolist()
            self.block_sums = self.block_sums[torch.as_tensor(rows, device=self.block_sums.device)]
            self.sums_starts = tuple(self.sums_starts[row] for row in rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_sums(beam_idx.cpu())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_sums(indices.cpu() if isinstance(indices, torch.Tensor) else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._select_sums(torch.arange(len(self.sums_starts)).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._drop_sums()

    def reset(self) -> None:
        super().reset()
        self._drop_sums()


class MoBACache(DynamicCache):
    """A ``DynamicCache`` of :class:`MoBACacheLayer`: pass it as ``past_key_values`` to ``generate``.

    Every layer keeps all tokens (MoBA replaces sliding windows), created lazily at its first update.
    """

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = MoBACacheLayer


def _cache_layer_of(keys: torch.Tensor) -> MoBACacheLayer | None:
    layer = _layer_of_keys.get(id(keys))
    return layer if layer is not None and layer.keys is keys else None


def _fold_new_keys(layer: MoBACacheLayer | None, k, starts, starts_host, block_size, new_rows) -> torch.Tensor:
    """Block sums covering all rows of ``k [B, Tk, HKV, D]``: the layer's, updated with its new rows only.

    Without a layer, or when its sums no longer describe the rows that preceded this step's ``new_rows``,
    the sums are built from every row.
    """
    B, Tk, HKV, D = k.shape
    needed = -(-Tk // block_size)
    if layer is None:
        layer = MoBACacheLayer()  # a throw-away holder
    sums = layer.block_sums
    if (sums is None or layer.sums_block_size != block_size or layer.sums_starts != starts_host
            or layer.sums_rows > Tk - new_rows or sums.shape[0] != B or sums.dtype != block_sums_dtype(k.dtype)):
        sums = torch.zeros(B, needed, HKV, D, dtype=block_sums_dtype(k.dtype), device=k.device)
        layer.sums_rows, layer.sums_starts, layer.sums_block_size = 0, starts_host, block_size
    elif sums.shape[1] < needed:
        # Grow geometrically so that generation reallocates O(log T) times.
        grown = sums.new_zeros(B, max(needed, 2 * sums.shape[1]), HKV, D)
        grown[:, : sums.shape[1]] = sums
        sums = grown
    begin = (layer.sums_rows - starts).clamp(min=0)
    accumulate_block_sums(sums, k, starts, begin, Tk - starts, block_size, Tk - layer.sums_rows)
    layer.block_sums, layer.sums_rows = sums, Tk
    return sums


# ----------------------------------------------------------------------------------------------------
# the attention function


def _dense_varlen(q, k, v, cu_seqlens, causal, scale):
    """Dense attention of packed sequences, one SDPA call each. q ``[N, HQ, D]``, k/v ``[N, HKV, D]``."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=causal, scale=scale, enable_gqa=True,
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
            raise ValueError("packed inputs (cu_seq_lens_q/k) need batch size 1, no padding mask and "
                             "cu_seq_lens_k == cu_seq_lens_q")
    elif padding is not None:
        indices, cu_seqlens, max_seqlen = padding.indices, padding.cu_seqlens, padding.max_seqlen
    elif B == 1 and position_ids is not None and position_ids.dim() == 2 and bool((torch.diff(position_ids[0]) != 1).any()):
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
            qp, kp, vp, cu_seqlens, max_seqlen=max_seqlen, block_size=settings.block_size, topk=settings.topk,
            causal=causal, softmax_scale=scale, backend=settings.backend,
        )
    if indices is None:
        return out.view(B, T, HQ, D)
    full = out.new_zeros(B * T, HQ, D)
    full[indices] = out
    return full.view(B, T, HQ, D)


def _dense_cached(query, key, value, starts, scale):
    """Dense causal attention of the newest tokens over a left-padded cache ([B, H, T, D] layout)."""
    Tq, Tk = query.shape[2], key.shape[2]
    row = torch.arange(Tk, device=query.device)
    query_row = Tk - Tq + torch.arange(Tq, device=query.device)
    allowed = (row[None, None, :] >= starts[:, None, None]) & (row[None, None, :] <= query_row[None, :, None])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _starts(padding: MoBAPadding | None, batch: int, device) -> tuple[torch.Tensor, tuple[int, ...]]:
    if padding is None:
        return torch.zeros(batch, dtype=torch.int32, device=device), (0,) * batch
    return padding.starts, padding.starts_host


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
        attention_mask: what :func:`moba_mask` returned.
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
        warnings.warn("attn_implementation='moba' ignores the model's sliding window: MoBA's block selection "
                      "replaces it", stacklevel=2)
    settings, dense = _layer_settings(module)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, T, H, D] views
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    layer = _cache_layer_of(key)
    if Tk == Tq:
        out = _prefill(q, k, v, attention_mask, settings, dense, causal, scaling, kwargs)
        if layer is not None and not dense and (attention_mask is None or attention_mask.starts is not None):
            starts, starts_host = _starts(attention_mask, B, q.device)
            _fold_new_keys(layer, k, starts, starts_host, settings.block_size, Tq)
        return out, None
    if not causal:
        raise ValueError("attention over cached tokens is causal; this module is not (is_causal=False)")
    if kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError("packed inputs (cu_seq_lens_q/k) cannot be combined with cached tokens")
    starts, starts_host = _starts(attention_mask, B, q.device)
    if dense:
        return _dense_cached(query, key, value, starts, scaling), None
    if layer is None:
        warnings.warn(
            "MoBA decoding without a MoBACache rebuilds the block centroids from every cached key at each step; "
            "pass past_key_values=flashmoba.integrations.transformers.MoBACache() to keep them incrementally",
            stacklevel=2,
        )
    block_sums = _fold_new_keys(layer, k, starts, starts_host, settings.block_size, Tq)
    out = _moba_decode(
        q, k, v, Tk - starts, block_sums, cache_starts=starts, block_size=settings.block_size, topk=settings.topk,
        shared_kv_routing=settings.shared_kv_routing, softmax_scale=scaling, return_lse=False,
        backend=settings.backend, check_values=False,
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
            :func:`flashmoba.moba_decode`); prefill always routes per query head.
        backend: "auto", "reference" or "triton", as in :func:`flashmoba.moba_attn_varlen`.

    Each may be overridden per model by ``config.moba_block_size``, ``moba_topk``, ``moba_dense_layers``,
    ``moba_shared_kv_routing``.
    """
    global _registered
    _registered = _validated_settings(block_size, topk, dense_layers, shared_kv_routing, backend, source="")
    AttentionInterface.register(IMPLEMENTATION, moba_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, moba_mask)
