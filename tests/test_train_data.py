"""Corpora and tokenizers: per-package documents, deterministic package split, user data, lossless tokenizers."""

import json
import string
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoba.train.data import TokenizedCorpus, python_source_corpus, user_corpus
from flashmoba.train.tokenizer import build_tokenizer, encode_corpus, load_tokenizer, save_tokenizer


def _random_source(rng, size):
    return "".join(rng.choice(list(string.ascii_letters + " \n=()"), size=size))


@pytest.fixture
def fake_installation(tmp_path):
    """A stdlib-like root holding modules, packages and a site-packages folder, plus a separate purelib root."""
    rng = np.random.default_rng(zlib.crc32(str(tmp_path).encode()))
    stdlib, purelib = tmp_path / "lib", tmp_path / "venv-site"
    files = {
        stdlib / "alpha.py": _random_source(rng, 300),
        stdlib / "beta" / "__init__.py": _random_source(rng, 200),
        stdlib / "beta" / "sub" / "zeta.py": _random_source(rng, 400),
        stdlib / "beta" / "core.py": _random_source(rng, 100),
        stdlib / "beta" / "notes.txt": "not python",
        stdlib / "site-packages" / "hidden" / "x.py": "must not be read from the stdlib root",
        purelib / "gamma" / "g.py": _random_source(rng, 500),
    }
    for i in range(40):  # enough packages that both splits are populated at val_fraction 0.3
        files[purelib / f"pkg{i}.py"] = _random_source(rng, 50 + i)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [stdlib, purelib], files


def _documents(corpus):
    return corpus.train + corpus.val


def test_one_document_per_package_in_path_order(fake_installation):
    roots, files = fake_installation
    corpus = python_source_corpus(roots=roots, val_fraction=0.3)
    docs = _documents(corpus)
    assert len(docs) == 3 + 40  # alpha, beta, gamma, pkg0..39; nothing from site-packages or .txt
    beta = next(d for d in docs if "beta/__init__.py" in d)
    stdlib = roots[0]
    members = [stdlib / "beta" / "__init__.py", stdlib / "beta" / "core.py", stdlib / "beta" / "sub" / "zeta.py"]
    expected = "".join(f"# ==== {p.relative_to(stdlib).as_posix()} ====\n{files[p]}\n" for p in members)
    assert beta == expected
    assert not any("must not be read" in d or "not python" in d for d in docs)


def test_package_split_is_deterministic_and_disjoint(fake_installation):
    roots, _ = fake_installation
    first = python_source_corpus(roots=roots, val_fraction=0.3)
    second = python_source_corpus(roots=roots, val_fraction=0.3)
    assert first == second
    assert first.train and first.val and not set(first.train) & set(first.val)
    # The split is by package name: the val packages are exactly those whose name hashes below the fraction.
    names = lambda docs: {d.removeprefix("# ==== ").split("/")[0].split(" ====")[0].removesuffix(".py") for d in docs}
    assert all(zlib.crc32(n.encode()) % 10_000 < 3_000 for n in names(first.val))
    assert all(zlib.crc32(n.encode()) % 10_000 >= 3_000 for n in names(first.train))


def test_budgets_cut_packages_and_take_a_subset(fake_installation):
    roots, _ = fake_installation
    full = python_source_corpus(roots=roots, val_fraction=0.3)
    capped = python_source_corpus(roots=roots, val_fraction=0.3, max_package_chars=120)
    assert all(len(d) <= 120 for d in _documents(capped))
    assert [d[:120] for d in full.train] == capped.train
    small = python_source_corpus(roots=roots, val_fraction=0.3, max_chars=600)
    assert sum(map(len, small.train)) <= 600
    assert small.train[:-1] == full.train[: len(small.train) - 1]  # the same packages, in the same order
    assert small.train[-1] == full.train[len(small.train) - 1][: len(small.train[-1])]


def test_this_installation_gives_a_real_corpus():
    corpus = python_source_corpus(max_chars=300_000, max_package_chars=50_000)
    assert sum(map(len, corpus.train)) == 300_000
    assert all(d.startswith("# ==== ") for d in _documents(corpus))
    assert corpus == python_source_corpus(max_chars=300_000, max_package_chars=50_000)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="val_fraction"):
        python_source_corpus(val_fraction=1.5)
    with pytest.raises(ValueError, match="max_chars"):
        python_source_corpus(max_chars=0)


def _texts(count, seed):
    rng = np.random.default_rng(seed)
    return [f"document {i}: " + _random_source(rng, int(rng.integers(20, 80))) for i in range(count)]


def test_user_folder_of_text_files(tmp_path):
    texts = _texts(60, 1)
    for i, text in enumerate(texts):
        (tmp_path / "nested" if i % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "nested" if i % 2 else tmp_path) / f"{i:03d}.txt").write_text(text)
    corpus = user_corpus(str(tmp_path), val_fraction=0.2)
    assert sorted(_documents(corpus)) == sorted(texts)
    assert corpus.val == [t for t in corpus.val if zlib.crc32(t.encode()) % 10_000 < 2_000]


def test_user_jsonl_and_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(50, 2)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    from_jsonl = user_corpus(str(jsonl), text_field="body", val_fraction=0.2)
    from_parquet = user_corpus(str(parquet), val_fraction=0.2)
    assert from_jsonl == from_parquet
    assert sorted(_documents(from_parquet)) == sorted(texts)
    with pytest.raises(ValueError, match="no column 'text'"):
        user_corpus(str(jsonl))


def test_a_dataset_folder_with_a_validation_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, val = _texts(30, 3), _texts(7, 4)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": train}), tmp_path / "data" / "train-00000.parquet")
    pq.write_table(pa.table({"text": val}), tmp_path / "data" / "validation-00000.parquet")
    corpus = user_corpus(str(tmp_path))
    assert sorted(corpus.train) == sorted(train) and sorted(corpus.val) == sorted(val)


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("bpe", _texts(200, 5) + ["value = 1234567 + 89"] * 50, vocab_size=400)


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizers_are_lossless(bpe, text):
    for tokenizer in (bpe, build_tokenizer("bytes", [])):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_bytes_tokenizer_is_one_token_per_byte():
    tokenizer = build_tokenizer("bytes", ["ignored"])
    assert tokenizer.get_vocab_size() == 257
    text = "héllo wörld 42 ∑"
    assert len(tokenizer.encode(text).ids) == len(text.encode("utf-8"))


def test_bpe_is_deterministic_splits_digits_and_round_trips(bpe, tmp_path):
    again = build_tokenizer("bpe", _texts(200, 5) + ["value = 1234567 + 89"] * 50, vocab_size=400)
    sample = " ".join(_texts(20, 6))
    assert again.encode(sample).ids == bpe.encode(sample).ids
    assert bpe.get_vocab_size() == 400
    digits = [t for t in bpe.encode("x = 1234567").tokens if any(c.isdigit() for c in t)]
    assert digits == list("1234567")  # one token per digit, however often the number was seen
    save_tokenizer(bpe, tmp_path)
    assert load_tokenizer(tmp_path).encode(sample).ids == bpe.encode(sample).ids
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", ["x"], vocab_size=100)


def test_encode_corpus_keeps_documents_apart(bpe, tmp_path):
    texts = _texts(30, 7)
    corpus = encode_corpus(bpe, texts)
    assert corpus.tokens.dtype == np.uint16 and corpus.num_documents == 30
    for i, text in enumerate(texts):
        assert corpus.document(i).tolist() == bpe.encode(text).ids
    corpus.save(tmp_path / "c.npz")
    loaded = TokenizedCorpus.load(tmp_path / "c.npz")
    assert np.array_equal(loaded.tokens, corpus.tokens) and np.array_equal(loaded.offsets, corpus.offsets)
