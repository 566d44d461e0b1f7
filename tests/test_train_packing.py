"""Packing: exact batch sizes, sequences never mix documents, every token once per epoch, exact resume."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoba.train.data import TokenizedCorpus
from flashmoba.train.packing import PackedStream, pack_sequences, sequence_chunks

DOC_STRIDE = 1000  # token = document id * DOC_STRIDE + position in the document


def labelled_corpus(lengths):
    """Each token names its document and its position, so a sequence's origin can be read off its tokens."""
    docs = [i * DOC_STRIDE + np.arange(n) for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(np.concatenate(docs).astype(np.int32), offsets)


def sequences_of(batch):
    ids = batch.input_ids[0].numpy()
    cu = batch.cu_seqlens.numpy()
    assert cu[0] == 0 and cu[-1] == len(ids) and np.all(np.diff(cu) >= 0)
    return [ids[a:b] for a, b in zip(cu[:-1], cu[1:])]


def assert_one_document_each(sequences, max_seqlen):
    for seq in sequences:
        assert 1 <= len(seq) <= max_seqlen
        doc, pos = seq // DOC_STRIDE, seq % DOC_STRIDE
        assert np.all(doc == doc[0]), "a sequence mixes documents"
        assert np.array_equal(pos, pos[0] + np.arange(len(seq))), "a sequence is not contiguous"


lengths_strategy = st.lists(st.integers(1, 300), min_size=1, max_size=25)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_strategy, max_seqlen=st.integers(2, 64), batches=st.integers(1, 4), seed=st.integers(0, 9))
def test_batches_are_exact_and_never_mix_documents(lengths, max_seqlen, batches, seed):
    corpus = labelled_corpus(lengths)
    if max(lengths) < 2:
        with pytest.raises(ValueError, match="no sequence"):
            PackedStream(corpus, 64, max_seqlen, seed)
        return
    stream = PackedStream(corpus, batch_tokens=64 * batches, max_seqlen=max_seqlen, seed=seed)
    for _ in range(5):
        batch = stream.next_batch()
        assert batch.input_ids.shape == (1, 64 * batches)
        assert str(batch.cu_seqlens.dtype) == "torch.int32"
        assert_one_document_each(sequences_of(batch), max_seqlen)


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_strategy, max_seqlen=st.integers(2, 50), seed=st.integers(0, 9))
def test_an_epoch_visits_every_token_once(lengths, max_seqlen, seed):
    corpus = labelled_corpus([n + 2 for n in lengths])  # every document yields at least one sequence
    _, chunk_lengths = sequence_chunks(corpus, max_seqlen)
    expected = np.sort(np.concatenate([corpus.tokens[s : s + n] for s, n in zip(*sequence_chunks(corpus, max_seqlen))]))
    stream = PackedStream(corpus, batch_tokens=max_seqlen * 2, max_seqlen=max_seqlen, seed=seed)
    seen = []
    while stream.epoch == 0:
        seen.append(stream.next_batch().input_ids[0].numpy())
    seen = np.concatenate(seen)[: chunk_lengths.sum()]
    assert np.array_equal(np.sort(seen), expected)


def test_chunks_drop_only_lone_tokens():
    corpus = labelled_corpus([1, 5, 9, 10, 11])
    starts, lengths = sequence_chunks(corpus, max_seqlen=5)
    pieces = [corpus.tokens[s : s + n].tolist() for s, n in zip(starts, lengths)]
    assert [len(p) for p in pieces] == [5, 5, 4, 5, 5, 5, 5]  # doc 0 (1 token) and doc 4's last token dropped
    assert pieces[2] == [2005, 2006, 2007, 2008]


def test_resume_from_state_continues_identically():
    corpus = labelled_corpus(np.random.default_rng(0).integers(2, 200, size=30))
    extra = lambda m: [np.full(m % 3 + 2, -1 - m)]  # noqa: E731 - a pure function of the micro-batch
    stream = PackedStream(corpus, batch_tokens=96, max_seqlen=40, seed=3, extra_sequences=extra)
    for _ in range(7):
        stream.next_batch()
    state = stream.state_dict()
    expected = [stream.next_batch() for _ in range(30)]  # crosses into the next epochs
    resumed = PackedStream(corpus, batch_tokens=96, max_seqlen=40, seed=3, extra_sequences=extra)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.cu_seqlens, want.cu_seqlens)
    assert stream.epoch >= 1


def test_extra_sequences_come_first_and_whole():
    corpus = labelled_corpus([100, 100])
    extra = lambda m: [np.full(10, -1), np.full(7, -2)]  # noqa: E731
    batch = PackedStream(corpus, batch_tokens=64, max_seqlen=32, seed=0, extra_sequences=extra).next_batch()
    sequences = sequences_of(batch)
    assert sequences[0].tolist() == [-1] * 10 and sequences[1].tolist() == [-2] * 7
    assert_one_document_each(sequences[2:], 32)
    too_long = PackedStream(corpus, 64, 32, 0, extra_sequences=lambda m: [np.zeros(33, dtype=np.int64)])
    with pytest.raises(ValueError, match="max_seqlen"):
        too_long.next_batch()


def test_pack_sequences_keeps_order_and_bounds():
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 100, size=n) for n in rng.integers(1, 60, size=40)]
    rows = pack_sequences(sequences, max_tokens=100)
    unpacked = [s for row in rows for s in sequences_of(row)]
    assert all(row.num_tokens <= 100 for row in rows)
    assert len(unpacked) == len(sequences) and all(np.array_equal(a, b) for a, b in zip(unpacked, sequences))
    assert [r.num_tokens for r in pack_sequences([np.arange(150)], max_tokens=100)] == [150]


@pytest.mark.parametrize("global_attn", ["moba", "dense"])
def test_packed_documents_do_not_see_each_other_in_the_model(global_attn):
    """Logits of every sequence of a packed training batch equal those of the sequence run alone."""
    from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM

    config = MoBAHybridConfig.from_preset(
        "tiny",
        vocab_size=DOC_STRIDE * 8,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        swa_window=8,
        moba_block_size=4,
        moba_topk=2,
        kconv_size=3,
        global_attn=global_attn,
        attn_backend="reference",
    )
    model = MoBAHybridForCausalLM(config).double().eval()
    stream = PackedStream(labelled_corpus([30, 7, 50, 19, 3, 41]), batch_tokens=96, max_seqlen=32, seed=1)
    batch = stream.next_batch()
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens).logits[0]
        cu = batch.cu_seqlens.tolist()
        assert len(cu) > 3
        for a, b in zip(cu[:-1], cu[1:]):
            alone = model(input_ids=batch.input_ids[:, a:b], cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32))
            torch.testing.assert_close(packed[a:b], alone.logits[0], rtol=1e-12, atol=1e-12)
