"""Registers, spills and shared memory of the engine's Triton kernels per GPU architecture, compiled on this
machine: no GPU needed.

Every launch is captured as the engine makes it: the launching functions (routing, attention forward and
backward, decode) run on CPU tensors with the tile tables of the target's architecture
(``flashmoba.configs``), and each ``kernel[grid](...)`` is recorded instead of run. Each recorded launch is
then compiled by Triton for the target with the signature, specialisation and options that a GPU of that
architecture would compile (the same binder and option parser), and its binary is read:

* ``regs``: registers per thread; ``spill st / ld``: bytes of spill stores and loads per thread, and
  ``stack``: its stack frame (``ptxas -v`` on the kernel's PTX);
* ``shared``: bytes of shared memory the launch asks for, against the architecture's per-block limit
  (``SHARED_LIMIT``, the CUDA programming guide's table). A kernel over the limit cannot launch on that
  GPU; ``--check`` exits with 1 when one is.

These are facts of the binaries, not of their speed. Launches with the same kernel and compile-time
parameters are listed once.

    python benchmarks/compile_stats.py --archs 90 --configs 128:8 64:16 32:32
    python benchmarks/compile_stats.py --archs 80 86 89 100 120 --check --out /tmp/compile_stats.json
    python benchmarks/compile_stats.py --archs 86 --override route_topk=64,64,8,3,0   # other tiles

``--override`` sets a family's tiles through ``flashmoba.configs.override``: ``attn_fwd`` / ``attn_bwd``
take ``block_m,block_n,num_warps,num_stages``, ``route_topk`` the same plus ``maxnreg`` (0: none).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from flashmoba import configs
from flashmoba.attention.backward import attn_bwd
from flashmoba.attention.forward import attn_fwd
from flashmoba.decode.kernels import decode_fwd
from flashmoba.routing.result import block_layout
from flashmoba.routing.topk import route_triton

# Maximum shared memory per thread block (opt-in), bytes, by compute capability (major * 10 + minor).
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448, 120: 101376}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_PTXAS_FIELDS = {  # what ``ptxas -v`` says of one kernel
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


@contextlib.contextmanager
def captured_launches(capability: int):
    """Inside the block, Triton kernels are recorded, not run, as ``(kernel, args, kwargs)`` in the yielded
    list, and ``flashmoba.configs`` picks the tiles of the architecture of ``capability``."""
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))

    run, arch = JITFunction.run, configs.arch
    JITFunction.run = record
    configs.arch = lambda device: configs.arch_of_capability(capability // 10)
    try:
        yield launches
    finally:
        JITFunction.run, configs.arch = run, arch


def engine_launches(capability: int, block: int, topk: int, heads: int, kv_heads: int, dim: int, dtype) -> list:
    """The launches of one training step's attention (routing, forward, backward) and of one decode step,
    for sequences of 8 blocks: shapes here set only what a kernel specialises on (strides, head counts)."""
    tokens = 8 * block
    q = torch.zeros(2 * tokens, heads, dim, dtype=dtype)
    k, v = (torch.zeros(2 * tokens, kv_heads, dim, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, tokens, 2 * tokens], dtype=torch.int32)
    with captured_launches(capability) as launches:
        layout = block_layout(cu, q.shape[0], block)
        _, index = route_triton(q, k, cu, block, topk, True, layout)
        route = (cu, layout[0], layout[1], index.offsets, index.entries, topk, block, True, dim**-0.5, False)
        out, stats = attn_fwd(q, k, v, *route)
        attn_bwd(torch.zeros_like(out), q, k, v, out, stats, *route)
        cache = torch.zeros(2, tokens, kv_heads, dim, dtype=dtype)
        sums = torch.zeros(2, 8, kv_heads, dim, dtype=torch.float32)
        seqlens = torch.full((2,), tokens, dtype=torch.int32)
        decode_fwd(q[:2, None], cache, cache, seqlens, torch.zeros_like(seqlens), sums, block, topk, False, 1.0)
    return launches


def compile_launch(kernel: JITFunction, args, kwargs, capability: int):
    """Compile one recorded launch for ``capability`` as Triton would on such a GPU."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str, capability: int) -> dict[str, int]:
    """Registers, spill stores / loads and stack frame of a kernel's PTX, from ``ptxas -v``."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    ptxas = _BIN / ("ptxas-blackwell" if capability >= 100 and (_BIN / "ptxas-blackwell").exists() else "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        log = subprocess.run(
            [str(ptxas), f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return {key: int(m.group(1)) for key, pattern in _PTXAS_FIELDS.items() if (m := pattern.search(log))}


def _constants(kernel: JITFunction, args, kwargs) -> dict:
    """The compile-time parameters of a launch (its constexpr arguments and launch options)."""
    named = dict(zip(kernel.arg_names, args)) | kwargs
    keep = {p.name for p in kernel.params if p.is_constexpr} | {"num_warps", "num_stages", "maxnreg"}
    return {name: value for name, value in named.items() if name in keep}


def parse_override(text: str) -> tuple[str, object]:
    """``family=a,b,c,d[,e]`` -> ``(family, TileConfig | TopkConfig)``; ValueError naming the problem."""
    family, _, values = text.partition("=")
    shapes = {"attn_fwd": configs.TileConfig, "attn_bwd": configs.TileConfig, "route_topk": configs.TopkConfig}
    if family not in shapes:
        raise ValueError(f"--override {text!r}: the family must be one of {', '.join(shapes)}")
    try:
        numbers = [int(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--override {text!r}: the values must be integers") from None
    fields = 5 if family == "route_topk" else 4
    if len(numbers) != fields or min(numbers) < 0:
        raise ValueError(f"--override {text!r}: {family} takes {fields} non-negative integers")
    if family == "route_topk":
        numbers[4] = numbers[4] or None
    return family, shapes[family](*numbers)


def stats_rows(capabilities, configs_, heads, kv_heads, dim, dtype_name, overrides=None) -> list[dict]:
    """One row per distinct (architecture, kernel, compile-time parameters)."""
    rows, seen = [], set()
    with configs.override(**(overrides or {})):
        for capability in capabilities:
            rows += _arch_rows(capability, configs_, heads, kv_heads, dim, dtype_name, seen)
    return rows


def _arch_rows(capability, configs_, heads, kv_heads, dim, dtype_name, seen) -> list[dict]:
    rows = []
    for config in configs_:
        block, topk = (int(x) for x in config.split(":"))
        for kernel, args, kwargs in engine_launches(capability, block, topk, heads, kv_heads, dim, DTYPES[dtype_name]):
            constants = _constants(kernel, args, kwargs)
            key = (capability, kernel.fn.__name__, json.dumps(constants, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            binary = compile_launch(kernel, args, kwargs, capability)
            row = {
                "arch": f"sm{capability}",
                "config": config,
                "kernel": kernel.fn.__name__,
                "constants": {k: v for k, v in constants.items() if isinstance(v, (bool, int, float, str))},
                "num_warps": binary.metadata.num_warps,
                "num_stages": binary.metadata.num_stages,
                "shared": binary.metadata.shared,
                "shared_limit": SHARED_LIMIT.get(capability),
                **ptxas_usage(binary.asm["ptx"], capability),
            }
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _tiles(row) -> str:
    blocks = " ".join(f"{k[len('BLOCK_') :]}={v}" for k, v in row["constants"].items() if k.startswith("BLOCK_"))
    return f"{blocks}, {row['num_warps']} warps, {row['num_stages']} stages"


def _line(row) -> str:
    fits = row["shared_limit"] is None or row["shared"] <= row["shared_limit"]
    return (
        f"| {row['arch']} | {row['config']} | {row['kernel']} | {_tiles(row)} | {row.get('regs', '-')} | "
        f"{row.get('spill_stores', '-')} / {row.get('spill_loads', '-')} | {row.get('stack', '-')} | "
        f"{row['shared'] / 1024:.1f} KB | {'yes' if fits else '**no**'} |"
    )


HEADER = (
    "| arch | block:topk | kernel | tiles (BLOCK_*), warps, stages | regs | spill st / ld (B) | stack (B) | shared "
    "| fits |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compile_stats.py", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 89 90 120")
    parser.add_argument("--configs", nargs="+", default=["128:8", "64:16", "32:32"], help="block:topk")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel needs more shared memory than allowed")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    parser.add_argument("--override", nargs="*", default=[], metavar="FAMILY=TILES", help="other tiles (see above)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.exit(2, "compile_stats.py: error: unset TRITON_INTERPRET: under it Triton compiles no kernel\n")
    unknown = [a for a in args.archs if a not in SHARED_LIMIT]
    if unknown:
        parser.exit(2, f"compile_stats.py: error: --archs {unknown}: known are {sorted(SHARED_LIMIT)}\n")
    for config in args.configs:
        parts = config.split(":")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.exit(2, f"compile_stats.py: error: --configs takes block:topk, got {config!r}\n")
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.exit(2, "compile_stats.py: error: --heads must be a positive multiple of --kv-heads\n")
    try:
        overrides = dict(parse_override(text) for text in args.override)
    except ValueError as e:
        parser.exit(2, f"compile_stats.py: error: {e}\n")
    print(HEADER, flush=True)
    rows = stats_rows(args.archs, args.configs, args.heads, args.kv_heads, args.dim, args.dtype, overrides)
    if args.out:
        args.out.write_text(
            json.dumps(
                {"triton": triton.__version__, "args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1
            )
        )
    over = [r for r in rows if r["shared_limit"] is not None and r["shared"] > r["shared_limit"]]
    for r in over:
        print(
            f"{r['arch']}: {r['kernel']} ({r['config']}) needs {r['shared']} bytes of shared memory, "
            f"over the limit of {r['shared_limit']}"
        )
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
