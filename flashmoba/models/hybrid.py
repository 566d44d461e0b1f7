"""The paper's hybrid decoder as a transformers model: MoBAHybridModel and MoBAHybridForCausalLM.

Pre-norm decoder layers (RMSNorm, attention, RMSNorm, SwiGLU MLP, residuals); sliding-window attention
with RoPE at even indices, MoBA or dense attention without positional encoding (optionally with the key
convolution) at odd indices; see ``flashmoba.models.config`` for the layout and the presets.

Inputs, three forms (the layers always see sequences that never attend to each other):

* ``input_ids [B, T]``: B sequences of T tokens;
* ``input_ids [1, N]`` + ``cu_seqlens [S + 1]``: packed documents; positions restart per document;
* ``input_ids [B, T]`` + ``attention_mask [B, past + T]`` (0 = padding, as transformers' generate()
  passes it): every row is the sequence of its real tokens in order, padding anywhere (right or left) is
  skipped. At a padding position the outputs repeat those of the row's last real token before it (zeros
  if none), so that ``logits[:, -1]`` is the next-token prediction of right-padded rows too.

Labels are shifted inside the model: token t is trained to predict token t + 1 of the same sequence (the
next real token with an attention mask); the last token of every sequence predicts nothing, so no loss
crosses a document boundary; -100 is ignored.

Generation keeps a ``MoBAHybridCache`` (one ``MoBAKVCache`` per layer, key-conv
states included; MoBA layers decode sparsely through ``flashmoba.moba_decode``); ``use_cache`` defaults to
False in ``forward`` and generate() turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from flashmoba._checks import check_cu_seqlens, check_int, common_length
from flashmoba.decode import MoBAKVCache
from flashmoba.models.config import MoBAHybridConfig
from flashmoba.models.loss import linear_cross_entropy
from flashmoba.nn import KeyConv, MoBAAttention
from flashmoba.nn.varlen import next_token_targets, uniform_cu_seqlens

__all__ = [
    "MoBAHybridCache",
    "MoBAHybridModelOutput",
    "MoBAHybridPreTrainedModel",
    "MoBAHybridModel",
    "MoBAHybridForCausalLM",
]


class MoBAHybridCache:
    """Generation cache of the hybrid model: one growing ``MoBAKVCache`` per layer.

    ``num_columns`` counts the input columns consumed so far, padding included; transformers reads it as
    ``get_seq_length`` (the per-sequence token counts are in each layer's ``seqlens``).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.layers = [MoBAKVCache.growing(block_size=None) for _ in range(num_layers)]
        self.num_columns = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_columns

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence ``i`` continues the old sequence ``beam_idx[i]``."""
        for layer in self.layers:
            layer.reorder(beam_idx)


@dataclass
class MoBAHybridModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the packed view the layers computed on.

    Attributes:
        last_hidden_state: ``[B, T, hidden]`` in the input's layout (``[1, N, hidden]`` for packed input).
        packed_hidden_state: ``[N, hidden]`` the real tokens only, sequence after sequence.
        cu_seqlens: ``[S + 1]`` the sequences of ``packed_hidden_state``.
    """

    packed_hidden_state: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# padding <-> packing


def _real_tokens(attention_mask, input_ids):
    """bool ``[B, T]`` real-token mask of this call's columns, or None when every column is real."""
    if attention_mask is None:
        return None
    batch, seq_len = input_ids.shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
        raise ValueError(
            f"attention_mask must be [B, past + T] with B={batch}, T={seq_len}, got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, -seq_len:].bool()
    return None if bool(mask.all()) else mask


def _fill_from_packed(packed, mask):
    """``[B, T, ...]`` from packed real tokens ``[N, ...]``: each padding position repeats the last real
    token before it in its row (zeros if none)."""
    seen = mask.long().cumsum(1)  # real tokens up to and including each position
    row_start = F.pad(seen[:, -1].cumsum(0), (1, 0))[:-1]
    index = row_start[:, None] + seen - 1
    filled = packed[index.clamp(min=0)]
    return torch.where((seen > 0).view(*seen.shape, *[1] * (packed.dim() - 1)), filled, 0)


def _mean_loss(total, targets, num_items_in_batch):
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
    return total / count


# ----------------------------------------------------------------------------------------------------
# modules


class MoBAHybridMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoBAHybridDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, config: MoBAHybridConfig, layer_idx: int):
        super().__init__()
        attn_type = config.layer_attn_types[layer_idx]
        local = attn_type == "swa"
        self.layer_idx = layer_idx
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MoBAAttention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            attn_type=attn_type,
            block_size=config.moba_block_size,
            topk=config.moba_topk,
            window=config.swa_window,
            kconv_size=0 if local else config.kconv_size,
            rope=local,
            rope_theta=config.rope_theta,
            layer_idx=layer_idx,
            backend=config.attn_backend,
            causal_backend=config.causal_backend,
        )
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoBAHybridMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden_states,
        cu_seqlens=None,
        past_key_values: MoBAHybridCache | None = None,
        max_seqlen=None,
        batch_shape=None,
    ):
        cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        attn = self.self_attn(
            self.input_layernorm(hidden_states), cu_seqlens, cache, max_seqlen=max_seqlen, batch_shape=batch_shape
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MoBAHybridPreTrainedModel(PreTrainedModel):
    """Weights init, checkpointing and cache conventions shared by the hybrid models."""

    config_class = MoBAHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoBAHybridDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, KeyConv):
            init.zeros_(module.weight)  # the identity map (flashmoba.nn.keyconv)
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The layers keep their own cache (per-sequence lengths, key-conv state): see MoBAHybridCache.
        return False


class MoBAHybridModel(MoBAHybridPreTrainedModel):
    """Embedding, decoder layers and final norm (no LM head)."""

    def __init__(self, config: MoBAHybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MoBAHybridDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MoBAHybridCache | None = None,
        use_cache: bool | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MoBAHybridModelOutput:
        """Run the decoder.

        Args:
            input_ids: ``[B, T]``, or ``[1, N]`` with ``cu_seqlens``.
            cu_seqlens: int32/int64 ``[S + 1]`` document boundaries of packed input.
            attention_mask: ``[B, past + T]``, 1 = real token, 0 = padding (module docstring).
            past_key_values: a ``MoBAHybridCache`` from an earlier call: the new tokens continue
                its sequences.
            use_cache: return a cache (a new one if none was passed); default False.
            max_seqlen: with ``cu_seqlens``, optional host-side upper bound of the documents' lengths
                (the packer knows it; it sizes the dense and sliding-window kernels' grid; default ``N``).
            position_ids: not supported (positions come from ``cu_seqlens`` / ``attention_mask`` / the
                cache); passing it raises.
            output_attentions: not supported; True raises.
            output_hidden_states: not supported; True raises.

        Returns:
            ``MoBAHybridModelOutput``.
        """
        if position_ids is not None:
            raise ValueError(
                "position_ids is not supported: positions restart per sequence (cu_seqlens / "
                "attention_mask) and continue from the cache"
            )
        if output_attentions or output_hidden_states:
            raise ValueError("output_attentions / output_hidden_states are not supported by MoBAHybridModel")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', input_ids)}")
        if past_key_values is not None and not isinstance(past_key_values, MoBAHybridCache):
            raise TypeError(f"past_key_values must be a MoBAHybridCache, got {type(past_key_values).__name__}")
        batch, seq_len = input_ids.shape
        mask = _real_tokens(attention_mask, input_ids)
        batch_shape = None
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass either cu_seqlens (packed documents) or attention_mask (padding), not both")
            if batch != 1:
                raise ValueError(f"with cu_seqlens, input_ids must be packed as [1, N], got {tuple(input_ids.shape)}")
            check_cu_seqlens(cu_seqlens, seq_len, input_ids.device)
            if max_seqlen is not None:
                max_seqlen = check_int("max_seqlen", max_seqlen, 0)
            hidden, layer_cu = self.embed_tokens(input_ids[0]), cu_seqlens
            # Documents of one length (known from the values just checked): the attention layers may run
            # them as a [documents, length] batch.
            length = common_length(cu_seqlens)
            batch_shape = (cu_seqlens.numel() - 1, length) if length is not None else None
        elif mask is not None:
            hidden = self.embed_tokens(input_ids[mask])
            layer_cu = F.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
            max_seqlen = seq_len  # a row's real tokens
        else:
            hidden, layer_cu = self.embed_tokens(input_ids), None
        if use_cache and past_key_values is None:
            past_key_values = MoBAHybridCache(self.config.num_layers)
        for layer in self.layers:
            hidden = layer(
                hidden,
                cu_seqlens=layer_cu,
                past_key_values=past_key_values,
                max_seqlen=max_seqlen,
                batch_shape=batch_shape,
            )
        hidden = self.norm(hidden)
        if past_key_values is not None:
            past_key_values.num_columns += seq_len
        packed = hidden.reshape(-1, hidden.shape[-1])
        if mask is not None:
            last_hidden = _fill_from_packed(packed, mask)
        else:
            last_hidden = hidden.view(batch, seq_len, -1)
            layer_cu = layer_cu if layer_cu is not None else uniform_cu_seqlens(batch, seq_len, hidden.device)
        return MoBAHybridModelOutput(
            last_hidden_state=last_hidden,
            past_key_values=past_key_values if use_cache else None,
            packed_hidden_state=packed,
            cu_seqlens=layer_cu,
        )


class MoBAHybridForCausalLM(MoBAHybridPreTrainedModel, GenerationMixin):
    """The hybrid decoder with an LM head; ``generate()`` works with its own cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoBAHybridConfig):
        super().__init__(config)
        self.model = MoBAHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def compile_layers(self, **compile_kwargs) -> MoBAHybridForCausalLM:
        """``torch.compile`` every decoder layer in place (``nn.Module.compile``), and return the model.

        The layer is the unit that compiles well: its attention ops are custom ops (no graph breaks), and
        the norms, rotary embedding, SwiGLU and residual adds around them fuse into a few kernels. The
        embedding and the chunked loss stay eager. ``compile_kwargs`` go to ``torch.compile``.
        """
        for layer in self.model.layers:
            layer.compile(**compile_kwargs)
        return self

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: MoBAHybridCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits, and the loss when ``labels`` are given.

        Args:
            input_ids: as in ``MoBAHybridModel.forward``, like ``cu_seqlens``, ``attention_mask``,
                ``past_key_values`` and ``use_cache``.
            labels: like ``input_ids`` (-100 = ignore); shifted inside (module docstring).
            logits_to_keep: return logits of the last ``logits_to_keep`` positions only (0 = all).
            num_items_in_batch: divide the summed loss by this instead of the number of targets
                (gradient accumulation, as transformers' Trainer passes it).

        Returns:
            ``CausalLMOutputWithPast``: ``logits [B, T or logits_to_keep, V]``, ``loss``, ``past_key_values``.
            In training mode with ``labels`` (and ``config.loss_chunk_size > 0``) the loss is the fused,
            chunked cross entropy and ``logits`` is None.
        """
        out = self.model(
            input_ids,
            cu_seqlens=cu_seqlens,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            mask = _real_tokens(attention_mask, input_ids)
            packed_labels = labels[mask] if mask is not None else labels.reshape(-1)
            targets = next_token_targets(packed_labels, out.cu_seqlens)
            if self.training and self.config.loss_chunk_size and self.lm_head.bias is None:
                # Training: the fused, chunked loss; no logits are returned (none are ever materialised).
                total = linear_cross_entropy(
                    out.packed_hidden_state, self.lm_head.weight, targets, chunk_size=self.config.loss_chunk_size
                )
                logits = None
            else:
                packed_logits = self.lm_head(out.packed_hidden_state)
                wide = packed_logits.to(torch.promote_types(packed_logits.dtype, torch.float32))
                total = F.cross_entropy(wide, targets, ignore_index=-100, reduction="sum")
                if mask is not None:
                    logits = _fill_from_packed(packed_logits, mask)[:, keep]
                else:
                    logits = packed_logits.view(*input_ids.shape, -1)[:, keep]
            loss = _mean_loss(total, targets, num_items_in_batch)
        else:
            logits = self.lm_head(out.last_hidden_state[:, keep])
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
