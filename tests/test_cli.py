"""The ``flashmoba`` command's failures: one line naming the option, exit code 2, no traceback, and
nothing built or written before the refusal. Also what a base install (no optional extras) can run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flashmoba.cli import main
from flashmoba.models import MoBAHybridConfig

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
# A sweep of six configurations with few trials: seconds on a CPU.
SMALL_SNR = [
    "snr",
    "--head-dims",
    "16",
    "--block-sizes",
    "16",
    "--breakdown-head-dim",
    "16",
    "--trials",
    "16",
    "--device",
    "cpu",
]
EXTRAS = ("matplotlib", "transformers", "tokenizers", "datasets", "safetensors")


def usage_error(capsys, argv: list[str]) -> str:
    """Run ``flashmoba argv``, check that it failed as a usage error and return the message line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"flashmoba {argv[0]}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


@pytest.mark.parametrize(
    "argv, option",
    [
        (["nonsense"], "COMMAND"),
        (["train"], "--out"),
        (["snr", "--trials", "x"], "--trials"),
        (["train", "--out", "run", "--backend", "bogus"], "--backend"),
    ],
)
def test_argparse_errors_are_one_line_too(capsys, argv, option):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and option in lines[0], lines


@pytest.fixture
def fake_run(tmp_path):
    """A run folder as ``flashmoba train`` leaves it, with the tiny preset's config and no data or weights:
    enough for every check ``flashmoba eval`` makes before it loads anything."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"context": 256, "batch_tokens": 512, "data_dir": None}))
    MoBAHybridConfig.from_preset("tiny").to_json_file(str(run / "model" / "config.json"))
    return run


# ----------------------------------------------------------------------------------------------------
# train


def test_train_refuses_an_existing_file_as_out(capsys, tmp_path):
    out = tmp_path / "file"
    out.write_text("not a run")
    assert "--out" in usage_error(capsys, ["train", "--out", str(out)])
    assert out.read_text() == "not a run"


def test_module_entry_point_reports_usage_errors_too(tmp_path):
    # `python -m flashmoba.cli` (torchrun's way) runs the file as __main__.
    out = tmp_path / "file"
    out.write_text("not a run")
    done = subprocess.run(
        [sys.executable, "-m", "flashmoba.cli", "train", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"flashmoba train: error: --out {out} is a file, not a run folder"]


def test_train_refuses_an_unknown_preset_before_reading_data(capsys, tmp_path):
    out = tmp_path / "run"
    message = usage_error(capsys, ["train", "--out", str(out), "--preset", "nonsense"])
    assert "--preset" in message and "'tiny'" in message
    assert not out.exists()  # no corpus read, no tokenizer trained


def test_train_names_an_unknown_set_key_and_lists_the_valid_ones(capsys, tmp_path):
    out = tmp_path / "run"
    message = usage_error(capsys, ["train", "--out", str(out), "--set", "hidden_size=32", "nonsense_key=3"])
    assert "--set" in message and "nonsense_key" in message
    assert "num_layers" in message and "moba_block_size" in message
    assert "--set hidden_size" not in message  # only the bad key is blamed
    assert not out.exists()


@pytest.mark.parametrize(
    "item, owner", [("vocab_size=512", "--vocab-size"), ("max_position_embeddings=99", "--context")]
)
def test_train_refuses_a_set_key_that_another_option_owns(capsys, tmp_path, item, owner):
    out = tmp_path / "run"
    message = usage_error(capsys, ["train", "--out", str(out), "--set", item])
    assert message.startswith(f"--set {item}:") and owner in message
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--set", "num_layers"], "--set"),  # no '='
        (["--set", "num_layers=two"], "--set num_layers"),
        (["--topk", "0"], "--topk"),
        (["--steps", "0"], "--steps"),
        (["--context", "1024", "--batch-tokens", "512"], "--context"),
        (["--needle-fraction", "1"], "--needle-fraction"),
        (["--lr", "0"], "--lr"),
        (["--vocab-size", "100"], "--vocab-size"),
        (["--resume"], "--resume"),  # nothing to resume
    ],
)
def test_train_names_the_bad_option(capsys, tmp_path, argv, option):
    out = tmp_path / "run"
    assert option in usage_error(capsys, ["train", "--out", str(out), *argv])
    assert not out.exists()


@NO_CUDA
def test_train_refuses_cuda_without_cuda(capsys, tmp_path):
    message = usage_error(capsys, ["train", "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert "--device" in message and "CUDA" in message


# ----------------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("option", ["--samples", "--context", "--ppl-tokens", "--batch-tokens", "--lengths"])
def test_eval_refuses_zero_instead_of_reading_it_as_the_default(capsys, fake_run, option):
    message = usage_error(capsys, ["eval", "--run", str(fake_run), option, "0"])
    assert message.startswith(option) and "must be >= 1" in message


def test_eval_names_a_folder_that_is_no_run(capsys, tmp_path):
    assert "--run" in usage_error(capsys, ["eval", "--run", str(tmp_path / "missing")])
    assert "--run" in usage_error(capsys, ["eval", "--run", str(tmp_path)])


def test_eval_refuses_lengths_that_cannot_fit_in_memory(capsys, fake_run):
    # The reference attention of the tiny model (4 heads) at 1M tokens: 4e12 scores, more than any host has.
    message = usage_error(capsys, ["eval", "--run", str(fake_run), "--lengths", "1000", "1000000", "--device", "cpu"])
    assert message.startswith("--lengths 1000000")
    assert "GB" in message and "GPU" in message and "Triton" in message and "smaller --lengths" in message
    assert not (fake_run / "eval.json").exists()


@NO_CUDA
def test_eval_refuses_cuda_without_cuda(capsys, fake_run):
    assert "--device" in usage_error(capsys, ["eval", "--run", str(fake_run), "--device", "cuda"])


# ----------------------------------------------------------------------------------------------------
# snr


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--trials", "0"], "--trials"),
        (["--block-sizes", "0"], "--block-sizes"),
        (["--cluster-size", "32"], "--cluster-size"),
        (["--tail-dof", "2"], "--tail-dof"),
        (["--block-correlation", "1"], "--block-correlation"),
        (["--mu-signal", "nan"], "--mu-signal"),
    ],
)
def test_snr_names_the_bad_option(capsys, argv, option):
    assert option in usage_error(capsys, [*SMALL_SNR, *argv])


@NO_CUDA
def test_snr_refuses_cuda_without_cuda(capsys):
    assert "--device" in usage_error(capsys, ["snr", "--device", "cuda"])


def test_snr_writes_no_file_without_plot(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(SMALL_SNR) == 0
    assert "| m=4 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_snr_plot_without_matplotlib_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    plot = tmp_path / "snr.png"
    message = usage_error(capsys, [*SMALL_SNR, "--plot", str(plot)])
    assert message == "--plot: plotting needs matplotlib: pip install 'flashmoba[plot]'"
    assert not plot.exists()


# ----------------------------------------------------------------------------------------------------
# missing extras, the Python API


@pytest.mark.parametrize(
    "command, module",
    [("train", "transformers"), ("train", "tokenizers"), ("eval", "transformers"), ("eval", "matplotlib")],
)
def test_train_and_eval_name_the_missing_extra(capsys, tmp_path, monkeypatch, command, module):
    monkeypatch.setitem(sys.modules, module, None)
    option = "--out" if command == "train" else "--run"
    message = usage_error(capsys, [command, option, str(tmp_path / "run")])
    assert module in message and "pip install 'flashmoba[train]'" in message


def test_train_names_the_missing_datasets_package_for_a_dataset_source(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    message = usage_error(capsys, ["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "docs.jsonl")])
    assert message.startswith("--data") and "pip install 'flashmoba[train]'" in message
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_data_dir_made_from_other_arguments(capsys, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "data.json").write_text(json.dumps({"source": "elsewhere"}))
    message = usage_error(capsys, ["train", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir)])
    assert message.startswith("--data-dir") and "elsewhere" in message
    assert not (tmp_path / "run").exists()


def run_without_extras(code: str, cwd) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where every optional extra is blocked, as on a base install."""
    block = f"import sys\nfor name in {EXTRAS!r}:\n    sys.modules[name] = None\n"
    # The environment is inherited: conftest sets TRITON_INTERPRET=1 on machines without CUDA.
    done = subprocess.run(
        [sys.executable, "-c", block + code], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def test_base_install_runs_theory_and_snr(tmp_path):
    code = (
        "import flashmoba.theory\n"
        "from flashmoba.cli import main\n"
        f"assert main({SMALL_SNR!r}) == 0\n"
        f"assert main({[*SMALL_SNR, '--plot', str(tmp_path / 'snr.png')]!r}) == 2\n"
        f"assert main(['train', '--out', {str(tmp_path / 'run')!r}]) == 2\n"
    )
    done = run_without_extras(code, tmp_path)
    assert "| m=4 |" in done.stdout
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert errors == [
        "flashmoba snr: error: --plot: plotting needs matplotlib: pip install 'flashmoba[plot]'",
        "flashmoba train: error: needs transformers, tokenizers (not installed): pip install 'flashmoba[train]'",
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_base_install_runs_the_demo(tmp_path):
    done = run_without_extras("from flashmoba.cli import main\nassert main(['demo']) == 0\n", tmp_path)
    assert done.stdout.rstrip().endswith("demo OK")


def test_from_preset_refuses_unknown_names_and_fields():
    with pytest.raises(TypeError, match="'nonsense'.*num_layers"):
        MoBAHybridConfig.from_preset("tiny", nonsense=1)
    with pytest.raises(ValueError, match="unknown preset 'nonsense'"):
        MoBAHybridConfig.from_preset("nonsense")
    with pytest.raises(TypeError, match="preset name"):
        MoBAHybridConfig.from_preset(1)
    # aliases and the generic PretrainedConfig fields stay accepted
    config = MoBAHybridConfig.from_preset("tiny", num_hidden_layers=2, dtype="float32")
    assert config.num_layers == 2
