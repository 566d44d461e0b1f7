"""Precision of the Triton attention against float64, next to plain PyTorch in the same dtype (GPU).

For each shape and launch configuration, the relative error in norm ``|x - x64| / |x64|`` of out, dq, dk
and dv from the kernels and from the reference computed in the input dtype on the same routing; the
FlashAttention rule asks the kernel's to be at most twice PyTorch's. Configurations are tried through
:func:`flashmoba.configs.override`, so a defect tied to a tile shape shows as one bad column.

    python benchmarks/precision_attention.py --out docs/results/precision_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import flashmoba
from flashmoba import configs, reference

#        lens          hq hkv  d  block topk
SHAPES = [
    ((777, 2100), 8, 8, 32, 16, 16),
    ((300, 1200), 4, 2, 64, 32, 32),
    ((2048, 1000), 8, 2, 64, 16, 8),
    ((1500, 700), 4, 1, 128, 32, 6),
    ((3000,), 4, 4, 128, 128, 4),
]


def packed(lens, hq, hkv, d, dtype, device):
    n = sum(lens)
    cu = torch.tensor([sum(lens[:i]) for i in range(len(lens) + 1)], dtype=torch.int32, device=device)
    return [torch.randn(n, h, d, device=device).to(dtype) for h in (hq, hkv, hkv)] + [cu]


def errors(lens, hq, hkv, d, block, topk, dtype, deterministic, device):
    q, k, v, cu = packed(lens, hq, hkv, d, dtype, device)
    dout = torch.randn_like(q)
    routing = flashmoba.moba_route_varlen(q, k, cu, block_size=block, topk=topk, backend="triton")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flashmoba.moba_attn_varlen(
        *leaves, cu, block_size=block, topk=topk, backend="triton", deterministic=deterministic
    )
    out.backward(dout)
    kernel = [out] + [t.grad for t in leaves]
    refs = {}
    for name, dt in (("exact", torch.float64), ("low", dtype)):
        rl = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, _ = reference.attention(*rl, cu, block, topk, True, d**-0.5, indices=routing.indices, compute_dtype=dt)
        o.backward(dout.to(dt))
        refs[name] = [o] + [t.grad for t in rl]
    rel = lambda x, i: ((x.double() - refs["exact"][i]).norm() / refs["exact"][i].norm()).item()  # noqa: E731
    names = ("out", "dq", "dk", "dv")
    return {n: {"kernel": rel(kernel[i], i), "torch": rel(refs["low"][i], i)} for i, n in enumerate(names)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    variants = {
        "shipped": {},
        "deterministic": {"deterministic": True},
        "bwd 4 warps": {"attn_bwd": lambda bs, d, dt, dev: _with("attn_bwd", bs, d, dt, dev, num_warps=4)},
        "bwd 1 stage": {"attn_bwd": lambda bs, d, dt, dev: _with("attn_bwd", bs, d, dt, dev, num_stages=1)},
        "bwd 32 rows": {"attn_bwd": lambda bs, d, dt, dev: _with("attn_bwd", bs, d, dt, dev, block_m=32)},
        "bwd 128 rows": {"attn_bwd": lambda bs, d, dt, dev: _with("attn_bwd", bs, d, dt, dev, block_m=128)},
    }
    rows = []
    torch.manual_seed(0)
    for shape in SHAPES:
        for name, variant in variants.items():
            variant = dict(variant)
            deterministic = variant.pop("deterministic", False)
            try:
                with configs.override(**variant):
                    errs = errors(*shape, dtype, deterministic, "cuda")
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                errs = {"error": f"{type(e).__name__}: {e}"[:200]}
            rows.append({"shape": shape, "variant": name, **errs})
            worst = max((v["kernel"] / v["torch"] for v in errs.values() if isinstance(v, dict)), default=float("nan"))
            print(
                f"{str(shape):42s} {name:14s} worst kernel/torch {worst:6.2f}  "
                + "  ".join(f"{n} {v['kernel']:.2e}/{v['torch']:.2e}" for n, v in errs.items() if isinstance(v, dict)),
                flush=True,
            )
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "dtype": args.dtype,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _with(family, block_size, head_dim, dtype, device, **changes):
    """The shipped config of ``family`` with some fields changed."""
    return dataclasses.replace(configs.shipped(family, block_size, head_dim, dtype, device), **changes)


if __name__ == "__main__":
    main()
