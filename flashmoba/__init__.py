"""flashmoba: Mixture of Block Attention (MoBA) with FlashMoBA-style Triton kernels.

Public entry points:

* ``moba_attn`` / ``moba_attn_varlen``: MoBA attention (batched ``[B, T, H, D]`` / packed
  ``[N, H, D]`` + ``cu_seqlens``), forward and backward;
* ``moba_route_varlen``: the router alone (selected blocks and the block -> query index);
* ``moba_decode`` / ``MoBAKVCache``: sparse decoding of the newest tokens over a KV cache;
* ``flashmoba.reference``: the naive definition, the oracle of every test.
"""

from flashmoba.api import moba_attn, moba_attn_varlen, moba_route_varlen
from flashmoba.decode import MoBAKVCache, moba_decode
from flashmoba.routing.result import BlockIndex, MoBARouting

__version__ = "0.1.0"

__all__ = [
    "moba_attn",
    "moba_attn_varlen",
    "moba_route_varlen",
    "moba_decode",
    "MoBAKVCache",
    "MoBARouting",
    "BlockIndex",
    "__version__",
]
