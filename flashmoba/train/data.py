"""Text corpora for training and evaluation, never downloaded at run time.

Default corpus: the Python source files of the interpreter that runs this code (its standard library and
its site-packages). Each top-level package (or single-file module) becomes ONE long document, its files
concatenated in path order, so documents are long enough for long-context training. Packages go to the
validation split by a hash of their name, so the split is deterministic for a given installation and no
package leaks between the splits.

User data: a folder of text files, a ``.txt`` file, a ``.jsonl``/``.json`` or ``.parquet`` file (read by the
``datasets`` library's own builders), or a ``datasets`` name or local dataset folder (``datasets.load_dataset``).
Without a validation split, documents are split by a hash of their text.

Tokenized corpora are kept as one flat token array plus document offsets (``TokenizedCorpus``).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoba._checks import check_float, check_int

__all__ = [
    "CorpusSplits",
    "TokenizedCorpus",
    "python_source_corpus",
    "user_corpus",
    "load_corpus",
    "reads_with_datasets",
]

# Site-packages folders that sit inside the standard library folder; walked as their own root instead.
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")
_TEXT_FIELD = "text"
# A folder holding any of these is a dataset for ``datasets.load_dataset``, not a folder of text files.
_DATASET_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")
# A file with one of these suffixes is one plain-text document.
_TEXT_SUFFIXES = (".txt", ".md", ".py", "")


@dataclass
class CorpusSplits:
    """Train and validation documents (plain text), in a deterministic order."""

    train: list[str]
    val: list[str]

    def __post_init__(self):
        for name in ("train", "val"):
            if not getattr(self, name):
                raise ValueError(f"the corpus has no {name} documents: give more data or another val_fraction")


@dataclass
class TokenizedCorpus:
    """Documents as token ids.

    Attributes:
        tokens: ``[T]`` token ids of all documents back to back (uint16 when the vocabulary allows, else int32).
        offsets: int64 ``[D + 1]``; document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path) -> TokenizedCorpus:
        with np.load(path) as f:
            return cls(tokens=f["tokens"], offsets=f["offsets"])


def _in_validation(key: str, val_fraction: float) -> bool:
    """Deterministic split: a stable hash of ``key`` (unlike ``hash()``, the same in every process)."""
    return zlib.crc32(key.encode("utf-8", "replace")) % 10_000 < val_fraction * 10_000


def _check_fraction(val_fraction):
    if not 0 < check_float("val_fraction", val_fraction) < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _python_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        root = Path(paths[key]).resolve()
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def _package_files(roots: list[Path]) -> dict[str, list[tuple[Path, str]]]:
    """``(path, name relative to its root)`` of every ``*.py`` file, grouped by top-level package, in path order."""
    packages: dict[str, list[tuple[Path, str]]] = {}
    for root in roots:
        nested_roots = {r for r in roots if r != root and root in r.parents}
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS and here / d not in nested_roots]
            for name in filenames:
                if name.endswith(".py"):
                    relative = (here / name).relative_to(root)
                    packages.setdefault(relative.parts[0].removesuffix(".py"), []).append(
                        (here / name, relative.as_posix())
                    )
    return {name: sorted(files, key=lambda f: f[1]) for name, files in sorted(packages.items())}


def _package_document(files: list[tuple[Path, str]], max_chars: int) -> str:
    """One package's files back to back, each under a header line naming it; cut at ``max_chars``."""
    parts, size = [], 0
    for path, relative in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(f"# ==== {relative} ====\n{text}\n")
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def python_source_corpus(
    *,
    val_fraction: float = 0.05,
    max_chars: int = 64_000_000,
    max_package_chars: int = 1_000_000,
    roots: list[Path] | None = None,
) -> CorpusSplits:
    """The running Python installation's source code, one document per top-level package.

    Args:
        val_fraction: share of packages (by a hash of the name) that form the validation split.
        max_chars: character budget of the training split; the validation split gets
            ``max_chars * val_fraction / (1 - val_fraction)``. Packages are taken in hash order until the
            budget is spent, so a smaller budget gives a subset of the same documents.
        max_package_chars: a package's document is cut here, so that a few huge packages don't dominate.
        roots: folders to read (default: the stdlib, purelib and platlib folders of this interpreter).

    Returns:
        ``CorpusSplits``, identical on every call for the same installation and arguments.
    """
    _check_fraction(val_fraction)
    max_chars = check_int("max_chars", max_chars, 1)
    max_package_chars = check_int("max_package_chars", max_package_chars, 1)
    roots = _python_roots() if roots is None else [Path(r).resolve() for r in roots]
    packages = _package_files(roots)
    budgets = {"train": max_chars, "val": max(1, int(max_chars * val_fraction / (1 - val_fraction)))}
    splits: dict[str, list[str]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    for name in sorted(packages, key=lambda n: (zlib.crc32(n.encode()), n)):
        split = "val" if _in_validation(name, val_fraction) else "train"
        if used[split] >= budgets[split]:
            continue
        limit = min(max_package_chars, budgets[split] - used[split])
        document = _package_document(packages[name], limit)
        if document:
            splits[split].append(document)
            used[split] += len(document)
    return CorpusSplits(**splits)


def _text_source(path: Path) -> str | None:
    """What ``path`` is to ``user_corpus``: a "folder" of text files, a "file" holding one text document,
    or None (read by the ``datasets`` library)."""
    if path.is_dir() and not any(p.suffix.lower() in _DATASET_SUFFIXES for p in path.rglob("*")):
        return "folder"
    if path.is_file() and path.suffix.lower() in _TEXT_SUFFIXES:
        return "file"
    return None


def reads_with_datasets(source: str) -> bool:
    """Whether ``load_corpus`` reads ``source`` with the ``datasets`` library (an optional dependency)."""
    return source != "python" and _text_source(Path(source)) is None


def _load_with_datasets(source: str):
    """A ``datasets`` DatasetDict from a jsonl/parquet file, a local dataset folder or a dataset name."""
    import datasets

    lowered = source.lower()
    if lowered.endswith((".jsonl", ".json")):
        return datasets.load_dataset("json", data_files=source)
    if lowered.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=source)
    return datasets.load_dataset(source)


def user_corpus(source: str, *, text_field: str = _TEXT_FIELD, val_fraction: float = 0.05) -> CorpusSplits:
    """User text: a folder of text files, a text file, jsonl, parquet, or a ``datasets`` name.

    Args:
        source: a folder of text files (every file under it, in path order, one document each, read as
            UTF-8; a folder holding parquet/json/csv/arrow files is a dataset folder instead), a
            ``.txt`` file (one document), a ``.jsonl``/``.json``/``.parquet`` file, or a ``datasets`` name /
            dataset folder with a ``text_field`` column (one row per document).
        text_field: the column holding the text.
        val_fraction: without a "validation"/"test" split, documents whose text hashes below this fraction
            form the validation split.

    Returns:
        ``CorpusSplits``.
    """
    _check_fraction(val_fraction)
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a non-empty str, got {source!r}")
    path = Path(source)
    kind = _text_source(path)
    if kind == "folder":
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.rglob("*")) if p.is_file()]
        named_splits = {}
    elif kind == "file":
        texts = [path.read_text(encoding="utf-8", errors="replace")]
        named_splits = {}
    else:
        loaded = _load_with_datasets(source)
        for split_name, split in loaded.items():
            if text_field not in split.column_names:
                raise ValueError(
                    f"{source!r} split {split_name!r} has no column {text_field!r} (columns: {split.column_names});"
                    " pass text_field="
                )
        named_splits = {name: list(loaded[name][text_field]) for name in loaded}
        texts = named_splits.pop("train", [])
    val_name = next((n for n in ("validation", "valid", "val", "test") if n in named_splits), None)
    texts = [t for t in texts if t]
    if val_name is not None:
        return CorpusSplits(train=texts, val=[t for t in named_splits[val_name] if t])
    val = [t for t in texts if _in_validation(t, val_fraction)]
    train = [t for t in texts if not _in_validation(t, val_fraction)]
    return CorpusSplits(train=train, val=val)


def load_corpus(
    source: str = "python", *, max_chars: int = 64_000_000, val_fraction: float = 0.05, text_field: str = _TEXT_FIELD
) -> CorpusSplits:
    """``"python"`` for ``python_source_corpus`` (capped at ``max_chars``), anything else for
    ``user_corpus``."""
    if source == "python":
        return python_source_corpus(val_fraction=val_fraction, max_chars=max_chars)
    return user_corpus(source, text_field=text_field, val_fraction=val_fraction)
