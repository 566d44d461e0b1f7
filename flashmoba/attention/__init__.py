"""FlashMoBA attention in Triton: key-block-centric forward and backward over the routed blocks.

* ``tiles``: what a key-tile program sees (its keys, its gathered queries);
* ``forward``: one-pass forward against a per-row softmax reference;
* ``backward``: key-block-parallel backward with recomputation;
* ``ops``: torch.library custom ops (autograd, torch.compile).
"""

from __future__ import annotations

import math

import torch


def moba_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    scale: float,
    deterministic: bool,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backend of ``flashmoba.moba_attn_varlen`` (arguments already validated).

    Returns:
        ``(out [N, HQ, D], lse float32 [N, HQ] natural log, or None unless return_lse)``; out is
        differentiable in q, k, v.
    """
    from flashmoba.attention.ops import moba_attn_fwd_op

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, stats, _, _ = moba_attn_fwd_op(q, k, v, cu_seqlens, block_size, topk, causal, scale, deterministic)
    return out, (torch.add(stats[0] * scale, stats[1], alpha=math.log(2.0)) if return_lse else None)


__all__ = ["moba_attn_triton"]
