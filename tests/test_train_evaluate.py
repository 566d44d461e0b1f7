"""Evaluation against oracle models whose answers are known: perplexity by position, retrieval counts."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flashmoba.theory
from flashmoba.train.data import TokenizedCorpus
from flashmoba.train.evaluate import EvalConfig, evaluate, needle_retrieval, perplexity, router_snr
from flashmoba.train.needles import NeedleFactory
from flashmoba.train.tokenizer import build_tokenizer, encode_corpus

VOCAB = 50


def _positions(cu_seqlens, n):
    cu = cu_seqlens.long()
    seq = torch.searchsorted(cu[1:], torch.arange(n), right=True)
    return seq, torch.arange(n) - cu[seq]


class PeekingLM(torch.nn.Module):
    """Reads the next token from its input and gives it logit ``margin(target position)`` over zeros.

    ``correct_if(sequence index in the row, row length)`` selects the sequences where it predicts right;
    elsewhere it favours a token that is never the next one.
    """

    def __init__(self, vocab, margin=lambda pos: torch.log1p(pos.double()), correct_if=lambda seq, n: True):
        super().__init__()
        self.vocab, self.margin, self.correct_if = vocab, margin, correct_if

    def forward(self, input_ids, cu_seqlens):
        ids = input_ids[0]
        n = ids.shape[0]
        seq, pos = _positions(cu_seqlens, n)
        target = torch.roll(ids, -1)
        right = torch.tensor([bool(self.correct_if(int(s), n)) for s in seq])
        favoured = torch.where(right, target, (target + 1) % self.vocab)
        logits = torch.zeros(n, self.vocab, dtype=torch.float64)
        logits[torch.arange(n), favoured] = self.margin(pos + 1)  # pos + 1: the position of the target
        return SimpleNamespace(logits=logits[None])


def random_corpus(rng, lengths):
    docs = [rng.integers(0, VOCAB, size=n) for n in lengths]
    return TokenizedCorpus(np.concatenate(docs).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]))


def test_perplexity_and_position_buckets_match_a_direct_count():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, size=25)
    corpus = random_corpus(rng, lengths)
    config = EvalConfig(context=256, ppl_tokens=10**9, batch_tokens=600)
    result = perplexity(PeekingLM(VOCAB), corpus, config, torch.device("cpu"))
    # Independently: every document cut into pieces of 256; targets at piece positions 1..len-1 with
    # probability e^m / (e^m + VOCAB - 1), m = log(1 + position).
    nll = {}
    for n in lengths:
        for start in range(0, n, 256):
            for p in range(1, min(256, n - start)):
                nll.setdefault(p, []).append(-math.log((1 + p) / (1 + p + VOCAB - 1)))
    every = [v for values in nll.values() for v in values]
    # Logits are scored in float32: a few ulps of the largest logit per token.
    tol = 16 * torch.finfo(torch.float32).eps * math.log(1 + 256)
    assert result["tokens"] == len(every)
    assert result["loss"] == pytest.approx(np.mean(every), abs=tol)
    assert result["ppl"] == pytest.approx(math.exp(np.mean(every)), rel=2 * tol)
    edges = [0, 64, 128, 256]
    for bucket, (a, b) in zip(result["by_position"], zip(edges[:-1], edges[1:])):
        values = [v for p, vs in nll.items() if a <= p < b for v in vs]
        assert (bucket["start"], bucket["end"], bucket["tokens"]) == (a, b, len(values))
        assert bucket["loss"] == pytest.approx(np.mean(values), abs=tol)


def test_perplexity_budget_takes_a_fixed_subset():
    rng = np.random.default_rng(1)
    corpus = random_corpus(rng, rng.integers(100, 400, size=30))
    config = EvalConfig(context=128, ppl_tokens=2000, batch_tokens=512)
    first = perplexity(PeekingLM(VOCAB, margin=lambda pos: 0 * pos.double()), corpus, config, torch.device("cpu"))
    assert first["ppl"] == pytest.approx(VOCAB)  # uniform predictions
    # Whole sequences of <= 128 tokens up to the 2000-token budget (their first tokens are not scored).
    assert 1000 < first["tokens"] <= 2000
    again = perplexity(PeekingLM(VOCAB), corpus, config, torch.device("cpu"))
    assert again["tokens"] == first["tokens"]


@pytest.fixture(scope="module")
def factory():
    rng = np.random.default_rng(2)
    texts = [" ".join(rng.choice(["spam", "eggs", "ham", "(x)", "= 1", "def"], size=300)) for _ in range(20)]
    tokenizer = build_tokenizer("bpe", texts, vocab_size=300)
    return NeedleFactory(tokenizer, encode_corpus(tokenizer, texts))


def test_retrieval_counts_follow_the_model(factory):
    vocab = factory.tokenizer.get_vocab_size()
    config = EvalConfig(lengths=(300, 700), samples=9, batch_tokens=1500, tasks=("niah_single_1", "niah_single_3"))
    cpu = torch.device("cpu")
    perfect = needle_retrieval(PeekingLM(vocab), factory, config, cpu)
    assert [(r["task"], r["length"], r["correct"], r["total"]) for r in perfect] == [
        (t, n, 9, 9) for t in config.tasks for n in config.lengths
    ]
    assert all(r["ci_high"] == 1.0 and 0.6 < r["ci_low"] < 1.0 for r in perfect)
    # Right only on the even sequences of each packed row: rows of 1500 tokens hold 5 samples of 300
    # (3 even) and 2 of 700 (1 even); 9 samples -> rows of 5 + 4 (3 + 2 even) and 2 + 2 + 2 + 2 + 1.
    half = needle_retrieval(PeekingLM(vocab, correct_if=lambda s, n: s % 2 == 0), factory, config, cpu)
    assert [r["correct"] for r in half] == [5, 5, 5, 5]
    low, high = half[0]["ci_low"], half[0]["ci_high"]
    assert low < 5 / 9 < high


def test_router_snr_is_skipped_with_a_reason_when_unavailable(factory, monkeypatch):
    monkeypatch.delattr(flashmoba.theory, "measure_router_snr", raising=False)
    result = router_snr(PeekingLM(10), factory, EvalConfig(context=300, batch_tokens=600), torch.device("cpu"))
    assert result["layers"] is None and "measure_router_snr" in result["note"]


def test_router_snr_of_a_moba_model_and_not_of_a_dense_one(factory):
    from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM

    measured = {}
    for attn in ("moba", "dense"):
        config = MoBAHybridConfig.from_preset(
            "tiny",
            vocab_size=factory.tokenizer.get_vocab_size(),
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            intermediate_size=64,
            moba_block_size=16,
            moba_topk=2,
            global_attn=attn,
            attn_backend="reference",
        )
        model = MoBAHybridForCausalLM(config).eval()
        measured[attn] = router_snr(model, factory, EvalConfig(context=300), torch.device("cpu"))
    layers = measured["moba"]["layers"]
    assert list(layers) == ["model.layers.1.self_attn"]  # the one MoBA layer
    assert (
        layers["model.layers.1.self_attn"]["block_size"] == 16 and layers["model.layers.1.self_attn"]["num_queries"] > 0
    )
    assert math.isfinite(layers["model.layers.1.self_attn"]["snr"])
    assert measured["dense"]["layers"] is None and "no MoBA layer" in measured["dense"]["note"]


def test_evaluate_bundles_everything(factory):
    config = EvalConfig(context=200, ppl_tokens=3000, batch_tokens=800, lengths=(300,), samples=3, snr=False)
    results = evaluate(
        PeekingLM(factory.tokenizer.get_vocab_size()), factory.haystack, factory, config, torch.device("cpu")
    )
    assert set(results) == {"perplexity", "retrieval", "router_snr", "config"}
    assert results["config"]["lengths"] == [300] and len(results["retrieval"]) == 3


@pytest.mark.parametrize("field, value", [("samples", 0), ("context", -1), ("tasks", ("niah_multi",)), ("lengths", ())])
def test_eval_config_names_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**{field: value})
