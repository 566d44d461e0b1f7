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

The breakdown comes from one profiled step (torch.profiler, input shapes recorded): the device time of
every kernel (on the CPU: every op's self CPU time), charged by the innermost range above the op that
launched it. The categories add up to all kernels of the step.

* Eager modules: hooks open a range per attention type, MLP and norm, forward and backward. A kernel under
  an attention range is "attn proj" if it is a GEMM, else "attn core: <type>" (the attention module's
  rotary embedding, casts and copies included); under an MLP or norm range, "mlp" or "norm".
* Compiled layers (the default; hooks open no range inside compiled code): one range per layer, opened
  outside it around its forward call and its backward node, names the layer's attention type; a kernel in
  it goes by what it is. "attn core: <type>": flashmoba's Triton kernels (the key convolution's included),
  a kernel named like FlashAttention / cuDNN / fmha, or any kernel under an attention op
  (``flashmoba::moba_attn_fwd`` / ``_bwd``, ``torch_attn::_varlen_attn``, ``aten::_scaled_dot_product_*``:
  MoBA's routing included). GEMMs by their shapes: "attn proj" or "mlp" when their dims are those of one of
  the layer's linear maps over the step's tokens (forward, input gradient and weight gradient alike), else
  "other: gemm". Inductor's fused kernels (``triton_poi_fused_*``, ``triton_red_fused_*``, ...) by the aten
  ops their names list: rsqrt / rms_norm, or pow with a mean or sum (the norm's backward), "norm"; silu,
  "mlp"; anything else, "other: fused elementwise" (casts, rotary embedding, copies, residual adds not fused
  into a norm). A fused kernel spanning categories goes to the first that its name qualifies for, in the
  order attention, norm, mlp: the residual add fused into the next norm counts as norm (and the one fused
  into the down projection's ``addmm``, as mlp). Other kernels (aten fallbacks such as cumsum or sort,
  copies, memsets) go to "other". Rows of the two kinds differ in where small work lands: rotary embedding
  and casts are attention core eager, "other: fused elementwise" compiled.
* Outside these ranges: "other" (embedding, loss, the residual adds of eager rows), its GEMMs "other: gemm"
  (the LM head). The final norm has its module range; the optimizer step (gradient clipping and AdamW) a
  range of its own, "optimizer".

    python benchmarks/bench_train.py --contexts 8192 32768 65536 --out docs/results/train_h200.json
    python benchmarks/bench_train.py --cpu-smoke --out /tmp/train_smoke.json     # CPU, seconds

writes the JSON, a markdown table next to it (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
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
    "other: fused elementwise",
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
# breakdown: profiler ranges opened by module hooks, and what the kernels of compiled layers are


@contextlib.contextmanager
def _range(name: str):
    handle = torch.ops.profiler._record_function_enter_new(name, None)
    try:
        yield
    finally:
        torch.ops.profiler._record_function_exit._RecordFunction(handle)


def _open(stack: list, label: str) -> None:
    """Open the profiler range ``label``, its handle pushed on ``stack``."""
    stack.append(torch.ops.profiler._record_function_enter_new(label, None))


def _close(stack: list) -> None:
    """Close the range last opened on ``stack`` (none open: nothing)."""
    if stack:
        torch.ops.profiler._record_function_exit._RecordFunction(stack.pop())


class _Undo:
    """A handle like a hook's: ``remove()`` runs ``undo``."""

    def __init__(self, undo):
        self.remove = undo


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


def _compiled_modules(model) -> list:
    """The modules compiled in place (``nn.Module.compile``, which ``compile_layers`` runs on every layer)."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def install_range_hooks(model) -> list:
    """Forward and backward hooks that open a profiler range named by the module's category; none inside
    compiled modules, whose code opens no range (``install_layer_ranges`` covers them)."""
    compiled = {id(sub) for m in _compiled_modules(model) for sub in m.modules()}
    handles = []
    for module in model.modules():
        name = _category(module)
        if name is None or id(module) in compiled:
            continue
        stack = []
        handles += [
            module.register_forward_pre_hook(lambda m, a, n=name, s=stack: _open(s, n)),
            module.register_forward_hook(lambda m, a, o, s=stack: _close(s)),
            module.register_full_backward_pre_hook(lambda m, g, n=name, s=stack: _open(s, n)),
            module.register_full_backward_hook(lambda m, gi, go, s=stack: _close(s)),
        ]
    return handles


_LAYER_LABEL = "compiled layer: "


def install_layer_ranges(model) -> list:
    """A profiler range "compiled layer: <attention type>" around every compiled module that holds an
    attention layer, opened outside its compiled code: around its forward call, and from the start to the end
    of the autograd node that runs its backward (its output's ``grad_fn``: the compiled backward graph, or
    with activation checkpointing the node that recomputes and backpropagates the layer). Returns handles
    whose ``remove()`` puts the module's forward back."""
    handles = []
    for module in _compiled_modules(model):
        types = [c[len("attn: ") :] for c in map(_category, module.modules()) if c and c.startswith("attn: ")]
        if not types:
            continue
        label, compiled, stack = _LAYER_LABEL + types[0], module._compiled_call_impl, []

        def call(*args, compiled=compiled, label=label, stack=stack, **kwargs):
            with _range(label):
                out = compiled(*args, **kwargs)
            node = getattr(out, "grad_fn", None)
            if node is not None:
                node.register_prehook(lambda grad_outputs: _open(stack, label))
                node.register_hook(lambda grad_inputs, grad_outputs: _close(stack))
            return out

        def undo(module=module, compiled=compiled, stack=stack):
            module._compiled_call_impl = compiled
            while stack:
                _close(stack)

        module._compiled_call_impl = call
        handles.append(_Undo(undo))
    return handles


def layer_gemms(model, tokens: int) -> dict[tuple[int, int, int], str]:
    """The GEMMs of one training step's linear maps inside attention and MLP modules, by their sorted dims.

    A map ``in -> out`` over ``tokens`` rows runs ``[tokens, in] @ [in, out]`` forward, and backward
    ``[tokens, out] @ [out, in]`` (input gradient) and ``[out, tokens] @ [tokens, in]`` (weight gradient):
    all three have the dims ``sorted((tokens, in, out))``. Values "attn proj" or "mlp"; dims that maps of both
    categories have are left out (such a GEMM counts as "other: gemm").
    """
    table: dict[tuple[int, int, int], str | None] = {}
    for module in model.modules():
        name = _category(module)
        if name is None or name == "norm":
            continue
        category = "attn proj" if name.startswith("attn: ") else name
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                dims = tuple(sorted((tokens, sub.in_features, sub.out_features)))
                table[dims] = category if table.get(dims, category) == category else None
    return {dims: category for dims, category in table.items() if category is not None}


# kernel names of GEMMs (CUDA libraries) and the CPU's matmul ops
_ATTENTION_MARKERS = ("flash", "fmha", "attn", "attention", "cudnn")
_GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "aten::mm", "aten::addmm", "aten::bmm")
# ops that run one GEMM, [m, k] @ [k, n] (addmm and baddbmm after their bias)
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# flashmoba's Triton kernels (flashmoba/attention/{forward,backward}.py, flashmoba/routing/, flashmoba/nn/keyconv/):
# attention core, the key convolution's included. Inductor launches the ones it compiles as "<name>_<i>".
_FLASHMOBA_KERNELS = (
    "_attn_fwd_kernel",
    "_attn_fwd_row_ref_kernel",
    "_attn_fwd_prepare_rescue_kernel",
    "_attn_fwd_finalize_kernel",
    "_attn_bwd_delta_kernel",
    "_attn_bwd_kernel",
    "_block_centroids_kernel",
    "_route_topk_kernel",
    "_conv_silu_residual_kernel",
    "_conv_silu_residual_grads_kernel",
)
# inductor's generated kernels: triton_poi_fused_..., triton_red_..., triton_per_..., triton_tem_... (a GEMM
# template) on CUDA, [graph_<i>_]cpp_fused_... on the CPU; the name lists the aten ops fused, sorted by name
_INDUCTOR_KERNEL = re.compile(r"(?:^|_)(?:triton_(?P<kind>[a-z]+)|cpp)_")
_NORM_OPS = {"rsqrt", "rms"}  # the norm forward; its backward fuses pow with a sum (below)
_MLP_OPS = {"silu", "sigmoid"}


def _is_gemm_kernel(kernel_name: str) -> bool:
    """A GEMM by its name (attention kernels first: FlashAttention's names carry cutlass template types)."""
    lowered = kernel_name.lower()
    return not any(m in lowered for m in _ATTENTION_MARKERS) and any(m in lowered for m in _GEMM_MARKERS)


def _gemm_dims(op) -> tuple[int, ...] | None:
    """Sorted ``(m, k, n)`` of the GEMM ``[..., m, k] @ [..., k, n]`` that ``op`` ran, from its recorded input
    shapes (those of a GEMM op; an inductor GEMM template's first two matrices), or None."""
    if op is None:
        return None
    shapes = list(getattr(op, "input_shapes", None) or [])
    if op.name in ("aten::addmm", "aten::baddbmm"):
        shapes = shapes[1:]
    matrices = [s for s in shapes if len(s) >= 2][:2]
    if len(matrices) < 2:
        return None
    a, b = matrices
    return tuple(sorted((a[-2], a[-1], b[-1])))


def _fused_category(kernel_name: str) -> str:
    """Category of an inductor-fused kernel by the aten ops its name lists: a norm's (rsqrt, rms_norm, or pow
    with a mean or sum: the norm's backward) -> "norm", SwiGLU's silu -> "mlp", else (residual adds not fused
    into a norm, casts, rotary embedding, copies) "other: fused elementwise". A kernel fusing several goes to
    the first of norm, mlp that it lists (a residual add fused into the next norm counts as norm)."""
    ops = set(kernel_name.lower().split("_"))
    if ops & _NORM_OPS or ("pow" in ops and ops & {"mean", "sum"}):
        return "norm"
    if ops & _MLP_OPS:
        return "mlp"
    return "other: fused elementwise"


def _compiled_category(kernel_name: str, chain: list, attn: str, gemms: dict) -> str:
    """Category of a kernel that a compiled layer whose attention is ``attn`` launched, by what the kernel is
    (the ranges of the layer's modules are gone). ``chain``: the op that launched it and its CPU parents up
    to the layer's range.

    Attention core: flashmoba's Triton kernels, a kernel named like FlashAttention / cuDNN / fmha (also an
    inductor kernel that fuses an attention op's output handling), or any kernel under an attention op
    (``flashmoba::moba_attn_fwd``, ``torch_attn::_varlen_attn``, ``aten::_scaled_dot_product_*``, ...:
    routing and softmax rescue included). GEMMs (an op of ``_GEMM_OPS`` in the chain, a GEMM kernel name, an
    inductor GEMM template) by their dims in ``gemms`` (``layer_gemms``), "other: gemm" if none there.
    Inductor-fused kernels by ``_fused_category``. Anything else (aten fallbacks such as cumsum or sort,
    copies, memsets): "other".
    """
    lowered = kernel_name.lower()
    if (
        re.sub(r"_\d+$", "", kernel_name) in _FLASHMOBA_KERNELS
        or any(m in lowered for m in _ATTENTION_MARKERS)
        or any("::" in e.name and any(m in e.name.lower() for m in _ATTENTION_MARKERS) for e in chain)
    ):
        return f"attn core: {attn}"
    inductor = _INDUCTOR_KERNEL.search(lowered)
    gemm_op = next((e for e in chain if e.name in _GEMM_OPS), None)
    if gemm_op is not None or _is_gemm_kernel(kernel_name) or (inductor and inductor["kind"] == "tem"):
        return gemms.get(_gemm_dims(gemm_op or (chain[0] if chain else None)), "other: gemm")
    if inductor:
        return _fused_category(kernel_name)
    return "other"


def _eager_category(kernel_name: str, label: str | None) -> str:
    """Category of a kernel under the module range ``label`` (None: under none): the range's, except that
    GEMMs under an attention range are its projections; outside ranges "other", its GEMMs "other: gemm"."""
    gemm = _is_gemm_kernel(kernel_name)
    if label is None:
        return "other: gemm" if gemm else "other"
    if label.startswith("attn: "):
        return "attn proj" if gemm else "attn core: " + label[len("attn: ") :]
    return label


_MODULE_LABELS = frozenset({f"attn: {t}" for t in ("moba", "dense", "swa")} | {"mlp", "norm", "optimizer"})


def _is_label(name: str) -> bool:
    return name in _MODULE_LABELS or name.startswith(_LAYER_LABEL)


def kernel_categories(events, on_cuda: bool, gemms: dict | None = None):
    """``(category, kernel name, op, microseconds)`` for every kernel of a profiled step (CUDA: the kernels of
    each op; CPU: each op's self CPU time, under the op's name), by the innermost range at or above the op
    that launched it: a module range (eager) by ``_eager_category``, a compiled layer's range by
    ``_compiled_category`` (with ``gemms``, ``layer_gemms``), outside ranges ``_eager_category(name, None)``.
    A range's own entry named like it (the GPU span the profiler may give a user range: the kernels under it,
    once more) is not a kernel and is skipped; every other kernel is yielded once."""
    gemms = gemms or {}
    for evt in events:
        if on_cuda:
            span = _is_label(evt.name) or getattr(evt, "is_user_annotation", False)
            pieces = [(k.name, k.duration) for k in getattr(evt, "kernels", []) if not (span and k.name == evt.name)]
        else:
            pieces = [(evt.name, evt.self_cpu_time_total)]
        if not pieces:
            continue
        chain, node = [], evt
        while node is not None and not _is_label(node.name):
            chain.append(node)
            node = node.cpu_parent
        label = node.name if node is not None else None
        for kernel_name, duration_us in pieces:
            if label is not None and label.startswith(_LAYER_LABEL):
                name = _compiled_category(kernel_name, chain, label[len(_LAYER_LABEL) :], gemms)
            else:
                name = _eager_category(kernel_name, label)
            yield name, kernel_name, evt, duration_us


def attribute(events, on_cuda: bool, gemms: dict | None = None) -> dict[str, float]:
    """Milliseconds per category of a profiled step (``kernel_categories``): they add up to all its kernels."""
    totals: dict[str, float] = {}
    for name, _, _, duration_us in kernel_categories(events, on_cuda, gemms):
        totals[name] = totals.get(name, 0.0) + duration_us / 1e3
    return totals


def profile_step(model, optimizer, batch, autocast, device) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = install_range_hooks(model) + install_layer_ranges(model)
    gemms = layer_gemms(model, batch["input_ids"].numel())
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            train_step(model, optimizer, batch, autocast)
            _sync(device)
    finally:
        for h in handles:
            h.remove()
    return attribute(prof.events(), device.type == "cuda", gemms)


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
