"""Training throughput of the hybrid model: tokens/s, MFU, step-time breakdown and peak memory, beside a
plain transformers Llama of the same shape on SDPA.

Every step trains on ``--tokens`` tokens (at least one document): documents of exactly ``context``
tokens, packed with ``cu_seqlens`` for the hybrid model, as a ``[documents, context]`` batch for Llama
(SDPA cannot keep packed documents apart; with equal lengths the two are the same work). bf16 autocast on
CUDA, fused AdamW, gradient clipping at 1.0: the step of ``flashmoba train``. Random tokens and weights.

Variants (``--variants``): ``llama`` (transformers LlamaForCausalLM, SDPA), ``dense`` (the hybrid with
dense global layers), ``moba-128x8`` / ``moba-64x16`` (MoBA global layers, block x top-k),
``moba-128x8-kconv3`` (plus the key convolution); suffixes switch one choice back to measure it:
``-sdpa`` (dense and sliding-window layers on SDPA instead of FlashAttention's varlen kernel),
``-logits`` (the loss on full ``[N, V]`` logits instead of the fused chunked one), ``-eager`` (the decoder
layers not compiled; by default they are, ``model.compile_layers()``, as in ``flashmoba train``), and
``-ckpt`` switches one on (activation checkpointing per decoder layer). Llama runs as transformers ships
it (eager) and takes only ``-ckpt``.

FLOPs (stated, so that MFU is comparable across variants): ``6 * P * tokens`` for the matmul parameters
``P`` (every ``nn.Linear`` weight, the LM head included, the embedding lookup excluded) plus attention
``3 * 4 * D * HQ * sum_t keys(t)`` per layer, where ``keys(t)`` is what query ``t`` attends: ``t + 1``
dense, ``min(t + 1, W)`` sliding window, its own block's ``t mod B + 1`` plus ``B`` per selected past
block for MoBA. MFU divides by the card's dense bf16 peak (``--peak-tflops``, the datasheet value: 989
for H100/H200 SXM); the bf16 matmul rate measured in the same run is reported next to it.

The breakdown comes from one profiled step (torch.profiler; module hooks open a range per attention
type, MLP and norm, forward and backward, and one around the optimizer): device time of the kernels each
range launched (the innermost range wins), GEMMs inside attention counted as its projections;
"other" is the rest (embedding, loss, residual adds, gradient clipping), its GEMMs ("other: gemm": the
LM head) apart. In a compiled layer the hooks do not open ranges, so a compiled row's layer kernels land
in "other" and "other: gemm" (the ranges of norms and attention types then show next to nothing).

    python benchmarks/bench_train.py --contexts 8192 32768 65536 --out docs/results/train_h200.json
    python benchmarks/bench_train.py --cpu-smoke --out /tmp/train_smoke.json     # CPU, seconds

writes the JSON, a markdown table next to it (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM

BASE_VARIANTS = {
    "llama": None,
    "dense": dict(global_attn="dense"),
    "moba-128x8": dict(global_attn="moba", moba_block_size=128, moba_topk=8),
    "moba-64x16": dict(global_attn="moba", moba_block_size=64, moba_topk=16),
    "moba-128x8-kconv3": dict(global_attn="moba", moba_block_size=128, moba_topk=8, kconv_size=3),
}
SUFFIXES = {
    "-sdpa": dict(causal_backend="sdpa"),
    "-logits": dict(loss_chunk_size=0),
    "-ckpt": {},  # activation checkpointing, set on the model
    "-eager": {},  # no torch.compile of the decoder layers
}
CATEGORIES = (
    "attn core: moba",
    "attn core: dense",
    "attn core: swa",
    "attn proj",
    "mlp",
    "norm",
    "optimizer",
    "other: gemm",
)


def parse_variant(name: str) -> tuple[str, dict, set[str]]:
    """``(base, config overrides, model switches {"-ckpt", "-eager"})`` of a variant name."""
    base, overrides, switches = name, {}, set()
    stripped = True
    while stripped:
        stripped = False
        for suffix, extra in SUFFIXES.items():
            if base.endswith(suffix) and base != suffix:
                base, stripped = base[: -len(suffix)], True
                overrides.update(extra)
                if suffix in ("-ckpt", "-eager"):
                    switches.add(suffix)
    if base not in BASE_VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: a base of {sorted(BASE_VARIANTS)} with suffixes {list(SUFFIXES)}")
    if base == "llama" and (overrides or "-eager" in switches):
        raise SystemExit(f"{name}: llama takes only the -ckpt suffix")
    return base, {**(BASE_VARIANTS[base] or {}), **overrides}, switches


# ------------------------------------------------------------------------------------------------
# models and FLOPs


def build_model(name: str, preset: str, context: int, device, backend: str, compile_layers: bool = True):
    base, overrides, switches = parse_variant(name)
    config = MoBAHybridConfig.from_preset(preset, max_position_embeddings=context, attn_backend=backend, **overrides)
    if base == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_position_embeddings=context,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(llama)
        layer_types = ["dense"] * config.num_layers
    else:
        model = MoBAHybridForCausalLM(config)
        layer_types = config.layer_attn_types
    if "-ckpt" in switches:
        model.gradient_checkpointing_enable()
    model = model.to(device).train()
    if compile_layers and base != "llama" and "-eager" not in switches:
        model.compile_layers()
    return model, config, layer_types


def keys_attended(attn: str, context: int, config) -> int:
    """Sum over the positions of one document of the keys each query attends."""
    t = torch.arange(context, dtype=torch.float64)
    if attn == "dense":
        keys = t + 1
    elif attn == "swa":
        keys = torch.clamp(t + 1, max=config.swa_window)
    else:
        block, topk = config.moba_block_size, config.moba_topk
        keys = t % block + 1 + block * torch.clamp(t // block, max=topk - 1)
    return int(keys.sum())


def step_flops(model, config, layer_types, context: int, tokens: int) -> dict:
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    documents = tokens // context
    per_pair = 3 * 4 * config.head_dim * config.num_heads
    attention = sum(per_pair * keys_attended(a, context, config) * documents for a in layer_types)
    return {"matmul_params": matmul_params, "matmul": 6 * matmul_params * tokens, "attention": attention}


# ------------------------------------------------------------------------------------------------
# the step


def make_batch(base: str, vocab: int, context: int, tokens: int, device) -> dict:
    documents = tokens // context
    ids = torch.randint(0, vocab, (documents, context), device=device)
    if base == "llama":
        return {"input_ids": ids, "labels": ids}
    cu = torch.arange(0, documents + 1, device=device, dtype=torch.int32) * context
    flat = ids.reshape(1, -1)
    return {"input_ids": flat, "cu_seqlens": cu, "labels": flat, "max_seqlen": context}


def train_step(model, optimizer, batch, autocast):
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    with _range("optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# breakdown: profiler ranges opened by module hooks


@contextlib.contextmanager
def _range(name: str):
    handle = torch.ops.profiler._record_function_enter_new(name, None)
    try:
        yield
    finally:
        torch.ops.profiler._record_function_exit._RecordFunction(handle)


def _category(module) -> str | None:
    kind = type(module).__name__
    if kind == "MoBAAttention":
        return f"attn: {module.attn_type}"
    if kind == "LlamaAttention":
        return "attn: dense"
    if kind in ("MoBAHybridMLP", "LlamaMLP"):
        return "mlp"
    if kind in ("RMSNorm", "LlamaRMSNorm"):
        return "norm"
    return None


def install_range_hooks(model) -> list:
    """Forward and backward hooks that open a profiler range named by the module's category."""
    handles = []
    for module in model.modules():
        name = _category(module)
        if name is None:
            continue
        stack = []

        def enter(label, stack=stack):
            stack.append(torch.ops.profiler._record_function_enter_new(label, None))

        def leave(stack=stack):
            if stack:
                torch.ops.profiler._record_function_exit._RecordFunction(stack.pop())

        handles += [
            module.register_forward_pre_hook(lambda m, a, n=name, e=enter: e(n)),
            module.register_forward_hook(lambda m, a, o, lv=leave: lv()),
            module.register_full_backward_pre_hook(lambda m, g, n=name, e=enter: e(n)),
            module.register_full_backward_hook(lambda m, gi, go, lv=leave: lv()),
        ]
    return handles


# kernel names of GEMMs (CUDA libraries) and the CPU's matmul ops
_ATTENTION_MARKERS = ("flash", "fmha", "attn", "attention", "cudnn")
_GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "aten::mm", "aten::addmm", "aten::bmm")


def attribute(events, on_cuda: bool) -> dict[str, float]:
    """Milliseconds per category: each kernel (CUDA) or each op's self CPU time (CPU) goes to the
    innermost category range above the op that launched it."""
    labels = {f"attn: {t}" for t in ("moba", "dense", "swa")} | {"mlp", "norm", "optimizer"}
    totals: dict[str, float] = {}

    def owner(evt):
        node = evt
        while node is not None:
            if node.name in labels:
                return node.name
            node = node.cpu_parent
        return "other"

    for evt in events:
        if evt.name in labels:
            continue
        if on_cuda:
            pieces = [(k.name, k.duration) for k in getattr(evt, "kernels", [])]
        else:
            pieces = [(evt.name, evt.self_cpu_time_total)] if not evt.cpu_children else []
        for kernel_name, duration_us in pieces:
            name = owner(evt)
            lowered = kernel_name.lower()
            # attention kernels first: FlashAttention's names carry cutlass template types
            gemm = not any(m in lowered for m in _ATTENTION_MARKERS) and any(m in lowered for m in _GEMM_MARKERS)
            if name.startswith("attn: "):
                name = "attn proj" if gemm else "attn core: " + name[len("attn: ") :]
            elif name == "other" and gemm:
                name = "other: gemm"
            totals[name] = totals.get(name, 0.0) + duration_us / 1e3
    return totals


def profile_step(model, optimizer, batch, autocast, device) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = install_range_hooks(model)
    try:
        with profile(activities=activities) as prof:
            train_step(model, optimizer, batch, autocast)
            _sync(device)
    finally:
        for h in handles:
            h.remove()
    return attribute(prof.events(), device.type == "cuda")


# ------------------------------------------------------------------------------------------------
# one row


def matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - start) / 1e12


def run_row(name: str, context: int, args, device) -> dict:
    base = parse_variant(name)[0]
    tokens = max(args.tokens, context)
    torch._dynamo.reset()  # a fresh model per row: compiled code of earlier rows would count toward the recompile limit
    torch.manual_seed(0)
    model, config, layer_types = build_model(name, args.preset, context, device, args.backend, not args.cpu_smoke)
    on_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)
    batch = make_batch(base, config.vocab_size, context, tokens, device)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step(model, optimizer, batch, autocast)
    _sync(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, batch, autocast))
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if on_cuda else None
    breakdown = profile_step(model, optimizer, batch, autocast, device) if args.breakdown else {}
    flops = step_flops(model, config, layer_types, context, tokens)
    total_flops = flops["matmul"] + flops["attention"]
    row = {
        "variant": name,
        "context": context,
        "tokens": tokens,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "model_tflops": total_flops / 1e12,
        "achieved_tflops": total_flops / step_s / 1e12,
        "mfu": total_flops / step_s / (args.peak_tflops * 1e12),
        "peak_gb": peak_gb,
        "loss": float(torch.stack(losses).float().mean()),
        "breakdown_ms": breakdown,
        **flops,
    }
    del model, optimizer, batch
    if on_cuda:
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# report


def _k(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def to_markdown(rows, meta) -> str:
    lines = [
        f"Preset `{meta['preset']}`, {meta['device']}, torch {meta['torch']}; median of {meta['steps']} steps "
        f"after {meta['warmup']} warm-up steps; MFU against {meta['peak_tflops']:.0f} TFLOP/s"
        + (f" (bf16 matmul measured in this run: {meta['matmul_tflops']:.0f})" if meta["matmul_tflops"] else "")
        + ".",
        "",
        "| context | variant | tokens/s | x dense | step ms | MFU | TFLOP/s | FLOP ratio to dense | peak GB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = {r["context"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense.get(r["context"])
        speed = f"{r['tokens_per_s'] / d['tokens_per_s']:.2f}x" if d else "-"
        flop_ratio = f"{d['model_tflops'] / r['model_tflops']:.2f}" if d else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        lines.append(
            f"| {_k(r['context'])} | {r['variant']} | {r['tokens_per_s']:,.0f} | {speed} | {r['step_ms']:.1f} | "
            f"{100 * r['mfu']:.1f} % | {r['achieved_tflops']:.0f} | {flop_ratio} | {peak} |"
        )
    if any(r["breakdown_ms"] for r in rows):
        cats = [c for c in CATEGORIES if any(c in r["breakdown_ms"] for r in rows)] + ["other"]
        lines += [
            "",
            "Step-time breakdown of one profiled step (ms of device time; module docstring):",
            "",
            "| context | variant | " + " | ".join(cats) + " |",
            "|---:|---|" + "---:|" * len(cats),
        ]
        for r in rows:
            b = r["breakdown_ms"]
            cells = " | ".join(f"{b[c]:.1f}" if c in b else "-" for c in cats)
            lines.append(f"| {_k(r['context'])} | {r['variant']} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["context"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(contexts) * max(1, len(variants)) / 3, 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j, c in enumerate(contexts) if (v, c) in by]
        ys = [by[(v, c)]["tokens_per_s"] / 1e3 for c in contexts if (v, c) in by]
        ax.bar(xs, ys, width, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [_k(c) for c in contexts])
    ax.set_xlabel("context (tokens per document)")
    ax.set_ylabel("training tokens/s (thousands)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per step (at least one context)")
    p.add_argument("--variants", nargs="+", default=["llama", "dense", "moba-128x8", "moba-64x16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto", help="the hybrid model's attn_backend")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (datasheet)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the profiled step")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU, eager: checks the script runs")
    p.add_argument("--out", type=Path, default=None, help="JSON path; the .md and .png go next to it")
    args = p.parse_args(argv)
    for name in args.variants:
        parse_variant(name)
    if args.cpu_smoke:
        args.preset, args.contexts, args.tokens, args.steps, args.warmup = "tiny", [128], 256, 2, 1
        args.backend, args.peak_tflops = "reference", 1.0
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("bench_train.py needs a CUDA GPU (or --cpu-smoke)")
    meta = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "matmul_tflops": matmul_tflops(device),
    }
    rows = []
    for context in args.contexts:
        for name in args.variants:
            rows.append(run_row(name, context, args, device))
            print(json.dumps(rows[-1]), flush=True)
            if args.out is not None:  # after every row: a run cut short keeps what it finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                args.out.with_suffix(".md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))
    if args.out is not None:
        plot(rows, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and its .md / .png")
    return rows


if __name__ == "__main__":
    main()
