"""XMC metrics: hand-computed cases, brute-force cross-checks (hypothesis), input paths and bad input."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadexml_fast import metrics as M

D2 = 1 / math.log2(3)  # discount of rank 2 = 0.6309297535714575; rank 1 -> 1, rank 3 -> 1/log2(4) = 0.5


def csr(rows, L):
    """Binary CSR [len(rows), L] from a list of label lists."""
    indptr = np.cumsum([0] + [len(r) for r in rows])
    ind = np.array([i for r in rows for i in r], dtype=np.int64)
    return sp.csr_matrix((np.ones(len(ind)), ind, indptr), shape=(len(rows), L))


# A 4-document, 6-label case used by the hand-computed tests.
#   doc0: y = {0, 2}        pred [0, 1, 2]   hits [1, 0, 1]
#   doc1: y = {3}           pred [4, 3, -1]  hits [0, 1, 0]   (-1 = missing slot)
#   doc2: y = {}            pred [5, 0, 1]   hits [0, 0, 0]   (no labels: counted, contributes 0)
#   doc3: y = {1, 2, 4, 5}  pred [5, -1, 1]  hits [1, 0, 1]
TRUTH = csr([[0, 2], [3], [], [1, 2, 4, 5]], 6)
PRED = np.array([[0, 1, 2], [4, 3, -1], [5, 0, 1], [5, -1, 1]])
INV_P = np.array([2.0, 3.0, 5.0, 7.0, 11.0, 13.0])  # 1/p for labels 0..5


def test_precision_by_hand():
    # P@1 = (1+0+0+1)/(4*1) = 0.5; P@2 = (1+1+0+1)/(4*2) = 0.375; P@3 = (2+1+0+2)/(4*3) = 5/12
    np.testing.assert_allclose(M.precision_at_k(PRED, TRUTH, k=3), [0.5, 0.375, 5 / 12], rtol=1e-12)


def test_ndcg_by_hand_fewer_labels_than_k_and_missing_slots():
    # DCG/IDCG per doc, IDCG over min(k, |y|) ranks:
    #   doc0 (|y|=2): @1 1/1; @2 1/(1+D2); @3 (1+0.5)/(1+D2)          (IDCG@3 stops at 2 labels)
    #   doc1 (|y|=1): @1 0;   @2 D2/1;     @3 D2/1                    (IDCG = 1 for every k)
    #   doc2 (|y|=0): 0 everywhere, still counted in the mean (pyxclib)
    #   doc3 (|y|=4): @1 1/1; @2 1/(1+D2); @3 (1+0.5)/(1+D2+0.5)
    want = [
        (1 + 0 + 0 + 1) / 4,                                          # 0.5
        (1 / (1 + D2) + D2 + 0 + 1 / (1 + D2)) / 4,                   # 0.46430605...
        (1.5 / (1 + D2) + D2 + 0 + 1.5 / (1.5 + D2)) / 4,             # 0.5046...
    ]
    got = M.ndcg_at_k(PRED, TRUTH, k=3)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[1] == pytest.approx(0.4643060, abs=1e-7)


def test_psp_by_hand():
    # weighted hits (1/p of the hit labels):  doc0 [2, 0, 5]  doc1 [0, 7, 0]  doc2 [0, 0, 0]  doc3 [13, 0, 3]
    # best achievable (true labels' 1/p sorted desc, 0 past |y|): doc0 [5, 2, 0] doc1 [7, 0, 0] doc2 0 doc3 [13, 11, 5]
    # PSP@1 = (2+0+0+13)/(5+7+0+13) = 15/25
    # PSP@2 = (2+7+13)/(5+2+7+13+11) = 22/38
    # PSP@3 = (2+5+7+13+3)/(5+2+7+13+11+5) = 30/43          (ratio of sums over the set, as pyxclib)
    np.testing.assert_allclose(M.psprecision_at_k(PRED, TRUTH, INV_P, k=3), [15 / 25, 22 / 38, 30 / 43], rtol=1e-12)


def test_psndcg_by_hand():
    # per-doc PSDCG / IDCG (unweighted IDCG over min(k,|y|)), numerator and best-achievable denominator; the 1/n of
    # both means cancels.  IDCG@2: doc0 1+D2, doc1 1, doc3 1+D2.  IDCG@3: doc0 1+D2, doc1 1, doc3 1.5+D2.
    # @1: num 2 + 0 + 13 = 15;  den 5 + 7 + 13 = 25
    # @2: num 2/(1+D2) + 7*D2 + 13/(1+D2);   den (5+2*D2)/(1+D2) + 7 + (13+11*D2)/(1+D2)
    # @3: num (2+5*0.5)/(1+D2) + 7*D2 + (13+3*0.5)/(1.5+D2);
    #     den (5+2*D2)/(1+D2) + 7 + (13+11*D2+5*0.5)/(1.5+D2)
    want = [
        15 / 25,
        (15 / (1 + D2) + 7 * D2) / ((18 + 13 * D2) / (1 + D2) + 7),
        (4.5 / (1 + D2) + 7 * D2 + 14.5 / (1.5 + D2)) / ((5 + 2 * D2) / (1 + D2) + 7 + (15.5 + 11 * D2) / (1.5 + D2)),
    ]
    np.testing.assert_allclose(M.psndcg_at_k(PRED, TRUTH, INV_P, k=3), want, rtol=1e-12)


def test_evaluate_keys_fractions_and_percent():
    r = M.evaluate(PRED, TRUTH, INV_P, ks=(1, 3))
    assert set(r) == {"P@1", "P@3", "nDCG@1", "nDCG@3", "PSP@1", "PSP@3", "PSnDCG@1", "PSnDCG@3"}
    assert r["P@3"] == pytest.approx(5 / 12) and r["PSP@3"] == pytest.approx(30 / 43)
    rp = M.evaluate(PRED, TRUTH, INV_P, ks=(1, 3), percent=True)
    assert all(rp[key] == pytest.approx(100 * r[key]) for key in r)
    assert set(M.evaluate(PRED, TRUTH)) == {"P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5"}
    # k beyond the predicted columns: missing slots; P@5 = (2+1+0+2)/(4*5)
    assert M.evaluate(PRED, TRUTH)["P@5"] == pytest.approx(5 / 20)


def test_truth_as_csr_offsets_and_ids_and_torch_predictions():
    offsets, ids = np.array([0, 2, 3, 3, 7]), np.array([2, 0, 3, 5, 1, 4, 2])  # unsorted within rows is fine
    a = M.evaluate(PRED, TRUTH, INV_P, ks=(1, 2, 3))
    b = M.evaluate(torch.tensor(PRED), (offsets, ids), torch.tensor(INV_P), ks=(1, 2, 3))
    assert a == pytest.approx(b)


def test_inv_propensity_by_hand():
    # N = 4 documents; label 0 in all 4, label 1 in 1.  A = 0.5, B = 0:
    # C = (ln 4 - 1) * (0 + 1)^0.5 = 0.3862943611;  1/p_0 = 1 + C * 4^-0.5 = 1.1931471806;  1/p_1 = 1 + C = 1.3862943611
    y = csr([[0, 1], [0], [0], [0]], 2)
    np.testing.assert_allclose(M.compute_inv_propensity(y, A=0.5, B=0.0), [1.1931471806, 1.3862943611], rtol=1e-10)
    # defaults A = 0.55, B = 1.5; label 2 never seen (N_l = 0):
    # C = (ln 4 - 1) * 2.5^0.55;  1/p = 1 + C * (N_l + 1.5)^-0.55
    y3 = csr([[0, 1], [0], [0], [0]], 3)
    C = (math.log(4) - 1) * 2.5 ** 0.55
    want = [1 + C * 5.5 ** -0.55, 1 + C * 2.5 ** -0.55, 1 + C * 1.5 ** -0.55]
    np.testing.assert_allclose(M.compute_inv_propensity(y3), want, rtol=1e-12)
    # presets and the (offsets, ids) input
    C = (math.log(4) - 1) * 1.4 ** 0.5  # Wiki-500K: A = 0.5, B = 0.4
    got = M.compute_inv_propensity((np.array([0, 2, 3, 4, 5]), np.array([0, 1, 0, 0, 0])), preset="Wiki-500K",
                                   num_labels=3)
    np.testing.assert_allclose(got, [1 + C * 4.4 ** -0.5, 1 + C * 1.4 ** -0.5, 1 + C * 0.4 ** -0.5], rtol=1e-12)
    assert M.PROPENSITY_PRESETS["Amazon-670K"] == (0.6, 2.6)
    with pytest.raises(ValueError, match="preset"):
        M.compute_inv_propensity(y, A=0.5, preset="Wiki-500K")
    with pytest.raises(ValueError, match="preset"):
        M.compute_inv_propensity(y, preset="nope")


def brute(pred_rows, truth_rows, w, k):
    """Python-loop reference of the pyxclib definitions (see the metrics module docstring)."""
    n = len(truth_rows)
    d = [1 / math.log2(j + 2) for j in range(k)]
    P, N, PSn, PSd, PDn, PDd = ([0.0] * k for _ in range(6))
    for pr, y in zip(pred_rows, truth_rows):
        pr = (list(pr) + [-1] * k)[:k]
        best = sorted((w[l] for l in y), reverse=True)
        for kk in range(1, k + 1):
            idcg = sum(d[: max(1, min(kk, len(y)))])
            hits = [j for j in range(kk) if pr[j] >= 0 and pr[j] in y]
            P[kk - 1] += len(hits) / kk / n
            N[kk - 1] += sum(d[j] for j in hits) / idcg / n
            PSn[kk - 1] += sum(w[pr[j]] for j in hits)
            PSd[kk - 1] += sum(best[:kk])
            PDn[kk - 1] += sum(w[pr[j]] * d[j] for j in hits) / idcg
            PDd[kk - 1] += sum(b * d[j] for j, b in enumerate(best[:kk])) / idcg
    div = lambda a, b: [x / y if y > 0 else 0.0 for x, y in zip(a, b)]  # noqa: E731
    return P, N, div(PSn, PSd), div(PDn, PDd)


@st.composite
def problems(draw):
    n, L, K = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    truth = [sorted(draw(st.sets(st.integers(0, L - 1), max_size=L))) for _ in range(n)]
    preds = []
    for _ in range(n):
        row = draw(st.permutations(list(range(L))))[: min(K, L)]
        row = [-1 if draw(st.booleans()) and draw(st.booleans()) else x for x in row]  # some missing slots
        preds.append(row + [-1] * (K - len(row)))
    w = draw(st.lists(st.floats(1.0, 50.0), min_size=L, max_size=L))
    return np.array(preds, dtype=np.int64).reshape(n, K), truth, np.array(w), L, draw(st.integers(1, 7))


@settings(max_examples=120, deadline=None)
@given(problems())
def test_all_metrics_match_python_loop_bruteforce(prob):
    pred, truth_rows, w, L, k = prob
    truth = csr(truth_rows, L)
    P, N, PSP, PSN = brute(pred.tolist(), [set(r) for r in truth_rows], w, k)
    np.testing.assert_allclose(M.psprecision_at_k(pred, truth, w, k=k), PSP, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(M.psndcg_at_k(pred, truth, w, k=k), PSN, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(M.precision_at_k(pred, truth, k=k), P, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(M.ndcg_at_k(pred, truth, k=k), N, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_score_matrix_path_equals_topk_ids_path(n, L, k, seed):
    rng = np.random.default_rng(seed)
    scores = sp.random(n, L, density=0.5, format="csr", random_state=rng)
    scores.data = rng.integers(-2, 3, scores.nnz).astype(np.float32)  # many ties, zeros and negatives stored
    # brute-force top-k: stored entries, higher score first, ties to the lower id, -1 padding
    want = np.full((n, k), -1)
    for i in range(n):
        row = scores.getrow(i)
        order = sorted(zip(row.indices.tolist(), row.data.tolist()), key=lambda t: (-t[1], t[0]))[:k]
        want[i, : len(order)] = [c for c, _ in order]
    np.testing.assert_array_equal(M.topk_from_scores(scores, k), want)
    truth = sp.random(n, L, density=0.3, format="csr", random_state=rng)
    w = rng.uniform(1, 5, L)
    assert M.evaluate(scores, truth, w, ks=range(1, k + 1)) == M.evaluate(want, truth, w, ks=range(1, k + 1))


def test_never_densifies_huge_label_space():
    L = 10**9  # a dense [n, L] float64 matrix would need 16 GB
    truth = sp.csr_matrix((np.ones(3), [5, 999_999_999, 7], [0, 2, 3]), shape=(2, L))
    scores = sp.csr_matrix(([0.9, 0.1, 0.3], [999_999_999, 5, 8], [0, 2, 3]), shape=(2, L))
    r = M.evaluate(scores, truth, ks=(1, 2))
    # doc0 top-2 = [999999999 (hit), 5 (hit)]; doc1 top-1 = [8] (miss), slot 2 missing
    assert r["P@1"] == 0.5 and r["P@2"] == 0.5


def test_bad_input_raises_clear_value_error():
    with pytest.raises(ValueError, match="predictions has 3 rows but truth has 4 rows"):
        M.precision_at_k(PRED[:3], TRUTH)
    bad = PRED.copy()
    bad[2, 1] = 6
    with pytest.raises(ValueError, match=r"predictions\[2, 1\] = 6 is out of range \[-1, 6\)"):
        M.evaluate(bad, TRUTH)
    bad[2, 1] = -3
    with pytest.raises(ValueError, match=r"predictions\[2, 1\] = -3"):
        M.ndcg_at_k(bad, TRUTH)
    with pytest.raises(ValueError, match=r"predictions: row 0 repeats a label id \(1\)"):
        M.precision_at_k(np.array([[1, 1, 0]] + [[0, 1, 2]] * 3), TRUTH)
    with pytest.raises(ValueError, match="predictions: expected integer"):
        M.precision_at_k(PRED.astype(np.float32), TRUTH)
    with pytest.raises(ValueError, match="predictions has 5 columns but truth has 6 labels"):
        M.precision_at_k(sp.csr_matrix((4, 5)), TRUTH)
    with pytest.raises(ValueError, match="inv_propensity has 5 entries but truth has 6 labels"):
        M.psprecision_at_k(PRED, TRUTH, INV_P[:5])
    with pytest.raises(ValueError, match=r"truth ids: label id 9 is out of range \[0, 6\)"):
        M.evaluate(PRED, (np.array([0, 1, 1, 1, 2]), np.array([0, 9])), num_labels=6)
    with pytest.raises(ValueError, match="truth offsets"):
        M.evaluate(PRED, (np.array([0, 1, 1, 3, 2]), np.array([0, 1])))
    with pytest.raises(ValueError, match="truth: expected a scipy.sparse"):
        M.evaluate(PRED, np.zeros((4, 6)))
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        M.precision_at_k(PRED, TRUTH, k=0)
    with pytest.raises(ValueError, match="scores: contains NaN"):
        M.topk_from_scores(sp.csr_matrix(np.array([[np.nan, 1.0]])), 1)
