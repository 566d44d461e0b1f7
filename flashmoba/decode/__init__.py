"""Decoding over a KV cache: sparse MoBA with incremental block centroids, and dense attention.

* :class:`MoBAKVCache`: the one KV cache type (block key sums kept as tokens arrive);
* :func:`moba_decode`: the newest tokens of every sequence against its cache, routed (decode, cached
  prefill); :func:`dense_decode`: the same for dense and sliding-window layers;
* :func:`accumulate_block_sums`: the incremental update, for caches managed elsewhere;
* :mod:`flashmoba.decode.reference`: the naive definition; :mod:`flashmoba.decode.kernels`: Triton.
"""

from flashmoba.decode.api import dense_decode, moba_decode
from flashmoba.decode.cache import MoBAKVCache, accumulate_block_sums, block_sums_dtype

__all__ = ["moba_decode", "dense_decode", "MoBAKVCache", "accumulate_block_sums", "block_sums_dtype"]
