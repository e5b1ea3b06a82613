"""LabelTree: building (balanced spherical k-means), structure, ids, persistence, validation, PIFA, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascadexml_fast import LabelTree
from cascadexml_fast import _kmeans
from cascadexml_fast.__main__ import main as cli_main
from cascadexml_fast.tree import pecos_level_sizes, pifa

REPO = Path(__file__).resolve().parent.parent


def blobs(num_blobs=8, per_blob=250, dim=32, spread=0.3, seed=0, dtype=torch.float32):
    """Well-separated Gaussian blobs (directions far apart); returns features and the blob of each label."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_blobs, dim, generator=g), dim=1)
    lab = torch.randperm(num_blobs * per_blob, generator=g) % num_blobs
    x = centers[lab] + spread / dim ** 0.5 * torch.randn(num_blobs * per_blob, dim, generator=g)
    return x.to(dtype), lab


def sparse_blobs(num_blobs=8, per_blob=100, vocab_per_blob=40, nnz=12, seed=0):
    """Sparse rows whose features come from a blob-specific vocabulary slice (TF-IDF-like, non-negative)."""
    rng = np.random.default_rng(seed)
    L = num_blobs * per_blob
    lab = rng.permutation(L) % num_blobs
    cols = lab[:, None] * vocab_per_blob + rng.integers(0, vocab_per_blob, size=(L, nnz))
    vals = rng.random((L, nnz)).astype(np.float32) + 0.1
    X = sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, L * nnz + 1, nnz)),
                      shape=(L, num_blobs * vocab_per_blob + 50))
    X.sum_duplicates()
    return X, torch.from_numpy(lab)


def groups_of_level(tree, level):
    """Original label ids grouped by node of ``level``."""
    o = tree.label_offsets(level)
    return [set(tree.perm[o[c]:o[c + 1]].tolist()) for c in range(o.numel() - 1)]


def assert_recovers(tree, lab, level):
    groups = groups_of_level(tree, level)
    truth = {}
    for i, b in enumerate(lab.tolist()):
        truth.setdefault(b, set()).add(i)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, truth.values()))


def check_structure(tree, num_labels, sizes):
    tree.validate()
    assert tree.num_labels == num_labels
    assert tree.level_sizes == tuple(sizes)
    assert sorted(tree.perm.tolist()) == list(range(num_labels))
    assert torch.equal(tree.perm[tree.inv_perm], torch.arange(num_labels))
    for j, o in enumerate(tree.offsets):
        assert o.dtype == torch.int64 and o.numel() == sizes[j] + 1
        # children counts of a level: floor or ceil of the ratio (Bresenham layout)
        nxt = sizes[j + 1] if j + 1 < len(sizes) else num_labels
        cnt = (o[1:] - o[:-1]).tolist()
        assert set(cnt) <= {nxt // sizes[j], -(-nxt // sizes[j])}
    # contiguity: every node's label range is exactly the union of its children's ranges
    for j in range(len(sizes) - 1):
        up, down = tree.label_offsets(j), tree.label_offsets(j + 1)
        assert torch.equal(up, down[tree.offsets[j]])
    if sizes:
        leaf = tree.label_offsets(len(sizes) - 1)
        n = (leaf[1:] - leaf[:-1]).tolist()
        assert set(n) <= {num_labels // sizes[-1], -(-num_labels // sizes[-1])}


# ----------------------------------------------------------------------------------------------------------
# quality


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_planted_blobs_recovered(dtype):
    x, lab = blobs(dtype=dtype)
    tree = LabelTree.build(x, level_sizes=(2, 8, 64), seed=3)
    check_structure(tree, x.shape[0], (2, 8, 64))
    assert_recovers(tree, lab, level=1)
    # the leaf level refines the blobs: every leaf cluster is pure
    for g in groups_of_level(tree, 2):
        assert len({int(lab[i]) for i in g}) == 1


def test_planted_blobs_numpy_and_power_of_two_snapshots():
    x, lab = blobs(num_blobs=16, per_blob=64, dim=48)
    tree = LabelTree.build(x.numpy(), level_sizes=(16,), seed=0)
    assert_recovers(tree, lab, level=0)


def test_planted_sparse_blobs_recovered():
    X, lab = sparse_blobs()
    tree = LabelTree.build(X, level_sizes=(4, 8), seed=1)
    check_structure(tree, X.shape[0], (4, 8))
    assert_recovers(tree, lab, level=1)
    assert tree.meta["sparse"] is True


def test_sparse_and_dense_agree_on_the_same_features():
    X, lab = sparse_blobs(per_blob=40, seed=2)
    a = LabelTree.build(X, level_sizes=(8,), seed=5)
    b = LabelTree.build(X.toarray(), level_sizes=(8,), seed=5)
    assert groups_of_level(a, 0) == groups_of_level(b, 0)


def test_torch_sparse_input():
    X, lab = sparse_blobs(per_blob=30)
    coo = X.tocoo()
    t = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, X.shape, check_invariants=True)
    tree = LabelTree.build(t, level_sizes=(8,), seed=0)
    assert_recovers(tree, lab, level=0)


# ----------------------------------------------------------------------------------------------------------
# balance and structure (hypothesis)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(L=st.integers(1, 300), data=st.data())
def test_schedule_balance_and_refinement(L, data):
    d = data.draw(st.integers(1, 4))
    sizes = sorted(data.draw(st.lists(st.integers(1, L), min_size=d, max_size=d)))
    rounds = _kmeans.plan(L, sizes)
    pow2 = all((k & (k - 1)) == 0 for k in sizes)
    for p0, pm, p1 in rounds:
        assert (pm > p0).all() and (p1 > pm).all()
        if pow2:  # every binary split is into halves differing by at most one label
            assert (np.abs((pm - p0) - (p1 - pm)) <= 1).all()
    # the final leaf boundaries are the leaf level's offsets
    if rounds:
        cuts = np.unique(np.concatenate([np.concatenate([p0, pm, p1]) for p0, pm, p1 in rounds]))
        leaf_starts = _kmeans.level_offsets(L, sizes)[-1]
        # composed positions of the last level
        assert set(cuts.tolist()) <= set(np.unique(leaf_starts).tolist()) | {0, L}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(L=st.integers(2, 200), data=st.data())
def test_built_tree_is_balanced_and_contiguous(L, data):
    d = data.draw(st.integers(1, 3))
    sizes = tuple(sorted(data.draw(st.lists(st.integers(1, L), min_size=d, max_size=d))))
    seed = data.draw(st.integers(0, 2**31))
    x = torch.randn(L, 8, generator=torch.Generator().manual_seed(seed % 1000))
    tree = LabelTree.build(x, level_sizes=sizes, seed=seed)
    check_structure(tree, L, sizes)


def test_power_of_two_levels_halve_every_node():
    L = 1000
    tree = LabelTree.build(torch.randn(L, 16), level_sizes=(4, 32, 128), seed=0)
    check_structure(tree, L, (4, 32, 128))
    for j, k in enumerate((4, 32, 128)):
        n = tree.label_offsets(j).diff()
        assert set(n.tolist()) <= {L // k, -(-L // k)}  # labels per node: floor or ceil of L / k
    assert (tree.offsets[0].diff() == 8).all() and (tree.offsets[1].diff() == 4).all()


def test_non_power_of_two_levels():
    L = 997
    tree = LabelTree.build(torch.randn(L, 16), level_sizes=(3, 10, 77), seed=0)
    check_structure(tree, L, (3, 10, 77))


def test_max_leaf_size_pecos_sizes():
    assert pecos_level_sizes(670091, 100, 16) == (2, 32, 512, 8192)
    assert pecos_level_sizes(670091, 100, 32) == (8, 256, 8192)
    assert pecos_level_sizes(2812281, 100, 32) == (32, 1024, 32768)
    assert pecos_level_sizes(50, 100, 16) == (1,)
    assert pecos_level_sizes(101, 100, 16) == (2,)
    x = torch.randn(3000, 8)
    tree = LabelTree.build(x, max_leaf_size=100, branching=4, seed=0)
    assert tree.level_sizes == (2, 8, 32)
    assert int(tree.label_offsets(2).diff().max()) <= 100
    assert tree.meta["max_leaf_size"] == 100


def test_flat_trees():
    x = torch.randn(10, 4)
    t = LabelTree.build(x, level_sizes=())
    assert t.num_levels == 0 and torch.equal(t.perm, torch.arange(10))
    assert LabelTree.flat(10) == t
    one = LabelTree.build(x, level_sizes=(1,))
    assert one.offsets[0].tolist() == [0, 10]
    singletons = LabelTree.build(x, level_sizes=(2, 10))
    check_structure(singletons, 10, (2, 10))


# ----------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_tree_different_seed_different_tree():
    x = torch.randn(2000, 24, generator=torch.Generator().manual_seed(1))
    a = LabelTree.build(x, level_sizes=(8, 64), seed=7)
    b = LabelTree.build(x.clone(), level_sizes=(8, 64), seed=7)
    c = LabelTree.build(x, level_sizes=(8, 64), seed=8)
    assert a == b
    assert a != c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_independent_of_thread_count(dtype):
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = LabelTree.build(x, level_sizes=(16, 128), seed=0)
        torch.set_num_threads(max(2, old))
        b = LabelTree.build(x, level_sizes=(16, 128), seed=0)
    finally:
        torch.set_num_threads(old)
    assert a == b


def test_sparse_deterministic():
    X, _ = sparse_blobs(per_blob=50, seed=4)
    assert LabelTree.build(X, level_sizes=(4, 16), seed=2) == LabelTree.build(X.copy(), level_sizes=(4, 16), seed=2)


# ----------------------------------------------------------------------------------------------------------
# ids


def test_id_conversion_round_trip_and_pads():
    tree = LabelTree.build(torch.randn(50, 4), level_sizes=(4,), seed=0)
    ids = torch.tensor([[3, 17, -1], [49, 0, -1]])
    t = tree.to_tree_ids(ids)
    assert t.dtype == ids.dtype and t.shape == ids.shape
    assert (t[:, 2] == -1).all()
    assert torch.equal(tree.to_label_ids(t), ids)
    assert torch.equal(tree.perm[tree.to_tree_ids(torch.arange(50))], torch.arange(50))
    t32 = tree.to_tree_ids(ids.to(torch.int32))
    assert t32.dtype == torch.int32
    n = tree.to_tree_ids(np.array([5, -1]))
    assert isinstance(n, np.ndarray) and n[1] == -1 and tree.to_label_ids(n)[0] == 5
    assert tree.to_tree_ids([1, 2]).tolist() == tree.inv_perm[[1, 2]].tolist()
    assert torch.equal(tree.to_tree_ids(ids, validate=False), t)


@pytest.mark.parametrize("bad", [[50], [-2], [0, 100]])
def test_id_conversion_rejects_out_of_range(bad):
    tree = LabelTree.build(torch.randn(50, 4), level_sizes=(4,), seed=0)
    with pytest.raises(ValueError, match="label_ids out of range"):
        tree.to_tree_ids(torch.tensor(bad))
    with pytest.raises(ValueError, match="tree_ids out of range"):
        tree.to_label_ids(np.array(bad))
    with pytest.raises(ValueError, match="integer"):
        tree.to_tree_ids(torch.tensor([1.0]))


# ----------------------------------------------------------------------------------------------------------
# persistence and validation


def test_save_load_round_trip(tmp_path):
    tree = LabelTree.build(torch.randn(300, 8), level_sizes=(4, 16), seed=0)
    tree.save(tmp_path / "t")
    back = LabelTree.load(tmp_path / "t")
    assert back == tree
    assert back.meta["seed"] == 0
    head = json.loads((tmp_path / "t" / "tree.json").read_text())
    assert head["format"] == "cascadexml_fast.LabelTree" and head["version"] == 1
    flat = LabelTree.flat(7)
    flat.save(tmp_path / "f")
    assert LabelTree.load(tmp_path / "f") == flat


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        LabelTree.load(tmp_path / "missing")
    tree = LabelTree.build(torch.randn(30, 4), level_sizes=(3,), seed=0)
    d = tree.save(tmp_path / "t")
    head = json.loads((d / "tree.json").read_text())
    head["version"] = 99
    (d / "tree.json").write_text(json.dumps(head))
    with pytest.raises(ValueError, match="version"):
        LabelTree.load(d)
    head["version"], head["format"] = 1, "other"
    (d / "tree.json").write_text(json.dumps(head))
    with pytest.raises(ValueError, match="format"):
        LabelTree.load(d)
    head["format"], head["num_labels"] = "cascadexml_fast.LabelTree", 31
    (d / "tree.json").write_text(json.dumps(head))
    with pytest.raises(ValueError, match="31 labels"):
        LabelTree.load(d)


@pytest.mark.parametrize("offsets,perm,match", [
    ([[0, 3, 2, 5]], range(5), "non-decreasing"),
    ([[0, 2, 4]], range(5), "must end at 5"),
    ([[1, 3, 5]], range(5), "start at 0"),
    ([[0, 2, 2, 5]], range(5), "no children"),
    ([[0, 5]], [0, 1, 2, 3, 3], "appears more than once"),
    ([[0, 5]], [0, 1, 2, 3, 7], "out of range"),
    ([[0, 1, 2], [0, 2, 4]], range(5), "must end at 5"),
    ([[0, 1, 2], [0, 2, 4, 5]], range(5), "must end at 3"),
    ([[0]], range(5), "at least 2 entries"),
])
def test_validation_rejects_malformed_trees(offsets, perm, match):
    with pytest.raises(ValueError, match=match):
        LabelTree([np.array(o, dtype=np.int64) for o in offsets], np.array(list(perm)))


def test_validate_catches_later_corruption():
    tree = LabelTree.build(torch.randn(40, 4), level_sizes=(4,), seed=0)
    tree.offsets[0][2] = 100
    with pytest.raises(ValueError, match="offsets\\[0\\]"):
        tree.validate()


def test_from_assignments_and_variable_size_clusters():
    # LightXML-style clusters of different sizes
    clusters = [[4, 0], [1, 2, 3, 7], [6], [5, 8, 9]]
    tree = LabelTree.from_clusters(clusters)
    assert tree.level_sizes == (4,)
    assert tree.offsets[0].tolist() == [0, 2, 6, 7, 10]
    assert [sorted(g) for g in groups_of_level(tree, 0)] == [[0, 4], [1, 2, 3, 7], [6], [5, 8, 9]]
    # two nested levels
    top = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    leaf = np.array([0, 1, 1, 2, 3, 3, 2, 0])
    t2 = LabelTree.from_assignments([top, leaf])
    check = [sorted(g) for g in groups_of_level(t2, 1)]
    assert check == [[0, 7], [1, 2], [3, 6], [4, 5]]
    assert t2.offsets[0].tolist() == [0, 2, 4]
    # three levels with ids that do not follow tree order
    l0 = np.array([1, 1, 0, 0, 1, 0])
    l1 = np.array([0, 2, 1, 1, 0, 3])
    l2 = np.array([4, 0, 2, 3, 1, 5])
    t3 = LabelTree.from_assignments([l0, l1, l2])
    assert t3.level_sizes == (2, 4, 6)
    # tree order (l0, l1, l2): label 2 (0,1,2), 3 (0,1,3), 5 (0,3,5), 4 (1,0,1), 0 (1,0,4), 1 (1,2,0)
    assert t3.perm.tolist() == [2, 3, 5, 4, 0, 1]
    assert t3.offsets[0].tolist() == [0, 2, 4] and t3.offsets[1].tolist() == [0, 2, 3, 5, 6]
    assert [sorted(g) for g in groups_of_level(t3, 1)] == [[2, 3], [5], [0, 4], [1]]
    assert [sorted(g) for g in groups_of_level(t3, 0)] == [[2, 3, 5], [0, 1, 4]]
    with pytest.raises(ValueError, match="nest"):
        LabelTree.from_assignments([np.array([0, 1, 0]), np.array([0, 0, 1])])
    with pytest.raises(ValueError, match="partition"):
        LabelTree.from_clusters([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="holds no label"):
        LabelTree.from_assignments([np.array([0, 2, 2])])


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_zero_feature_rows_are_placed():
    x, lab = blobs(num_blobs=4, per_blob=100)
    x[::10] = 0  # labels without positive documents
    tree = LabelTree.build(x, level_sizes=(4, 16), seed=0)
    check_structure(tree, x.shape[0], (4, 16))
    assert tree.meta["zero_rows"] == 40
    X = sp.csr_matrix(x.numpy())
    ts = LabelTree.build(X, level_sizes=(4, 16), seed=0)
    check_structure(ts, x.shape[0], (4, 16))
    assert ts.meta["zero_rows"] == 40
    # all-zero features: still a valid, balanced tree
    z = LabelTree.build(torch.zeros(37, 5), level_sizes=(2, 4), seed=0)
    check_structure(z, 37, (2, 4))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_features_rejected(value):
    x = torch.randn(20, 4)
    x[7, 2] = value
    with pytest.raises(ValueError, match="NaN or inf.*row 7"):
        LabelTree.build(x, level_sizes=(2,))
    with pytest.raises(ValueError, match="NaN or inf.*row 7"):
        LabelTree.build(x.half(), level_sizes=(2,))
    with pytest.raises(ValueError, match="NaN or inf.*row 7"):
        LabelTree.build(sp.csr_matrix(x.numpy()), level_sizes=(2,))


def test_huge_finite_values_are_fine():
    x = torch.randn(20, 4, dtype=torch.float64) * 1e200
    tree = LabelTree.build(x, level_sizes=(2,))
    check_structure(tree, 20, (2,))


@pytest.mark.parametrize("kwargs,match", [
    (dict(level_sizes=(4, 8, 64)), "only 50 labels"),
    (dict(level_sizes=(8, 4)), "non-decreasing"),
    (dict(level_sizes=(0, 4)), "positive integers"),
    (dict(level_sizes=(2.5,)), "positive integers"),
    (dict(level_sizes=5), "sequence"),
    (dict(), "exactly one of"),
    (dict(level_sizes=(2,), max_leaf_size=10), "exactly one of"),
    (dict(max_leaf_size=0), "max_leaf_size"),
    (dict(max_leaf_size=10, branching=1), "branching"),
    (dict(level_sizes=(2,), seed=-1), "seed"),
    (dict(level_sizes=(2,), max_iter=0), "max_iter"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelTree.build(torch.randn(50, 4), **kwargs)


def test_bad_feature_containers():
    with pytest.raises(ValueError, match="2-D"):
        LabelTree.build(torch.randn(50), level_sizes=(2,))
    with pytest.raises(ValueError, match="floating point"):
        LabelTree.build(torch.ones(5, 3, dtype=torch.int64), level_sizes=(2,))
    with pytest.raises(ValueError, match="floating point"):
        LabelTree.build(np.ones((5, 3), dtype=np.int32), level_sizes=(2,))
    with pytest.raises(ValueError, match="numpy array"):
        LabelTree.build([[1.0, 2.0]], level_sizes=(1,))
    with pytest.raises(ValueError, match="at least one label"):
        LabelTree.build(torch.zeros(0, 3), level_sizes=())


# ----------------------------------------------------------------------------------------------------------
# PIFA


def _dense_pifa(X, Y):
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
    Z = Y.T @ Xn
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-30)


def test_pifa_matches_dense_numpy():
    rng = np.random.default_rng(0)
    X = rng.random((30, 12)) * (rng.random((30, 12)) < 0.4)
    Y = (rng.random((30, 9)) < 0.2).astype(np.float32)
    Y[:, 4] = 0  # a label without positive documents
    ref = _dense_pifa(X, Y)
    Zs = pifa(sp.csr_matrix(X), sp.csr_matrix(Y))
    assert sp.issparse(Zs) and Zs.dtype == np.float32
    np.testing.assert_allclose(Zs.toarray(), ref, rtol=1e-5, atol=1e-6)
    assert Zs[4].nnz == 0
    Zd = pifa(X, sp.csr_matrix(Y))  # dense document features (embeddings)
    assert isinstance(Zd, np.ndarray)
    np.testing.assert_allclose(Zd, ref, rtol=1e-5, atol=1e-6)
    lists = [np.flatnonzero(r).tolist() for r in Y]
    np.testing.assert_allclose(pifa(sp.csr_matrix(X), lists, num_labels=9).toarray(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pifa(torch.from_numpy(X), sp.csr_matrix(Y)), ref, rtol=1e-5, atol=1e-6)


def test_pifa_top_k_and_graph():
    rng = np.random.default_rng(1)
    X = rng.random((40, 20)) * (rng.random((40, 20)) < 0.5)
    Y = (rng.random((40, 6)) < 0.3).astype(np.float32)
    Z = pifa(sp.csr_matrix(X), sp.csr_matrix(Y), top_k=3)
    assert np.diff(Z.indptr).max() <= 3
    raw = Y.T @ (X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30))
    for i in range(6):  # the kept entries are the 3 largest of each row
        kept = set(Z[i].indices.tolist())
        assert kept == set(np.argsort(-raw[i], kind="stable")[:3].tolist()) or len(kept) < 3
    # co-occurrence smoothing against a dense computation (graph_top_k large: no pruning)
    P = _dense_pifa(X, Y)
    C = Y.T @ Y
    np.fill_diagonal(C, 0)
    G = C + np.eye(6)
    G = G / G.sum(1, keepdims=True)
    ref = G @ P
    ref /= np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-30)
    Zg = pifa(sp.csr_matrix(X), sp.csr_matrix(Y), graph="cooccurrence", graph_top_k=100)
    np.testing.assert_allclose(Zg.toarray(), ref, rtol=1e-5, atol=1e-6)
    Zu = pifa(sp.csr_matrix(X), sp.csr_matrix(Y), graph=sp.csr_matrix(G))
    np.testing.assert_allclose(Zu.toarray(), ref, rtol=1e-5, atol=1e-6)


def test_pifa_bad_labels():
    X = sp.csr_matrix(np.eye(3, 4, dtype=np.float32))
    dup = sp.csr_matrix((np.ones(3, np.float32), np.array([1, 1, 0]), np.array([0, 2, 3, 3])), shape=(3, 4))
    with pytest.raises(ValueError, match="twice in document 0"):
        pifa(X, dup)
    with pytest.raises(ValueError, match="label id 7 in document 1"):
        pifa(X, [[0], [7], []], num_labels=4)
    with pytest.raises(ValueError, match="label id -1"):
        pifa(X, [[0], [-1], []], num_labels=4)
    with pytest.raises(ValueError, match="twice"):
        pifa(X, [[0, 0], [1], []], num_labels=4)
    oob = sp.csr_matrix((np.ones(1, np.float32), np.array([9]), np.array([0, 1, 1, 1])), shape=(3, 4))
    with pytest.raises(ValueError, match="outside"):
        pifa(X, oob)
    with pytest.raises(ValueError, match="rows but X has 3"):
        pifa(X, sp.csr_matrix((2, 4)))
    with pytest.raises(ValueError, match="num_labels"):
        pifa(X, [[0], [1], []])
    with pytest.raises(ValueError, match="NaN"):
        pifa(sp.csr_matrix(np.array([[np.nan, 1.0]])), [[0]], num_labels=1)


def test_pifa_then_build_recovers_label_groups():
    # documents of 4 topics; labels belong to one topic each; PIFA + tree separates the topics
    rng = np.random.default_rng(3)
    n_docs, L, vocab = 800, 64, 200
    topic_of_label = np.arange(L) % 4
    doc_topic = rng.integers(0, 4, n_docs)
    cols = doc_topic[:, None] * 50 + rng.integers(0, 50, (n_docs, 10))
    X = sp.csr_matrix((rng.random(n_docs * 10) + 0.1, cols.ravel(), np.arange(0, n_docs * 10 + 1, 10)),
                      shape=(n_docs, vocab))
    labels = [rng.choice(np.flatnonzero(topic_of_label == t), 3, replace=False).tolist() for t in doc_topic]
    Z = pifa(X, labels, num_labels=L)
    tree = LabelTree.build(Z, level_sizes=(4,), seed=0)
    assert_recovers(tree, torch.from_numpy(topic_of_label), level=0)


# ----------------------------------------------------------------------------------------------------------
# CLI


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cascadexml_fast", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_build_tree_dense_sparse_and_pifa(tmp_path):
    x, lab = blobs(num_blobs=4, per_blob=30, dim=8)
    np.save(tmp_path / "f.npy", x.numpy())
    r = _cli("build-tree", "--features", str(tmp_path / "f.npy"), "--level-sizes", "2,4", "--out",
             str(tmp_path / "t1"))
    assert r.returncode == 0, r.stderr
    assert "round" in r.stderr  # progress shown
    t1 = LabelTree.load(tmp_path / "t1")
    assert t1.level_sizes == (2, 4)
    assert t1 == LabelTree.build(x, level_sizes=(2, 4), seed=0)

    # the other inputs in-process (same entry point, no interpreter start-up)
    sp.save_npz(tmp_path / "f.npz", sp.csr_matrix(x.numpy().clip(0)))
    assert cli_main(["build-tree", "--features", str(tmp_path / "f.npz"), "--max-leaf-size", "20", "--branching",
                     "4", "--no-progress", "--out", str(tmp_path / "t2")]) == 0
    assert LabelTree.load(tmp_path / "t2").level_sizes == (2, 8)

    rng = np.random.default_rng(0)
    Xd = sp.random(50, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    Y = sp.csr_matrix((rng.random((50, 12)) < 0.2).astype(np.float32))
    sp.save_npz(tmp_path / "X.npz", Xd)
    sp.save_npz(tmp_path / "Y.npz", Y)
    assert cli_main(["build-tree", "--tfidf", str(tmp_path / "X.npz"), "--labels", str(tmp_path / "Y.npz"),
                     "--level-sizes", "3", "--top-k", "5", "--graph", "cooccurrence", "--no-progress",
                     "--out", str(tmp_path / "t3")]) == 0
    t3 = LabelTree.load(tmp_path / "t3")
    assert t3.num_labels == 12 and t3.level_sizes == (3,)


@pytest.mark.parametrize("args,match", [
    (["--level-sizes", "8"], "only 5 labels"),
    ([], "exactly one of"),
    (["--level-sizes", "2,x"], "comma-separated"),
])
def test_cli_errors(tmp_path, args, match):
    np.save(tmp_path / "f.npy", np.ones((5, 3), np.float32))
    with pytest.raises(SystemExit, match=match):
        cli_main(["build-tree", "--features", str(tmp_path / "f.npy"), *args, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--labels"):
        cli_main(["build-tree", "--tfidf", str(tmp_path / "f.npy"), "--level-sizes", "2", "--out",
                  str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=".npy"):
        cli_main(["build-tree", "--features", str(tmp_path / "f.txt"), "--level-sizes", "2", "--out",
                  str(tmp_path / "o")])


def test_cli_info_still_works():
    r = _cli("info")
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------------------
# heavier


@pytest.mark.slow
def test_planted_blobs_at_scale():
    x, lab = blobs(num_blobs=256, per_blob=400, dim=64, spread=0.2, dtype=torch.float16)
    tree = LabelTree.build(x, level_sizes=(16, 256, 4096), seed=0)
    check_structure(tree, x.shape[0], (16, 256, 4096))
    # 2-means can cut a blob when both start centres fall in one; most of the 256 blobs come out whole
    nol, blob = tree.node_of_label(1), lab[tree.perm]
    agree = sum(int(torch.bincount(blob[nol == c]).max()) for c in range(256))
    assert agree / x.shape[0] > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features():
    x, lab = blobs(dtype=torch.float16)
    tree = LabelTree.build(x.cuda(), level_sizes=(2, 8), seed=0)
    check_structure(tree, x.shape[0], (2, 8))
    assert_recovers(tree, lab, level=1)
