"""The run folder: where a run keeps its data, tokenizer, configs, log, checkpoint and model.

::

    RUN/
      run.json            the command-line arguments of the run (resume reuses them)
      model_config.json   the model configuration
      train_config.json   the TrainConfig
      log.jsonl           one record per logged step
      checkpoint.pt       the latest checkpoint (exact resume)
      model/              the final model (save_pretrained) with its tokenizer
      eval.json, *.png    written by ``flashmoba eval``
    DATA/ (RUN/data unless --data-dir names a folder shared by several runs)
      data.json           what the data was made from (source, tokenizer kind, vocabulary, budget)
      tokenizer/          the tokenizer (transformers fast-tokenizer format)
      train.npz, val.npz  the tokenized splits
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from flashmoba.train.data import TokenizedCorpus, load_corpus
from flashmoba.train.tokenizer import build_tokenizer, encode_corpus, load_tokenizer, save_tokenizer

__all__ = ["RunData", "check_prepared_data", "prepare_data", "load_data", "model_classes"]


@dataclass
class RunData:
    """A run's tokenizer and tokenized splits, and the folder they live in."""

    tokenizer: Tokenizer
    train: TokenizedCorpus
    val: TokenizedCorpus
    directory: Path


def load_data(directory: Path) -> RunData:
    """The data prepared by ``prepare_data`` in ``directory``."""
    directory = Path(directory)
    if not (directory / "data.json").exists():
        raise ValueError(f"{directory} holds no prepared data (no data.json)")
    return RunData(
        load_tokenizer(directory / "tokenizer"),
        TokenizedCorpus.load(directory / "train.npz"),
        TokenizedCorpus.load(directory / "val.npz"),
        directory,
    )


def check_prepared_data(
    directory: Path,
    *,
    source: str,
    tokenizer: str,
    vocab_size: int,
    max_chars: int,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> bool:
    """Whether ``directory`` holds data made by ``prepare_data`` with these arguments (False: none yet).

    Raises:
        ValueError: ``directory`` holds data made with other arguments.
    """
    directory = Path(directory)
    recipe = {
        "source": source,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "max_chars": max_chars,
        "val_fraction": val_fraction,
        "text_field": text_field,
    }
    marker = directory / "data.json"
    if not marker.exists():
        return False
    stored = json.loads(marker.read_text())
    if stored != recipe:
        raise ValueError(f"{directory} holds data made from {stored}, not {recipe}: use another --data-dir")
    return True


def prepare_data(
    directory: Path,
    *,
    source: str,
    tokenizer: str,
    vocab_size: int,
    max_chars: int,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> RunData:
    """Load the corpus, train the tokenizer and tokenize both splits into ``directory``; reuse them if present.

    Raises:
        ValueError: ``directory`` holds data made with other arguments.
    """
    directory = Path(directory)
    recipe = {
        "source": source,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "max_chars": max_chars,
        "val_fraction": val_fraction,
        "text_field": text_field,
    }
    if check_prepared_data(directory, **recipe):
        return load_data(directory)
    marker = directory / "data.json"
    corpus = load_corpus(source, max_chars=max_chars, val_fraction=val_fraction, text_field=text_field)
    trained = build_tokenizer(tokenizer, corpus.train, vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    save_tokenizer(trained, directory / "tokenizer")
    train, val = encode_corpus(trained, corpus.train), encode_corpus(trained, corpus.val)
    train.save(directory / "train.npz")
    val.save(directory / "val.npz")
    marker.write_text(json.dumps(recipe, indent=2))  # last: its presence means the data is complete
    return RunData(trained, train, val, directory)


def model_classes():
    """``(MoBAHybridConfig, MoBAHybridForCausalLM)`` from ``flashmoba.models``."""
    try:
        from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM
    except ImportError as e:
        raise ImportError(f"flashmoba.models (the hybrid MoBA model) is needed to train or evaluate: {e}") from e
    return MoBAHybridConfig, MoBAHybridForCausalLM
