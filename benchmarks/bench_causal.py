"""The hybrid model's dense causal attention paths, side by side (a CUDA GPU machine).

Documents of one length, as the dense global layers see them: the varlen path (``causal_attention``,
FlashAttention-2's varlen kernel) against the batched path (``batched_causal_attention``, SDPA, whose
default on Hopper is cuDNN's fused kernel), and SDPA forced to each of its fused backends. Forward and
forward+backward, median ms of ``triton.testing.do_bench``; TFLOP/s count the causal half of the product
(4 x D x HQ x T^2 / 2 per document forward, 3.5x that forward+backward); the kernels that ran are read from
the profiler.

    python benchmarks/bench_causal.py --docs 4 --T 8192 --heads 16 --dim 64 --out runs/causal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashmoba.nn.causal import batched_causal_attention, causal_attention


def _kernels(fn) -> list[str]:
    """Names of the attention kernels that one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    words = ("flash", "cudnn", "fmha", "attn", "sdpa")
    return sorted({e.key[:100] for e in prof.key_averages() if any(w in e.key.lower() for w in words)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--T", type=int, default=8192, help="tokens per document")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_causal.py needs a CUDA GPU")
    S, T, H, D = args.docs, args.T, args.heads, args.dim
    q, k, v = (torch.randn(S * T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    cu = torch.arange(S + 1, device="cuda", dtype=torch.int32) * T

    def batched():
        return batched_causal_attention(*(t.view(S, T, H, D) for t in (q, k, v))).reshape_as(q)

    def forced(backend):
        def run():
            with sdpa_kernel([backend]):
                return batched()

        return run

    paths = {
        "varlen (flash backend: FlashAttention-2 varlen)": lambda: causal_attention(
            q, k, v, cu, max_seqlen=T, backend="flash"
        ),
        "batched (SDPA default)": batched,
        "batched, SDPA cuDNN": forced(SDPBackend.CUDNN_ATTENTION),
        "batched, SDPA flash": forced(SDPBackend.FLASH_ATTENTION),
    }
    flop_fwd = 4.0 * D * H * S * T * T / 2
    rows = []
    for name, fn in paths.items():

        def fwd_bwd(fn=fn):
            for t in (q, k, v):
                t.grad = None
            fn().backward(dout)

        fwd_ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
        fwd_bwd_ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, return_mode="median")
        rows.append(
            dict(
                path=name,
                fwd_ms=fwd_ms,
                fwd_bwd_ms=fwd_bwd_ms,
                fwd_tflops=flop_fwd / fwd_ms / 1e9,
                fwd_bwd_tflops=3.5 * flop_fwd / fwd_bwd_ms / 1e9,
                kernels=_kernels(fwd_bwd),
            )
        )
    print(f"{S} documents x {T} tokens, {H} heads, head dim {D}, bf16, causal ({torch.cuda.get_device_name()})")
    print("| path | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        times = f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f}"
        print(f"| {r['path']} | {times} |")
    for r in rows:
        print(f"{r['path']}: {', '.join(r['kernels'])}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {**vars(args), "out": str(args.out), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
