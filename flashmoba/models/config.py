"""MoBAHybridConfig: the configuration of the paper's hybrid decoder, with named presets.

Layer layout (FlashMoBA section 5): counting layers from 1, the odd layers (1, 3, 5, ...; indices 0, 2,
4, ... in ``model.layers``) use sliding-window attention with RoPE, the even layers (indices 1, 3, 5,
...) use ``global_attn`` ("moba" or "dense") with no positional encoding and, if ``kconv_size > 0``, the
key convolution. ``MoBAHybridConfig.layer_attn_types`` spells the layout out.

Not in the paper (FlashMoBA digest, NOT FOUND): the number of KV heads (the presets use plain multi-head
attention), the FFN and norm types (SwiGLU and RMSNorm here; the 340M FFN width 2816 is the SwiGLU
width of a 4x MLP rounded up to 256, which supports SwiGLU there), tied embeddings (tied in every preset:
that makes the 340M preset 341M parameters, 374M untied).

Parameters of the presets, as ``model.num_parameters()`` counts them:

========  ======  ======  =====  ==  ======  =====  ==========================================
preset    layers  hidden  heads  kv  FFN     vocab  parameters
========  ======  ======  =====  ==  ======  =====  ==========================================
tiny      4       128     4x32   2   352     1024   0.87M
small     8       512     8x64   8   1408    32000  42.1M (25.7M without the embedding)
340m      24      1024    16x64  16  2816    32000  341M
1b        24      2048    32x64  32  8192    32000  1.68B (a SwiGLU FFN of 8192 makes the paper's
                                                    "1B" this large; the paper does not say its FFN type)
========  ======  ======  =====  ==  ======  =====  ==========================================
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from flashmoba._checks import BACKENDS, check_bool, check_choice, check_int
from flashmoba.nn.causal import CAUSAL_BACKENDS

__all__ = ["MoBAHybridConfig", "PRESETS", "GLOBAL_ATTN_TYPES"]

GLOBAL_ATTN_TYPES = ("moba", "dense")

PRESETS: dict[str, dict] = {
    # CPU tests: short sequences still span several MoBA blocks and SWA windows.
    "tiny": dict(
        vocab_size=1024,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=352,
        swa_window=32,
        moba_block_size=16,
        moba_topk=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    # Short GPU runs: head dim 64 and the paper's routing at a few thousand tokens.
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=1408,
        tie_word_embeddings=True,
    ),
    "340m": dict(
        vocab_size=32000,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        intermediate_size=2816,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=24,
        num_heads=32,
        num_kv_heads=32,
        head_dim=64,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
}


class MoBAHybridConfig(PretrainedConfig):
    r"""Configuration of ``MoBAHybridForCausalLM``.

    Attributes:
        vocab_size: token vocabulary.
        hidden_size: model width.
        intermediate_size: SwiGLU width.
        num_layers: decoder layers (alias ``num_hidden_layers``).
        num_heads: query heads (alias ``num_attention_heads``).
        num_kv_heads: KV heads (alias ``num_key_value_heads``); defaults to ``num_heads``.
        head_dim: D.
        swa_window: keys per query of the sliding-window layers (the query included).
        global_attn: "moba" or "dense", the attention of the even (1-based) layers.
        moba_block_size: MoBA block size of the global layers.
        moba_topk: MoBA blocks per query of the global layers (the own block counts).
        kconv_size: key-convolution width W on the global layers; 0 = off (the paper: 3 or 5).
        max_position_embeddings: the training context (informational: RoPE is computed on the fly, so
            longer inputs run, as in the paper's 64K evaluation of 8K-trained models).
        rope_theta: RoPE base of the sliding-window layers.
        rms_norm_eps: RMSNorm epsilon.
        initializer_range: std of the normal init of linear and embedding weights.
        tie_word_embeddings: share the LM head with the input embedding.
        attn_backend: "auto", "reference" or "triton" for MoBA and the key convolution ("reference" is the
            fast choice on CPU).
        causal_backend: "auto", "flash" or "sdpa" for the sliding-window and dense layers
            (``flashmoba.nn.causal.causal_attention``; "auto": FlashAttention's varlen kernel on CUDA).
        loss_chunk_size: tokens per chunk of the fused LM-head cross entropy used in training mode
            (``flashmoba.models.loss.linear_cross_entropy``; no ``[N, V]`` logits are kept); 0 = the
            plain path (full logits) always.
    """

    model_type = "moba_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
    }

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int | None = None
    head_dim: int = 64
    swa_window: int = 256
    global_attn: str = "moba"
    moba_block_size: int = 128
    moba_topk: int = 8
    kconv_size: int = 0
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attn_backend: str = "auto"
    causal_backend: str = "auto"
    loss_chunk_size: int = 4096
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self):
        """ValueError / TypeError naming the field, for an architecture that cannot be built."""
        minimum = {"kconv_size": 0, "loss_chunk_size": 0}
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "swa_window",
            "moba_block_size",
            "moba_topk",
            "kconv_size",
            "loss_chunk_size",
        ):
            setattr(self, name, check_int(name, getattr(self, name), minimum.get(name, 1)))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE on the sliding-window layers), got {self.head_dim}")
        check_choice("global_attn", self.global_attn, GLOBAL_ATTN_TYPES)
        check_choice("attn_backend", self.attn_backend, BACKENDS)
        check_choice("causal_backend", self.causal_backend, CAUSAL_BACKENDS)
        check_bool("tie_word_embeddings", self.tie_word_embeddings)

    @property
    def layer_attn_types(self) -> list[str]:
        """Attention of every layer by index: "swa" at even indices, ``global_attn`` at odd ones."""
        return ["swa" if i % 2 == 0 else self.global_attn for i in range(self.num_layers)]

    @classmethod
    def field_names(cls) -> tuple[list[str], list[str]]:
        """``(this model's fields and their aliases, the generic PretrainedConfig fields)``: the keywords
        ``from_preset`` takes, as two lists of names in declaration order."""
        own = [name for name in MoBAHybridConfig.__annotations__ if not name.startswith("_")]
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        generic = [f.name for f in fields if f.name not in own]
        return own + list(cls.attribute_map), generic

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MoBAHybridConfig:
        """A preset ("tiny", "small", "340m", "1b"; module docstring) with fields overridden by keyword.

        Raises:
            ValueError: an unknown preset name. TypeError: an override that is not a config field.
        """
        if not isinstance(name, str):
            raise TypeError(f"preset name must be a str, got {type(name).__name__}")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        own, generic = cls.field_names()
        unknown = [key for key in overrides if key not in own and key not in generic]
        if unknown:
            # PretrainedConfig would keep any keyword as an attribute: a misspelt field must not pass silently.
            raise TypeError(
                f"unknown config field(s) {', '.join(map(repr, unknown))}; the fields are "
                f"{', '.join(own)} (and the generic PretrainedConfig ones, e.g. dtype)"
            )
        return cls(**{**PRESETS[name], **overrides})
