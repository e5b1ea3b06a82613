"""Label-tree build: time and peak memory of ``LabelTree.build`` against a one-node-at-a-time baseline.

Synthetic label features of the real shapes (timing does not need real data):
- ``dense-fp16``: ``[L, 768]`` fp16, a mixture of 4096 Gaussian directions plus noise (embedding-like);
- ``sparse``: ``[L, 200K]`` CSR, ``nnz_per_row`` (default uniform in [100, 300]) TF-IDF-like non-negative
  entries, 70% drawn from one of 4096 topic vocabularies and 30% from a Zipf-distributed global vocabulary.

Trees (CascadeXML-style fixed branching): 100K -> 1024/8192; 670K -> 1024/8192/65536 (Amazon-670K's tree);
2.8M -> 2048/16384/131072 (131072 leaves like the Amazon-3M LightXML port).

Baseline (``method = baseline``): plain numpy/scipy recursive balanced 2-means, one node at a time, as
LightXML/AttentionXML's ``cluster.py`` (``split_node``: two random centres, sort by the similarity difference,
halves, tol 1e-4), splitting to the same number of leaf clusters; fp32 numpy matmuls (numpy's BLAS threads) for
dense features (fp16 matmuls in numpy are far slower), scipy for sparse. It runs where its predicted time fits
``--baseline-budget`` seconds (default 600); above that its time is extrapolated from the largest measured
size (time ~ L x rounds) and marked ``extrapolated``.

Peak memory: ``harness.PeakMemory`` (VmHWM; extra over what was allocated before, i.e. the input features are
not counted; ``input_mb`` gives their size).

    python benchmarks/bench_tree.py            # full: 100K, 670K, 2.8M; dense and sparse (about 30-40 min on 2 cores)
    python benchmarks/bench_tree.py --quick    # 100K only
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks import harness  # noqa: E402
from cascadexml_fast.tree import LabelTree  # noqa: E402

TREES = {100_000: (1024, 8192), 670_091: (1024, 8192, 65536), 2_812_281: (2048, 16384, 131072)}


def dense_features(L: int, F: int = 768, topics: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(topics, F, generator=g)
    out = torch.empty(L, F, dtype=torch.float16)
    for s in range(0, L, 65536):
        e = min(L, s + 65536)
        a = torch.randint(0, topics, (e - s,), generator=g)
        out[s:e] = (C[a] + 1.5 * torch.randn(e - s, F, generator=g)).half()
    return out


def sparse_features(L: int, vocab: int = 200_000, nnz_lo: int = 100, nnz_hi: int = 300, topics: int = 4096,
                    seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    counts = rng.integers(nnz_lo, nnz_hi + 1, L)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nnz = int(indptr[-1])
    rows = np.repeat(np.arange(L, dtype=np.int64), counts)
    topic = rng.integers(0, topics, L)[rows]
    width = vocab // topics
    local = rng.random(nnz) < 0.7
    cols = np.where(local, topic * width + rng.integers(0, width, nnz),
                    np.minimum(rng.zipf(1.3, nnz) - 1, vocab - 1)).astype(np.int32)
    del topic, local
    data = (rng.random(nnz, dtype=np.float32) * 0.9 + 0.1)
    M = sp.csr_matrix((data, cols, indptr), shape=(L, vocab))
    M.sum_duplicates()
    return M


# ----------------------------------------------------------------------------------------------------------
# baseline: LightXML / AttentionXML cluster.py, one node at a time


def _split_node(Z, idx, rng, eps=1e-4):
    n = idx.size
    X = Z[idx]
    c_idx = rng.choice(n, 2, replace=False)
    if sp.issparse(X):
        centers = X[c_idx].toarray()
    else:
        centers = X[c_idx]
    old_sim, new_sim = -10000.0, -1.0
    l_idx = r_idx = None
    while new_sim - old_sim >= eps:
        sims = X @ centers.T
        sims = np.asarray(sims)
        order = np.argsort(sims[:, 0] - sims[:, 1])[::-1]
        l_idx, r_idx = order[: n // 2], order[n // 2:]
        old_sim, new_sim = new_sim, (sims[l_idx, 0].sum() + sims[r_idx, 1].sum()) / n
        cl = np.asarray(X[l_idx].sum(axis=0)).ravel()
        cr = np.asarray(X[r_idx].sum(axis=0)).ravel()
        centers = np.stack([cl / max(np.linalg.norm(cl), 1e-30), cr / max(np.linalg.norm(cr), 1e-30)])
        centers = centers.astype(np.float32)
    return idx[l_idx], idx[r_idx]


def baseline_build(features, leaves: int, seed: int = 0):
    """Recursive balanced 2-means to ``leaves`` (a power of two) leaf clusters, one node at a time."""
    rng = np.random.default_rng(seed)
    if sp.issparse(features):
        Z = sp.csr_matrix(features, dtype=np.float32, copy=True)
        nrm = np.sqrt(np.asarray(Z.multiply(Z).sum(axis=1)).ravel())
        nrm[nrm == 0] = 1
        Z = sp.diags(1.0 / nrm).astype(np.float32) @ Z
        Z = Z.tocsr()
    else:
        Z = features.float().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
        Z = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-30)
    nodes = [np.arange(Z.shape[0])]
    depth = int(round(math.log2(leaves)))
    for _ in range(depth):
        nxt = []
        for idx in nodes:  # the loop over nodes the fast build avoids
            nxt.extend(_split_node(Z, idx, rng))
        nodes = nxt
    return nodes


# ----------------------------------------------------------------------------------------------------------


def run_one(kind, L, feats, sizes, seed, method):
    gc.collect()
    t0 = time.perf_counter()
    with harness.PeakMemory("cpu") as pm:
        if method == "fast":
            tree = LabelTree.build(feats, sizes, seed=seed)
            info = dict(rounds=tree.meta["rounds"], mean_iters=float(np.mean(tree.meta["iters_per_round"])),
                        compute_dtype=tree.meta["compute_dtype"])
            del tree
        else:
            leaves = 1 << int(math.ceil(math.log2(sizes[-1])))
            baseline_build(feats, leaves, seed)
            info = {}
    secs = time.perf_counter() - t0
    return dict(secs=secs, peak_extra_mb=None if pm.extra_bytes is None else pm.extra_bytes / harness.MB, **info)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100K labels only")
    ap.add_argument("--sizes", default=None, help="comma-separated label counts (default: 100000,670091,2812281)")
    ap.add_argument("--kinds", default="dense-fp16,sparse")
    ap.add_argument("--nnz", default="100,300", help="sparse: nonzeros per row drawn uniformly in [lo, hi]")
    ap.add_argument("--nnz-large", default="50,150",
                    help="sparse at 2.8M labels: nonzeros per row (lower, to keep the input + build in memory)")
    ap.add_argument("--baseline-budget", type=float, default=600.0,
                    help="run the baseline where its predicted time is below this many seconds")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [100_000] if args.quick else [int(s) for s in (args.sizes or "100000,670091,2812281").split(",")]
    kinds = args.kinds.split(",")
    records = []
    base_rate = {}  # kind -> seconds per (label x round) of the baseline at the largest measured size
    for L in sizes:
        tree_sizes = TREES.get(L) or (1024, 8192, 1 << int(math.log2(max(2, L // 10))))
        rounds = int(math.ceil(math.log2(tree_sizes[-1])))
        for kind in kinds:
            t0 = time.perf_counter()
            if kind == "dense-fp16":
                feats = dense_features(L, seed=args.seed)
                input_mb = feats.numel() * 2 / harness.MB
                nnz_row = None
                F = feats.shape[1]
            elif kind == "sparse":
                lo, hi = (int(v) for v in (args.nnz_large if L > 1_000_000 else args.nnz).split(","))
                feats = sparse_features(L, nnz_lo=lo, nnz_hi=hi, seed=args.seed)
                input_mb = (feats.data.nbytes + feats.indices.nbytes + feats.indptr.nbytes) / harness.MB
                nnz_row = round(feats.nnz / L, 1)
                F = feats.shape[1]
            else:
                raise SystemExit(f"unknown kind {kind}")
            print(f"[{kind} L={L}] features generated in {time.perf_counter() - t0:.1f}s", flush=True)
            base = dict(kind=kind, L=L, F=F, nnz_per_row=nnz_row, levels="/".join(map(str, tree_sizes)),
                        input_mb=round(input_mb, 1))
            r = run_one(kind, L, feats, tree_sizes, args.seed, "fast")
            rec = dict(base, method="fast", seconds=r["secs"], peak_extra_mb=r["peak_extra_mb"],
                       rounds=r.get("rounds"), mean_iters=r.get("mean_iters"), compute_dtype=r.get("compute_dtype"),
                       extrapolated=False, loadavg=harness.loadavg())
            records.append(rec)
            print(harness.format_table([rec]), flush=True)
            fast_secs = r["secs"]
            if not args.no_baseline:
                pred = base_rate[kind] * L * rounds if kind in base_rate else None
                if pred is None or pred <= args.baseline_budget:
                    b = run_one(kind, L, feats, tree_sizes, args.seed, "baseline")
                    base_rate[kind] = b["secs"] / (L * rounds)
                    brec = dict(base, method="baseline", seconds=b["secs"], peak_extra_mb=b["peak_extra_mb"],
                                rounds=rounds, extrapolated=False, loadavg=harness.loadavg())
                else:
                    brec = dict(base, method="baseline", seconds=pred, peak_extra_mb=None, rounds=rounds,
                                extrapolated=True)
                brec["speedup"] = brec["seconds"] / fast_secs
                rec["speedup"] = brec["speedup"]
                records.append(brec)
                print(harness.format_table([brec]), flush=True)
            del feats
            gc.collect()
    cols = ["kind", "L", "F", "nnz_per_row", "levels", "method", "seconds", "speedup", "extrapolated",
            "peak_extra_mb", "input_mb", "rounds", "mean_iters", "compute_dtype"]
    print(harness.format_table(records, cols))
    if not args.no_write:
        meta = dict(device_info=harness.device_info("cpu"), command=harness.command_line(),
                    timestamp=time.strftime("%Y-%m-%d %H:%M:%S"), seed=args.seed,
                    targets="670K < 120 s, 2.8M < 600 s, peak < 12 GiB at 2.8M x 768 fp16 (2 cores)")
        notes = ("speedup = baseline seconds / fast seconds (baseline: one node at a time, numpy/scipy, "
                 "LightXML/AttentionXML cluster.py). extrapolated baseline rows: time ~ L x rounds from the largest "
                 "measured size. peak_extra_mb excludes the input features (input_mb). Other processes shared the "
                 "2 cores during the run: see loadavg in the JSON.")
        paths = harness.write_results("tree_quick" if args.quick else "tree", records, meta, out_dir=args.out,
                                      columns=cols, notes=notes,
                                      plot=dict(x="L", y="seconds", series="method", panels=("kind",)))
        print("wrote", {k: str(v) for k, v in paths.items() if v})
    return 0


if __name__ == "__main__":
    sys.exit(main())
