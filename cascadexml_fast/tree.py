"""Label trees: PIFA label features, balanced hierarchical spherical k-means, the tree-order permutation.

``LabelTree.build(label_features, level_sizes=(1024, 8192, 65536))`` clusters ``L`` labels into cluster levels of
1024, 8192 and 65536 nodes (the levels above the labels); ``max_leaf_size=100`` builds PECOS-style trees instead.
The result is CSR: per level ``offsets`` (int64, ``len = nodes + 1``) into the next level, the last level's
children being labels in *tree order*, and ``perm`` (tree position -> original label id) with its inverse, so
that every node's children are one contiguous id range (DESIGN.md: tree-order ids inside, original ids at the
edges; ``to_tree_ids`` / ``to_label_ids`` convert, pads ``-1`` stay ``-1``).

Algorithm (``cascadexml_fast._kmeans`` has the details). Rows are L2-normalised (cosine similarity). The tree is
grown by balanced spherical 2-means, level-synchronously: round ``r`` splits *every* unfinished node at once
with array ops (batched matmuls over row tiles, one padded segmented sort, ``embedding_bag`` child sums; scipy
mat-vecs on a per-node compressed feature space for sparse input). A node is cut into a left part of fixed size
(``floor(n/2)`` or ``ceil(n/2)`` when the sizes are powers of two; in general the sizes below), filled with its
labels most similar to the left centre (sorted by ``sim(left) - sim(right)``, LightXML/Parabel's balanced
split), and refined until the mean similarity gains less than ``tol`` (or ``max_iter``). Centres start at two
random distinct members, drawn from ``seed`` and the round number: the same seed gives the same tree whatever
the thread count; the random numbers never depend on data order.

Level sizes. The levels are laid out top-down by Bresenham splits: node ``i`` of a level with ``K`` nodes owns
children ``[floor(i*K'/K), floor((i+1)*K'/K))`` of the next level (``K'`` nodes), and leaf cluster ``c`` owns
``floor(L/K_d)`` or ``ceil(L/K_d)`` labels. Bisection cuts a run of nodes in its middle, so every level is an
exact refinement of the one above; with power-of-two sizes (CascadeXML's 2^10/2^13/2^16) every split is into
halves differing by at most one label and the level of ``2^b`` nodes is the snapshot after round ``b``. Other
sizes are split into uneven halves in proportion (e.g. 3 nodes: the root is cut 1/3 : 2/3 of its labels).

``max_leaf_size=m`` (PECOS's hierarchical k-means): ``2^ceil(log2(L/m))`` leaf clusters (each ``<= m`` labels,
all ``floor`` or ``ceil`` of the same size); upper levels by grouping ``branching`` (default 16) consecutive
clusters until a level has ``<= branching`` nodes: 670,091 labels, ``m=100`` -> levels 2 / 32 / 512 / 8192.

Defined behaviour on awkward input:
- Labels whose feature row is zero (no positive documents): similarity 0 to every centre, so each split sorts
  them between the labels that prefer the left and the right child (ties in tree-position order): they are
  shared among the children and end up spread over the leaves. ``meta["zero_rows"]`` counts them.
- NaN/inf features: ``ValueError`` naming the first bad row. Fewer labels than nodes at a level, decreasing
  level sizes, bad dtypes or shapes: ``ValueError`` naming the argument.
- ``pifa``: duplicate label ids in a document, out-of-range or negative ids: ``ValueError`` naming ``Y``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import _kmeans

__all__ = ["LabelTree", "pifa", "pecos_level_sizes"]

FORMAT_NAME = "cascadexml_fast.LabelTree"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# helpers


def _is_scipy_sparse(x) -> bool:
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover
        return False
    return sp.issparse(x)


def _as_int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        if a.size == 0:
            return a.astype(np.int64)
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def pecos_level_sizes(num_labels: int, max_leaf_size: int = 100, branching: int = 16) -> tuple:
    """PECOS-style level sizes: ``2^ceil(log2(L / max_leaf_size))`` leaf clusters (each holds at most
    ``max_leaf_size`` labels), then groups of ``branching`` consecutive clusters until a level has at most
    ``branching`` nodes. One cluster (a flat tree) when ``L <= max_leaf_size``."""
    if not isinstance(max_leaf_size, (int, np.integer)) or max_leaf_size < 1:
        raise ValueError(f"max_leaf_size must be a positive integer, got {max_leaf_size!r}")
    if not isinstance(branching, (int, np.integer)) or branching < 2:
        raise ValueError(f"branching must be an integer >= 2, got {branching!r}")
    L = int(num_labels)
    if L <= max_leaf_size:
        return (1,)
    depth = max(0, math.ceil(math.log2(L / max_leaf_size) - 1e-12))
    while (L + (1 << depth) - 1) >> depth > max_leaf_size:  # guard against log rounding
        depth += 1
    sizes = [1 << depth]
    while sizes[0] > branching:
        sizes.insert(0, -(-sizes[0] // branching))
    return tuple(sizes)


def _check_level_sizes(level_sizes, num_labels: int) -> tuple:
    try:
        sizes = tuple(level_sizes)
    except TypeError:
        raise ValueError(f"level_sizes must be a sequence of node counts, got {level_sizes!r}") from None
    for k in sizes:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"level_sizes must hold positive integers, got {level_sizes!r}")
    sizes = tuple(int(k) for k in sizes)
    for a, b in zip(sizes, sizes[1:]):
        if b < a:
            raise ValueError(f"level_sizes must be non-decreasing (each level refines the one above), got {sizes}")
    if sizes and sizes[-1] > num_labels:
        raise ValueError(f"level_sizes asks for {sizes[-1]} nodes at the last level but there are only "
                         f"{num_labels} labels (every node needs at least one label)")
    return sizes


class _Progress:
    """tqdm when installed, else one rewritten stderr line."""

    def __init__(self, total: int, desc: str = "build-tree"):
        self.t0 = time.perf_counter()
        self.desc = desc
        try:
            from tqdm.auto import tqdm  # optional
            self.bar = tqdm(total=total, desc=desc, unit="round")
        except Exception:
            self.bar = None
        self.total = total

    def __call__(self, done: int, total: int, info: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(nodes=info.get("nodes"), iters=info.get("iters"))
            self.bar.update(1)
        else:
            el = time.perf_counter() - self.t0
            sys.stderr.write(f"\r{self.desc}: round {done}/{total}, {info.get('nodes')} nodes split, "
                             f"{info.get('iters')} iterations, {el:.1f}s")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------
# the tree


class LabelTree:
    """A label tree in CSR form, with the tree-order permutation of the labels.

    Attributes:
      ``num_labels``; ``level_sizes`` (nodes per cluster level, top first; ``()`` for a flat tree without
      cluster levels); ``offsets[j]`` (int64, ``level_sizes[j] + 1``): children of node ``c`` of level ``j`` are
      ``[offsets[j][c], offsets[j][c+1])`` of level ``j+1``, or tree-order label ids for the last level;
      ``perm`` (int64 ``[L]``, tree-order id -> original label id) and ``inv_perm`` (original -> tree order);
      ``meta`` (how it was built).
    """

    def __init__(self, offsets: Sequence[Any], perm: Any, *, meta: Optional[dict] = None, validate: bool = True):
        self.offsets: List[torch.Tensor] = [torch.as_tensor(np.asarray(o) if not isinstance(o, torch.Tensor) else o)
                                            .to(torch.int64).cpu().contiguous() for o in offsets]
        p = perm if isinstance(perm, torch.Tensor) else torch.as_tensor(np.asarray(perm))
        self.perm = p.to(torch.int64).cpu().contiguous()
        self.num_labels = int(self.perm.numel())
        self.level_sizes = tuple(int(o.numel()) - 1 for o in self.offsets)
        self.meta: Dict[str, Any] = dict(meta or {})
        inv = torch.full((self.num_labels,), -1, dtype=torch.int64)
        if validate:
            self._validate_perm()
        inv[self.perm.clamp(0, max(self.num_labels - 1, 0))] = torch.arange(self.num_labels)
        self.inv_perm = inv
        if validate:
            self.validate()

    # ---- construction

    @classmethod
    def build(cls, label_features, level_sizes: Optional[Sequence[int]] = None, *,
              max_leaf_size: Optional[int] = None, branching: int = 16, seed: int = 0, max_iter: int = 20,
              tol: float = 1e-4, compute_dtype: Optional[torch.dtype] = None,
              progress: Union[bool, Callable[[int, int, dict], None]] = False) -> "LabelTree":
        """Cluster labels into a tree by balanced spherical k-means (see the module docstring).

        ``label_features``: ``[L, F]`` dense (numpy array or torch tensor, fp32/fp64/fp16/bf16, any device) or a
        scipy.sparse matrix (clustered exactly, on the CPU). Rows need not be normalised.
        ``level_sizes``: node counts of the cluster levels above the labels, top first, non-decreasing, the
        last ``<= L``; ``()`` gives a flat tree (identity permutation, no cluster level).
        ``max_leaf_size`` (instead of ``level_sizes``): PECOS-style sizes, see ``pecos_level_sizes``.
        ``seed``: non-negative int; same seed -> identical tree. ``max_iter`` / ``tol``: 2-means stopping rule
        per node (iterations per split / minimum gain in mean cosine similarity). ``compute_dtype``: dense
        working precision (default: bf16 for fp16/bf16 input where bf16 matmuls are fast, else fp32).
        ``progress``: True for a progress bar (tqdm if installed, else stderr), or a callable
        ``(round, rounds, info)``.
        """
        sparse = _is_scipy_sparse(label_features)
        if isinstance(label_features, torch.Tensor) and label_features.layout != torch.strided:
            import scipy.sparse as sp
            coo = label_features.to_sparse_coo().coalesce().cpu()
            i = coo.indices().numpy()
            label_features = sp.csr_matrix((coo.values().numpy(), (i[0], i[1])), shape=tuple(coo.shape))
            sparse = True
        if sparse:
            shape = label_features.shape
        else:
            if isinstance(label_features, np.ndarray):
                if label_features.dtype.kind != "f":
                    raise ValueError(f"label_features must be floating point, got dtype {label_features.dtype}")
                arr = np.ascontiguousarray(label_features)
                with warnings.catch_warnings():  # read-only (e.g. memory-mapped) input: it is only read
                    warnings.simplefilter("ignore", UserWarning)
                    label_features = torch.from_numpy(arr)
            elif not isinstance(label_features, torch.Tensor):
                raise ValueError("label_features must be a numpy array, a torch tensor or a scipy.sparse matrix, "
                                 f"got {type(label_features).__name__}")
            if not label_features.is_floating_point():
                raise ValueError(f"label_features must be floating point, got dtype {label_features.dtype}")
            shape = tuple(label_features.shape)
        if len(shape) != 2:
            raise ValueError(f"label_features must be 2-D [num_labels, num_features], got shape {tuple(shape)}")
        L, F = int(shape[0]), int(shape[1])
        if L < 1 or F < 1:
            raise ValueError(f"label_features must have at least one label and one feature, got shape {shape}")
        if (level_sizes is None) == (max_leaf_size is None):
            raise ValueError("give exactly one of level_sizes and max_leaf_size")
        if max_leaf_size is not None:
            sizes = pecos_level_sizes(L, max_leaf_size, branching)
        else:
            sizes = _check_level_sizes(level_sizes, L)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (tol >= 0):
            raise ValueError(f"tol must be >= 0, got {tol!r}")

        t0 = time.perf_counter()
        if sparse:
            backend = _kmeans.SparseBackend(label_features)
            cdt = "float32 (sparse)"
        else:
            backend = _kmeans.DenseBackend(label_features, compute_dtype=compute_dtype)
            cdt = str(backend.dtype).replace("torch.", "")
        zero_rows = backend.num_zero_rows
        bar = None
        cb = None
        if progress is True:
            bar = _Progress(len(_kmeans.plan(L, sizes)))
            cb = bar
        elif callable(progress):
            cb = progress
        try:
            perm, stats = _kmeans.bisect(backend, L, sizes, seed=int(seed), max_iter=int(max_iter), tol=float(tol),
                                         progress=cb)
        finally:
            if bar is not None:
                bar.close()
        meta = dict(algorithm="balanced spherical 2-means, level-synchronous", seed=int(seed),
                    max_iter=int(max_iter), tol=float(tol), compute_dtype=cdt, sparse=bool(sparse),
                    num_features=F, zero_rows=int(zero_rows), rounds=stats["rounds"],
                    iters_per_round=stats.get("iters", []), build_seconds=round(time.perf_counter() - t0, 3))
        if max_leaf_size is not None:
            meta.update(max_leaf_size=int(max_leaf_size), branching=int(branching))
        offsets = _kmeans.level_offsets(L, sizes)
        return cls(offsets, perm, meta=meta)

    @classmethod
    def flat(cls, num_labels: int) -> "LabelTree":
        """No cluster level: identity permutation (small label sets scored in full)."""
        return cls([], torch.arange(int(num_labels)), meta={"algorithm": "flat"})

    @classmethod
    def from_assignments(cls, assignments: Sequence[Any], level_sizes: Optional[Sequence[int]] = None,
                         meta: Optional[dict] = None) -> "LabelTree":
        """A tree from given clusterings, e.g. LightXML / CascadeXML cluster files or variable-size clusters.

        ``assignments[j][label]`` is the node of level ``j`` (top first) holding original label ``label``. Levels
        must nest (labels of one node share their parent); nodes are renumbered in order of their ids within
        the parent, labels within a leaf keep ascending original-id order. Node counts default to
        ``max id + 1``; every node must hold at least one label.
        """
        levels = [_as_int_array(a, f"assignments[{j}]").ravel() for j, a in enumerate(assignments)]
        if not levels:
            raise ValueError("assignments must hold at least one level")
        L = levels[0].size
        for j, a in enumerate(levels):
            if a.size != L:
                raise ValueError(f"assignments[{j}] has {a.size} entries, expected {L} (one per label)")
            if L and a.min() < 0:
                raise ValueError(f"assignments[{j}] has negative node ids")
        if level_sizes is None:
            level_sizes = [int(a.max()) + 1 if L else 0 for a in levels]
        level_sizes = [int(k) for k in level_sizes]
        for j, (a, k) in enumerate(zip(levels, level_sizes)):
            if L and a.max() >= k:
                raise ValueError(f"assignments[{j}] has node id {int(a.max())} >= level_sizes[{j}] = {k}")
            cnt = np.bincount(a, minlength=k)
            if (cnt == 0).any():
                raise ValueError(f"assignments[{j}]: node {int(np.flatnonzero(cnt == 0)[0])} holds no label "
                                 "(every node needs at least one)")
        for j in range(1, len(levels)):
            parent = np.full(level_sizes[j], -1, dtype=np.int64)
            parent[levels[j]] = levels[j - 1]
            if (parent[levels[j]] != levels[j - 1]).any():
                bad = int(np.flatnonzero(parent[levels[j]] != levels[j - 1])[0])
                raise ValueError(f"assignments[{j}] does not nest in assignments[{j - 1}]: the labels of node "
                                 f"{int(levels[j][bad])} have more than one parent")
        perm = np.lexsort([np.arange(L)] + levels[::-1])
        # nodes are renumbered in tree order: a new node starts wherever its id changes along the sorted labels
        starts = []
        for a in levels:
            seq = a[perm]
            first = np.ones(L, dtype=bool)
            first[1:] = seq[1:] != seq[:-1]
            starts.append(first)
        offsets = []
        for j in range(len(levels)):
            seg = np.cumsum(starts[j]) - 1  # tree-order node of level j at every sorted label
            below = starts[j + 1] if j + 1 < len(levels) else np.ones(L, dtype=bool)
            cnt = np.bincount(seg[below], minlength=level_sizes[j])
            offsets.append(np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64))
        return cls(offsets, perm, meta=dict(meta or {}, algorithm=(meta or {}).get("algorithm", "given")))

    @classmethod
    def from_clusters(cls, clusters: Sequence[Any], num_labels: Optional[int] = None) -> "LabelTree":
        """One cluster level from a list of label-id arrays (LightXML's cluster files: variable sizes)."""
        sizes = np.array([len(np.asarray(c).ravel()) for c in clusters], dtype=np.int64)
        labels = (np.concatenate([_as_int_array(c, "clusters").ravel() for c in clusters])
                  if len(clusters) else np.zeros(0, np.int64))
        L = int(num_labels) if num_labels is not None else int(labels.size)
        if labels.size != L or (L and (labels.min() < 0 or labels.max() >= L)) or \
                np.bincount(labels, minlength=L).max(initial=0) > 1:
            raise ValueError(f"clusters must partition the label ids 0..{L - 1} (each exactly once)")
        assign = np.repeat(np.arange(len(clusters)), sizes)
        out = np.empty(L, np.int64)
        out[labels] = assign
        return cls.from_assignments([out], [len(clusters)])

    # ---- structure

    @property
    def num_levels(self) -> int:
        return len(self.offsets)

    def __len__(self) -> int:
        return self.num_levels

    def label_offsets(self, level: int) -> torch.Tensor:
        """``[level_sizes[level] + 1]`` int64: node ``c`` of ``level`` covers tree-order labels
        ``[out[c], out[c+1])``."""
        self._check_level(level)
        o = self.offsets[level]
        for j in range(level + 1, self.num_levels):
            o = self.offsets[j][o]
        return o

    def node_of_label(self, level: int) -> torch.Tensor:
        """``[L]`` int64: the node of ``level`` holding each tree-order label."""
        o = self.label_offsets(level)
        return torch.repeat_interleave(torch.arange(o.numel() - 1), o[1:] - o[:-1], output_size=self.num_labels)

    def children(self, level: int, node: int) -> range:
        self._check_level(level)
        o = self.offsets[level]
        if not 0 <= node < o.numel() - 1:
            raise ValueError(f"node {node} out of range for level {level} with {o.numel() - 1} nodes")
        return range(int(o[node]), int(o[node + 1]))

    def max_children(self, level: int) -> int:
        self._check_level(level)
        o = self.offsets[level]
        return int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0

    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not -self.num_levels <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels}), got {level!r}")

    # ---- id conversion

    def _table(self, which: str, device: torch.device) -> torch.Tensor:
        """``perm`` / ``inv_perm`` on ``device``, copied there once and cached."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (which, str(device))
        src = self.perm if which == "perm" else self.inv_perm
        if device.type == "cpu":
            return src
        if key not in cache or cache[key].numel() != src.numel():
            cache[key] = src.to(device)
        return cache[key]

    def _convert(self, ids, which: str, name: str, validate: bool):
        was_np = not isinstance(ids, torch.Tensor)
        t = torch.as_tensor(np.asarray(ids)) if was_np else ids
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer ids, got dtype {t.dtype}")
        if validate and t.numel():  # (a host sync on GPU: pass validate=False in a trusted hot loop)
            lo, hi = int(t.min()), int(t.max())
            if lo < -1 or hi >= self.num_labels:
                raise ValueError(f"{name} out of range: ids must be in [0, {self.num_labels}) or -1 (pad), "
                                 f"got min {lo}, max {hi}")
        tab = self._table(which, t.device)
        t64 = t.to(torch.int64)
        out = torch.where(t64 >= 0, tab[t64.clamp_min(0)], t64)
        out = out.to(t.dtype) if t.dtype in (torch.int32, torch.int64) else out
        return out.cpu().numpy() if was_np else out

    def to_tree_ids(self, label_ids, validate: bool = True):
        """Original label ids -> tree-order ids (same shape, dtype, device and container; -1 pads stay -1).
        ``validate=False`` skips the range check (no host sync; ids must then be in range)."""
        return self._convert(label_ids, "inv_perm", "label_ids", validate)

    def to_label_ids(self, tree_ids, validate: bool = True):
        """Tree-order ids -> original label ids (same shape, dtype, device and container; -1 pads stay -1)."""
        return self._convert(tree_ids, "perm", "tree_ids", validate)

    # ---- validation

    def _validate_perm(self) -> None:
        p = self.perm
        if p.dim() != 1:
            raise ValueError(f"perm must be 1-D, got shape {tuple(p.shape)}")
        L = p.numel()
        if L and (int(p.min()) < 0 or int(p.max()) >= L):
            raise ValueError(f"perm is not a permutation of 0..{L - 1}: values out of range "
                             f"(min {int(p.min())}, max {int(p.max())})")
        if L and int(torch.bincount(p, minlength=L).max()) != 1:
            dup = int(torch.nonzero(torch.bincount(p, minlength=L) > 1)[0, 0])
            raise ValueError(f"perm is not a permutation of 0..{L - 1}: label {dup} appears more than once")

    def validate(self) -> "LabelTree":
        """Raise ``ValueError`` with a clear message if the tree is malformed; returns self."""
        self._validate_perm()
        L = self.num_labels
        if L and not torch.equal(self.perm[self.inv_perm], torch.arange(L)):
            raise ValueError("inv_perm is not the inverse of perm")
        for j, o in enumerate(self.offsets):
            if o.dtype != torch.int64:
                raise ValueError(f"offsets[{j}] must be int64, got {o.dtype}")
            if o.dim() != 1 or o.numel() < 2:
                raise ValueError(f"offsets[{j}] must be 1-D with at least 2 entries (one node), got shape "
                                 f"{tuple(o.shape)}")
            if int(o[0]) != 0:
                raise ValueError(f"offsets[{j}] must start at 0, got {int(o[0])}")
            step = o[1:] - o[:-1]
            if bool((step < 0).any()):
                c = int(torch.nonzero(step < 0)[0, 0])
                raise ValueError(f"offsets[{j}] must be non-decreasing (node {c}: {int(o[c])} -> {int(o[c + 1])})")
            if bool((step == 0).any()):
                c = int(torch.nonzero(step == 0)[0, 0])
                raise ValueError(f"offsets[{j}]: node {c} has no children (every node needs at least one)")
            expect = self.level_sizes[j + 1] if j + 1 < self.num_levels else L
            what = f"level {j + 1} has {expect} nodes" if j + 1 < self.num_levels else f"there are {L} labels"
            if int(o[-1]) != expect:
                raise ValueError(f"offsets[{j}] must end at {expect} ({what}), got {int(o[-1])}")
        return self

    # ---- comparison and printing

    def __eq__(self, other) -> bool:
        if not isinstance(other, LabelTree):
            return NotImplemented
        return (self.num_labels == other.num_labels and self.level_sizes == other.level_sizes
                and torch.equal(self.perm, other.perm)
                and all(torch.equal(a, b) for a, b in zip(self.offsets, other.offsets)))

    __hash__ = None  # mutable tensors

    def __repr__(self) -> str:
        sizes = " -> ".join(str(k) for k in self.level_sizes + (self.num_labels,))
        return f"LabelTree({sizes}; {self.num_levels} cluster levels)"

    # ---- persistence

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``tree.json`` (format name and version, sizes, meta) and ``tree.npz`` (perm, offsets)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"perm": self.perm.numpy()}
        for j, o in enumerate(self.offsets):
            arrays[f"offsets_{j}"] = o.numpy()
        tmp = d / "tree.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(d / "tree.npz")
        head = dict(format=FORMAT_NAME, version=FORMAT_VERSION, num_labels=self.num_labels,
                    level_sizes=list(self.level_sizes), meta=self.meta)
        (d / "tree.json").write_text(json.dumps(head, indent=1, default=str))
        return d

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], validate: bool = True) -> "LabelTree":
        d = Path(directory)
        if not (d / "tree.json").is_file() or not (d / "tree.npz").is_file():
            raise FileNotFoundError(f"{d} does not hold a saved LabelTree (tree.json + tree.npz)")
        head = json.loads((d / "tree.json").read_text())
        if head.get("format") != FORMAT_NAME:
            raise ValueError(f"{d / 'tree.json'} is not a {FORMAT_NAME} file (format {head.get('format')!r})")
        if not isinstance(head.get("version"), int) or head["version"] > FORMAT_VERSION:
            raise ValueError(f"{d / 'tree.json'} has format version {head.get('version')!r}; this package reads "
                             f"versions <= {FORMAT_VERSION}")
        with np.load(d / "tree.npz", allow_pickle=False) as z:
            perm = z["perm"]
            nlev = len(head["level_sizes"])
            missing = [f"offsets_{j}" for j in range(nlev) if f"offsets_{j}" not in z.files]
            if missing:
                raise ValueError(f"{d / 'tree.npz'} lacks {missing}")
            offsets = [z[f"offsets_{j}"] for j in range(nlev)]
        tree = cls(offsets, perm, meta=head.get("meta"), validate=validate)
        if tree.num_labels != head["num_labels"] or list(tree.level_sizes) != list(head["level_sizes"]):
            raise ValueError(f"{d}: tree.json says {head['num_labels']} labels and levels {head['level_sizes']}, "
                             f"tree.npz holds {tree.num_labels} labels and levels {list(tree.level_sizes)}")
        return tree


# ----------------------------------------------------------------------------------------------------------
# PIFA label features


def _label_matrix(Y, num_labels: Optional[int], num_docs: int):
    """Y as a binary CSR [num_docs, L] after checking ids (duplicates, range)."""
    import scipy.sparse as sp

    if _is_scipy_sparse(Y):
        Yc = Y.tocsr(copy=True)
        if Yc.shape[0] != num_docs:
            raise ValueError(f"Y has {Yc.shape[0]} rows but X has {num_docs} documents")
        L = Yc.shape[1] if num_labels is None else int(num_labels)
        if num_labels is not None and Yc.shape[1] != L:
            raise ValueError(f"Y has {Yc.shape[1]} columns but num_labels is {L}")
        indptr, indices = Yc.indptr.astype(np.int64), Yc.indices.astype(np.int64)
        data = np.asarray(Yc.data)
        keep = data != 0
        if not keep.all():  # explicit zeros are not labels
            rows = np.repeat(np.arange(num_docs), np.diff(indptr))[keep]
            indices = indices[keep]
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_docs))])
    else:
        try:
            docs = list(Y)
        except TypeError:
            raise ValueError("Y must be a scipy.sparse label matrix [num_docs, num_labels] or a list of label-id "
                             "lists") from None
        if len(docs) != num_docs:
            raise ValueError(f"Y has {len(docs)} documents but X has {num_docs}")
        lens = np.array([len(np.asarray(d).ravel()) for d in docs], dtype=np.int64)
        indices = (np.concatenate([_as_int_array(np.asarray(d).ravel(), "Y") for d in docs])
                   if lens.sum() else np.zeros(0, np.int64))
        indptr = np.concatenate([[0], np.cumsum(lens)])
        if num_labels is None:
            raise ValueError("num_labels is required when Y is a list of label-id lists")
        L = int(num_labels)
    if indices.size:
        if indices.min() < 0 or indices.max() >= L:
            bad = int(np.flatnonzero((indices < 0) | (indices >= L))[0])
            doc = int(np.searchsorted(indptr, bad, side="right") - 1)
            raise ValueError(f"Y has label id {int(indices[bad])} in document {doc}, outside [0, {L})")
        rows = np.repeat(np.arange(num_docs), np.diff(indptr))
        o = np.lexsort((indices, rows))
        r, c = rows[o], indices[o]
        dup = (r[1:] == r[:-1]) & (c[1:] == c[:-1])
        if dup.any():
            k = int(np.flatnonzero(dup)[0])
            raise ValueError(f"Y has label id {int(c[k])} twice in document {int(r[k])} (duplicate label ids)")
    Yb = sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(num_docs, L))
    Yb.sort_indices()
    return Yb


def _normalize_rows(M):
    """L2-normalise rows (scipy sparse CSR or numpy 2-D), zero rows stay zero."""
    import scipy.sparse as sp

    if sp.issparse(M):
        M = M.tocsr()
        counts = np.diff(M.indptr)
        sq = np.bincount(np.repeat(np.arange(M.shape[0]), counts), weights=np.asarray(M.data, np.float64) ** 2,
                         minlength=M.shape[0])
        n = np.sqrt(sq)
        n[n == 0] = 1
        M.data = (M.data / np.repeat(n, counts)).astype(M.dtype, copy=False)
        return M
    n = np.linalg.norm(M, axis=1, keepdims=True)
    n[n == 0] = 1
    return M / n


def _top_k_rows(M, k: int):
    """Keep the k largest-magnitude entries of every row of a CSR matrix (ties: lower column)."""
    import scipy.sparse as sp

    M = M.tocsr()
    M.sort_indices()
    counts = np.diff(M.indptr)
    if counts.size == 0 or counts.max() <= k:
        return M
    rows = np.repeat(np.arange(M.shape[0]), counts)
    o = np.lexsort((-np.abs(M.data), rows))  # stable: equal magnitudes keep column order
    rank = np.arange(o.size) - M.indptr[rows[o]]
    keep = np.sort(o[rank < k])
    out = sp.csr_matrix((M.data[keep], M.indices[keep], np.concatenate([[0], np.cumsum(np.minimum(counts, k))])),
                        shape=M.shape)
    return out


def pifa(X, Y, *, num_labels: Optional[int] = None, normalize_x: bool = True, top_k: Optional[int] = None,
         graph: Union[None, str, Any] = None, graph_top_k: int = 10, dtype=np.float32):
    """PIFA label features: ``Z = rownorm(Y^T rownorm(X))`` (positive-instance feature aggregation).

    ``X``: ``[n_docs, F]`` scipy.sparse TF-IDF (result sparse CSR; nothing dense of size ``L x n_docs`` or
    ``L x F`` is formed) or dense numpy/torch embeddings (result dense numpy ``[L, F]``).
    ``Y``: ``[n_docs, L]`` scipy.sparse label matrix (stored entries are labels; values ignored) or a list of
    label-id lists with ``num_labels``. Duplicate ids in a document, negative or ``>= L`` ids: ``ValueError``.
    ``top_k``: sparse only, keep the ``k`` largest entries per label row (CascadeXML keeps 1000).
    ``graph``: smoothing over a label graph, CascadeXML/ECLARE style: ``"cooccurrence"`` builds ``G = Y^T Y``
    keeping the ``graph_top_k`` strongest neighbours per label (ties: lower id), diagonal forced to 1, rows
    L1-normalised; or pass your own ``[L, L]`` scipy.sparse ``G``. Then ``Z = rownorm(G_norm @ Z)``.
    Labels without positive documents get a zero row (``LabelTree.build`` places them; see its docs).
    """
    import scipy.sparse as sp

    sparse_x = sp.issparse(X)
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().float().numpy()
    if not sparse_x:
        X = np.asarray(X)
        if X.ndim != 2 or X.dtype.kind != "f":
            raise ValueError(f"X must be a 2-D float matrix [n_docs, F], got shape {X.shape} dtype {X.dtype}")
    elif X.ndim != 2:
        raise ValueError(f"X must be 2-D [n_docs, F], got shape {X.shape}")
    n_docs = X.shape[0]
    Yb = _label_matrix(Y, num_labels, n_docs)
    L = Yb.shape[1]
    if sparse_x:
        Xc = sp.csr_matrix(X, dtype=np.float32, copy=True)
        if not np.isfinite(Xc.data).all():
            raise ValueError("X has NaN or inf values")
        if normalize_x:
            Xc = _normalize_rows(Xc)
        Z = (Yb.T.tocsr() @ Xc).tocsr()
        Z.sum_duplicates()
        if top_k is not None:
            Z = _top_k_rows(Z, int(top_k))
    else:
        Xd = X.astype(np.float32, copy=False)
        if not np.isfinite(Xd).all():
            raise ValueError("X has NaN or inf values")
        if normalize_x:
            Xd = _normalize_rows(Xd)
        Z = np.asarray(Yb.T.tocsr() @ Xd)
    Z = _normalize_rows(Z)
    if graph is not None:
        if isinstance(graph, str):
            if graph != "cooccurrence":
                raise ValueError(f"graph must be 'cooccurrence' or a scipy.sparse [L, L] matrix, got {graph!r}")
            G = (Yb.T.tocsr() @ Yb).tocsr()
            G.setdiag(0)
            G.eliminate_zeros()
            G = _top_k_rows(G, int(graph_top_k))
            G = (G + sp.identity(L, dtype=np.float32, format="csr")).tocsr()
        else:
            if not sp.issparse(graph) or graph.shape != (L, L):
                raise ValueError(f"graph must be 'cooccurrence' or a scipy.sparse [{L}, {L}] matrix")
            G = sp.csr_matrix(graph, dtype=np.float32, copy=True)
            G.setdiag(np.where(G.diagonal() == 0, 1.0, G.diagonal()))
        rs = np.asarray(abs(G).sum(axis=1)).ravel()
        rs[rs == 0] = 1
        G = sp.diags(1.0 / rs) @ G
        Z = G @ Z
        if sp.issparse(Z):
            Z = Z.tocsr()
            if top_k is not None:
                Z = _top_k_rows(Z, int(top_k))
        else:
            Z = np.asarray(Z)
        Z = _normalize_rows(Z)
    if sp.issparse(Z):
        Z = Z.astype(dtype)
        Z.sort_indices()
        return Z
    return Z.astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------------------------
# command line: `cascadexml-fast build-tree`


def add_build_tree_parser(commands) -> None:
    """Register ``build-tree`` on an argparse sub-parser collection."""
    p = commands.add_parser(
        "build-tree", help="cluster labels into a LabelTree (PIFA + balanced spherical k-means)",
        description="Build a label tree. Inputs: --features (label features [L, F]: dense .npy, or scipy "
                    "sparse .npz written by scipy.sparse.save_npz), or --tfidf X + --labels Y to compute PIFA "
                    "features first (X: [n_docs, F] sparse .npz TF-IDF or dense .npy embeddings; Y: [n_docs, L] "
                    "sparse .npz label matrix). Writes tree.json + tree.npz under --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="label features: dense .npy or scipy sparse .npz [L, F]")
    src.add_argument("--tfidf", help="document features for PIFA: sparse .npz or dense .npy [n_docs, F]")
    p.add_argument("--labels", help="label matrix for PIFA: scipy sparse .npz [n_docs, L] (with --tfidf)")
    p.add_argument("--level-sizes", help="node counts of the cluster levels, top first, e.g. 1024,8192,65536")
    p.add_argument("--max-leaf-size", type=int, help="PECOS-style tree: at most this many labels per leaf")
    p.add_argument("--branching", type=int, default=16, help="children per node with --max-leaf-size (16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=20, help="2-means iterations per split at most (20)")
    p.add_argument("--tol", type=float, default=1e-4, help="stop a split when the mean similarity gains less")
    p.add_argument("--top-k", type=int, default=None, help="PIFA: keep the k largest entries per label (sparse)")
    p.add_argument("--graph", choices=["cooccurrence"], default=None,
                   help="PIFA: smooth over the label co-occurrence graph")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory")


def _load_matrix(path: str, what: str):
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    if path.endswith(".npz"):
        import scipy.sparse as sp
        try:
            return sp.load_npz(path).tocsr()
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"{what}: {path} is not a scipy.sparse .npz file ({e})")
    raise SystemExit(f"{what}: expected a .npy (dense) or .npz (scipy sparse) file, got {path}")


def run_build_tree(args) -> int:
    t0 = time.perf_counter()
    if args.tfidf is not None:
        if args.labels is None:
            raise SystemExit("--tfidf needs --labels (the [n_docs, L] label matrix, scipy sparse .npz)")
        X = _load_matrix(args.tfidf, "--tfidf")
        Y = _load_matrix(args.labels, "--labels")
        if not _is_scipy_sparse(Y):
            raise SystemExit("--labels must be a scipy sparse .npz label matrix [n_docs, L]")
        if not _is_scipy_sparse(X):
            X = np.asarray(X)
        feats = pifa(X, Y, top_k=args.top_k, graph=args.graph)
        print(f"PIFA features: {feats.shape[0]} labels x {feats.shape[1]} features "
              f"({'sparse' if _is_scipy_sparse(feats) else 'dense'}), {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    else:
        if args.labels is not None:
            raise SystemExit("--labels goes with --tfidf (PIFA); with --features it is not used")
        feats = _load_matrix(args.features, "--features")
        if not _is_scipy_sparse(feats):
            feats = np.ascontiguousarray(feats)
    if (args.level_sizes is None) == (args.max_leaf_size is None):
        raise SystemExit("give exactly one of --level-sizes and --max-leaf-size")
    sizes = None
    if args.level_sizes is not None:
        try:
            sizes = tuple(int(s) for s in args.level_sizes.split(",") if s.strip())
        except ValueError:
            raise SystemExit(f"--level-sizes must be comma-separated integers, got {args.level_sizes!r}")
    cdt = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.compute_dtype]
    try:
        tree = LabelTree.build(feats, sizes, max_leaf_size=args.max_leaf_size, branching=args.branching,
                               seed=args.seed, max_iter=args.max_iter, tol=args.tol, compute_dtype=cdt,
                               progress=not args.no_progress)
    except ValueError as e:
        raise SystemExit(f"build-tree: {e}")
    tree.save(args.out)
    print(f"{tree} -> {args.out} ({time.perf_counter() - t0:.1f}s)")
    return 0
