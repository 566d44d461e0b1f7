"""Context parallelism for MoBA over torch.distributed: one sequence's tokens split over several GPUs.

* ``shard_sequence`` / ``unshard_sequence``: a rank's part of a sequence in the layout the ops
  expect ("zigzag": causal load balance; "contiguous"), and back;
* ``context_parallel_moba_attn`` (``[B, T / W, H, D]``) and ``context_parallel_moba_attn_varlen``
  (packed ``[N / W, H, D]`` with the whole batch's ``cu_seqlens``): exact MoBA of the whole sequences at
  this rank's tokens, forward and backward;
* ``ContextParallel``: the same for every attention layer of a model
  (``flashmoba.nn.MoBAAttention``: MoBA, dense and sliding-window layers, key convolution, RoPE), as
  ``flashmoba train --context-parallel N`` uses it.

How and why (the communication model with its numbers): ``docs/distributed.md``.
"""

from flashmoba.distributed.attention import context_parallel_moba_attn, context_parallel_moba_attn_varlen
from flashmoba.distributed.layout import LAYOUTS
from flashmoba.distributed.shard import shard_sequence, unshard_sequence
from flashmoba.distributed.training import ContextParallel, ShardedBatch

__all__ = [
    "ContextParallel",
    "LAYOUTS",
    "ShardedBatch",
    "context_parallel_moba_attn",
    "context_parallel_moba_attn_varlen",
    "shard_sequence",
    "unshard_sequence",
]
