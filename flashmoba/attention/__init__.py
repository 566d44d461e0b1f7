"""FlashMoBA attention in Triton: key-block-centric forward and backward over the routed blocks.

* :mod:`~flashmoba.attention.forward`: two-pass forward with an exact log-sum-exp merge;
* :mod:`~flashmoba.attention.backward`: key-block-parallel backward with recomputation;
* :mod:`~flashmoba.attention.ops`: torch.library custom ops (autograd, torch.compile).
"""

from __future__ import annotations

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`flashmoba.moba_attn_varlen` (arguments already validated).

    Returns:
        ``(out [N, HQ, D], lse float32 [N, HQ])``, differentiable in q, k, v.
    """
    from flashmoba.attention.ops import moba_attn_fwd_op

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse, _, _ = moba_attn_fwd_op(q, k, v, cu_seqlens, block_size, topk, causal, scale, deterministic)
    return out, lse


__all__ = ["moba_attn_triton"]
