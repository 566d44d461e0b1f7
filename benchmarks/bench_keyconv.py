"""Cost of the key convolution next to the MoBA attention it feeds (GPU).

The question it answers: is the key convolution a small share (a few per cent) of the layer's time?

The layer is the 340M preset's MoBA layer (hidden 1024, 16 heads x 64, MoBA block 128, top-k 8) with a
key convolution of width ``--kconv`` (3), bf16, one sequence per length. Timed, forward + backward each:

* ``kconv``: the key convolution alone (fused Triton kernels) on the layer's keys ``[T, 1024]``;
* ``kconv_torch``: the same in plain PyTorch (the CPU fallback), for comparison;
* ``attention``: :func:`flashmoba.moba_attn_varlen` alone (routing + forward + backward);
* ``layer``: the whole :class:`flashmoba.nn.MoBAAttention` (projections, key conv, MoBA, output).

It first checks the Triton key conv against the PyTorch path on the same input (max abs difference of
the output and of both gradients). ``kconv_share_of_layer`` and ``kconv_share_of_attention`` are
the key conv's time over the layer's and over the attention's.

    python benchmarks/bench_keyconv.py --out docs/results/keyconv.json

Prints a markdown table; ``--out`` writes the JSON and a PNG plot next to it (same name, .png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from tqdm import tqdm

import flashmoba
from flashmoba.models import MoBAHybridConfig
from flashmoba.nn import MoBAAttention, key_conv


def bench_ms(fn, rep_ms: float = 200.0) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def _fwd_bwd(fn, args, grad, params=()):
    """A closure running ``fn(*args)`` forward and backward with the upstream gradient ``grad``."""

    def step():
        for t in (*args, *params):
            t.grad = None
        fn(*args).backward(grad)

    return step


def _keyconv_check(keys, weight, grad):
    """Max abs differences (out, dk, dweight) of the Triton key conv against the PyTorch path."""
    results = []
    for backend in ("triton", "reference"):
        k, w = (t.detach().clone().requires_grad_() for t in (keys, weight))
        out = key_conv(k, w, backend=backend)
        out.backward(grad)
        results.append([out.detach().float(), k.grad.float(), w.grad.float()])
    return {name: float((a - b).abs().max()) for name, a, b in zip(("out", "dk", "dweight"), *results)}


def run(seq_len: int, layer: MoBAAttention, dtype) -> dict:
    device = layer.q_proj.weight.device
    channels = layer.num_kv_heads * layer.head_dim
    hidden = torch.randn(seq_len, layer.q_proj.in_features, device=device, dtype=dtype, requires_grad=True)
    keys = torch.randn(seq_len, channels, device=device, dtype=dtype, requires_grad=True)
    weight = layer.key_conv.weight
    grad_keys = torch.randn_like(keys)
    row = {"seq_len": seq_len, "check_max_abs_diff": _keyconv_check(keys, weight, grad_keys)}
    for name, backend in (("kconv_ms", "triton"), ("kconv_torch_ms", "reference")):
        conv = lambda k, backend=backend: key_conv(k, weight, backend=backend)  # noqa: E731
        row[name] = bench_ms(_fwd_bwd(conv, [keys], grad_keys, [weight]))

    with torch.no_grad():
        q, k = layer.qk(hidden)
        v = layer.v_proj(hidden).view(seq_len, layer.num_kv_heads, layer.head_dim)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0, seq_len], dtype=torch.int32, device=device)

    def attention(q, k, v):
        return flashmoba.moba_attn_varlen(q, k, v, cu, block_size=layer.block_size, topk=layer.topk)

    row["attention_ms"] = bench_ms(_fwd_bwd(attention, [q, k, v], torch.randn_like(q)))
    row["layer_ms"] = bench_ms(_fwd_bwd(layer, [hidden], torch.randn_like(hidden), list(layer.parameters())))
    row["kconv_share_of_layer"] = row["kconv_ms"] / row["layer_ms"]
    row["kconv_share_of_attention"] = row["kconv_ms"] / row["attention_ms"]
    return row


def _plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["seq_len"] for r in rows]
    fig, (ax_time, ax_share) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("layer_ms", "MoBA layer"),
        ("attention_ms", "MoBA attention"),
        ("kconv_torch_ms", "key conv (PyTorch)"),
        ("kconv_ms", "key conv (Triton)"),
    ):
        ax_time.plot(lengths, [r[key] for r in rows], marker="o", label=label)
    ax_time.set(xscale="log", yscale="log", xlabel="tokens", ylabel="forward + backward (ms)")
    ax_time.legend()
    ax_share.plot(lengths, [100 * r["kconv_share_of_layer"] for r in rows], marker="o", label="of the layer")
    ax_share.plot(lengths, [100 * r["kconv_share_of_attention"] for r in rows], marker="o", label="of the attention")
    ax_share.axhline(5, color="gray", linestyle="--", label="target 5%")
    ax_share.set(xscale="log", xlabel="tokens", ylabel="key conv share (%)")
    ax_share.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--kconv", type=int, default=3, help="key convolution width W")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_keyconv.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = MoBAHybridConfig.from_preset("340m", kconv_size=args.kconv)
    layer = MoBAAttention(
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        attn_type="moba",
        block_size=config.moba_block_size,
        topk=config.moba_topk,
        kconv_size=config.kconv_size,
        backend="triton",
    )
    with torch.no_grad():  # away from the identity init, as after training (the cost is the same)
        layer.key_conv.weight.normal_(std=0.3)
    layer = layer.to(device="cuda", dtype=dtype)
    rows = [run(n, layer, dtype) for n in tqdm(args.seqlens, desc="sequence lengths")]

    print(
        f"\nkey conv W={args.kconv} vs the 340M MoBA layer, {args.dtype}, forward + backward "
        f"({torch.cuda.get_device_name()})\n"
    )
    print(
        "| tokens | key conv (ms) | key conv PyTorch (ms) | MoBA attention (ms) | layer (ms) "
        "| share of layer | share of attention |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq_len']} | {r['kconv_ms']:.3f} | {r['kconv_torch_ms']:.3f} | {r['attention_ms']:.2f} "
            f"| {r['layer_ms']:.2f} | {100 * r['kconv_share_of_layer']:.2f}% "
            f"| {100 * r['kconv_share_of_attention']:.2f}% |"
        )
    print("\nTriton vs PyTorch key conv, max abs difference:", rows[-1]["check_max_abs_diff"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": torch.cuda.get_device_name(),
            "dtype": args.dtype,
            "kconv": args.kconv,
            "hidden": config.hidden_size,
            "heads": config.num_heads,
            "head_dim": config.head_dim,
            "block_size": config.moba_block_size,
            "topk": config.moba_topk,
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        _plot(
            rows,
            args.out.with_suffix(".png"),
            f"Key conv (W={args.kconv}) vs MoBA, 340M preset layer, {args.dtype}, forward + backward, {meta['device']}",
        )
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
