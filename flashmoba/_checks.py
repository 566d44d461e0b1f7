"""Argument validation shared by every public entry point: one place, one wording, one exception rule.

The rule: a value of the wrong *type* raises ``TypeError``, a value of the right type that is out of
range or inconsistent raises ``ValueError``; both messages name the argument. Checks that would read a
device value on the host are skipped while torch.compile traces or a CUDA graph captures (``tracing``),
and a CUDA tensor's values are read once per version of the tensor (``check_cu_seqlens``).
"""

from __future__ import annotations

import math
import numbers
import os
import weakref
from collections.abc import Sequence

import torch

__all__ = [
    "BACKENDS",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "TRITON_MAX_TOPK",
    "TRITON_MIN_BLOCK",
    "UsageError",
    "check_backend_support",
    "check_bool",
    "check_choice",
    "check_cu_seqlens",
    "check_device",
    "check_float",
    "check_int",
    "check_lengths",
    "check_qkv",
    "check_option",
    "check_routing_args",
    "check_tensor",
    "common_length",
    "resolve_backend",
    "tracing",
]

BACKENDS = ("auto", "reference", "triton")
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_TOPK = 64
TRITON_MIN_BLOCK = 16
TRITON_HEAD_DIMS = "a multiple of 8 between 16 and 256"


def tracing() -> bool:
    """True while torch.compile traces or a CUDA graph captures: no host reads of device values then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------------
# python values


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int: any integral number (numpy integers included), never a bool or a tensor."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_float(name: str, value, *, positive: bool = False, nonzero: bool = False) -> float:
    """``value`` as a finite Python float (ints and numpy floats accepted, bools refused)."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonzero and value == 0:
        raise ValueError(f"{name} must be nonzero, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_routing_args(block_size, topk, causal, softmax_scale=None) -> tuple[int, int]:
    """The routing parameters every MoBA entry point takes; returns ``(block_size, topk)`` as ints."""
    block_size = check_int("block_size", block_size, 1)
    topk = check_int("topk", topk, 1)
    check_bool("causal", causal)
    if softmax_scale is not None:
        if isinstance(softmax_scale, (bool, torch.Tensor)) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale == 0:
            raise ValueError(f"softmax_scale must be finite and nonzero, got {softmax_scale}")
    return block_size, topk


# ----------------------------------------------------------------------------------------------------
# tensors


def check_tensor(name: str, value, *, dim: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must have rank {dim}, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}: all must share a device")
    return value


def check_qkv(q, k, v, rank: int, layout: str) -> None:
    """q, k (and v unless None) of rank ``rank`` in ``layout`` (e.g. ``"[N, H, D]"``): tensors on one device,
    one floating dtype, matching token dims and head dim, ``HQ`` a positive multiple of ``HKV``."""
    names = ("q", "k", "v") if v is not None else ("q", "k")
    tensors = (q, k, v) if v is not None else (q, k)
    for name, t in zip(names, tensors):
        check_tensor(name, t)
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
        raise ValueError(f"k must match q in its leading (token) dims {tuple(q.shape[:-2])}, got {tuple(k.shape)}")
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


def check_lengths(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """An int32/int64 ``[batch]`` tensor of per-sequence counts on ``device`` (values are not read)."""
    check_tensor(name, value)
    if value.dtype not in (torch.int32, torch.int64) or value.shape != (batch,):
        raise ValueError(
            f"{name} must be an int32/int64 tensor of shape [{batch}], got {value.dtype} {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")
    return value


# CUDA boundary tensors whose values were read and found valid: id -> (weak reference, version counter
# then, total tokens, longest sequence). A model passes one tensor to all its layers, and every host read
# of it waits for the GPU to drain the queue, so that reading it per call would leave the GPU idle while
# the host launches each layer's kernels. An in-place write bumps the version counter (views share it),
# and a tensor that died is gone from its weak reference, so a hit is always the tensor that was read.
_valid_boundaries: dict[int, tuple[weakref.ref, int, int, int]] = {}
_VALID_BOUNDARIES_MAX = 64


def keeps_host_copy(tensor: torch.Tensor) -> bool:
    """Whether a host copy of ``tensor``'s values is kept and trusted while its version counter stands
    still (valid boundaries here, a KV cache's lengths in ``flashmoba.decode``): CUDA tensors, whose host
    read waits for the device to drain its queue. A CPU tensor's read is cheap, and numpy views can write
    it without bumping its version."""
    return tensor.is_cuda


def _boundary_totals(cu_seqlens: torch.Tensor) -> tuple[int, int]:
    """``(last boundary, longest sequence)`` of valid boundaries; raises ``ValueError`` otherwise."""
    remember = keeps_host_copy(cu_seqlens)
    cached = _valid_boundaries.get(id(cu_seqlens)) if remember else None
    if cached is not None and cached[0]() is cu_seqlens and cached[1] == cu_seqlens._version:
        return cached[2], cached[3]
    version = cu_seqlens._version
    host = cu_seqlens.tolist()
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {host[0]}")
    lens = [b - a for a, b in zip(host[:-1], host[1:])]
    if any(n < 0 for n in lens):
        raise ValueError("cu_seqlens must be non-decreasing")
    totals = host[-1], max(lens, default=0)
    if remember:
        _remember_boundaries(cu_seqlens, version, totals)
    return totals


def _remember_boundaries(cu_seqlens: torch.Tensor, version: int, totals: tuple[int, int]) -> None:
    if len(_valid_boundaries) >= _VALID_BOUNDARIES_MAX:  # forget the dead ones, or else all
        dead = [key for key, hit in _valid_boundaries.items() if hit[0]() is None]
        for key in dead or list(_valid_boundaries):
            del _valid_boundaries[key]
    _valid_boundaries[id(cu_seqlens)] = (weakref.ref(cu_seqlens), version, *totals)


def built_valid_boundaries(cu_seqlens: torch.Tensor, total: int, longest: int) -> torch.Tensor:
    """Mark boundaries that were just built valid by construction (last boundary ``total``, longest
    sequence ``longest``), so that checking them reads nothing back; returns ``cu_seqlens``."""
    if not tracing() and keeps_host_copy(cu_seqlens):
        _remember_boundaries(cu_seqlens, cu_seqlens._version, (total, longest))
    return cu_seqlens


def check_cu_seqlens(cu_seqlens, num_tokens: int, device: torch.device, max_seqlen=None) -> None:
    """Sequence boundaries ``[S + 1]``: shape, dtype and device always; values when eager (one host read
    per CUDA tensor and version: later calls with the same unchanged tensor only compare its totals)."""
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with at least one element, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if max_seqlen is not None:
        max_seqlen = check_int("max_seqlen", max_seqlen, 0)
    if tracing():
        return
    total, longest = _boundary_totals(cu_seqlens)
    if total != num_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens N={num_tokens}, got {total}")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")


def common_length(cu_seqlens: torch.Tensor) -> int | None:
    """The length that every sequence of checked boundaries shares (``check_cu_seqlens`` first), or None
    where lengths differ, a sequence is empty, or values cannot be read (while tracing). A CUDA tensor's
    values come from its check, so this reads nothing more on the host."""
    num_seqs = cu_seqlens.numel() - 1
    if tracing() or num_seqs < 1:
        return None
    total, longest = _boundary_totals(cu_seqlens)
    return longest if longest > 0 and longest * num_seqs == total else None


# ----------------------------------------------------------------------------------------------------
# backends


def resolve_backend(backend, device: torch.device) -> str:
    """``"auto"`` -> Triton for CUDA tensors, the reference otherwise; an explicit backend is kept or refused."""
    check_choice("backend", backend, BACKENDS)
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
        except ImportError as e:
            raise ValueError("backend='triton' needs the triton package: pip install triton") from e
    return backend


def check_backend_support(backend: str, q: torch.Tensor, block_size: int, topk: int) -> None:
    """What the chosen backend accepts (dtype, head dim, block size, topk)."""
    if backend == "reference":
        if q.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"dtype {q.dtype} is not supported by backend='reference' ({REFERENCE_DTYPES})")
        return
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported by backend='triton' ({TRITON_DTYPES})")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise TypeError(
            "dtype torch.bfloat16 is not supported by backend='triton' under the Triton interpreter "
            "(CPU tensors): the interpreter computes tl.dot on bfloat16 operands wrongly. Use float16 or "
            "float32 there, or backend='reference'."
        )
    d = q.shape[-1]
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"head dim {d} is not supported by backend='triton': it must be {TRITON_HEAD_DIMS}")
    if block_size < TRITON_MIN_BLOCK:
        raise ValueError(
            f"block_size {block_size} is not supported by backend='triton': it must be >= {TRITON_MIN_BLOCK}"
        )
    if topk > TRITON_MAX_TOPK:
        raise ValueError(f"topk {topk} is not supported by backend='triton': it must be <= {TRITON_MAX_TOPK}")


# ----------------------------------------------------------------------------------------------------
# the command line: the same checks, reported by ``flashmoba.cli.main`` as one line with exit code 2


class UsageError(ValueError):
    """A bad command-line argument; the message names the option. ``flashmoba.cli.main`` prints it as one line."""


def check_option(check, option: str, *args, **kwargs):
    """``check(option, *args, **kwargs)`` (a ``flashmoba._checks`` function) with its error as a UsageError."""
    try:
        return check(option, *args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def check_device(option: str, value: str | None):
    """``value`` as a ``torch.device`` that exists on this machine (None: CUDA when available, else CPU)."""
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} must be a torch device such as 'cpu' or 'cuda', got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {value}: CUDA is not available on this machine (use {option} cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"{option} must be 'cpu' or 'cuda', got {value!r}")
    return device
