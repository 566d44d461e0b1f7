"""Generation speed of the hybrid model: MoBA global layers (sparse decode) vs the same model with dense ones.

The hybrid model (a preset of :mod:`flashmoba.models`, random weights, bf16) prefills a random prompt of
``context`` tokens per sequence, then decodes ``--steps`` tokens greedily, one per step, through its cache:
one :class:`flashmoba.MoBAKVCache` per layer; MoBA layers decode with :func:`flashmoba.moba_decode`, dense
and sliding-window layers with :func:`flashmoba.decode.dense_decode`. The two models differ only in
``global_attn`` ("moba" or "dense"). Each step is an eager ``model(...)`` call (Python and launches
included; its argument checks read nothing back from the GPU), timed after warm-up steps that compile the
kernels and let the caches grow.

    python benchmarks/bench_model_decode.py --out docs/results/model_decode.json

writes model_decode.json and model_decode.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM


def decode_row(model, context: int, batch: int, steps: int, warmup: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for step in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    step_ms = 1e3 * times[len(times) // 2]
    return {
        "context": context,
        "batch": batch,
        "prefill_s": prefill_s,
        "step_ms": step_ms,
        "tokens_per_s": batch / step_ms * 1e3,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def to_markdown(rows, meta) -> str:
    lines = [
        f"Hybrid model `{meta['preset']}` (random weights, bf16), greedy decoding after a random prompt; "
        f"{meta['device']}. Median step of {meta['steps']} (after {meta['warmup']} warm-up steps), eager.",
        "",
        "| context | batch | MoBA tokens/s | dense tokens/s | MoBA / dense | MoBA step ms | dense step ms "
        "| MoBA peak GB | dense peak GB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["global_attn"], r["context"], r["batch"]): r for r in rows}
    for (attn, context, batch), r in by.items():
        if attn != "moba" or ("dense", context, batch) not in by:
            continue
        d = by[("dense", context, batch)]
        lines.append(
            f"| {context // 1024}K | {batch} | {r['tokens_per_s']:.0f} | {d['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / d['tokens_per_s']:.2f}x | {r['step_ms']:.2f} | {d['step_ms']:.2f} | "
            f"{r['peak_gb']:.1f} | {d['peak_gb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--max-cache-gb", type=float, default=40.0, help="skip configs whose K+V cache is larger")
    p.add_argument("--out", type=Path, default=None, help="JSON path; the .md table goes next to it")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model_decode.py needs a CUDA GPU")
    rows = []
    for global_attn in ("moba", "dense"):
        config = MoBAHybridConfig.from_preset(args.preset, global_attn=global_attn)
        torch.manual_seed(0)
        model = MoBAHybridForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # K and V bytes
        for context in args.contexts:
            for batch in args.batches:
                if per_token * context * batch > args.max_cache_gb * 1e9:
                    continue
                row = decode_row(model, context, batch, args.steps, args.warmup)
                rows.append({"global_attn": global_attn, **row})
                print(json.dumps(rows[-1]), flush=True)
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    meta = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    md = to_markdown(rows, meta)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(md)
        print(f"wrote {args.out}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
