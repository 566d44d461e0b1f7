"""Key convolution (FlashMoBA section 4): a short causal depthwise convolution on the keys.

    k'_t = k_t + SiLU( sum_{l=0}^{W-1} w_l * k_{t-l} + b )      (per channel; b optional)

applied to the keys before routing and attention, so the block centroids and the attended keys are both
the convolved ones. It mixes each key with its ``W - 1`` predecessors, which the paper credits with
clustering relevant tokens inside a block (a larger effective signal for the router).

Conventions
    * ``weight [C, W]`` is in torch's cross-correlation order: column ``W - 1 - l`` multiplies the key
      ``l`` tokens back, so ``weight[:, -1]`` weighs the current token. The convolution is exactly
      ``F.conv1d(groups=C)`` over the sequence left-padded with ``W - 1`` zeros.
    * Packed sequences (``cu_seqlens``) never see each other: before a sequence's first token the
      convolution reads zeros, or the rolling ``state`` when one is given.
    * Decoding: ``state [S, W - 1, C]`` holds the last ``W - 1`` raw keys of every sequence. It is read as
      the left context of this call and then overwritten in place with the new last ``W - 1`` keys, so
      feeding a sequence in pieces gives exactly the keys of one full pass. No gradient flows into it.
    * Initialisation (the paper does not say): weight and bias start at zero, so a fresh layer is exactly
      the identity, ``k' = k + SiLU(0) = k`` (an untrained MoBA layer routes like plain MoBA), while the
      weight gradient ``SiLU'(0) sum_t g_t k_{t-l} = 0.5 sum_t g_t k_{t-l}`` is non-zero, so it learns
      from the first step.

Backends (the names of ``flashmoba.api``): "triton" runs one fused kernel for the forward and one for
the backward (the weight gradient is reduced per tile and summed once, deterministically); "reference"
is the same arithmetic in PyTorch (any device and dtype); "auto" picks Triton for CUDA tensors. The naive
per-lag loop ``key_conv_naive`` is the oracle of the tests.

Modules
    * ``reference``: ``key_conv_naive`` (the definition) and the PyTorch
      backend;
    * ``kernels``: the Triton kernels and their launchers, imported only when the
      Triton backend runs (this package imports without triton);
    * ``ops``: ``key_conv``, checks, backend dispatch, autograd, the state;
    * ``module``: the ``KeyConv`` layer.
"""

from flashmoba.nn.keyconv.module import KeyConv
from flashmoba.nn.keyconv.ops import key_conv
from flashmoba.nn.keyconv.reference import key_conv_naive

__all__ = ["KeyConv", "key_conv", "key_conv_naive"]
