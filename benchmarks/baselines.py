"""Linear baselines of the accuracy report: TF-IDF features + a linear label tree (omikuji, napkinXC).

- :func:`tfidf_features`: sklearn ``TfidfVectorizer`` fitted on the training texts only (settings in
  :data:`TFIDF_SETTINGS`: word unigrams + bigrams, sublinear tf, min_df 2, l2-normalised rows, float32).
- :class:`OmikujiBaseline`: omikuji (a Rust Parabel/Bonsai implementation). Presets (:data:`OMIKUJI_PRESETS`) are
  the two settings of omikuji's README: ``parabel`` (balanced 2-means, depth <= 20, leaves of <= 100 labels,
  3 trees, hinge loss) and ``bonsai`` (regular, unbalanced 100-means, depth <= 3, 3 trees).
- :class:`NapkinPLTBaseline`: napkinXC's probabilistic label tree (hierarchical balanced 2-means, leaves of <= 100
  labels, LIBLINEAR logistic loss, one tree), when ``napkinxc`` imports.

Every baseline has ``fit(X, offsets, label_ids, num_labels)`` (the timed training), ``prepare_inference()`` (untimed
steps between training and serving), ``predict(X, k) -> int64 [n, k]`` (original label ids, best first, -1 where
fewer than k came back), ``predict_one(x_row, k)`` for latency, ``set_threads(n)`` and ``model_bytes()``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import scipy.sparse as sp

TFIDF_SETTINGS: Dict[str, object] = dict(
    analyzer="word",
    ngram_range=(1, 2),
    sublinear_tf=True,
    min_df=2,
    lowercase=True,
    norm="l2",
    dtype=np.float32,
)


def tfidf_vectorizer(**overrides):
    """An unfitted sklearn TfidfVectorizer with :data:`TFIDF_SETTINGS` (``overrides`` replace single settings)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**{**TFIDF_SETTINGS, **overrides})


def tfidf_features(train_texts: Sequence[str], test_texts: Sequence[str], **overrides):
    """(vectorizer, X_train, X_test): CSR float32, the vocabulary and idf from the training texts only."""
    vec = tfidf_vectorizer(**overrides)
    X_train = vec.fit_transform(train_texts).tocsr()
    X_test = vec.transform(test_texts).tocsr()
    X_train.sort_indices()
    X_test.sort_indices()
    return vec, X_train, X_test


def _rows_to_ids(rows, n: int, k: int) -> np.ndarray:
    """List (per document) of label-id sequences -> int64 [n, k] padded with -1."""
    out = np.full((n, k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        r = list(r)[:k]
        if r:
            out[i, : len(r)] = r
    return out


def write_xmc_repo_file(path, X: sp.csr_matrix, offsets: np.ndarray, label_ids: np.ndarray, num_labels: int) -> None:
    """The Extreme Classification Repository text format omikuji trains from: a header ``n_docs n_features
    n_labels`` then ``l1,l2,... f:v f:v ...`` per document (0-based ids; an empty label field for a document without
    labels, nothing after the labels for one without features)."""
    X = X.tocsr()
    with open(path, "w") as f:
        f.write(f"{X.shape[0]} {X.shape[1]} {num_labels}\n")
        indptr, indices, data = X.indptr, X.indices, X.data
        for i in range(X.shape[0]):
            labs = ",".join(map(str, label_ids[offsets[i] : offsets[i + 1]].tolist()))
            a, b = indptr[i], indptr[i + 1]
            # omikuji splits on single spaces: no trailing space for a document without features
            feats = "".join(f" {j}:{v:.6g}" for j, v in zip(indices[a:b].tolist(), data[a:b].tolist()))
            f.write(f"{labs}{feats}\n")


# (A field name of omikuji's HyperParam struct, value) per preset; everything else keeps omikuji's default.
OMIKUJI_PRESETS: Dict[str, Dict[str, object]] = {
    # omikuji's defaults == its "Parabel, better parallelized" setting
    "parabel": dict(n_trees=3, cluster_k=2, cluster_balanced=True, max_depth=20, min_branch_size=100,
                    linear_loss="hinge", linear_c=1.0, linear_weight_threshold=0.1, linear_max_iter=20),
    # README "Regular k-means for shallow trees" (Bonsai): unbalanced 100-means, depth <= 3
    "bonsai": dict(n_trees=3, cluster_k=100, cluster_balanced=False, max_depth=3, min_branch_size=100,
                   linear_loss="hinge", linear_c=1.0, linear_weight_threshold=0.1, linear_max_iter=20),
}


class OmikujiBaseline:
    """omikuji trained from a temporary XMC-repository file (its only training input), predicted in memory.

    omikuji's Python API predicts one document per call. ``predict`` spreads the documents over ``threads`` Python
    threads (the cffi call releases the GIL) and gives omikuji's own pool (trees of one document in parallel)
    ``threads`` threads too, the fastest pairing measured here; ``predict_one`` runs on the pool ``set_threads``
    left.
    """

    name = "omikuji"

    def __init__(self, preset: str = "parabel", threads: Optional[int] = None, beam_size: int = 10,
                 max_sparse_density: Optional[float] = 0.1, **overrides):
        if preset not in OMIKUJI_PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; known: {sorted(OMIKUJI_PRESETS)}")
        self.preset = preset
        self.params = {**OMIKUJI_PRESETS[preset], **overrides}
        self.threads = threads or os.cpu_count() or 1
        self.beam_size = beam_size
        # `omikuji test` densifies weight vectors denser than 0.1 before predicting (its default): 1.5-2x faster
        # predictions here, same ids; None keeps every vector sparse
        self.max_sparse_density = max_sparse_density
        self.model = None
        self._saved_bytes: Optional[int] = None

    @property
    def label(self) -> str:
        return f"omikuji-{self.preset}"

    def settings(self) -> Dict[str, object]:
        return dict(self.params, beam_size=self.beam_size, max_sparse_density=self.max_sparse_density)

    def _hyper_param(self):
        import omikuji

        hp = omikuji.Model.default_hyper_param()
        for key, value in self.params.items():
            if key == "linear_loss":
                value = (omikuji.LossType.HINGE if value == "hinge" else omikuji.LossType.LOG).value
                key = "linear_loss_type"
            setattr(hp, key, value)
        return hp

    def fit(self, X: sp.csr_matrix, offsets: np.ndarray, label_ids: np.ndarray, num_labels: int):
        import omikuji

        tmp = tempfile.mkdtemp(prefix="omikuji_")
        try:
            path = os.path.join(tmp, "train.txt")
            write_xmc_repo_file(path, X, offsets, label_ids, num_labels)
            self.model = omikuji.Model.train_on_data(path, self._hyper_param(), n_threads=self.threads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.set_threads(1)
        return self

    def prepare_inference(self) -> None:
        """After training, outside its timing: record the saved model's size, then densify as `omikuji test`."""
        self._saved_bytes = self._measure_saved_bytes()
        if self.max_sparse_density is not None:
            self.model.densify_weights(self.max_sparse_density, n_threads=self.threads)

    def set_threads(self, n: int) -> None:
        """Threads of omikuji's own pool (it parallelises over the trees of one document)."""
        self.model.init_prediction_thread_pool(n)

    def _pairs(self, X: sp.csr_matrix, i: int):
        a, b = X.indptr[i], X.indptr[i + 1]
        return list(zip(X.indices[a:b].tolist(), X.data[a:b].tolist()))

    def predict_one(self, x: sp.csr_matrix, k: int) -> np.ndarray:
        out = self.model.predict(self._pairs(x, 0), beam_size=self.beam_size, top_k=k)
        return _rows_to_ids([[lab for lab, _ in out]], 1, k)[0]

    def predict(self, X: sp.csr_matrix, k: int, threads: Optional[int] = None) -> np.ndarray:
        X = X.tocsr()
        n = X.shape[0]
        threads = threads or self.threads

        def chunk(lo_hi):
            lo, hi = lo_hi
            return [[lab for lab, _ in self.model.predict(self._pairs(X, i), beam_size=self.beam_size, top_k=k)]
                    for i in range(lo, hi)]

        self.set_threads(threads)
        bounds = np.linspace(0, n, threads * 8 + 1).astype(int)
        parts = list(zip(bounds[:-1], bounds[1:]))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            rows = [r for part in pool.map(chunk, parts) for r in part]
        return _rows_to_ids(rows, n, k)

    def model_bytes(self) -> Optional[int]:
        """Size of the saved model directory (what a deployment loads), taken before densifying."""
        return self._saved_bytes

    def _measure_saved_bytes(self) -> int:
        tmp = tempfile.mkdtemp(prefix="omikuji_model_")
        try:
            self.model.save(tmp)
            return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def napkinxc_available() -> bool:
    try:
        from napkinxc.models import PLT  # noqa: F401
    except Exception:
        return False
    return True


class NapkinPLTBaseline:
    """napkinXC's PLT (Jasinska-Kobus et al.): hierarchical balanced 2-means tree, leaves of <= 100 labels, one
    LIBLINEAR logistic-loss classifier per node (weights below 0.1 pruned), exact top-k tree search."""

    name = "napkinxc-plt"

    def __init__(self, threads: Optional[int] = None, seed: int = 0, **overrides):
        self.threads = threads or os.cpu_count() or 1
        self.params = dict(tree_type="hierarchicalKmeans", arity=2, max_leaves=100, loss="log",
                           liblinear_c=10.0, liblinear_eps=0.1, weights_threshold=0.1, ensemble=1, seed=seed)
        self.params.update(overrides)
        self.model = None
        self._dir = None

    @property
    def label(self) -> str:
        return "napkinxc-plt"

    def settings(self) -> Dict[str, object]:
        return dict(self.params)

    def fit(self, X: sp.csr_matrix, offsets: np.ndarray, label_ids: np.ndarray, num_labels: int):
        from napkinxc.models import PLT

        self._dir = tempfile.mkdtemp(prefix="napkinxc_")
        self.model = PLT(self._dir, threads=self.threads, **self.params)
        Y = [label_ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
        self.model.fit(X.tocsr().astype(np.float32), Y)
        return self

    def prepare_inference(self) -> None:
        pass

    def set_threads(self, n: int) -> None:
        self.model.set_params(threads=n)

    def predict_one(self, x: sp.csr_matrix, k: int) -> np.ndarray:
        return _rows_to_ids(self.model.predict(x, top_k=k), 1, k)[0]

    def predict(self, X: sp.csr_matrix, k: int, threads: Optional[int] = None) -> np.ndarray:
        before = self.model.get_params().get("threads")
        self.set_threads(threads or self.threads)
        try:
            rows = self.model.predict(X.tocsr().astype(np.float32), top_k=k)
        finally:
            self.set_threads(before)
        return _rows_to_ids(rows, X.shape[0], k)

    def model_bytes(self) -> Optional[int]:
        if self._dir is None:
            return None
        return sum(p.stat().st_size for p in Path(self._dir).rglob("*") if p.is_file())

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
