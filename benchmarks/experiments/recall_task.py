"""Multi-query associative recall (MQAR) over natural-text filler: the data of ``recall.py``.

A sequence of ``seq_len`` tokens is a *context* followed by a *query region*:

* context: filler text (bytes of Python source, token ids 0-255) with ``num_pairs`` key-value pairs
  inserted at uniformly random, non-overlapping depths. A pair is ``L`` key tokens and one value token.
* query region: every key of the context once, in a random order, each followed by its value (the
  answer). The model is scored on predicting each answer from the tokens before it, so the answer
  depends on finding the one pair, possibly thousands of tokens back.

Keys come in two kinds, drawn per pair (``key_lengths``, uniformly):

* single-token keys (L = 1), distinct ids from a large alphabet: the classic MQAR key;
* multi-token keys (L = 2, 3, 4): slot ``j`` of a length-``L`` key comes from its own small alphabet of
  ``multi_alphabet`` tokens, so one key token occurs in several pairs of a sequence and only the whole
  tuple identifies the pair (the case the paper's key convolution is argued for: it mixes neighbouring
  keys into each key). Keys of one length are distinct within a sequence; keys of different lengths share
  no token, so no key is a prefix of another.

Vocabulary layout (ids): ``[0, 256)`` filler bytes, then ``num_values`` values, then the single-token key
alphabet, then the multi-token alphabets (``(L, j)`` in order); ``vocab_size`` is their total.

Everything is built with torch on the CPU from a seeded ``torch.Generator``, so a (seed, step) pair gives
the same batch on every machine with the same torch and corpus, whatever the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["TaskSpec", "RecallBatch", "text_bytes", "make_batch"]

FILLER_TOKENS = 256  # byte values
MAX_SLOTS = 5  # the widest pair: 4 key tokens and the value


@dataclass(frozen=True)
class TaskSpec:
    """The MQAR task's shape (see the module docstring)."""

    seq_len: int = 4096
    num_pairs: int = 128
    num_values: int = 2048
    single_alphabet: int = 5744
    multi_alphabet: int = 16
    key_lengths: tuple[int, ...] = (1, 2, 3, 4)

    def __post_init__(self):
        if not self.key_lengths or any(n not in (1, 2, 3, 4) for n in self.key_lengths):
            raise ValueError(f"key_lengths must be a non-empty subset of 1, 2, 3, 4, got {self.key_lengths}")
        if 2 * self.num_pairs * MAX_SLOTS > self.seq_len:
            raise ValueError(f"num_pairs {self.num_pairs} does not fit in seq_len {self.seq_len}")
        for length in self.key_lengths:
            if self.key_space(length) < self.num_pairs:
                raise ValueError(f"{self.key_space(length)} distinct keys of length {length} < num_pairs")

    @property
    def value_base(self) -> int:
        return FILLER_TOKENS

    @property
    def single_base(self) -> int:
        return self.value_base + self.num_values

    def multi_base(self, length: int, slot: int) -> int:
        """First id of the alphabet of slot ``slot`` of keys of ``length`` tokens (length >= 2)."""
        index = sum(range(2, length)) + slot  # (2, 0), (2, 1), (3, 0), ... in order
        return self.single_base + self.single_alphabet + index * self.multi_alphabet

    @property
    def vocab_size(self) -> int:
        return self.multi_base(5, 0)

    def key_space(self, length: int) -> int:
        return self.single_alphabet if length == 1 else self.multi_alphabet**length

    def as_dict(self) -> dict:
        return {**asdict(self), "key_lengths": list(self.key_lengths), "vocab_size": self.vocab_size}


@dataclass
class RecallBatch:
    """One batch of ``S`` sequences with ``P`` queries each.

    Attributes:
        tokens: int64 ``[S, T]``.
        answer_pos: int64 ``[S, P]`` position of every query's answer (its value token) in the query region;
            the logits at ``answer_pos - 1`` predict it.
        value_pos: int64 ``[S, P]`` position of the same pair's value token in the context.
        values: int64 ``[S, P]`` the answers.
        key_len: int64 ``[S, P]`` key tokens of each query.
        text_mask: bool ``[S, T]`` filler positions whose next token is filler too (language-model targets).
    """

    tokens: torch.Tensor
    answer_pos: torch.Tensor
    value_pos: torch.Tensor
    values: torch.Tensor
    key_len: torch.Tensor
    text_mask: torch.Tensor

    def to(self, device) -> RecallBatch:
        return RecallBatch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})

    def pin(self) -> RecallBatch:
        """In page-locked memory, so that ``to(cuda)`` copies without stopping the host."""
        return RecallBatch(**{k: v.pin_memory() for k, v in vars(self).items()})

    @property
    def distance(self) -> torch.Tensor:
        """``[S, P]`` tokens from the pair's value in the context to the query's answer."""
        return self.answer_pos - self.value_pos


def text_bytes(documents: list[str]) -> torch.Tensor:
    """uint8 ``[N]``: the documents' UTF-8 bytes back to back (the filler stream)."""
    return torch.frombuffer(bytearray("".join(documents).encode("utf-8", "replace")), dtype=torch.uint8)


def _distinct(num_seqs: int, count: int, space: int, g: torch.Generator) -> torch.Tensor:
    """``[S, count]`` distinct integers of ``[0, space)`` per row, in random order."""
    if space <= 4 * count:  # small space: a random permutation's prefix
        return torch.rand(num_seqs, space, generator=g).argsort(1)[:, :count]
    # large space: sorted draws from [0, space - count] shifted by their rank are distinct; then shuffled
    draws = torch.randint(0, space - count + 1, (num_seqs, count), generator=g).sort(1).values
    distinct = draws + torch.arange(count)
    return distinct.gather(1, torch.rand(num_seqs, count, generator=g).argsort(1))


def _key_tokens(spec: TaskSpec, key_len: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """int64 ``[S, P, 4]`` key tokens of every pair (slots past its length unused)."""
    num_seqs, num_pairs = key_len.shape
    keys = torch.zeros(num_seqs, num_pairs, 4, dtype=torch.long)
    for length in spec.key_lengths:
        index = _distinct(num_seqs, num_pairs, spec.key_space(length), g)
        chosen = (key_len == length)[..., None]
        if length == 1:
            slots = (spec.single_base + index)[..., None].expand(-1, -1, 4)
        else:
            digits = [(index // spec.multi_alphabet**j) % spec.multi_alphabet for j in range(4)]
            slots = torch.stack(
                [spec.multi_base(length, j) + digits[j] if j < length else digits[j] for j in range(4)], -1
            )
        keys = torch.where(chosen, slots, keys)
    return keys


def _write_pairs(tokens, start, keys, key_len, values):
    """Write every pair (key tokens then value) at ``start [S, P]``; returns the value positions."""
    rows = torch.arange(tokens.shape[0])[:, None].expand_as(start)
    for slot in range(MAX_SLOTS):
        valid = slot <= key_len
        if slot < 4:
            content = torch.where(slot < key_len, keys[..., slot], values)
        else:
            content = values
        pos = start + slot
        tokens[rows[valid], pos[valid]] = content[valid]
    return start + key_len


def make_batch(spec: TaskSpec, num_seqs: int, text: torch.Tensor, g: torch.Generator) -> RecallBatch:
    """``num_seqs`` fresh MQAR sequences with filler from ``text`` (uint8 bytes, see :func:`text_bytes`).

    Args:
        spec: the task.
        num_seqs: S.
        text: the filler byte stream, at least ``seq_len`` bytes.
        g: the CPU generator every random choice is drawn from.
    """
    seq_len, num_pairs = spec.seq_len, spec.num_pairs
    if text.numel() < seq_len:
        raise ValueError(f"the filler text has {text.numel()} bytes, fewer than seq_len {seq_len}")
    lengths = torch.tensor(spec.key_lengths)
    key_len = lengths[torch.randint(0, len(lengths), (num_seqs, num_pairs), generator=g)]
    width = key_len + 1
    pair_tokens = width.sum(1)  # [S]: tokens of all pairs, also the length of the query region
    context = seq_len - pair_tokens
    free = context - pair_tokens  # filler tokens of the context
    # Stars and bars: sorted gaps in [0, free] plus the widths of the pairs before give non-overlapping starts.
    gaps = (torch.rand(num_seqs, num_pairs, generator=g) * (free[:, None] + 1).double()).floor().long()
    gaps = gaps.clamp(max=free[:, None]).sort(1).values
    start = gaps + width.cumsum(1) - width
    keys = _key_tokens(spec, key_len, g)
    values = spec.value_base + torch.randint(0, spec.num_values, (num_seqs, num_pairs), generator=g)

    tokens = torch.full((num_seqs, seq_len), -1, dtype=torch.long)
    value_pos = _write_pairs(tokens, start, keys, key_len, values)
    order = torch.rand(num_seqs, num_pairs, generator=g).argsort(1)  # the query order
    q_width = width.gather(1, order)
    q_start = context[:, None] + q_width.cumsum(1) - q_width
    q_keys = keys.gather(1, order[..., None].expand(-1, -1, 4))
    q_len, q_values = key_len.gather(1, order), values.gather(1, order)
    answer_pos = _write_pairs(tokens, q_start, q_keys, q_len, q_values)

    is_text = tokens < 0
    offsets = torch.randint(0, text.numel() - seq_len + 1, (num_seqs, 1), generator=g)
    filler = text.long()[(offsets + is_text.long().cumsum(1) - 1).clamp(min=0)]
    tokens = torch.where(is_text, filler, tokens)
    text_mask = torch.zeros_like(is_text)
    text_mask[:, :-1] = is_text[:, :-1] & is_text[:, 1:]
    return RecallBatch(
        tokens=tokens,
        answer_pos=answer_pos,
        value_pos=value_pos.gather(1, order),
        values=q_values,
        key_len=q_len,
        text_mask=text_mask,
    )
