"""Torch modules built on MoBA: the key convolution and the attention layer.

* ``KeyConv`` / ``key_conv``: ``k' = k + SiLU(causal depthwise conv(k))`` (fused Triton kernels
  on CUDA, PyTorch elsewhere), varlen-aware, with a rolling decode state;
* ``MoBAAttention``: q/k/v/o projections, GQA, optional key conv and RoPE, attention "moba" /
  "dense" / "swa", batched or packed inputs, generation over a ``flashmoba.MoBAKVCache``;
* ``causal_attention``: the "dense" and "swa" layers' attention of packed sequences (FlashAttention's
  varlen kernel on CUDA, SDPA elsewhere).
"""

from flashmoba.nn.attention import ATTN_TYPES, MoBAAttention
from flashmoba.nn.causal import causal_attention
from flashmoba.nn.keyconv import KeyConv, key_conv, key_conv_naive

__all__ = [
    "ATTN_TYPES",
    "KeyConv",
    "MoBAAttention",
    "causal_attention",
    "key_conv",
    "key_conv_naive",
]
