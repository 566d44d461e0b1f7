"""Public API: argument validation, batched <-> packed layout adapters, and backend dispatch.

This is the only module that chooses a backend. ``backend="auto"`` picks Triton for CUDA tensors and the
PyTorch reference otherwise; an explicit backend never falls back silently.

Validation reads ``cu_seqlens`` on the host (one synchronisation) when the tensors are eager; it is
skipped while torch.compile traces or a CUDA graph captures, so the compiled / captured path stays free
of host synchronisation (pass ``max_seqlen`` there, or nothing at all: the kernels do not need it).
"""

from __future__ import annotations

import math
import os

import torch

from flashmoba.routing.result import MoBARouting, block_layout

__all__ = ["moba_attn", "moba_attn_varlen", "moba_route_varlen", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_TOPK = 64
TRITON_MIN_BLOCK = 16
TRITON_HEAD_DIMS = "a multiple of 8 between 16 and 256"


# ----------------------------------------------------------------------------------------------------
# validation


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); on the CPU it runs only "
                "under TRITON_INTERPRET=1. Use backend='reference' or 'auto' for CPU tensors."
            )
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - triton is a dependency
            raise ValueError("backend='triton' needs the triton package installed") from e
    return backend


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_tensor(name: str, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_qkv(q, k, v, rank: int, layout: str):
    names = ("q", "k", "v") if v is not None else ("q", "k")
    tensors = (q, k, v) if v is not None else (q, k)
    for name, t in zip(names, tensors):
        _check_tensor(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all must share a dtype")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"k must match q in its leading (token) dims {tuple(q.shape[:-2])}, got {tuple(k.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim {k.shape[-1]} must equal q's head dim {q.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv < 1 or hq < 1 or hq % hkv != 0:
        raise ValueError(
            f"q has {hq} heads and k has {hkv}: the number of query heads must be a positive multiple "
            "of the number of KV heads"
        )
    if q.shape[-1] < 1:
        raise ValueError("head dim must be >= 1")


def _check_backend_support(backend: str, q, block_size: int, topk: int):
    d = q.shape[-1]
    if backend == "reference":
        if q.dtype not in _REFERENCE_DTYPES:
            raise TypeError(f"dtype {q.dtype} is not supported by backend='reference' ({_REFERENCE_DTYPES})")
        return
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported by backend='triton' ({_TRITON_DTYPES})")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise TypeError(
            "dtype torch.bfloat16 is not supported by backend='triton' under the Triton interpreter "
            "(CPU tensors): the interpreter computes tl.dot on bfloat16 operands wrongly. Use float16 or "
            "float32 there, or backend='reference'."
        )
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"head dim {d} is not supported by backend='triton': it must be {TRITON_HEAD_DIMS}")
    if block_size < TRITON_MIN_BLOCK:
        raise ValueError(
            f"block_size {block_size} is not supported by backend='triton': it must be >= {TRITON_MIN_BLOCK}"
        )
    if topk > TRITON_MAX_TOPK:
        raise ValueError(f"topk {topk} is not supported by backend='triton': it must be <= {TRITON_MAX_TOPK}")


def _check_cu_seqlens(cu_seqlens, num_tokens: int, device: torch.device, max_seqlen):
    _check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with at least one element, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if max_seqlen is not None:
        _check_int("max_seqlen", max_seqlen, 0)
    if _tracing():
        return
    host = cu_seqlens.tolist()
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {host[0]}")
    lens = [b - a for a, b in zip(host[:-1], host[1:])]
    if any(n < 0 for n in lens):
        raise ValueError("cu_seqlens must be non-decreasing")
    if host[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens N={num_tokens}, got {host[-1]}")
    longest = max(lens, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")


def _check_common(block_size, topk, causal, softmax_scale=None):
    _check_int("block_size", block_size, 1)
    _check_int("topk", topk, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale == 0:
            raise ValueError(f"softmax_scale must be finite and nonzero, got {softmax_scale}")


# ----------------------------------------------------------------------------------------------------
# public functions


def moba_route_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    backend: str = "auto",
) -> MoBARouting:
    """Route every query token to its MoBA key blocks.

    Args:
        q: ``[N, HQ, D]`` packed queries.
        k: ``[N, HKV, D]`` packed keys, ``HQ % HKV == 0`` (query head ``h`` reads KV head ``h // (HQ // HKV)``).
        cu_seqlens: int32/int64 ``[S + 1]`` sequence boundaries (empty sequences allowed).
        max_seqlen: optional longest sequence length (checked, not needed by the kernels).
        block_size: tokens per key block. topk: blocks per query (the own block counts when causal).
        causal: own block forced plus the best ``topk - 1`` fully-past blocks; else plain top-k.
        backend: "auto", "reference" or "triton".

    Returns:
        :class:`MoBARouting`; ``.indices`` is int32 ``[N, HQ, topk]`` (local block ids, ascending,
        -1 padded) and ``.block_index`` the block -> query CSR view.
    """
    _check_qkv(q, k, None, 3, "[N, H, D]")
    _check_common(block_size, topk, causal)
    _check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    backend = _resolve_backend(backend, q.device)
    _check_backend_support(backend, q, block_size, topk)
    cu_blocks, block_seq, num_blocks_max = block_layout(cu_seqlens, q.shape[0], block_size)
    block_index = None
    if backend == "reference":
        from flashmoba import reference

        indices = reference.route(q, k, cu_seqlens, block_size, topk, causal)
    else:
        from flashmoba.routing import route_triton

        indices, block_index = route_triton(
            q, k, cu_seqlens, block_size, topk, causal, (cu_blocks, block_seq, num_blocks_max)
        )
    return MoBARouting(
        indices=indices,
        cu_seqlens=cu_seqlens,
        block_size=block_size,
        topk=topk,
        causal=causal,
        cu_blocks=cu_blocks,
        block_seq=block_seq,
        num_blocks_max=num_blocks_max,
        _block_index=block_index,
    )


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
):
    """MoBA attention over packed variable-length sequences.

    Args:
        q: ``[N, HQ, D]`` packed queries.
        k, v: ``[N, HKV, D]`` packed keys and values, ``HQ % HKV == 0`` (GQA/MQA without copies).
        cu_seqlens: int32/int64 ``[S + 1]``; sequence ``s`` is tokens ``cu_seqlens[s]:cu_seqlens[s+1]``.
        max_seqlen: optional longest sequence length (checked, not needed by the kernels).
        block_size: tokens per key block (blocks start at each sequence's first token).
        topk: selected blocks per query and head (causal: the own block counts).
        causal: see :mod:`flashmoba.reference` for the exact rule.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the natural-log sum-exp ``[N, HQ]`` (float32; float64 for float64 inputs).
        backend: "auto" (Triton for CUDA tensors, reference otherwise), "reference" or "triton".
        deterministic: Triton only; bitwise reproducible forward and backward at the cost of
            ``N * HQ * topk * D`` float32 of scratch memory (the default accumulates with atomics).

    Returns:
        ``out [N, HQ, D]`` in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    _check_qkv(q, k, v, 3, "[N, H, D]")
    _check_common(block_size, topk, causal, softmax_scale)
    _check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    return _attend(q, k, v, cu_seqlens, block_size, topk, causal, softmax_scale, return_lse, backend,
                   deterministic)


def _attend(q, k, v, cu_seqlens, block_size, topk, causal, softmax_scale, return_lse, backend, deterministic):
    """Packed inputs whose shapes and sequence boundaries are checked -> the chosen backend."""
    backend = _resolve_backend(backend, q.device)
    _check_backend_support(backend, q, block_size, topk)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        from flashmoba import reference

        out, lse = reference.attention(q, k, v, cu_seqlens, block_size, topk, causal, scale)
        lse = lse.float() if q.dtype != torch.float64 else lse
    else:
        from flashmoba.attention import moba_attn_triton

        out, lse = moba_attn_triton(
            q, k, v, cu_seqlens, block_size, topk, causal, scale, deterministic, return_lse
        )
    return (out, lse) if return_lse else out


def moba_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 8,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
):
    """MoBA attention over a batch of equal-length sequences.

    Args:
        q: ``[B, T, HQ, D]``; k, v: ``[B, T, HKV, D]`` with ``HQ % HKV == 0``.
        Other arguments as in :func:`moba_attn_varlen`.

    Returns:
        ``out [B, T, HQ, D]``, or ``(out, lse [B, T, HQ])`` when ``return_lse``.
    """
    _check_qkv(q, k, v, 4, "[B, T, H, D]")
    B, T, HQ, D = q.shape
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=q.device) * T
    _check_common(block_size, topk, causal, softmax_scale)
    res = _attend(
        q.reshape(B * T, HQ, D), k.reshape(B * T, k.shape[2], D), v.reshape(B * T, v.shape[2], D),
        cu_seqlens, block_size, topk, causal, softmax_scale, return_lse, backend, deterministic,
    )
    if return_lse:
        out, lse = res
        return out.view(B, T, HQ, D), lse.view(B, T, HQ)
    return res.view(B, T, HQ, D)
