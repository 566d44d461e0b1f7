"""benchmarks/bench_train.py: the FLOP accounting and the whole script on the CPU (--cpu-smoke)."""

import importlib.util
import json
from pathlib import Path

import pytest

from flashmoba.models import MoBAHybridConfig

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
