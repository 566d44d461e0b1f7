"""benchmarks/bench_train.py: the FLOP accounting, the step-time breakdown of compiled layers (fake CUDA
profiler events, and inductor on the CPU) and the whole script on the CPU (--cpu-smoke)."""

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keys_attended_by_brute_force(bench):
    config = MoBAHybridConfig.from_preset("tiny", swa_window=5, moba_block_size=4, moba_topk=3)
    context = 23
    want = {"dense": 0, "swa": 0, "moba": 0}
    for t in range(context):
        want["dense"] += t + 1
        want["swa"] += len([s for s in range(t + 1) if t - s < 5])
        own = t // 4
        past = min(own, 3 - 1)  # fully-past blocks selected (own block counts toward top-k)
        want["moba"] += (t - 4 * own + 1) + 4 * past
    for attn, n in want.items():
        assert bench.keys_attended(attn, context, config) == n, attn
    # MoBA selecting every block, or a window as long as the document, is dense attention
    every = MoBAHybridConfig.from_preset("tiny", swa_window=context, moba_block_size=4, moba_topk=6)
    assert bench.keys_attended("moba", context, every) == want["dense"] == bench.keys_attended("swa", context, every)


def test_variant_names(bench):
    assert bench.parse_variant("moba-64x16-sdpa-ckpt") == (
        "moba-64x16",
        {"global_attn": "moba", "moba_block_size": 64, "moba_topk": 16, "causal_backend": "sdpa"},
        {"-ckpt"},
    )
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.parse_variant("moba-32x32")


def test_cpu_smoke_writes_json_markdown_and_plot(bench, tmp_path):
    out = tmp_path / "train.json"
    bench.main(["--cpu-smoke", "--variants", "llama", "moba-128x8-ckpt", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["llama", "moba-128x8-ckpt"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["matmul"] == 6 * r["matmul_params"] * r["tokens"]
        assert r["breakdown_ms"]["mlp"] > 0 and r["breakdown_ms"]["optimizer"] > 0
    assert "attn core: dense" in rows[0]["breakdown_ms"] and "attn core: moba" in rows[1]["breakdown_ms"]
    assert "| 128 | llama |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# the breakdown of compiled layers


class FakeEvent:
    """The fields of a torch.profiler FunctionEvent that the breakdown reads."""

    def __init__(self, name, parent=None, kernels=(), shapes=(), user_annotation=False):
        self.name, self.cpu_parent, self.cpu_children = name, parent, []
        self.kernels = [SimpleNamespace(name=k, duration=us) for k, us in kernels]
        self.input_shapes = [list(s) for s in shapes]
        self.is_user_annotation = user_annotation
        self.self_cpu_time_total = 0.0
        if parent is not None:
            parent.cpu_children.append(self)


class FakeStep:
    """Events of one profiled CUDA step, in the order the profiler lists them."""

    def __init__(self):
        self.events, self.spans_us = [], 0.0

    def op(self, name, parent=None, us=None, kernel=None, span=None, **kwargs):
        """An event; with ``us``, one kernel of that many microseconds (named like the op unless ``kernel``);
        with ``span``, the GPU span of a user range too: an entry named like it, which is not a kernel."""
        kernels = kwargs.pop("kernels", [(kernel or name, us)] if us is not None else [])
        if span is not None:
            kernels, self.spans_us = [(name, span), *kernels], self.spans_us + span
        evt = FakeEvent(name, parent, kernels, **kwargs)
        self.events.append(evt)
        return evt

    def kernel_us(self) -> float:
        """Microseconds of every kernel (the spans left out)."""
        return sum(k.duration for e in self.events for k in e.kernels) - self.spans_us


@pytest.fixture(scope="module")
def tiny_gemms(bench):
    """``layer_gemms`` of the tiny hybrid (hidden 128, 4x32 query heads, 2x32 KV heads, MLP 352) at 256 tokens."""
    model = MoBAHybridForCausalLM(MoBAHybridConfig.from_preset("tiny", attn_backend="reference"))
    return bench.layer_gemms(model, 256)


def test_layer_gemms_are_the_projections_and_mlp_maps(tiny_gemms):
    # q and o projections 128 <-> 128, k and v 128 -> 64, gate / up / down 128 <-> 352; the LM head is no layer's
    assert tiny_gemms == {(128, 128, 256): "attn proj", (64, 128, 256): "attn proj", (128, 256, 352): "mlp"}


NVJET = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
XMMA = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
FLASH_FWD = (
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>"
)
CUDNN_FWD = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0"
ADAMW = "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4, ADAMW>>"


def compiled_cuda_step() -> FakeStep:
    """A compiled step of the tiny hybrid on CUDA (256 tokens) as the profiler shows it: a MoBA layer forward
    and backward, a sliding-window and a dense layer forward, the loss, the final norm, the optimizer, one
    eager attention range (a ``-eager`` layer), and the GPU spans that user ranges get (not kernels)."""
    s = FakeStep()
    # MoBA layer, forward
    layer = s.op("compiled layer: moba", span=999.0)
    region = s.op("Torch-Compiled Region: 0/1", s.op("TorchDynamo Cache Lookup", layer))
    graph = s.op(
        "## Call CompiledFxGraph fxmoba ##", s.op("CompiledFunction", region), span=777.0, user_annotation=True
    )
    s.op("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", graph, us=10.0)  # input norm
    s.op("aten::mm", graph, us=20.0, kernel=NVJET, shapes=[[256, 128], [128, 128], [256, 128]])  # q_proj
    s.op("aten::mm", graph, us=5.0, kernel=XMMA, shapes=[[256, 128], [128, 64], [256, 64]])  # k_proj
    s.op("_conv_silu_residual_kernel_0", graph, us=3.0, kernel="_conv_silu_residual_kernel")  # key conv
    routing_and_forward = [("_block_centroids_kernel", 1.0), ("_route_topk_kernel", 40.0), ("_attn_fwd_kernel", 200.0)]
    moba = s.op("flashmoba::moba_attn_fwd", graph, kernels=routing_and_forward)
    s.op("aten::sort", moba, us=2.0, kernel="void at::native::bitonicSortKVInPlace<int, long>")  # routing's block index
    s.op("aten::mm", graph, us=30.0, kernel=NVJET, shapes=[[256, 128], [128, 352], [256, 352]])  # gate_proj
    s.op("triton_poi_fused_mul_silu_1", graph, us=7.0)
    # down_proj, the residual add as its bias
    s.op("aten::addmm", graph, us=15.0, kernel=NVJET, shapes=[[256, 128], [256, 352], [352, 128], [], []])
    s.op("triton_poi_fused__to_copy_2", graph, us=4.0)  # a weight cast
    s.op("aten::cumsum", graph, us=6.0, kernel="void at::cuda::tensor_kernel_scan_innermost_dim<long>")  # unknown kind
    # MoBA layer, backward
    node = s.op("autograd::engine::evaluate_function: CompiledFunctionBackward")
    layer = s.op("compiled layer: moba", node, span=888.0)
    graph = s.op("## Call CompiledFxGraph fxback ##", s.op("CompiledFunctionBackward", layer))
    s.op("triton_poi_fused_mul_silu_silu_backward_0", graph, us=8.0)
    s.op("aten::mm", graph, us=25.0, kernel=NVJET, shapes=[[352, 256], [256, 128], [352, 128]])  # dW of gate_proj
    s.op("aten::mm", graph, us=9.0, kernel=XMMA, shapes=[[256, 128], [128, 128], [256, 128]])  # dX of o_proj
    s.op("flashmoba::moba_attn_bwd", graph, kernels=[("_attn_bwd_delta_kernel", 11.0), ("_attn_bwd_kernel", 300.0)])
    s.op("triton_red_fused_add_div_expand_mul_pow_sum_3", graph, us=12.0)  # a norm's backward
    s.op("_conv_silu_residual_grads_kernel_1", graph, us=13.0, kernel="_conv_silu_residual_grads_kernel")
    s.op("aten::mm", graph, us=14.0, kernel=NVJET, shapes=[[256, 77], [77, 128]])  # no linear map has these dims
    # sliding-window layer (FlashAttention's varlen kernel) and dense layer (cuDNN), forward
    graph = s.op("## Call CompiledFxGraph fxswa ##", s.op("CompiledFunction", s.op("compiled layer: swa")))
    s.op("triton_poi_fused__to_copy_arange_cat_cos_mul_neg_sin_0", graph, us=16.0)  # rotary embedding
    varlen = s.op("torch_attn::_varlen_attn", graph)
    s.op("aten::_flash_attention_forward", varlen, us=100.0, kernel=FLASH_FWD)
    graph = s.op("## Call CompiledFxGraph fxdense ##", s.op("CompiledFunction", s.op("compiled layer: dense")))
    s.op("aten::_scaled_dot_product_cudnn_attention", graph, us=150.0, kernel=CUDNN_FWD)
    # an eager sliding-window attention module (module ranges)
    attn = s.op("attn: swa", span=666.0)
    s.op("aten::mm", s.op("aten::linear", attn), us=22.0, kernel=NVJET, shapes=[[256, 128], [128, 128]])
    s.op("aten::_flash_attention_forward", attn, us=23.0, kernel=FLASH_FWD)
    # outside the layers: the fused loss (LM head GEMM), the embedding, the final norm, the optimizer
    lm_head = s.op("aten::matmul", s.op("_LinearCrossEntropy"))
    s.op("aten::mm", lm_head, us=50.0, kernel=NVJET, shapes=[[256, 128], [128, 1024]])
    s.op(
        "aten::embedding",
        us=17.0,
        kernel="void at::native::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>",
    )
    s.op("aten::_fused_rms_norm", s.op("norm", span=555.0), us=18.0, kernel="void at::native::rms_norm_kernel<float>")
    optimizer = s.op("optimizer", span=444.0, us=21.0, kernel="triton_per_fused_linalg_vector_norm_0")
    s.op("aten::_fused_adamw_", optimizer, us=19.0, kernel=ADAMW)
    return s


def test_compiled_layers_are_attributed_by_kernel_kind(bench, tiny_gemms):
    step = compiled_cuda_step()
    got = bench.attribute(step.events, on_cuda=True, gemms=tiny_gemms)
    want_us = {
        "attn core: moba": 3 + 1 + 40 + 200 + 2 + 11 + 300 + 13,  # key conv, routing, forward, backward
        "attn core: swa": 100 + 23,  # compiled (varlen flash) + eager range
        "attn core: dense": 150,
        "attn proj": 20 + 5 + 9 + 22,  # q, k, dX of o (compiled), q (eager)
        "mlp": 30 + 7 + 15 + 8 + 25,  # gate, silu, down (addmm), silu backward, dW of gate
        "norm": 10 + 12 + 18,  # fused forward and backward, final norm (eager range)
        "other: fused elementwise": 4 + 16,  # cast, rotary embedding
        "other: gemm": 14 + 50,  # unknown dims in a layer, the LM head
        "other": 6 + 17,  # cumsum, embedding
        "optimizer": 21 + 19,
    }
    assert got == pytest.approx({k: v / 1e3 for k, v in want_us.items()})
    # every kernel once, and no range's GPU span (they would add 999 + 777 + 888 + 666 + 555 + 444 us)
    assert sum(got.values()) == pytest.approx(step.kernel_us() / 1e3)
    assert sum(want_us.values()) == step.kernel_us()


@pytest.mark.parametrize(
    "kernel",
    [
        "Memset (Device)",
        "Memcpy DtoD (Device -> Device)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
        "a_kernel_nobody_knows",
    ],
)
def test_kernels_of_unknown_kind_go_to_other(bench, tiny_gemms, kernel):
    s = FakeStep()
    graph = s.op("## Call CompiledFxGraph fx ##", s.op("CompiledFunction", s.op("compiled layer: swa")))
    s.op("aten::copy_", graph, us=3.0, kernel=kernel)  # in a compiled layer
    s.op("compiled layer: dense", kernels=[(kernel, 5.0)])  # launched by the range itself (no op)
    s.op("aten::fill_", us=7.0, kernel=kernel)  # outside the layers
    s.op("aten::mm", graph, us=11.0, kernel=NVJET)  # a layer's GEMM whose shapes were not recorded
    got = bench.attribute(s.events, on_cuda=True, gemms=tiny_gemms)
    assert got == pytest.approx({"other": 15e-3, "other: gemm": 11e-3})
    assert sum(got.values()) == pytest.approx(s.kernel_us() / 1e3)  # nothing dropped


def test_flashmoba_kernel_names_are_the_sources(bench):
    """Every Triton kernel the training step can launch (``*_kernel`` under ``@triton.jit``) is known by name."""
    root = SCRIPT.parents[1] / "flashmoba"
    files = [root / "attention" / "forward.py", root / "attention" / "backward.py"]
    files += sorted((root / "routing").glob("*.py")) + sorted((root / "nn" / "keyconv").glob("*.py"))
    names = {n for f in files for n in re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", f.read_text())}
    assert len(names) >= 10 and names == set(bench._FLASHMOBA_KERNELS)


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on the CPU needs a C++ compiler"
)
def test_compiled_layer_on_the_cpu_through_the_profiler(bench, monkeypatch):
    """The real path: a tiny hybrid whose dense layer is compiled by inductor (its CPU kernels recorded by
    the profiler) and whose sliding-window layer stays eager, profiled by ``profile_step``."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    config = MoBAHybridConfig.from_preset(
        "tiny", num_layers=2, global_attn="dense", attn_backend="reference", max_position_embeddings=128
    )
    model = MoBAHybridForCausalLM(config).train()
    assert config.layer_attn_types == ["swa", "dense"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    batch = bench.make_batch("dense", config.vocab_size, 128, 256, device)
    captured = {}
    attribute = bench.attribute

    def capture(events, on_cuda, gemms):
        captured.update(events=events, gemms=gemms)
        return attribute(events, on_cuda, gemms)

    monkeypatch.setattr(bench, "attribute", capture)
    try:
        # cpp_fused_* kernels show as profiler events only with enable_kernel_profile; scalar code compiles faster
        with inductor_config.patch({"cpp.enable_kernel_profile": True, "cpp.vec_isa_ok": False}):
            model.model.layers[1].compile()
            compiled = model.model.layers[1]._compiled_call_impl
            bench.train_step(model, optimizer, batch, autocast)  # compiles forward and backward
        graphs = counters["stats"]["unique_graphs"]
        breakdown = bench.profile_step(model, optimizer, batch, autocast, device)
        assert counters["stats"]["unique_graphs"] == graphs  # the ranges recompiled nothing
        assert model.model.layers[1]._compiled_call_impl is compiled  # and are gone
    finally:
        torch._dynamo.reset()

    rows = list(bench.kernel_categories(captured["events"], False, captured["gemms"]))

    def layer_of(evt):
        while evt is not None and not bench._is_label(evt.name):
            evt = evt.cpu_parent
        return evt.name if evt is not None else None

    compiled_rows = [(c, k, bench._gemm_dims(e)) for c, k, e, _ in rows if layer_of(e) == "compiled layer: dense"]
    fused = {k: c for c, k, _ in compiled_rows if "cpp_fused" in k}
    assert fused, "no inductor kernel recorded"
    for kernel, category in fused.items():
        if "scaled_dot_product" in kernel:
            assert category == "attn core: dense", kernel
        elif "rsqrt" in kernel or ("pow" in kernel and "sum" in kernel):
            assert category == "norm", kernel
        elif "silu" in kernel:
            assert category == "mlp", kernel
        else:
            assert category == "other: fused elementwise", kernel
    assert {"norm", "mlp", "attn core: dense"} <= set(fused.values())
    # every GEMM of the compiled layer, forward and backward, is a projection or the MLP by its shapes
    gemms = [(c, dims) for c, k, dims in compiled_rows if k in ("aten::mm", "aten::addmm")]
    assert len(gemms) >= 3 * 7  # 7 linear maps: forward, input and weight gradients
    assert all(c == ("mlp" if 352 in dims else "attn proj") for c, dims in gemms), gemms
    assert any(c == "attn core: dense" and "scaled_dot_product" in k for c, k, _ in compiled_rows)
    # the eager layer keeps its module ranges; the LM head is outside the layers
    assert any(c == "attn core: swa" for c, *_ in rows) and ("other: gemm", "aten::mm") in {(c, k) for c, k, *_ in rows}
    assert sum(us for *_, us in rows) == pytest.approx(sum(e.self_cpu_time_total for e in captured["events"]))
    assert set(breakdown) >= {"attn core: swa", "attn core: dense", "attn proj", "mlp", "norm", "optimizer"}
