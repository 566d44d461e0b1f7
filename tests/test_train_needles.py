"""Needle generators: exact lengths, needles where they are said to be, answers that copy them, scoring."""

import re

import numpy as np
import pytest

from flashmoba.train.needles import REPEATED_FILLER, TASKS, NeedleFactory, answer_correct
from flashmoba.train.tokenizer import build_tokenizer, encode_corpus

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest.fixture(scope="module", params=["bpe", "bytes"])
def factory(request):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "import", "self", "None", "value", "(", ")", ":"]
    texts = [" ".join(rng.choice(words, size=400)) for _ in range(30)]
    tokenizer = build_tokenizer(request.param, texts, vocab_size=600)
    corpus = encode_corpus(tokenizer, texts)
    return NeedleFactory(tokenizer, corpus)


def _text(factory, tokens):
    return factory.tokenizer.decode(tokens.tolist())


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_eval_sample_places_one_needle(factory, task, depth):
    length = 700 if factory.tokenizer.get_vocab_size() > 257 else 900
    sample = factory.eval_sample(task, length, depth, np.random.default_rng(1))
    tokens = sample.tokens
    assert len(tokens) == length and tokens.dtype == np.int64
    (n0, n1), (a0, a1) = sample.needle_spans[0], sample.answer_spans[0]
    assert a1 == length  # the answer ends the sequence
    assert np.array_equal(tokens[n0:n1], tokens[a0:a1])  # the answer copies the needle's value tokens
    value = _text(factory, tokens[n0:n1])
    haystack, kind = TASKS[task]
    assert re.fullmatch(r"\d{7}" if kind == "number" else UUID, value)
    text = _text(factory, tokens)
    needle = re.search(r"\nOne of the special magic (numbers|uuids) for ([a-z]+-[a-z]+) is: (.*?)\.\n", text)
    assert needle and needle.group(3) == value
    assert text.endswith(f"The special magic {kind} for {needle.group(2)} mentioned in the provided text is: {value}")
    assert text.count(value) == 2
    # Everything before the needle and between it and the query is filler, and the needle sits at `depth`.
    before, after = text[: needle.start()], text[needle.end() : text.rindex("\nWhat is the special magic")]
    filler = before + after
    if haystack == "repeated":
        assert filler == (REPEATED_FILLER * (len(filler) // len(REPEATED_FILLER) + 1))[: len(filler)]
    else:
        corpus_text = _text(factory, factory.haystack.tokens)
        assert filler in corpus_text  # one contiguous span of the corpus, needle removed
    encode = lambda text: len(factory.tokenizer.encode(text).ids)  # noqa: E731
    prefix = encode(f"\nOne of the special magic {needle.group(1)} for {needle.group(2)} is: ")
    needle_tokens = prefix + (n1 - n0) + encode(".\n")
    filler_tokens = a0 - needle_tokens  # everything before the answer but the needle and the query
    filler_tokens -= encode(text[text.rindex("\nWhat is the special magic") : len(text) - len(value)])
    assert n0 - prefix == round(depth * filler_tokens)  # filler tokens before the needle


def test_eval_samples_are_reproducible_and_spread(factory):
    first = factory.eval_samples("niah_single_2", 800, 8, seed=5)
    again = factory.eval_samples("niah_single_2", 800, 8, seed=5)
    other = factory.eval_samples("niah_single_2", 800, 8, seed=6)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(first, again))
    assert not all(np.array_equal(a.tokens, b.tokens) for a, b in zip(first, other))
    np.testing.assert_allclose([s.depth for s in first], (np.arange(8) + 0.5) / 8, atol=0.01)
    values = {tuple(s.tokens[slice(*s.answer_spans[0])]) for s in first}
    assert len(values) == 8


def test_too_short_or_bad_arguments_are_named(factory):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too short"):
        factory.eval_sample("niah_single_3", 20, 0.5, rng)
    with pytest.raises(ValueError, match="task"):
        factory.eval_sample("niah_multi", 500, 0.5, rng)
    with pytest.raises(ValueError, match="depth"):
        factory.eval_sample("niah_single_1", 500, 1.5, rng)


def test_training_samples_query_every_needle(factory):
    rng = np.random.default_rng(3)
    counts = set()
    for _ in range(40):
        sample = factory.training_sample(1500, rng)
        assert len(sample.tokens) == 1500
        counts.add(len(sample.needle_spans))
        starts = [s for s, _ in sample.needle_spans]
        assert starts == sorted(starts) and sample.needle_spans[-1][1] < min(a for a, _ in sample.answer_spans)
        for (n0, n1), (a0, a1) in zip(sample.needle_spans, sample.answer_spans):
            assert np.array_equal(sample.tokens[n0:n1], sample.tokens[a0:a1])
        keys = re.findall(r"special magic \w+ for ([a-z]+-[a-z]+) is", _text(factory, sample.tokens))
        assert len(keys) == len(set(keys)) == len(sample.needle_spans)
        assert max(a1 for _, a1 in sample.answer_spans) == 1500
    assert len(counts) > 1  # several needle counts occur


def test_training_sequences_fill_the_budget_deterministically(factory):
    kwargs = dict(seed=2, token_budget=5000, min_length=300, max_length=1200)
    first = factory.training_sequences(17, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(first, factory.training_sequences(17, **kwargs)))
    lengths = [len(s) for s in first]
    assert all(300 <= n <= 1200 for n in lengths)
    assert 5000 - 300 < sum(lengths) <= 5000
    assert not np.array_equal(first[0], factory.training_sequences(18, **kwargs)[0])


def test_answer_correct_scores_greedy_copies(factory):
    sample = factory.eval_sample("niah_single_3", 800, 0.5, np.random.default_rng(4))
    oracle = np.append(sample.tokens[1:], 0)  # predicts every next token
    assert answer_correct(oracle, sample)
    a0, a1 = sample.answer_spans[0]
    for wrong_at in (a0 - 1, a1 - 2):  # the first and the last answer token
        wrong = oracle.copy()
        wrong[wrong_at] += 1
        assert not answer_correct(wrong, sample)
    elsewhere = oracle.copy()
    elsewhere[: a0 - 1] = 0  # mistakes outside the answer don't matter
    assert answer_correct(elsewhere, sample)
    assert not answer_correct(np.roll(oracle, 1), sample)
