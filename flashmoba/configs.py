"""Launch configurations of the Triton kernels: one home for every tile shape, per GPU architecture.

Each kernel family asks this module for its configuration with the problem's static parameters (block
size, head dim, dtype) and the device. The architecture comes from the device's compute capability at run
time, never from a card name:

* ``"sm90"`` (Hopper: H100, H200): tables chosen from tile sweeps (``benchmarks/tune_attention.py``,
  ``benchmarks/bench_routing.py --tune``, ``benchmarks/tune_centroids.py``; the runs are in docs/results/);
* ``"default"``: every other CUDA GPU (sm80, sm86/sm89, sm100, sm120): tiles that fit in 99 KB of shared
  memory, the smallest opt-in limit of the architectures Triton supports, so they run everywhere;
* ``"interpreter"``: CPU tensors under ``TRITON_INTERPRET=1`` (the tests): the default tiles.

Benchmarks and tuning scripts try other configurations with ``override``, never by patching private
functions::

    with configs.override(attn_fwd=configs.TileConfig(64, 128, 4, 2)):
        attn_fwd(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "TileConfig",
    "TopkConfig",
    "arch",
    "arch_of_capability",
    "attn_bwd",
    "attn_fwd",
    "centroids",
    "dot_precision",
    "key_conv",
    "override",
    "route_topk",
    "shipped",
]


@dataclass(frozen=True)
class TileConfig:
    """A tiled kernel's launch: ``block_m`` query rows x ``block_n`` keys per tile, warps and pipeline depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TopkConfig:
    """The routing top-k's launch: ``block_m`` queries x ``block_n`` centroids per tile; ``maxnreg`` caps
    the registers per thread (None: no cap)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None


_Override = TileConfig | TopkConfig | int | Callable[..., object]
_overrides: dict[str, _Override] = {}


def arch(device: torch.device) -> str:
    """``"sm90"``, ``"default"`` or ``"interpreter"`` (CPU tensors) for tensors on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return arch_of_capability(major)


def arch_of_capability(major: int) -> str:
    """The table (``"sm90"`` or ``"default"``) of a CUDA GPU of compute capability ``major.x``."""
    return "sm90" if major == 9 else "default"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: float32 inputs get exact (IEEE) products, where Triton's default
    would round them to TF32; 16-bit inputs multiply exactly either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _key_tile(block_size: int, cap: int) -> int:
    """Keys per tile: the block rounded up to a power of two (at least 16, the dot's minimum), at most cap."""
    return min(cap, max(16, _next_pow2(block_size)))


def _attn_fwd_table(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    if dtype == torch.float32:  # exact (IEEE) fp32 products: small tiles fit in shared memory
        return TileConfig(32, _key_tile(block_size, 32), 4, 1)
    if arch(device) == "sm90":
        block_n = _key_tile(block_size, 128 if head_dim <= 128 else 64)
        if head_dim > 128:
            return TileConfig(64, block_n, 8, 2)
        if block_n >= 128:
            return TileConfig(128, block_n, 8, 3)
        if block_n == 64:
            return TileConfig(64, block_n, 4, 3)
        return TileConfig(128, block_n, 4, 2)
    if head_dim <= 128:
        return TileConfig(64, _key_tile(block_size, 64), 4, 2)
    return TileConfig(32, _key_tile(block_size, 64), 4, 1)


def _attn_bwd_table(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    if dtype == torch.float32:
        return TileConfig(32, _key_tile(block_size, 32), 4, 1)
    if arch(device) == "sm90":
        block_n = _key_tile(block_size, 128 if head_dim <= 128 else 64)
        if head_dim > 128:
            return TileConfig(32, block_n, 8, 1)
        if block_n >= 128:
            return TileConfig(64, block_n, 8, 3)
        if block_n == 64:
            return TileConfig(32, block_n, 4, 3)
        return TileConfig(64, block_n, 4, 3)
    if head_dim <= 64:
        return TileConfig(64, _key_tile(block_size, 64), 4, 2)
    return TileConfig(32, _key_tile(block_size, 64), 4, 1)


def _route_topk_table(dtype: torch.dtype, k_pad: int, device: torch.device) -> TopkConfig:
    if dtype == torch.float32:
        return TopkConfig(32, max(32, k_pad), 4, 2, None)
    return TopkConfig(64, 64, 4, 3, 80 if arch(device) == "sm90" else None)


def _centroids_table(block_size: int, head_dim: int, device: torch.device) -> tuple[int, int]:
    return min(_next_pow2(block_size), max(16, 8192 // _next_pow2(head_dim))), 2


def _key_conv_table(num_channels: int, device: torch.device) -> tuple[int, int]:
    return 64, 64


_TABLES = {
    "attn_fwd": _attn_fwd_table,
    "attn_bwd": _attn_bwd_table,
    "route_topk": _route_topk_table,
    "centroids": _centroids_table,
    "key_conv": _key_conv_table,
}


def shipped(family: str, *args):
    """The configuration of ``family`` from the tables, ignoring any ``override`` (for tuning scripts
    that vary one field of it)."""
    return _TABLES[family](*args)


def _chosen(family: str, *args):
    chosen = _overrides.get(family)
    if chosen is None:
        return _TABLES[family](*args)
    return chosen(*args) if callable(chosen) else chosen


def attn_fwd(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """The MoBA forward's tiles (``flashmoba.attention.forward``): gathered queries x one key tile."""
    return _chosen("attn_fwd", block_size, head_dim, dtype, device)


def attn_bwd(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """The MoBA backward's tiles (``flashmoba.attention.backward``): ``block_m`` gathered queries
    against a key tile of ``block_n`` keys that keeps K, V, dK and dV on chip. On Hopper a 128-key tile
    halves the gathers and dQ merges of a 64-key one, which outweighs the register spills of holding
    twice the keys."""
    return _chosen("attn_bwd", block_size, head_dim, dtype, device)


def route_topk(dtype: torch.dtype, k_pad: int, device: torch.device) -> TopkConfig:
    """The routing top-k's tiles (``flashmoba.routing.topk``). A list slot lives in the low
    ``log2(block_n)`` bits of a score, so ``block_n >= k_pad`` (at most 64).

    16-bit inputs: 64 x 64 tiles and one warpgroup. The merge rounds are chains of shuffles and barriers
    whose latency only other resident programs hide, so programs are kept small, and on Hopper the
    register cap (80) fits 6 programs per SM instead of 4. float32 inputs (exact products on the CUDA
    cores): small tiles, no cap."""
    return _chosen("route_topk", dtype, k_pad, device)


def centroids(block_size: int, head_dim: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)`` of the centroid kernel (``flashmoba.routing.centroids``): many small
    programs, each summing one block's keys in tiles of ``BLOCK_T`` tokens. The kernel reads every key
    once, so reading the keys is its whole cost: the launch is the smallest that streams them at copy
    bandwidth, 2 warps a program."""
    return _chosen("centroids", block_size, head_dim, device)


def key_conv(num_channels: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_C)`` of the key convolution's kernels (``flashmoba.nn.keyconv.kernels``):
    tiles of tokens x channels, each program reading its tile plus ``W - 1`` lagged rows. The kernels
    stream the keys once (a memory-bound stencil), so any tile that keeps enough programs in flight
    serves every architecture; the backward writes one weight-gradient row per token tile, which a
    longer token tile makes fewer."""
    return _chosen("key_conv", num_channels, device)


@contextlib.contextmanager
def override(**chosen: _Override) -> Iterator[None]:
    """Use other configurations inside the ``with`` block (benchmarks, tuning, tests).

    Keyword names are the functions of this module (``attn_fwd``, ``attn_bwd``, ``route_topk``,
    ``centroids``, ``key_conv``); a value is the configuration to return, or a callable taking that function's
    arguments. Not thread-safe: it changes a module-level table.
    """
    unknown = set(chosen) - set(_TABLES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; known: {sorted(_TABLES)}")
    saved = dict(_overrides)
    _overrides.update(chosen)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
