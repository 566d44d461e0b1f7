"""Tokenizers trained locally with the ``tokenizers`` library, saved with the run.

Two kinds, one code path (a byte-level BPE model):

* ``"bpe"``: byte-level BPE trained on the training split; digits are split into single tokens (as in
  Llama's tokenizer), so every number is spelled digit by digit, which keeps needle values learnable;
* ``"bytes"``: the same model with no merges: one token per UTF-8 byte.

The tokenizer is saved as a ``transformers`` fast tokenizer next to the model, so
``PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")`` loads it for ``generate()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flashmoba._checks import check_int
from flashmoba.train.data import TokenizedCorpus

__all__ = ["END_OF_TEXT", "MIN_VOCAB_SIZE", "build_tokenizer", "save_tokenizer", "load_tokenizer", "encode_corpus"]

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "bytes")
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
MIN_VOCAB_SIZE = len(_BYTE_ALPHABET) + 1  # the bytes and END_OF_TEXT
# Training a BPE on more text than this changes its merges little and only costs time.
_MAX_BPE_TRAINING_CHARS = 24_000_000


def _byte_level_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _training_sample(texts: list[str], max_chars: int) -> Iterable[str]:
    """The first ``max_chars`` characters of the documents, in order (deterministic)."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def build_tokenizer(kind: str, texts: list[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a tokenizer on ``texts``.

    Args:
        kind: ``"bpe"`` or ``"bytes"``.
        texts: training documents (``"bytes"`` ignores them).
        vocab_size: BPE vocabulary size including the 256 bytes and the special token.

    Returns:
        A ``tokenizers.Tokenizer``; the same texts give the same tokenizer.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if kind == "bytes":
        vocab_size = MIN_VOCAB_SIZE
    else:
        try:
            vocab_size = check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
        except ValueError as e:
            raise ValueError(f"{e} (the 256 bytes and {END_OF_TEXT})") from None
    tokenizer = _byte_level_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    sample = [] if kind == "bytes" else _training_sample(texts, _MAX_BPE_TRAINING_CHARS)
    tokenizer.train_from_iterator(sample, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Save as a ``transformers`` fast tokenizer (``tokenizer.json`` + config) in ``directory``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT)
    fast.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` saved by ``save_tokenizer``."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"no tokenizer.json in {directory}: was the run trained with this version?")
    return Tokenizer.from_file(str(path))


def encode_corpus(tokenizer: Tokenizer, texts: list[str]) -> TokenizedCorpus:
    """Token ids of every document, back to back (uint16 if the vocabulary fits, else int32)."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=dtype)
    for encoding, start, end in zip(encodings, offsets[:-1], offsets[1:]):
        tokens[start:end] = encoding.ids
    return TokenizedCorpus(tokens=tokens, offsets=offsets)
