"""``flashmoba train`` / ``flashmoba eval`` end to end on a CPU: train, interrupt, resume, evaluate."""

import json

import pytest

from flashmoba.cli import main

MICRO = [
    "--preset",
    "tiny",
    "--set",
    "hidden_size=32",
    "num_layers=2",
    "num_heads=2",
    "num_kv_heads=1",
    "head_dim=16",
    "intermediate_size=64",
    "swa_window=16",
    "--block-size",
    "16",
    "--topk",
    "2",
    "--kconv",
    "3",
    "--tokenizer",
    "bytes",
    "--max-corpus-mb",
    "0.3",
    "--context",
    "256",
    "--batch-tokens",
    "512",
    "--steps",
    "4",
    "--warmup",
    "1",
    "--log-every",
    "1",
    "--checkpoint-every",
    "2",
    "--needle-fraction",
    "0.5",
]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli") / "data"  # shared by the runs: the corpus is read once


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(run), "--data-dir", str(data_dir), *MICRO]) == 0
    return run


def test_train_writes_a_complete_run(trained):
    for name in (
        "run.json",
        "model_config.json",
        "train_config.json",
        "log.jsonl",
        "checkpoint.pt",
        "model/config.json",
        "model/tokenizer.json",
    ):
        assert (trained / name).exists(), name
    config = json.loads((trained / "model_config.json").read_text())
    assert (config["moba_block_size"], config["moba_topk"], config["kconv_size"]) == (16, 2, 3)
    assert config["vocab_size"] == 320  # 257 byte tokens rounded up to a multiple of 64
    assert len(_losses(trained)) == 4


def test_interrupted_and_resumed_run_matches(trained, data_dir, tmp_path, capsys):
    run = tmp_path / "split"
    assert main(["train", "--out", str(run), "--data-dir", str(data_dir), *MICRO, "--stop-at", "2"]) == 0
    assert not (run / "model").exists()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert _losses(run) == _losses(trained)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--data-dir", str(data_dir), *MICRO]) == 2
    assert "--resume" in capsys.readouterr().err.splitlines()[-1]


def _snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_refuses_an_existing_run_before_touching_it(trained, data_dir, capsys):
    before = _snapshot(trained)
    capsys.readouterr()
    assert "run.json" in {p.name for p in before} and "model_config.json" in {p.name for p in before}
    assert main(["train", "--out", str(trained), "--data-dir", str(data_dir), *MICRO]) == 2
    assert _snapshot(trained) == before
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--out" in err[0] and "--resume" in err[0]


def test_eval_writes_results_and_plots(trained):
    assert (
        main(["eval", "--run", str(trained), "--lengths", "400", "--samples", "2", "--ppl-tokens", "1000", "--no-snr"])
        == 0
    )
    results = json.loads((trained / "eval.json").read_text())
    assert 500 < results["perplexity"]["tokens"] <= 1000
    cells = {(r["task"], r["length"]): r["total"] for r in results["retrieval"]}
    assert cells == {(t, 400): 2 for t in ("niah_single_1", "niah_single_2", "niah_single_3")}
    for png in ("retrieval.png", "perplexity_by_position.png", "loss.png"):
        assert (trained / png).read_bytes()[:4] == b"\x89PNG"


def test_eval_refuses_a_needle_length_it_cannot_build_before_any_work(trained, capsys):
    before = _snapshot(trained)
    capsys.readouterr()
    assert main(["eval", "--run", str(trained), "--lengths", "400", "8", "--samples", "2", "--no-snr"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("flashmoba eval: error: --lengths 8:")
    assert _snapshot(trained) == before
