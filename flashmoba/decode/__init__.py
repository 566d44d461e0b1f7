"""Sparse MoBA decoding over a KV cache, with incremental block centroids.

* :func:`moba_decode`: the newest tokens of every sequence against its cache (decode, cached prefill);
* :class:`MoBAKVCache`: a preallocated cache that keeps the running block key sums routing reads;
* :func:`accumulate_block_sums`: the incremental update, for caches managed elsewhere;
* :mod:`flashmoba.decode.reference`: the naive definition; :mod:`flashmoba.decode.kernels`: Triton.
"""

from flashmoba.decode.api import moba_decode
from flashmoba.decode.cache import MoBAKVCache, accumulate_block_sums, block_sums_dtype

__all__ = ["moba_decode", "MoBAKVCache", "accumulate_block_sums", "block_sums_dtype"]
