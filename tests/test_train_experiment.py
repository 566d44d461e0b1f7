"""The experiment driver's bookkeeping: merging split calls, the markdown tables, at most 5 output files."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "experiments" / "moba_variants.py"


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("moba_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(variant, seed, rng, lengths=(1024, 4096)):
    retrieval = [
        {"task": task, "length": n, "correct": int(c), "total": 20, "accuracy": c / 20, "ci_low": 0.0, "ci_high": 1.0}
        for task in ("niah_single_1", "niah_single_2", "niah_single_3")
        for n, c in zip(lengths, rng.integers(0, 21, 2))
    ]
    moba = variant != "dense"
    layer = {"snr": 1.5, "snr_blocks": 0.5, "delta_mu_eff": 2.0, "block_correlation": 0.1, "selected_rate": 0.8}
    return {
        "variant": variant,
        "seed": seed,
        "data": {"tokenizer_crc32": 1},
        "params": 30_000_000,
        "setup": {"context": 4096},
        "environment": {"device": "test"},
        "train_seconds": 60.0,
        "eval_seconds": 20.0,
        "log": [{"step": s, "loss": 5.0 - s / 10, "tokens": s * 100, "tokens_per_s": 1000.0} for s in range(1, 11)],
        "eval": {
            "perplexity": {
                "ppl": 10.0,
                "loss": 2.3,
                "tokens": 100,
                "by_position": [
                    {"start": 0, "end": 2048, "tokens": 50, "loss": 2.5, "ppl": 12.2},
                    {"start": 2048, "end": 4096, "tokens": 50, "loss": 2.1, "ppl": 8.2},
                ],
            },
            "retrieval": retrieval,
            "router_snr": {"layers": {"model.layers.1.self_attn": layer} if moba else None},
        },
    }


def test_merge_orders_runs_and_writes_five_files(driver, tmp_path):
    rng = np.random.default_rng(0)
    first = {"runs": {f"{v}_s0": fake_run(v, 0, rng) for v in ("moba128_k8", "dense")}}
    second = {"runs": {f"{v}_s0": fake_run(v, 0, rng) for v in ("moba512_k2", "moba128_k8_kconv5")}}
    for i, part in enumerate((first, second)):
        (tmp_path / f"{i}.json").write_text(json.dumps(part))
    merged = driver.merge([tmp_path / "0.json", tmp_path / "1.json"])
    assert list(merged["runs"]) == ["dense_s0", "moba512_k2_s0", "moba128_k8_s0", "moba128_k8_kconv5_s0"]
    driver.write_outputs(merged, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(driver.RESULT_FILES)
    table = (tmp_path / "out" / "results.md").read_text()
    # Every run has a summary row, and every retrieval cell shows its counts.
    for key, run in merged["runs"].items():
        assert f"| {key} | 30.0M |" in table
        for cell in run["eval"]["retrieval"]:
            assert f"({cell['correct']}/20)" in table
    dense_row = next(line for line in table.splitlines() if line.startswith("| dense_s0 | 30.0M"))
    assert "| - | - |" in dense_row  # no router SNR for the dense model
    assert f"| {math.exp(2.1):.3f} |" in table  # late-position perplexity: from the loss of the second half
