"""Synthetic key-value retrieval sequences: a training mix and RULER-style single-needle evaluations.

A *needle* is a sentence ``One of the special magic numbers for <key> is: <value>.`` planted in a
haystack of filler; the sequence ends with a *query* for the key followed by the value as the *answer*.
Every piece is tokenized on its own and the token ids are concatenated, so the value's tokens are the same
in the needle and in the answer: retrieval is an exact copy, and a model answers correctly iff its
greedy prediction reproduces every answer token (``answer_correct``, one forward pass, no sampling).

Evaluation tasks (analogues of RULER's S-NIAH, ``TASKS``):

* ``niah_single_1``: a 7-digit number needle in a repeated filler paragraph;
* ``niah_single_2``: a 7-digit number needle in real text (validation corpus);
* ``niah_single_3``: a UUID needle in real text.

Training sequences (``NeedleFactory.training_sample``) plant 1-4 needles with distinct keys in real
(75%) or repeated filler, with number or UUID values, and query all of them at the end, in random order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from flashmoba.train.data import TokenizedCorpus

__all__ = ["TASKS", "NeedleSample", "NeedleFactory", "answer_correct"]

# RULER's noise paragraph (its "essay"-free S-NIAH-1 haystack).
REPEATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_KEY_ADJECTIVES = (
    "amber",
    "brisk",
    "calm",
    "dusty",
    "eager",
    "faint",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "noble",
    "odd",
    "proud",
    "quiet",
    "rapid",
    "silent",
    "tidy",
    "upbeat",
    "vivid",
    "wary",
    "young",
)
_KEY_NOUNS = (
    "anchor",
    "badger",
    "canyon",
    "dolphin",
    "ember",
    "falcon",
    "glacier",
    "harbor",
    "island",
    "jungle",
    "kettle",
    "lantern",
    "meadow",
    "nebula",
    "orchid",
    "pepper",
    "quartz",
    "river",
    "saddle",
    "tunnel",
    "violin",
    "walrus",
    "yarrow",
    "zephyr",
)
# task -> (haystack, value kind)
TASKS = {
    "niah_single_1": ("repeated", "number"),
    "niah_single_2": ("corpus", "number"),
    "niah_single_3": ("corpus", "uuid"),
}
_VALUE_NAMES = {"number": ("number", "numbers"), "uuid": ("uuid", "uuids")}
MAX_TRAINING_NEEDLES = 4


@dataclass
class NeedleSample:
    """One retrieval sequence.

    Attributes:
        tokens: int64 ``[L]`` token ids.
        needle_spans: ``(start, end)`` token span of each planted value inside the haystack.
        answer_spans: ``(start, end)`` token span of each answer at the end (same order as ``needle_spans``).
        depth: relative position of the first needle in the haystack, in [0, 1].
    """

    tokens: np.ndarray
    needle_spans: list[tuple[int, int]]
    answer_spans: list[tuple[int, int]]
    depth: float


def answer_correct(predicted_next: np.ndarray, sample: NeedleSample, answer: int = 0) -> bool:
    """Whether greedy decoding reproduces the answer: ``predicted_next[t]`` is the model's argmax for token ``t + 1``.

    Args:
        predicted_next: ``[L]`` argmax token ids at every position of ``sample.tokens``.
        answer: which answer span to score.
    """
    start, end = sample.answer_spans[answer]
    return bool(np.array_equal(predicted_next[start - 1 : end - 1], sample.tokens[start:end]))


class NeedleFactory:
    """Builds needle sequences at token level from a tokenizer and a corpus of haystack text.

    Args:
        tokenizer: the run's ``tokenizers.Tokenizer``.
        haystack: tokenized documents for the "corpus" haystack (training split for the training mix,
            validation split for evaluation).
    """

    def __init__(self, tokenizer: Tokenizer, haystack: TokenizedCorpus):
        if len(haystack.tokens) == 0:
            raise ValueError("haystack corpus is empty")
        self.tokenizer = tokenizer
        self.haystack = haystack
        self._filler = self._encode(REPEATED_FILLER)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def _value(self, kind: str, rng: np.random.Generator) -> str:
        if kind == "number":
            return str(int(rng.integers(1_000_000, 10_000_000)))
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    def _keys(self, count: int, rng: np.random.Generator) -> list[str]:
        pairs = rng.choice(len(_KEY_ADJECTIVES) * len(_KEY_NOUNS), size=count, replace=False)
        return [f"{_KEY_ADJECTIVES[p // len(_KEY_NOUNS)]}-{_KEY_NOUNS[p % len(_KEY_NOUNS)]}" for p in pairs]

    def _filler_tokens(self, kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
        """The repeated paragraph, or a random span of the corpus' token stream (it may run across a
        document boundary: it is only filler)."""
        if kind == "repeated":
            return np.resize(self._filler, length)
        tokens = self.haystack.tokens
        if length > len(tokens):
            raise ValueError(f"the haystack corpus has {len(tokens)} tokens, fewer than the {length} needed")
        start = int(rng.integers(0, len(tokens) - length + 1))
        return tokens[start : start + length].astype(np.int64)

    def _build(self, length, haystack, value_kind, count, positions_fn, rng, max_structure) -> NeedleSample | None:
        """Assemble ``count`` needles + queries into exactly ``length`` tokens, the rest filler.

        Returns None when needles and queries take more than ``max_structure`` tokens.
        """
        singular, plural = _VALUE_NAMES[value_kind]
        keys = self._keys(count, rng)
        values = [self._encode(self._value(value_kind, rng)) for _ in keys]
        needles = [
            (self._encode(f"\nOne of the special magic {plural} for {key} is: "), value, self._encode(".\n"))
            for key, value in zip(keys, values)
        ]
        query_order = rng.permutation(count)
        queries = [
            (
                self._encode(
                    f"\nWhat is the special magic {singular} for {keys[i]} mentioned in the provided text? "
                    f"The special magic {singular} for {keys[i]} mentioned in the provided text is: "
                ),
                values[i],
            )
            for i in query_order
        ]
        structure = sum(len(a) + len(b) + len(c) for a, b, c in needles) + sum(len(q) + len(v) for q, v in queries)
        if structure > max_structure:
            return None
        filler_length = length - structure
        filler = self._filler_tokens(haystack, filler_length, rng)
        positions = positions_fn(filler_length)
        parts, needle_spans, cursor, used = [], [], 0, 0
        for (prefix, value, suffix), pos in zip(needles, map(int, positions)):
            parts.append(filler[used:pos])
            cursor += pos - used
            used = pos
            needle_spans.append((cursor + len(prefix), cursor + len(prefix) + len(value)))
            parts += [prefix, value, suffix]
            cursor += len(prefix) + len(value) + len(suffix)
        parts.append(filler[used:])
        cursor += filler_length - used
        answer_spans = [None] * count
        for i, (query, value) in zip(query_order, queries):
            answer_spans[i] = (cursor + len(query), cursor + len(query) + len(value))
            parts += [query, value]
            cursor += len(query) + len(value)
        depth = positions[0] / filler_length if filler_length else 0.0
        return NeedleSample(np.concatenate(parts), needle_spans, answer_spans, float(depth))

    def eval_sample(self, task: str, length: int, depth: float, rng: np.random.Generator) -> NeedleSample:
        """One single-needle sequence of exactly ``length`` tokens, the needle at relative ``depth`` of the haystack."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        haystack, value_kind = TASKS[task]
        sample = self._build(length, haystack, value_kind, 1, lambda n: [round(depth * n)], rng, max_structure=length)
        if sample is None:
            raise ValueError(f"length {length} is too short for the {task} needle and query")
        return sample

    def eval_samples(self, task: str, length: int, count: int, seed: int) -> list[NeedleSample]:
        """``count`` samples with depths evenly spread over [0, 1]; the same arguments give the same samples."""
        rng = np.random.default_rng([seed, list(TASKS).index(task), length])
        return [self.eval_sample(task, length, (i + 0.5) / count, rng) for i in range(count)]

    def training_sample(self, length: int, rng: np.random.Generator) -> NeedleSample | None:
        """1-4 needles in real or repeated filler, all queried at the end, in random order.

        As many of the wanted needles as fit in half of ``length`` (at least one, if it fits at all);
        None when not even one needle and its query fit in ``length`` tokens.
        """
        haystack = "corpus" if rng.random() < 0.75 else "repeated"
        value_kind = "number" if rng.random() < 0.5 else "uuid"
        wanted = int(rng.integers(1, MAX_TRAINING_NEEDLES + 1))
        attempts = [(count, length // 2) for count in range(wanted, 0, -1)] + [(1, length)]
        for count, max_structure in attempts:
            positions = lambda n, c=count: np.sort(rng.integers(0, n + 1, size=c))  # noqa: E731
            sample = self._build(length, haystack, value_kind, count, positions, rng, max_structure)
            if sample is not None:
                return sample
        return None

    def training_sequences(
        self, micro_batch: int, *, seed: int, token_budget: int, min_length: int, max_length: int
    ) -> list[np.ndarray]:
        """Needle sequences for one training micro-batch: about ``token_budget`` tokens in sequences of
        ``min_length..max_length`` tokens; a pure function of its arguments (exact resume)."""
        rng = np.random.default_rng([seed, 0x6E656564, micro_batch])
        sequences, left = [], token_budget
        while left >= min_length:
            length = int(rng.integers(min_length, min(max_length, left) + 1))
            sample = self.training_sample(length, rng)
            if sample is not None:  # else these tokens go to corpus text
                sequences.append(sample.tokens)
            left -= length
        return sequences
