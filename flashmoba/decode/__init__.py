"""Decoding over a KV cache: sparse MoBA with incremental block centroids, and dense attention.

* ``MoBAKVCache``: the one KV cache type (block key sums kept as tokens arrive);
* ``moba_decode``: the newest tokens of every sequence against its cache, routed (decode, cached
  prefill); ``dense_decode``: the same for dense and sliding-window layers;
* ``accumulate_block_sums``: the incremental update, for caches managed elsewhere;
* ``flashmoba.decode.reference``: the naive definition; ``flashmoba.decode.kernels``: Triton.
"""

from flashmoba.decode.api import dense_decode, moba_decode
from flashmoba.decode.cache import MoBAKVCache, accumulate_block_sums, block_sums_dtype

__all__ = ["moba_decode", "dense_decode", "MoBAKVCache", "accumulate_block_sums", "block_sums_dtype"]
