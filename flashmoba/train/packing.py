"""Sequence packing: many sequences in one ``[1, N]`` row, separated by ``cu_seqlens``.

Documents are cut into sequences of at most ``max_seqlen`` tokens and never share a sequence, so
attention (which the model restricts to each ``cu_seqlens`` segment) never crosses a document boundary.

``PackedStream`` is the training stream: every epoch visits all sequences of the corpus once in a
seeded random order and fills micro-batches of exactly ``batch_tokens`` tokens. A sequence that does not
fit the rest of a micro-batch is cut and continues at the start of the next one. Its whole state is three
integers (``PackedStream.state_dict``), which makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flashmoba.train.data import TokenizedCorpus

__all__ = ["PackedBatch", "PackedStream", "sequence_chunks", "pack_sequences"]


@dataclass
class PackedBatch:
    """One packed row.

    Attributes:
        input_ids: int64 ``[1, N]``.
        cu_seqlens: int32 ``[S + 1]``, ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = N``.
        max_seqlen: the longest sequence, known on the host (the model's ``max_seqlen``: no device read).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.cu_seqlens.to(device), self.max_seqlen)


def _batch(sequences: list[np.ndarray]) -> PackedBatch:
    lengths = [len(s) for s in sequences]
    cu = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.concatenate(sequences).astype(np.int64)
    return PackedBatch(torch.from_numpy(ids)[None, :], torch.from_numpy(cu), max(lengths, default=0))


def sequence_chunks(corpus: TokenizedCorpus, max_seqlen: int, min_seqlen: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Cut every document into consecutive pieces of at most ``max_seqlen`` tokens.

    Pieces shorter than ``min_seqlen`` (a lone token predicts nothing) are dropped.

    Returns:
        ``(starts int64 [C], lengths int64 [C])``: piece ``c`` is ``corpus.tokens[starts[c]:starts[c] + lengths[c]]``,
        in document order.
    """
    doc_starts = corpus.offsets[:-1]
    doc_lengths = np.diff(corpus.offsets)
    pieces = -(-doc_lengths // max_seqlen)
    starts = np.repeat(doc_starts, pieces) + max_seqlen * (
        np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    )
    ends = np.minimum(starts + max_seqlen, np.repeat(doc_starts + doc_lengths, pieces))
    lengths = ends - starts
    keep = lengths >= min_seqlen
    return starts[keep], lengths[keep]


def pack_sequences(sequences: list[np.ndarray], max_tokens: int) -> list[PackedBatch]:
    """Greedily pack whole sequences, in order, into rows of at most ``max_tokens`` tokens (for evaluation).

    A sequence longer than ``max_tokens`` gets a row of its own.
    """
    rows, current, size = [], [], 0
    for seq in sequences:
        if current and size + len(seq) > max_tokens:
            rows.append(_batch(current))
            current, size = [], 0
        current.append(np.asarray(seq))
        size += len(seq)
    if current:
        rows.append(_batch(current))
    return rows


class PackedStream:
    """Deterministic stream of packed training micro-batches.

    Args:
        corpus: the tokenized training documents.
        batch_tokens: tokens per micro-batch (N of the ``[1, N]`` row).
        max_seqlen: the training context; no sequence is longer.
        seed: the order of the sequences in epoch ``e`` is ``default_rng([seed, e]).permutation``.
        extra_sequences: optional ``f(micro_batch_index) -> list of token arrays`` (e.g. needle sequences),
            placed first in that micro-batch; it must be a pure function of its argument for exact resume.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        batch_tokens: int,
        max_seqlen: int,
        seed: int,
        extra_sequences: Callable[[int], list[np.ndarray]] | None = None,
    ):
        if not 2 <= max_seqlen <= batch_tokens:
            raise ValueError(
                f"need 2 <= max_seqlen <= batch_tokens, got max_seqlen={max_seqlen}, batch_tokens={batch_tokens}"
            )
        self.corpus = corpus
        self.batch_tokens = batch_tokens
        self.max_seqlen = max_seqlen
        self.seed = seed
        self.extra_sequences = extra_sequences
        self.starts, self.lengths = sequence_chunks(corpus, max_seqlen)
        if len(self.starts) == 0:
            raise ValueError("the training corpus has no sequence of at least 2 tokens")
        self.epoch, self.cursor, self.offset, self.micro_batch = 0, 0, 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.starts))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset, "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]
        self.micro_batch = state["micro_batch"]
        self._order = self._epoch_order()

    def _next_piece(self, room: int) -> np.ndarray:
        """Up to ``room`` tokens of the current sequence; advances the cursor (and the epoch)."""
        chunk = self._order[self.cursor]
        start = self.starts[chunk] + self.offset
        take = min(room, self.lengths[chunk] - self.offset)
        self.offset += take
        if self.offset == self.lengths[chunk]:
            self.cursor, self.offset = self.cursor + 1, 0
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
        return self.corpus.tokens[start : start + take]

    def next_batch(self) -> PackedBatch:
        """The next micro-batch: ``[1, batch_tokens]`` ids and its ``cu_seqlens``."""
        sequences = list(self.extra_sequences(self.micro_batch)) if self.extra_sequences else []
        used = sum(len(s) for s in sequences)
        if used > self.batch_tokens or any(len(s) > self.max_seqlen for s in sequences):
            raise ValueError("extra_sequences returned more than batch_tokens tokens or a sequence over max_seqlen")
        while used < self.batch_tokens:
            sequences.append(self._next_piece(self.batch_tokens - used))
            used += len(sequences[-1])
        self.micro_batch += 1
        return _batch(sequences)
