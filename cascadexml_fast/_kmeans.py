"""Level-synchronous balanced spherical 2-means (the engine behind ``LabelTree.build``).

Vocabulary. *Positions* are tree-order slots ``0..L-1``; ``order[p]`` is the label at position ``p``. Every
node of the tree under construction owns one contiguous position range, so the final ``order`` is the tree
permutation. A *round* splits every unfinished node of the binary bisection tree into two children at once.

Schedule (``plan``), fixed before any data is looked at. Levels ``K_1 <= ... <= K_d <= L`` are laid out top-down
with Bresenham splits: node ``i`` of level ``j`` owns children ``[floor(i*K_{j+1}/K_j), floor((i+1)*K_{j+1}/K_j))``
of level ``j+1`` and leaf cluster ``c`` owns positions ``[floor(c*L/K_d), floor((c+1)*L/K_d))``. A bisection node
covers a run of nodes ``[a, b)`` of one level; it is cut at ``a + (b-a)//2``; a run of one node is that level's node
and continues with the run of its children. Every level is therefore an exact refinement of the one above, every
node of level ``j+1`` holds ``floor`` or ``ceil`` of ``L/K_{j+1}`` labels, and when a run has an even number of nodes
(always, when ratios are powers of two) the two halves differ by at most one label. With power-of-two sizes the
level of ``2^b`` nodes is the snapshot after round ``b`` (CascadeXML's scheme).

One round (``_run_round``): every node to split gets two random distinct members as centres; then, until the
node's objective gains less than ``tol`` (or ``max_iter``), for all still-active nodes at once:
  1. ``d_i = <z_i, c1 - c2>`` for every label of every active node (dense: the round's rows are gathered once,
     normalised, into node-contiguous order, then batched bf16/fp32 matmuls of row tiles against the few centre
     differences each tile touches; sparse: one scipy mat-vec on the round's per-node compressed feature space);
  2. a segmented sort by ``-d`` (one padded ``[nodes, max_size]`` ``torch.sort``, stable): the first ``n_left``
     labels of each node go left, the rest right (the sizes fixed by the schedule);
  3. left-child sums (``embedding_bag`` with 0/1 weights over consecutive rows / a sparse mat-vec; right =
     node total - left), new normalised centres, and the objective ``(|s_left| + |s_right|) / n`` (mean cosine
     to the own centre; it never decreases). Nodes whose gain fell below ``tol`` drop out of the active set.
No Python loop over nodes or labels; loops are over rounds, iterations and fixed-size row chunks.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple  # noqa: F401

import numpy as np
import torch

__all__ = ["plan", "level_offsets", "DenseBackend", "SparseBackend", "bisect"]


# ----------------------------------------------------------------------------------------------------------
# schedule


def _down(j: np.ndarray, u: np.ndarray, sizes: Sequence[int], num_labels: int) -> np.ndarray:
    """Position of the start of node ``u`` of level ``j`` (vectorised over pairs)."""
    K = np.asarray(list(sizes), dtype=np.int64)
    d = len(K)
    u = u.astype(np.int64).copy()
    j = j.astype(np.int64)
    for jj in range(d - 1):
        m = j <= jj
        u[m] = (u[m] * K[jj + 1]) // K[jj]
    return (u * num_labels) // K[d - 1]


def level_offsets(num_labels: int, sizes: Sequence[int]) -> List[np.ndarray]:
    """CSR offsets of each level into the next (the last one into tree-order label ids)."""
    out = []
    sizes = list(sizes)
    for j, k in enumerate(sizes):
        nxt = sizes[j + 1] if j + 1 < len(sizes) else num_labels
        i = np.arange(k + 1, dtype=np.int64)
        out.append((i * nxt) // k)
    return out


def plan(num_labels: int, sizes: Sequence[int]) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rounds of the bisection: per round ``(p0, pm, p1)`` position arrays, one entry per node split in that
    round (node ``[p0, p1)`` -> left ``[p0, pm)``, right ``[pm, p1)``), in position order."""
    sizes = [int(s) for s in sizes]
    d = len(sizes)
    if d == 0:
        return []
    K = np.asarray(sizes, dtype=np.int64)
    j = np.zeros(1, np.int64)
    a = np.zeros(1, np.int64)
    b = np.array([sizes[0]], np.int64)
    rounds = []
    while j.size:
        for _ in range(d):  # a run of a single node continues with the run of its children
            m = (b - a == 1) & (j < d - 1)
            if not m.any():
                break
            jm = j[m]
            am = a[m]
            a[m] = (am * K[jm + 1]) // K[jm]
            b[m] = ((am + 1) * K[jm + 1]) // K[jm]
            j[m] = jm + 1
        split = b - a >= 2
        j, a, b = j[split], a[split], b[split]  # the rest are finished leaf clusters
        if not j.size:
            break
        mid = a + (b - a) // 2
        p0, pm, p1 = _down(j, a, sizes, num_labels), _down(j, mid, sizes, num_labels), _down(j, b, sizes, num_labels)
        rounds.append((p0, pm, p1))
        j = np.repeat(j, 2)
        a, b = np.stack([a, mid], 1).ravel(), np.stack([mid, b], 1).ravel()
    return rounds


# ----------------------------------------------------------------------------------------------------------
# backends


def _bf16_fast() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 / AMX), i.e. bf16 matmuls beat fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


class DenseBackend:
    """Dense features ``[L, F]`` (any float dtype, any device), clustered in a compute dtype (bf16 or fp32).

    Each round gathers its labels once, in round order, into ``Wr [M, F]`` (rows L2-normalised and cast to the
    compute dtype, chunk by chunk), so every node is a contiguous row block: differences are batched matmuls
    over tiles of consecutive rows, child sums are ``embedding_bag`` over consecutive rows with 0/1 weights.
    Only the input and one working copy are ever held (2.8M x 768 fp16 in, bf16 copy: 8.6 GB).

    bf16 is the default for fp16/bf16 input (fast bf16 matmuls on CPUs with AVX512-BF16/AMX and on GPUs; fp32
    elsewhere); fp32 input is clustered in fp32 unless ``compute_dtype`` says otherwise. Sums accumulate in fp32
    inside the kernels; centres and objectives are fp32.
    """

    def __init__(self, features: torch.Tensor, compute_dtype: Optional[torch.dtype] = None,
                 chunk_rows: int = 65536):
        if compute_dtype is None:
            if features.dtype in (torch.float16, torch.bfloat16):
                compute_dtype = torch.bfloat16 if (features.is_cuda or _bf16_fast()) else torch.float32
            else:
                compute_dtype = torch.float32
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        self.X = features
        self.device = features.device
        self.dtype = compute_dtype
        self.chunk = int(chunk_rows)
        L, F = features.shape
        # inverse row norms (0 for zero rows), checking for NaN/inf on the way
        self.inv_norm = torch.empty(L, dtype=torch.float32, device=self.device)
        step = max(1, (1 << 24) // max(F, 1))
        for s in range(0, L, step):
            x = features[s:s + step]
            if x.dtype == torch.float64:
                nrm = torch.linalg.vector_norm(x, dim=1).to(torch.float32)
            else:
                nrm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
            if not bool(torch.isfinite(nrm).all()):
                bad = ~torch.isfinite(x).all(dim=1)
                if bool(bad.any()):
                    row = s + int(bad.nonzero()[0, 0])
                    raise ValueError(f"label_features has NaN or inf values (first in row {row})")
                nrm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).to(torch.float32)
                if not bool(torch.isfinite(nrm).all()):  # norms beyond fp32: scale in float64
                    nrm = torch.linalg.vector_norm(x.double() * 1e-200, dim=1) * 1e200
            inv = torch.where(nrm > 0, 1.0 / nrm.double(), torch.zeros_like(nrm, dtype=torch.float64))
            self.inv_norm[s:s + step] = inv.to(torch.float32)
        self.num_zero_rows = int((self.inv_norm == 0).sum())
        self.Wr = None

    def begin_round(self, lab0: torch.Tensor, seg: torch.Tensor, K: int) -> None:
        M = lab0.numel()
        F = self.X.shape[1]
        pad = self.chunk
        if self.Wr is None or self.Wr.shape[0] < M + pad:
            self.Wr = None
            self.Wr = torch.empty((M + pad, F), dtype=self.dtype, device=self.device)
        Wr = self.Wr
        step = max(1, (1 << 24) // max(F, 1))
        lab0 = lab0.to(self.device)
        for s in range(0, M, step):
            idx = lab0[s:s + step]
            x = self.X.index_select(0, idx).to(torch.float32)
            x *= self.inv_norm.index_select(0, idx)[:, None]
            Wr[s:s + idx.numel()].copy_(x)
        Wr[M:M + pad].zero_()
        self.M = M
        self.seg = seg
        self.K = K
        ones = torch.ones(M, dtype=self.dtype, device=self.device)
        q0 = torch.cumsum(torch.bincount(seg, minlength=K), 0)
        q0 = torch.cat([q0.new_zeros(1), q0[:-1]])
        self.total = torch.nn.functional.embedding_bag(
            torch.arange(M, device=self.device), Wr[:M], q0, mode="sum", per_sample_weights=ones).float()
        self.D = torch.zeros((K, F), dtype=self.dtype, device=self.device)

    def init_centroids(self, s1: torch.Tensor, s2: torch.Tensor) -> None:
        c1 = self.Wr.index_select(0, s1).float()
        c2 = self.Wr.index_select(0, s2).float()
        self.D = (c1 - c2).to(self.dtype)

    def diff(self, slots: Optional[torch.Tensor], seg: torch.Tensor, nodes: torch.Tensor, nmin: int) -> torch.Tensor:
        """``<z, c1 - c2>`` for the round rows ``slots`` (None: all rows); ``seg`` (non-decreasing) indexes
        ``nodes``, the active nodes."""
        M = self.M if slots is None else slots.numel()
        F = self.Wr.shape[1]
        out = torch.empty(M, dtype=torch.float32, device=self.device)
        if M == 0:
            return out
        T = 64  # tile height about twice the smallest node: a tile spans few nodes
        while T < 2 * nmin and T < self.chunk:
            T *= 2
        C = max(T, (self.chunk // T) * T)
        if slots is not None:
            if getattr(self, "_buf", None) is None or self._buf.shape[0] < C or self._buf.dtype != self.dtype:
                self._buf = torch.empty((C, F), dtype=self.dtype, device=self.device)
        D = self.D if slots is None else self.D.index_select(0, nodes)
        K = D.shape[0]
        ar = torch.arange(T, device=self.device)
        for s in range(0, M, C):
            e = min(s + C, M)
            n = e - s
            nt = -(-n // T)
            if slots is None:
                rows = self.Wr[s:s + nt * T]  # zero padding rows after M
            else:
                rows = self._buf[:nt * T]
                torch.index_select(self.Wr, 0, slots[s:e], out=rows[:n])
                if nt * T > n:
                    rows[n:].zero_()
            sg = seg[s:e]
            if nt * T > n:
                sg = torch.cat([sg, sg[-1:].expand(nt * T - n)])
            sg = sg.view(nt, T)
            first = sg[:, 0]
            P = int((sg[:, -1] - first).max()) + 1
            idx = (first[:, None] + ar[:P]).clamp_(max=K - 1)
            Dt = D.index_select(0, idx.view(-1)).view(nt, P, F).transpose(1, 2).contiguous()
            res = torch.bmm(rows.view(nt, T, F), Dt)  # [nt, T, P]
            if P == 1:
                out[s:e] = res.view(-1)[:n]
            else:
                col = (sg - first[:, None]).view(-1, 1)
                out[s:e] = res.view(-1, P).gather(1, col).view(-1)[:n]
        return out

    def update(self, slots: Optional[torch.Tensor], left: torch.Tensor, starts: torch.Tensor, nodes: torch.Tensor):
        """Left sums over the active ``nodes`` (their rows ``slots`` (None: all), ``left`` 0/1 per row, node
        ``i`` starting at ``starts[i]``); updates the centre differences; returns (|s_left|, |s_right|)."""
        idx = torch.arange(self.M, device=self.device) if slots is None else slots
        SL = torch.nn.functional.embedding_bag(idx, self.Wr, starts, mode="sum",
                                               per_sample_weights=left.to(self.dtype)).float()
        SR = self.total.index_select(0, nodes) - SL
        nl = torch.linalg.vector_norm(SL, dim=1)
        nr = torch.linalg.vector_norm(SR, dim=1)
        SL /= nl.clamp_min(1e-30)[:, None]
        SR /= nr.clamp_min(1e-30)[:, None]
        SL -= SR
        self.D[nodes] = SL.to(self.dtype)
        return nl, nr

    def end_round(self) -> None:
        self.D = None
        self.total = None

    def close(self) -> None:
        self.Wr = None
        self._buf = None


class SparseBackend:
    """Sparse features (scipy CSR, rows L2-normalised, fp32), exact.

    Each round compresses the feature space per node: the (node, feature) pairs present among a node's members
    get consecutive ids ``u`` (``Z[round labels].tocsc()`` lists each column's rows in round order, so a new pair
    starts wherever the node changes along a column: linear time, no sort). With ``Zu [M, U]`` (rows: the
    round's labels, columns: pairs) the differences are ``Zu @ D`` and the left sums ``Zu.T @ left``; centres
    live on the ``U`` pairs. Single-threaded (scipy).
    """

    def __init__(self, features, compute_dtype=None):
        import scipy.sparse as sp

        Z = sp.csr_matrix(features, dtype=np.float32, copy=True)
        Z.sum_duplicates()
        if not np.isfinite(Z.data).all():
            bad = np.flatnonzero(~np.isfinite(Z.data))[0]
            row = int(np.searchsorted(Z.indptr, bad, side="right") - 1)
            raise ValueError(f"label_features has NaN or inf values (first in row {row})")
        counts = np.diff(Z.indptr)
        sq = np.bincount(np.repeat(np.arange(Z.shape[0]), counts), weights=Z.data.astype(np.float64) ** 2,
                         minlength=Z.shape[0])
        nrm = np.sqrt(sq)
        self.num_zero_rows = int((nrm == 0).sum())
        nrm[nrm == 0] = 1.0
        Z.data /= np.repeat(nrm, counts).astype(np.float32)
        Z.eliminate_zeros()
        self.Z = Z
        self.device = torch.device("cpu")

    def begin_round(self, lab0: torch.Tensor, seg: torch.Tensor, K: int) -> None:
        import scipy.sparse as sp

        lab = lab0.numpy()
        seg = seg.numpy().astype(np.int32 if K < 2**31 - 1 else np.int64)
        Zc = self.Z[lab].tocsc()
        Zc.sort_indices()
        node = seg[Zc.indices]
        nnz = node.size
        flags = np.zeros(nnz, dtype=bool)
        if nnz:
            flags[1:] = node[1:] != node[:-1]
            flags[Zc.indptr[:-1][np.diff(Zc.indptr) > 0]] = True
        ustart = np.flatnonzero(flags)
        del flags
        self.node_of_u = node[ustart]
        del node
        self.M, self.K = lab.size, K
        itype = np.int32 if max(nnz, lab.size) < 2**31 - 1 else np.int64
        indptr = np.append(ustart, nnz).astype(itype)
        self.Zu = sp.csc_matrix((Zc.data, Zc.indices.astype(itype, copy=False), indptr),
                                shape=(lab.size, ustart.size))
        del Zc
        self.total = np.asarray(self.Zu.T @ np.ones(self.M, dtype=np.float32), dtype=np.float64).ravel()
        self.D = np.zeros(ustart.size, dtype=np.float32)
        self._v = np.zeros(self.M, dtype=np.float32)
        self._sl, self._sr, self._tmp = (np.empty(ustart.size, dtype=np.float64) for _ in range(3))

    def init_centroids(self, s1: torch.Tensor, s2: torch.Tensor) -> None:
        v = np.zeros(self.M, dtype=np.float32)
        np.add.at(v, s1.numpy(), 1.0)
        np.add.at(v, s2.numpy(), -1.0)
        self.D = np.asarray(self.Zu.T @ v, dtype=np.float32).ravel()

    def diff(self, slots: Optional[torch.Tensor], seg: torch.Tensor, nodes: torch.Tensor, nmin: int) -> torch.Tensor:
        full = np.asarray(self.Zu @ self.D, dtype=np.float32).ravel()
        return torch.from_numpy(full if slots is None else full[slots.numpy()])

    def update(self, slots: Optional[torch.Tensor], left: torch.Tensor, starts: torch.Tensor, nodes: torch.Tensor):
        # Arrays of U (feature, node) pairs are tens of MB: every fresh one costs its page faults, which cost
        # more than the arithmetic, so the pass works in buffers kept for the round (out=, take instead of
        # boolean masks); the values are computed exactly as before (float64 sums, division).
        v = self._v
        if slots is None:
            v[:] = left.numpy()
        else:
            v.fill(0)
            v[slots.numpy()] = left.numpy()
        sl32 = self.Zu.T @ v
        nd = nodes.numpy()
        if nd.size == self.K:
            sel = None
            nu = self.node_of_u
            SL, SR, tmp = self._sl, self._sr, self._tmp
            np.copyto(SL, sl32)
            np.subtract(self.total, SL, out=SR)
        else:
            act = np.zeros(self.K, dtype=bool)
            act[nd] = True
            sel = np.flatnonzero(act.take(self.node_of_u))
            nu = self.node_of_u.take(sel)
            n = sel.size
            SL, SR, tmp = self._sl[:n], self._sr[:n], self._tmp[:n]
            np.copyto(SL, sl32.take(sel))
            np.take(self.total, sel, out=SR)
            np.subtract(SR, SL, out=SR)
        del sl32
        np.multiply(SL, SL, out=tmp)
        nl = np.sqrt(np.bincount(nu, tmp, minlength=self.K))
        np.multiply(SR, SR, out=tmp)
        nr = np.sqrt(np.bincount(nu, tmp, minlength=self.K))
        np.take(np.maximum(nl, 1e-30), nu, out=tmp)
        np.divide(SL, tmp, out=SL)
        np.take(np.maximum(nr, 1e-30), nu, out=tmp)
        np.divide(SR, tmp, out=SR)
        np.subtract(SL, SR, out=SL)
        if sel is None:
            np.copyto(self.D, SL, casting="same_kind")
        else:
            self.D[sel] = SL
        return torch.from_numpy(nl[nd].astype(np.float32)), torch.from_numpy(nr[nd].astype(np.float32))

    def end_round(self) -> None:
        self.Zu = None
        self.D = None
        self.node_of_u = None
        self.total = None
        self._v = self._sl = self._sr = self._tmp = None

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# engine


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(s, s + n)`` over pairs, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=starts.device)
    cum = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - cum, lengths, output_size=total) + torch.arange(
        total, device=starts.device)


def _run_round(backend, order: torch.Tensor, p0, pm, p1, rng: np.random.Generator, max_iter: int,
               tol: float, stats: dict) -> None:
    dev = backend.device
    K = p0.size
    n_np = (p1 - p0).astype(np.int64)
    n = torch.from_numpy(n_np).to(dev)
    nl = torch.from_numpy((pm - p0).astype(np.int64)).to(dev)
    pos = _ranges(torch.from_numpy(p0).to(dev), n)  # round row i sits at tree position pos[i]
    M = pos.numel()
    q0 = torch.cumsum(n, 0) - n  # node k owns round rows [q0[k], q0[k] + n[k])
    seg_all = torch.repeat_interleave(torch.arange(K, device=dev), n, output_size=M)
    lab0 = order[pos]
    backend.begin_round(lab0, seg_all, K)
    # two distinct random members per node
    r1 = np.floor(rng.random(K) * n_np).astype(np.int64)
    r2 = np.floor(rng.random(K) * (n_np - 1)).astype(np.int64)
    r2 += r2 >= r1
    backend.init_centroids(q0 + torch.from_numpy(r1).to(dev), q0 + torch.from_numpy(r2).to(dev))

    arrangement = torch.arange(M, device=dev)  # round row at each round slot (final order of the round)
    active = torch.arange(K, device=dev)
    prev = torch.full((K,), -math.inf, dtype=torch.float32, device=dev)
    it = 0
    cache_key = None
    while active.numel() and it < max_iter:
        it += 1
        Ka = active.numel()
        if cache_key != Ka:  # the active set changed: rebuild the index arrays of the segmented sort
            cache_key = Ka
            full = Ka == K
            na = n[active]
            nla = nl[active]
            nmax = int(na.max())
            nmin = int(na.min())
            slots = None if full else _ranges(q0[active], na)
            Ma = M if full else slots.numel()
            start_a = torch.cumsum(na, 0) - na
            local_seg = torch.repeat_interleave(torch.arange(Ka, device=dev), na, output_size=Ma)
            flat = torch.arange(Ma, device=dev) - start_a[local_seg] + local_seg * nmax  # slot in [Ka, nmax]
            padded = torch.arange(Ka * nmax, device=dev).view(Ka, nmax) % nmax >= na[:, None]
            valid_flat = (~padded).view(-1).nonzero().view(-1)
            thresh = nla[local_seg]
            rows_a = arrangement.new_empty(0) if full else slots
        d = backend.diff(slots, local_seg, active, nmin)
        key = torch.full((Ka * nmax,), math.inf, dtype=torch.float32, device=dev)
        key[flat] = -d  # most similar to c1 first
        sidx = torch.sort(key.view(Ka, nmax), dim=1, stable=True).indices
        del key
        # rank of every row within its node; the first nl ranks go left
        rank = torch.empty_like(sidx)
        rank.scatter_(1, sidx, torch.arange(nmax, device=dev).expand(Ka, nmax))
        left = rank.view(-1)[flat] < thresh
        src = (sidx + start_a[:, None]).view(-1)[valid_flat]  # active rows in sorted order (a-local)
        if full:
            arrangement = src
        else:
            arrangement[slots] = slots[src]
        del sidx, rank, src
        sl, sr = backend.update(slots, left, start_a, active)
        obj = (sl.to(dev) + sr.to(dev)) / n[active].to(torch.float32)
        gain = obj - prev[active]
        prev[active] = obj
        active = active[gain >= tol]
        stats["row_iters"] = stats.get("row_iters", 0) + Ma
    stats.setdefault("iters", []).append(it)
    order[pos] = lab0[arrangement]
    backend.end_round()


def bisect(backend, num_labels: int, sizes: Sequence[int], *, seed: int = 0, max_iter: int = 20,
           tol: float = 1e-4, progress: Optional[Callable[[int, int, dict], None]] = None) -> Tuple[torch.Tensor, dict]:
    """Run every round of ``plan(num_labels, sizes)``; returns the tree permutation (position -> label, int64
    on CPU) and statistics (iterations per round)."""
    rounds = plan(num_labels, sizes)
    order = torch.arange(num_labels, device=backend.device)
    stats: dict = {"rounds": len(rounds)}
    try:
        for r, (p0, pm, p1) in enumerate(rounds):
            rng = np.random.default_rng([int(seed), r])
            _run_round(backend, order, p0, pm, p1, rng, max_iter, tol, stats)
            if progress is not None:
                progress(r + 1, len(rounds), {"nodes": int(p0.size), "iters": stats["iters"][-1]})
    finally:
        backend.close()
    return order.cpu(), stats
