"""Extreme multi-label ranking metrics: P@k, nDCG@k, PSP@k, PSnDCG@k, and Jain et al. inverse propensities.

Every metric returns the values for all k = 1..K at once (index ``k - 1``), as pyxclib's ``xc_metrics`` does, and
computes them with vectorised numpy/scipy on sparse label matrices: no ``[n, L]`` matrix is ever densified and there
is no Python loop over documents.

Inputs
------
``predictions``
    * top-k label ids per document: an integer ``numpy`` array or ``torch`` tensor ``[n, K]``, best first, ``-1``
      for a missing slot (contributes nothing). A row must not repeat an id. Fewer than the requested k columns are
      padded with ``-1``; more are truncated.
    * or a ``scipy.sparse`` score matrix ``[n, L]``: the top k *stored* entries of each row are taken (higher score
      first, ties to the lower label id; explicit zeros and negative scores are stored entries too); rows with fewer
      than k stored entries get ``-1`` slots. NaN scores raise ``ValueError``.
``truth``
    * a ``scipy.sparse`` ``[n, L]`` label matrix: every stored non-zero is a positive label (values are binarised;
      duplicates count once);
    * or a pair ``(offsets, ids)`` in CSR form (``offsets`` of length ``n + 1``, ``ids`` the label ids of document
      ``i`` at ``ids[offsets[i]:offsets[i + 1]]``); ``L`` is then ``num_labels``, else the length of
      ``inv_propensity``, else one more than the largest id seen.

Definitions (pyxclib ``xc_metrics``, the convention of the XMC repository)
--------------------------------------------------------------------------
With ``y_i`` the label set of document ``i``, ``r_i1..r_ik`` its ranked predictions, ``w_l = 1 / p_l`` the inverse
propensities, ``D(j) = 1 / log2(j + 1)`` and ``IDCG_i(k) = sum_{j <= min(k, |y_i|)} D(j)``:

* ``P@k      = mean_i [ (1/k) sum_{j<=k} [r_ij in y_i] ]``
* ``nDCG@k   = mean_i [ sum_{j<=k} [r_ij in y_i] D(j) / IDCG_i(k) ]``
* ``PSP@k    = sum_i sum_{j<=k} [r_ij in y_i] w_{r_ij}  /  sum_i sum_{j<=min(k,|y_i|)} w*_ij``
* ``PSnDCG@k = mean_i [ sum_{j<=k} [r_ij in y_i] w_{r_ij} D(j) / IDCG_i(k) ]
  / mean_i [ sum_{j<=min(k,|y_i|)} w*_ij D(j) / IDCG_i(k) ]``

where ``w*_i1 >= w*_i2 >= ...`` are the inverse propensities of the true labels of document ``i`` in decreasing
order, i.e. the best achievable propensity-weighted ranking. The propensity-scored metrics are therefore normalised
*over the whole evaluated set* (a ratio of sums / of means, exactly pyxclib's ``psprecision`` and ``psndcg``, and the
ratio of sums CascadeXML accumulates), not averaged per document; this is why PSP@k < P@k is normal. Note that
PSnDCG's per-document terms are divided by the *unweighted* ``IDCG_i(k)`` before the ratio, as in pyxclib.

Documents without labels are kept, as in pyxclib: they count in every mean (denominator ``n``) and contribute 0 to
P@k, nDCG@k and both numerator and denominator of the PS metrics. If the PS denominator is 0 (no labels anywhere)
the PS metric is reported as 0.0 (pyxclib would give NaN).

Values are fractions in [0, 1] (as pyxclib); ``evaluate(..., percent=True)`` reports percentages (as papers do).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import scipy.sparse as sp

__all__ = [
    "PROPENSITY_PRESETS",
    "compute_inv_propensity",
    "evaluate",
    "ndcg_at_k",
    "precision_at_k",
    "psndcg_at_k",
    "psprecision_at_k",
    "topk_from_scores",
]

#: (A, B) of Jain et al.'s propensity model per benchmark, the XMC-repository convention used by the CascadeXML code
#: (spec section 1.4). "Eurlex-4K" follows the XMC-repository convention (0.55, 1.5); the CascadeXML code uses
#: (0.6, 2.6) under a key "Eurlex" that does not match its folder name.
PROPENSITY_PRESETS: Dict[str, Tuple[float, float]] = {
    "Amazon-670K": (0.6, 2.6),
    "Amazon-3M": (0.6, 2.6),
    "LF-Amazon-131K": (0.6, 2.6),
    "Wiki-500K": (0.5, 0.4),
    "AmazonCat-13K": (0.55, 1.5),
    "Wiki10-31K": (0.55, 1.5),
    "Eurlex-4K": (0.55, 1.5),
}


# ----------------------------------------------------------------------------------------------------------- input
def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic objects
        raise ValueError(f"{name}: cannot be converted to an array ({e})") from None


def _truth_csr(truth, num_labels: Optional[int], name: str = "truth") -> sp.csr_matrix:
    """Canonical binary CSR (sorted, deduplicated indices, data all ones, int64 index arrays)."""
    if sp.issparse(truth):
        if truth.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D sparse matrix, got {truth.ndim}-D")
        if num_labels is not None and truth.shape[1] != num_labels:
            raise ValueError(f"{name} has {truth.shape[1]} columns but num_labels = {num_labels}")
        m = sp.csr_matrix(truth, copy=True)
        m.eliminate_zeros()
        n, L = m.shape
        indptr, indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)
    elif isinstance(truth, (tuple, list)) and len(truth) == 2:
        indptr = _to_numpy(truth[0], f"{name} offsets")
        indices = _to_numpy(truth[1], f"{name} ids")
        for arr, what in ((indptr, "offsets"), (indices, "ids")):
            if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
                raise ValueError(f"{name} {what}: expected a 1-D integer array, got shape {arr.shape} {arr.dtype}")
        indptr, indices = indptr.astype(np.int64), indices.astype(np.int64)
        if indptr.size == 0 or indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
            raise ValueError(
                f"{name} offsets: must start at 0, be non-decreasing and end at len(ids) = {indices.size}")
        if indices.size and indices.min() < 0:
            raise ValueError(f"{name} ids: negative label id {int(indices.min())}")
        L = num_labels if num_labels is not None else (int(indices.max()) + 1 if indices.size else 0)
        if indices.size and indices.max() >= L:
            raise ValueError(f"{name} ids: label id {int(indices.max())} is out of range [0, {L})")
        n = indptr.size - 1
    else:
        raise ValueError(f"{name}: expected a scipy.sparse [n, L] matrix or a pair (offsets, ids), "
                         f"got {type(truth).__name__}")
    m = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(n, L))
    m.sum_duplicates()  # sorts indices and merges duplicates
    m.data[:] = 1.0
    m.indptr, m.indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)
    return m


def topk_from_scores(scores, k: int) -> np.ndarray:
    """Top-``k`` label ids per row of a ``scipy.sparse`` score matrix, ``[n, k]`` int64, best first.

    Only stored entries are candidates; higher score first, ties broken towards the lower label id; rows with fewer
    than ``k`` stored entries are padded with ``-1``.
    """
    if not sp.issparse(scores) or scores.ndim != 2:
        raise ValueError("scores: expected a 2-D scipy.sparse matrix")
    k = _check_k(k)
    m = sp.csr_matrix(scores, copy=True)
    m.sum_duplicates()
    if m.data.dtype.kind not in "iufb":
        raise ValueError(f"scores: unsupported dtype {m.data.dtype}")
    data = m.data.astype(np.float64)
    if np.isnan(data).any():
        raise ValueError("scores: contains NaN")
    return _topk_csr(m.indptr.astype(np.int64), m.indices.astype(np.int64), data, m.shape[0], k)


def _topk_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n: int, k: int,
              return_values: bool = False):
    """Per-row top-k of CSR entries by value (desc), ties to lower index; vectorised via one lexsort."""
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    order = np.lexsort((indices, -values, rows))  # last key is primary: rows stay grouped
    rank = np.arange(rows.size, dtype=np.int64) - indptr[rows]
    keep = rank < k
    out = np.full((n, k), -1, dtype=np.int64)
    out[rows[keep], rank[keep]] = indices[order][keep]
    if not return_values:
        return out
    vals = np.zeros((n, k), dtype=np.float64)
    vals[rows[keep], rank[keep]] = values[order][keep]
    return out, vals


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    return int(k)


def _predictions_ids(predictions, k: int, n: int, L: int) -> np.ndarray:
    if sp.issparse(predictions):
        if predictions.ndim != 2:
            raise ValueError("predictions: expected a 2-D sparse score matrix")
        if predictions.shape[0] != n:
            raise ValueError(f"predictions has {predictions.shape[0]} rows but truth has {n} rows")
        if predictions.shape[1] != L:
            raise ValueError(f"predictions has {predictions.shape[1]} columns but truth has {L} labels")
        return topk_from_scores(predictions, k)
    ids = _to_numpy(predictions, "predictions")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"predictions: expected integer top-k label ids [n, K] (or a scipy.sparse score matrix), "
                         f"got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"predictions: expected a 2-D [n, K] array of label ids, got shape {ids.shape}")
    if ids.shape[0] != n:
        raise ValueError(f"predictions has {ids.shape[0]} rows but truth has {n} rows")
    ids = ids.astype(np.int64)
    bad = (ids < -1) | (ids >= L)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"predictions[{r}, {c}] = {int(ids[r, c])} is out of range [-1, {L})")
    s = np.sort(ids, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        r = int(np.argwhere(dup)[0, 0])
        raise ValueError(f"predictions: row {r} repeats a label id ({int(s[r, 1:][dup[r]][0])})")
    if ids.shape[1] >= k:
        return ids[:, :k]
    return np.concatenate([ids, np.full((n, k - ids.shape[1]), -1, dtype=np.int64)], axis=1)


def _hits(ids: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """Boolean [n, k]: ids[i, j] is a true label of document i (False for -1)."""
    n, L = truth.shape
    valid = ids >= 0
    if truth.nnz == 0:
        return np.zeros(ids.shape, dtype=bool)
    if n * L < 2 ** 62:
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(truth.indptr))
        keys = rows * L + truth.indices  # strictly increasing: canonical CSR
        q = np.arange(n, dtype=np.int64)[:, None] * L + np.where(valid, ids, 0)
        pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
        return valid & (keys[pos] == q)
    r = np.repeat(np.arange(n), ids.shape[1])  # pragma: no cover - astronomically large n * L
    return valid & (np.asarray(truth[r, np.where(valid, ids, 0).ravel()]).reshape(ids.shape) > 0)


def _prepare(predictions, truth, k, num_labels=None, inv_propensity=None):
    k = _check_k(k)
    if inv_propensity is not None:
        inv_propensity = _to_numpy(inv_propensity, "inv_propensity").astype(np.float64)
        if inv_propensity.ndim != 1:
            raise ValueError(f"inv_propensity: expected a 1-D array [L], got shape {inv_propensity.shape}")
        if not np.isfinite(inv_propensity).all():
            raise ValueError("inv_propensity: contains non-finite values")
        if num_labels is None and not sp.issparse(truth):
            num_labels = inv_propensity.size
    if num_labels is None and not sp.issparse(truth) and not sp.issparse(predictions):
        # CSR pair without an explicit L: make room for the predicted ids too.
        p = _to_numpy(predictions, "predictions")
        if p.dtype.kind in "iu" and p.size:
            t = _to_numpy(truth[1], "truth ids") if isinstance(truth, (tuple, list)) and len(truth) == 2 else None
            tmax = int(t.max()) if t is not None and t.size and t.dtype.kind in "iu" else -1
            num_labels = max(int(p.max()), tmax) + 1
    if num_labels is None and sp.issparse(predictions) and not sp.issparse(truth):
        num_labels = predictions.shape[1]
    t = _truth_csr(truth, num_labels)
    n, L = t.shape
    if n == 0:
        raise ValueError("truth: has no documents (rows)")
    if inv_propensity is not None and inv_propensity.size != L:
        raise ValueError(f"inv_propensity has {inv_propensity.size} entries but truth has {L} labels")
    ids = _predictions_ids(predictions, k, n, L)
    return ids, t, k, inv_propensity


def _discount(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)  # D(j) = 1/log2(j+1), j = 1..k


def _idcg(num_pos: np.ndarray, k: int) -> np.ndarray:
    """[n, k]: IDCG_i(k') = sum_{j <= min(k', |y_i|)} D(j); uses min(k', 1) for label-less rows (numerators are 0)."""
    cum = np.cumsum(_discount(k))  # cum[k'-1] = sum_{j<=k'} D(j)
    m = np.minimum(np.arange(1, k + 1)[None, :], np.maximum(num_pos, 1)[:, None])
    return cum[m - 1]


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


# --------------------------------------------------------------------------------------------------------- metrics
def precision_at_k(predictions, truth, k: int = 5, *, num_labels: Optional[int] = None) -> np.ndarray:
    """P@1..P@k as a float64 array of length k (fractions): mean over all documents of hits in the top k' / k'."""
    ids, t, k, _ = _prepare(predictions, truth, k, num_labels)
    hits = _hits(ids, t)
    return np.cumsum(hits, axis=1).mean(axis=0) / np.arange(1, k + 1)


def ndcg_at_k(predictions, truth, k: int = 5, *, num_labels: Optional[int] = None) -> np.ndarray:
    """nDCG@1..nDCG@k (fractions): mean over all documents of DCG@k' / IDCG@min(k', |y|); label-less docs give 0."""
    ids, t, k, _ = _prepare(predictions, truth, k, num_labels)
    dcg = np.cumsum(_hits(ids, t) * _discount(k), axis=1)
    return (dcg / _idcg(np.diff(t.indptr), k)).mean(axis=0)


def _ps_parts(ids, t, k, inv_propensity):
    hits = _hits(ids, t)
    w = np.where(hits, inv_propensity[np.maximum(ids, 0)], 0.0)  # weighted hits, [n, k]
    # best achievable: the true labels ranked by inverse propensity, descending (0-padded past |y_i|).
    _, best = _topk_csr(t.indptr, t.indices, inv_propensity[t.indices], t.shape[0], k, return_values=True)
    return w, best


def psprecision_at_k(predictions, truth, inv_propensity, k: int = 5) -> np.ndarray:
    """PSP@1..PSP@k (fractions), pyxclib normalisation: a ratio of sums over the whole set,

    ``PSP@k = sum_i sum_{j<=k} [r_ij in y_i] / p_{r_ij}  /  sum_i (sum of the min(k, |y_i|) largest 1/p_l, l in y_i)``.
    """
    if inv_propensity is None:
        raise ValueError("inv_propensity: required for PSP@k")
    ids, t, k, inv_propensity = _prepare(predictions, truth, k, inv_propensity=inv_propensity)
    w, best = _ps_parts(ids, t, k, inv_propensity)
    return _safe_ratio(np.cumsum(w, axis=1).sum(axis=0), np.cumsum(best, axis=1).sum(axis=0))


def psndcg_at_k(predictions, truth, inv_propensity, k: int = 5) -> np.ndarray:
    """PSnDCG@1..PSnDCG@k (fractions), pyxclib normalisation:

    ``mean_i[PSDCG_i(k) / IDCG_i(k)] / mean_i[bestPSDCG_i(k) / IDCG_i(k)]`` with ``PSDCG_i(k) = sum_{j<=k}
    [r_ij in y_i] D(j) / p_{r_ij}``, ``bestPSDCG_i`` the same for the true labels sorted by decreasing ``1/p`` and
    ``IDCG_i(k) = sum_{j<=min(k,|y_i|)} D(j)`` the unweighted ideal DCG.
    """
    if inv_propensity is None:
        raise ValueError("inv_propensity: required for PSnDCG@k")
    ids, t, k, inv_propensity = _prepare(predictions, truth, k, inv_propensity=inv_propensity)
    w, best = _ps_parts(ids, t, k, inv_propensity)
    d = _discount(k)
    idcg = _idcg(np.diff(t.indptr), k)
    num = (np.cumsum(w * d, axis=1) / idcg).mean(axis=0)
    den = (np.cumsum(best * d, axis=1) / idcg).mean(axis=0)
    return _safe_ratio(num, den)


# ----------------------------------------------------------------------------------------------------- propensity
def compute_inv_propensity(train_labels, A: Optional[float] = None, B: Optional[float] = None, *,
                           preset: Optional[str] = None, num_labels: Optional[int] = None) -> np.ndarray:
    """Jain et al. (2016) inverse propensities ``1/p_l = 1 + C (N_l + B)^(-A)``, ``C = (ln N - 1)(B + 1)^A``.

    ``N`` is the number of training documents (rows of ``train_labels``) and ``N_l`` the number of them carrying
    label ``l`` (stored non-zeros, binarised). ``A`` and ``B`` default to 0.55 and 1.5; ``preset`` takes them from
    :data:`PROPENSITY_PRESETS` instead (then ``A``/``B`` must not be given). ``train_labels`` is a ``scipy.sparse``
    ``[N, L]`` matrix or a pair ``(offsets, ids)`` (then ``L`` = ``num_labels`` or max id + 1). Returns float64 ``[L]``.
    """
    if preset is not None:
        if A is not None or B is not None:
            raise ValueError("preset: give either preset or A/B, not both")
        if preset not in PROPENSITY_PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; known: {sorted(PROPENSITY_PRESETS)}")
        A, B = PROPENSITY_PRESETS[preset]
    A = 0.55 if A is None else float(A)
    B = 1.5 if B is None else float(B)
    if not (np.isfinite(A) and A > 0):
        raise ValueError(f"A: expected a positive number, got {A}")
    if not (np.isfinite(B) and B > -1):
        raise ValueError(f"B: expected a number > -1, got {B}")
    t = _truth_csr(train_labels, num_labels, name="train_labels")
    N = t.shape[0]
    if N < 1:
        raise ValueError("train_labels: has no rows")
    freqs = np.bincount(t.indices, minlength=t.shape[1]).astype(np.float64)
    C = (np.log(N) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * (freqs + B) ** (-A)


# ------------------------------------------------------------------------------------------------------- evaluate
def evaluate(predictions, truth, inv_propensity=None, ks: Iterable[int] = (1, 3, 5), *,
             num_labels: Optional[int] = None, percent: bool = False) -> Dict[str, float]:
    """All metrics at the requested ``ks`` in one pass: ``{"P@1": .., "nDCG@3": .., "PSP@5": .., "PSnDCG@5": ..}``.

    The PS metrics are included only when ``inv_propensity`` is given. Values are fractions (pyxclib's convention)
    unless ``percent=True`` (papers' convention: 100x). A score matrix in ``predictions`` is reduced to its top
    ``max(ks)`` once.
    """
    ks = [_check_k(k) for k in ks]
    if not ks:
        raise ValueError("ks: must name at least one k")
    K = max(ks)
    ids, t, K, inv = _prepare(predictions, truth, K, num_labels, inv_propensity)
    hits = _hits(ids, t)
    d = _discount(K)
    idcg = _idcg(np.diff(t.indptr), K)
    res = {
        "P": np.cumsum(hits, axis=1).mean(axis=0) / np.arange(1, K + 1),
        "nDCG": (np.cumsum(hits * d, axis=1) / idcg).mean(axis=0),
    }
    if inv is not None:
        w, best = _ps_parts(ids, t, K, inv)
        res["PSP"] = _safe_ratio(np.cumsum(w, axis=1).sum(axis=0), np.cumsum(best, axis=1).sum(axis=0))
        res["PSnDCG"] = _safe_ratio((np.cumsum(w * d, axis=1) / idcg).mean(axis=0),
                                    (np.cumsum(best * d, axis=1) / idcg).mean(axis=0))
    scale = 100.0 if percent else 1.0
    return {f"{name}@{k}": float(v[k - 1]) * scale for name, v in res.items() for k in ks}
