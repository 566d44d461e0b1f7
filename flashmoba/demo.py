"""``flashmoba demo``: MoBA on the best device present, in four short steps.

1. route a default problem and show which blocks a few queries chose;
2. run MoBA forward + backward and time it against dense causal attention (SDPA);
3. check the Triton kernels against the float64 reference (under the Triton interpreter on a CPU);
4. print the router signal-to-noise summary (theory vs simulation).
"""

from __future__ import annotations

import os
import time

import torch

import flashmoba
from flashmoba import reference


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up (compiles kernels, allocates)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def _problem(device: str):
    if device == "cuda":  # the FlashMoBA paper's efficiency config at 32K
        return dict(B=2, T=32768, HQ=16, HKV=16, D=128, dtype=torch.bfloat16, block=128, topk=8, reps=10)
    return dict(B=1, T=2048, HQ=4, HKV=2, D=64, dtype=torch.float32, block=128, topk=4, reps=3)


def _show_routing(q, k, cfg):
    T, block = cfg["T"], cfg["block"]
    cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    routing = flashmoba.moba_route_varlen(q[0], k[0], cu, block_size=block, topk=cfg["topk"])
    print(
        f"\n[1] routing: {T // block} blocks of {block} tokens, top-{cfg['topk']} per query (own block forced), head 0"
    )
    for t in (block // 2, T // 2 + 7, T - 1):
        chosen = [int(j) for j in routing.indices[t, 0] if j >= 0]
        print(f"    query {t:6d} (own block {t // block:3d}) -> blocks {chosen}")
    counts = routing.block_index.counts[0].float()
    print(
        f"    block -> query index: on average {counts[counts > 0].mean():.0f} queries read a block "
        f"(topk * block = {cfg['topk'] * block})"
    )


def _time_against_dense(q, k, v, cfg):
    B, T, HQ, HKV, D = cfg["B"], cfg["T"], cfg["HQ"], cfg["HKV"], cfg["D"]
    dout = torch.randn_like(q)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def moba():
        out = flashmoba.moba_attn(*leaves, block_size=cfg["block"], topk=cfg["topk"])
        out.backward(dout)

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dout_t = dout.transpose(1, 2)

    def dense():
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=HQ != HKV)
        out.backward(dout_t)

    moba_ms = _median_ms(moba, cfg["reps"])
    dense_ms = _median_ms(dense, cfg["reps"])
    backend = "triton" if q.is_cuda else "reference"
    print(f"\n[2] forward+backward, B={B} T={T} HQ={HQ} HKV={HKV} D={D} {str(cfg['dtype'])[6:]}:")
    print(f"    MoBA ({backend}, block {cfg['block']}, top-{cfg['topk']}): {moba_ms:8.2f} ms")
    print(f"    dense causal SDPA:                     {dense_ms:8.2f} ms   ({dense_ms / moba_ms:.1f}x)")
    if not q.is_cuda:
        print(
            "    (on a CPU MoBA runs the PyTorch reference, which builds each [T x T] mask: a GPU runs "
            "the Triton kernels)"
        )


def _check_kernels(device: str):
    """Triton vs float64 reference on a small awkward packed problem."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [700, 0, 333] if device == "cuda" else [150, 0, 61]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    N, HQ, HKV, D = sum(lens), 4, 2, 64
    q, k, v = (torch.randn(N, h, D, device=device, dtype=dtype, requires_grad=True) for h in (HQ, HKV, HKV))
    kw = dict(block_size=32, topk=3)
    out = flashmoba.moba_attn_varlen(q, k, v, cu, backend="triton", **kw)
    out.float().square().sum().backward()
    routing = flashmoba.moba_route_varlen(q, k, cu, backend="triton", **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.attention(*ref_leaves, cu, 32, 3, True, D**-0.5, indices=routing.indices)
    ref_out.square().sum().backward()
    same_routing = torch.equal(
        routing.indices,
        flashmoba.moba_route_varlen(*(t.detach().double() for t in (q, k)), cu, backend="reference", **kw).indices,
    )
    errors = {
        name: ((a.double() - b).norm() / b.norm()).item()
        for name, a, b in [("out", out, ref_out)]
        + [(f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), ref_leaves)]
    }
    where = "GPU" if device == "cuda" else "CPU, Triton interpreter"
    print(
        f"\n[3] Triton kernels vs float64 reference ({where}, {str(dtype)[6:]}, lengths {lens}, "
        f"GQA {HQ}/{HKV}, block 32):"
    )
    print("    routing identical: " + ("yes" if same_routing else "no (near-ties)"))
    print("    relative errors:   " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    limit = 2e-2 if dtype == torch.bfloat16 else 1e-5
    bad = [k for k, v in errors.items() if not v < limit]
    if bad:
        raise SystemExit(f"kernel check FAILED for {bad} (limit {limit:g})")


def add_arguments(parser) -> None:
    parser.add_argument("--skip-snr", action="store_true", help="skip the router SNR summary")


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run on the CPU, slowly but exactly
    import triton

    cfg = _problem(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"flashmoba {flashmoba.__version__} | torch {torch.__version__} | triton {triton.__version__} | {name}")
    torch.manual_seed(0)
    shape = lambda h: (cfg["B"], cfg["T"], h, cfg["D"])  # noqa: E731
    q = torch.randn(shape(cfg["HQ"]), device=device, dtype=cfg["dtype"])
    k = torch.randn(shape(cfg["HKV"]), device=device, dtype=cfg["dtype"])
    v = torch.randn(shape(cfg["HKV"]), device=device, dtype=cfg["dtype"])
    _show_routing(q, k, cfg)
    _time_against_dense(q, k, v, cfg)
    _check_kernels(device)
    if not args.skip_snr:
        from flashmoba.theory.cli import demo_summary

        print("\n[4] router signal-to-noise: theory vs Monte-Carlo with the real router")
        print(demo_summary())
    print("\ndemo OK")
    return 0
