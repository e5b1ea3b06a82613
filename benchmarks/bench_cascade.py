"""Benchmark of `cascadexml_fast.cascade_search` (whole-tree beam search) against the reference cascade, a dense
x @ W.T + topk over all labels and the bytes-touched roofline, with a per-row check of the ids.

    python benchmarks/bench_cascade.py                 # GPU when present, else CPU (full run)
    python benchmarks/bench_cascade.py --quick         # fewer shapes / reps
    python benchmarks/bench_cascade.py --device cpu --trees 670k --dtypes fp32 --out /tmp/res

Trees are built synthetically with evenly split children (offsets[i] = floor(arange(n_i + 1) * n_{i+1} / n_i)):
Amazon-670K's CascadeXML shape 1024 / 8192 / 65536 / 670,091 (8, 8, 10-11 children) and a 2.8M-label tree
1024 / 16384 / 262144 / 2,812,281 (16, 16, 10-11 children); beams 128 / 256 / 400; D = 768; tables random with
std 0.05 (logits O(1)), one feature matrix per level (CascadeXML feeds each level from its own encoder layer).
dtype "int8": the fp32 tables quantised by cascadexml_fast.quantize_table (int8 rows + per-row fp32 scales, passed as
weight_scales), fp32 biases and features; the reference cascade then dequantises the rows it gathers, and there is
no dense baseline (it would dequantise the whole label table).
See benchmarks/README.md ("bench_topk.py and bench_cascade.py") for every column and the roofline.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parent.parent
try:  # imported as benchmarks.bench_cascade (tests), or run as a script from anywhere
    from benchmarks import harness
    from benchmarks.trees import TREES, Tree
    from benchmarks import bench_topk as _bt
except ImportError:  # appended, not prepended: an installed cascadexml_fast keeps precedence over the tree
    sys.path.append(str(REPO))
    from benchmarks import harness
    from benchmarks.trees import TREES, Tree
    from benchmarks import bench_topk as _bt

NAME = "cascade"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
INT8 = "int8"  # tables int8 + per-row fp32 scales; features and biases fp32
# fused_graph: CUDA only (the op replayed as a CUDA graph). fused_loop: CPU, B = 1 only: the op on a different document
# each call without flushing caches in between (a serving loop: level 0 and popular nodes stay cached).
METHODS = ("fused", "reference", "dense", "fused_graph", "fused_loop")
LOOP_DOCUMENTS = 16  # documents fused_loop cycles through

COLUMNS = ["method", "tree", "dtype", "B", "threads", "ms", "p10_ms", "p90_ms", "n", "ms_per_doc", "docs_per_s",
           "gbps", "pct_roofline", "x_vs_ref", "x_vs_dense", "extra_mb", "rows_touched", "ids_equal", "check", "note"]
HEADERS = {"p10_ms": "p10", "p90_ms": "p90", "ms_per_doc": "ms/doc", "docs_per_s": "docs/s", "gbps": "GB/s",
           "pct_roofline": "%roof", "x_vs_ref": "x ref", "x_vs_dense": "x dense", "extra_mb": "extra MB",
           "rows_touched": "rows", "ids_equal": "ids eq"}

SCALE = 0.05  # std of the random tables: logits = <x, w> + b with x ~ N(0, 1), D = 768 -> std ~1.4


# ----------------------------------------------------------------------------------------------------------
# trees, inputs




@dataclass(frozen=True)
class Case:
    tree: str
    B: int
    dtype: str
    threads: Optional[int] = None  # CPU: None = all of torch's threads; GPU: None
    methods: Tuple[str, ...] = ("fused", "reference", "dense")


def plan(device: str, preset: str) -> List[Case]:
    """Shapes per device and preset (full / quick / tiny)."""
    frd = ("fused", "reference", "dense")
    if preset == "tiny":
        return ([Case("tiny", 1, dt, 1, frd + ("fused_loop",)) for dt in ("fp32", "bf16")]
                + [Case("tiny", 5, "fp32", None, frd)]
                + [Case("tiny", 1, INT8, 1, ("fused", "reference"))])
    if device == "cuda":
        allm = ("fused", "reference", "dense", "fused_graph")  # graph last: a failed capture cannot spoil the rest
        if preset == "quick":
            return [Case("670k", B, "bf16", None, allm) for B in (1, 256)] + [Case("2.8m", 256, "bf16", None, allm)]
        return ([Case("670k", B, dt, None, allm) for dt in ("bf16", "fp32") for B in (1, 32, 256)]
                + [Case("2.8m", B, "bf16", None, allm) for B in (1, 32, 256)])
    if preset == "quick":
        return [Case("670k", 1, "fp32", 1, frd), Case("670k", 32, "fp32", None, ("fused", "reference")),
                Case("670k", 1, "bf16", 1, frd)]
    cases: List[Case] = []
    for dt in ("fp32", "bf16"):
        cases += [Case("670k", 1, dt, 1, frd + ("fused_loop",)), Case("670k", 32, dt, None, frd),
                  Case("670k", 256, dt, None, ("fused", "reference"))]  # dense at B=256: ~4-11 s a call on 2 cores
    cases += [Case("670k", 1, INT8, 1, ("fused", "reference", "fused_loop")),
              Case("670k", 256, INT8, None, ("fused", "reference"))]
    return cases


def make_table(rows: int, D: int, device: torch.device, dtype: torch.dtype, g: torch.Generator,
               chunk: int = 1 << 16) -> torch.Tensor:
    """[rows, D] with std SCALE, generated in chunks straight into `dtype` (no full-size fp32 temporary).
    CPU: uniform (faster than randn on 2 cores); GPU: normal. Values do not change the timing, only the beams."""
    W = harness.table_empty((rows, D), dtype, device)  # huge pages on CPU, as the library's layers
    half = SCALE * math.sqrt(3.0)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        if device.type == "cuda":
            blk = torch.randn(n, D, device=device, generator=g).mul_(SCALE)
        else:
            blk = torch.rand(n, D, generator=g).mul_(2 * half).sub_(half)
        W[s:s + n] = blk
    return W


def make_tables(tree: Tree, D: int, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    weights = [make_table(n, D, device, dtype, g) for n in tree.sizes]
    biases = [make_table(n, 1, device, dtype, g).view(n) for n in tree.sizes]
    return weights, biases


def make_features(tree: Tree, B: int, D: int, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, D, device=device, generator=g).to(dtype) for _ in range(tree.levels)]


# ----------------------------------------------------------------------------------------------------------
# bytes, flops


def rows_from_trace(trace: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[List[int], List[int]]:
    """Per level: (distinct table rows the batch scored, (document, row) pairs scored), from a beam-search trace
    of (candidate ids [B, n] with -1 pads, logits)."""
    distinct, pairs = [], []
    for ids, _ in trace:
        valid = ids[ids >= 0]
        pairs.append(int(valid.numel()))
        distinct.append(int(torch.unique(valid).numel()))
    return distinct, pairs


def rows_from_tree(tree: Tree, B: int) -> Tuple[List[int], List[int]]:
    """Fallback without a trace: level 0 all rows; level i the beam's children at the mean block size; distinct rows
    assume no overlap between documents (capped at the level size)."""
    pairs = [B * tree.sizes[0]]
    distinct = [tree.sizes[0]]
    for i in range(1, tree.levels):
        per_doc = min(tree.beams[i - 1], tree.sizes[i - 1]) * tree.sizes[i] / tree.sizes[i - 1]
        pairs.append(int(round(B * per_doc)))
        distinct.append(int(min(tree.sizes[i], round(B * per_doc))))
    return distinct, pairs


def op_bytes(distinct: Sequence[int], pairs: Sequence[int], *, B: int, D: int, k: int, s_w: int, s_b: int,
             s_x: int, s_scale: int = 0) -> Dict[str, int]:
    """Unavoidable bytes of one search: every table row the batch scores read once (row + bias, + the row's fp32
    scale for int8 tables: distinct rows over the batch, each level), the per-level features read once, ids (int64)
    and scores (fp32) [B, k] written once. Candidate scores between levels stay on chip in a fused kernel, so they
    are not counted. `no_dedup`: a row is read once per document that scores it."""
    row = D * s_w + s_b + s_scale
    common = len(distinct) * B * D * s_x + B * k * (8 + 4)
    return dict(bytes=sum(distinct) * row + common, bytes_no_dedup=sum(pairs) * row + common)


def op_flops(pairs: Sequence[int], D: int) -> int:
    return 2 * D * sum(pairs)


# ----------------------------------------------------------------------------------------------------------
# correctness


def compare_ids(ids: torch.Tensor, scores: torch.Tensor, rids: torch.Tensor, rscores: torch.Tensor,
                tol: float = 1e-3) -> Dict[str, Any]:
    """Fused vs reference, per row. ids_equal: fraction of (row, slot) ids equal; rows_equal: fraction of rows whose
    k ids are all equal; score_err: max |score diff| on equal ids. check: "ok" when every row is equal; "near-tie"
    when the differing rows' scores still agree slot by slot within `tol` (an accumulation-order flip between
    near-equal scores); "MISMATCH" otherwise, or when an equal id carries a different score."""
    ids, rids = ids.cpu(), rids.cpu()
    s, rs = scores.float().cpu(), rscores.float().cpu()
    if ids.shape != rids.shape:
        return dict(ids_equal=0.0, rows_equal=0.0, check=f"MISMATCH shape {tuple(ids.shape)} vs {tuple(rids.shape)}")
    eq = ids == rids
    row_eq = eq.all(dim=1)
    both = eq & (rids >= 0)
    diff = (s - rs).abs()
    score_err = float(diff[both].max()) if bool(both.any()) else 0.0
    bad = (~row_eq).nonzero().flatten()
    out = dict(ids_equal=float(eq.double().mean()), rows_equal=float(row_eq.double().mean()), score_err=score_err,
               bad_rows=bad[:8].tolist())
    slot_err = torch.where(torch.isinf(s) & torch.isinf(rs) & (s == rs), torch.zeros_like(diff), diff)
    bad_err = float(slot_err[bad].max()) if bad.numel() else 0.0
    out["bad_rows_score_err"] = bad_err
    if score_err > tol:
        out["check"] = f"MISMATCH scores (max err {score_err:.2e})"
    elif bad.numel() == 0:
        out["check"] = "ok"
    elif bad_err <= tol:
        out["check"] = f"near-tie {bad.numel()}/{ids.shape[0]} rows"
    else:
        out["check"] = f"MISMATCH {bad.numel()}/{ids.shape[0]} rows"
    return out


# ----------------------------------------------------------------------------------------------------------
# the timed callables


def graph_callable(call: Callable[[], Any]) -> Callable[[], Any]:
    """Capture `call` in a CUDA graph (after 3 warm-up calls on a side stream); the result replays it and returns the
    graph's static outputs. Raises when the call cannot be captured (e.g. it syncs with the host)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = call()

    def replay():
        g.replay()
        return static

    replay.graph = g  # keep alive
    return replay


def memory_estimate(method: str, tree: Tree, B: int, D: int, s_w: int) -> int:
    """Generous guess of a call's extra bytes, to skip shapes that cannot fit (never exact)."""
    widest = max([tree.sizes[0]] + [b * m for b, m in zip(tree.beams, tree.max_children())])
    if method == "reference":  # gathers [B, n, D] rows in the storage dtype, then an fp32 copy
        return B * widest * D * (s_w + 4) + B * widest * 64
    if method == "dense":
        return B * tree.L * (max(s_w, 4) + 8) * 2
    return B * widest * 64


# ----------------------------------------------------------------------------------------------------------
# measurement


def run(cases: Sequence[Case], device: torch.device, timing: Dict[str, Any], *, D: int, k: int, combine: str,
        bandwidth: Dict[Any, float], peaks: Dict[Any, float], cx, ref, validate: bool = False, seed: int = 0,
        methods: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    records: List[Dict[str, Any]] = []
    cuda = device.type == "cuda"
    # group by tree (tables built once per tree and dtype; fp32 tables converted for the other dtypes)
    order: List[Tuple[str, str]] = []
    for c in cases:
        if (c.tree, c.dtype) not in order:
            order.append((c.tree, c.dtype))
    first = [t for t, _ in order]
    order.sort(key=lambda td: first.index(td[0]))  # stable: each tree's dtypes together, in plan order
    fp32_cache: Dict[str, Any] = {}

    for tname, dname in order:
        tree = TREES[tname]
        dtype = DTYPES[dname]
        if tname not in fp32_cache:
            fp32_cache.clear()
            if cuda:
                torch.cuda.empty_cache()
        t0 = time.perf_counter()
        need_fp32 = any(c.tree == tname and c.dtype in ("fp32", INT8) for c in cases)
        if need_fp32 and tname not in fp32_cache:
            fp32_cache[tname] = make_tables(tree, D, device, torch.float32, seed)
        scales = None
        if dname == INT8:
            from benchmarks.bench_shortlist_score import quantize

            Wf, bf = fp32_cache[tname]
            quantised = [quantize(w) for w in Wf]
            weights, scales, biases = [q for q, _ in quantised], [sc for _, sc in quantised], list(bf)
        elif tname in fp32_cache:
            Wf, bf = fp32_cache[tname]
            weights, biases = [harness.table_as(w, dtype) for w in Wf], [b.to(dtype) for b in bf]
        else:
            weights, biases = make_tables(tree, D, device, dtype, seed)
        harness.synchronize(device)
        log(f"# tree {tname} {'/'.join(map(str, tree.sizes))} D={D} {dname}: tables built in "
            f"{time.perf_counter() - t0:.1f} s")
        offsets = [o.to(device) for o in tree.offsets()]
        mc = tree.max_children()
        beams = list(tree.beams)
        s_w, s_b = weights[0].element_size(), biases[0].element_size()
        s_scale = 4 if scales is not None else 0
        x_dtype = torch.float32 if dname == INT8 else dtype

        for c in [c for c in cases if c.tree == tname and c.dtype == dname]:
            B = c.B
            X = make_features(tree, B, D, device, x_dtype, seed + 17 * B + 1)
            nthreads = None if cuda else (c.threads or torch.get_num_threads())
            tkey = None if cuda else nthreads
            base = dict(device=device.type, tree=tname, sizes="/".join(map(str, tree.sizes)),
                        beams="/".join(map(str, beams)), L=tree.L, D=D, k=k, combine=combine, dtype=dname, B=B,
                        threads=nthreads, shape=f"{tname} B={B}" + (f" t{nthreads}" if nthreads else ""))
            want = [m for m in c.methods if (methods is None or m in methods)]
            if not cuda:
                want = [m for m in want if m != "fused_graph"]
            if cuda or B != 1:
                want = [m for m in want if m != "fused_loop"]
            if cx is None:
                want = [m for m in want if m not in ("fused", "fused_graph", "fused_loop")]
            if dname == INT8:
                want = [m for m in want if m != "dense"]  # would dequantise the whole label table
            state: Dict[str, Any] = {"trace": []}

            def ref_call():
                trace = state.pop("trace", None)  # the first call records the beams (rows touched per level)
                out = ref.beam_search(X, weights, biases, offsets, beams, mc, k, combine,
                                      score_fn=ref.shortlist_score, block_score_fn=ref.block_score,
                                      topk_fn=ref.topk, trace=trace, weight_scales=scales)
                if trace is not None:
                    state["trace_done"] = trace
                return out

            def fused_call():
                if scales is not None:
                    return cx.cascade_search(X, weights, biases, offsets, beams, k, combine, max_children=mc,
                                             validate=validate, weight_scales=scales)
                return cx.cascade_search(X, weights, biases, offsets, beams, k, combine, max_children=mc,
                                         validate=validate)

            loop_features = [make_features(tree, B, D, device, x_dtype, seed + 17 * B + 1 + 1000 * (i + 1))
                             for i in range(LOOP_DOCUMENTS)] if "fused_loop" in c.methods and not cuda else []
            loop_turn = [0]

            def loop_call():  # the next document of the cycle
                loop_turn[0] += 1
                feats = loop_features[loop_turn[0] % LOOP_DOCUMENTS]
                return cx.cascade_search(feats, weights, biases, offsets, beams, k, combine, max_children=mc,
                                         validate=validate, **({"weight_scales": scales} if scales is not None else {}))

            def dense_call():
                return torch.topk(X[-1] @ weights[-1].T + biases[-1], k, dim=1)

            outs: Dict[str, Any] = {}
            case_recs: List[Dict[str, Any]] = []
            with harness.num_threads(c.threads if not cuda else None):
                for method in want:
                    rec = dict(base, method=method)
                    need = memory_estimate(method, tree, B, D, s_w)
                    avail = harness.available_memory_bytes(device)
                    if avail is not None and need > 0.85 * avail:
                        rec.update(ms=None, note=f"skipped: needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB free")
                        case_recs.append(rec)
                        log(f"  {method:11s} {dname} {base['shape']}: {rec['note']}")
                        continue
                    try:
                        if method == "fused_graph":
                            fn = graph_callable(fused_call)
                        else:
                            fn = {"fused": fused_call, "reference": ref_call, "dense": dense_call,
                                  "fused_loop": loop_call}[method]
                        m = harness.measure_call(fn, device, warmup=timing["warmup"], reps=timing["reps"],
                                                 min_reps=timing["min_reps"], max_time_s=timing["max_time_s"],
                                                 keep_out=method not in ("dense", "fused_loop"),
                                                 flush=method != "fused_loop")
                    except Exception as exc:  # a failing method is a row with its error, not a crashed run
                        if cuda:
                            try:
                                torch.cuda.synchronize()
                                torch.cuda.empty_cache()
                            except Exception:
                                pass
                        rec.update(ms=None, check="ERROR" if method != "dense" else None,
                                   note=f"{type(exc).__name__}: {str(exc)[:200]}")
                        case_recs.append(rec)
                        log(f"  {method:11s} {dname} {base['shape']}: {rec['note']}")
                        continue
                    if m["out"] is not None:
                        outs[method] = (m["out"][0].clone(), m["out"][1].clone())
                    rec.update(ms=m["median_ms"], p10_ms=m["p10_ms"], p90_ms=m["p90_ms"], n=m["n"],
                               extra_mb=m["extra_mb"], first_ms=m["first_ms"], ms_per_doc=m["median_ms"] / B,
                               docs_per_s=B / (m["median_ms"] * 1e-3))
                    case_recs.append(rec)
                    log(f"  {method:11s} {dname} {base['shape']:18s}: {m['median_ms']:.3f} ms (p10 {m['p10_ms']:.3f}, "
                        f"p90 {m['p90_ms']:.3f}, n={m['n']}), extra {harness._fmt(m['extra_mb'])} MB")
                    if method == "fused_graph":
                        del fn
                    if cuda:
                        torch.cuda.empty_cache()

            # rows touched: from the reference's first call (its beams), else from the fused ops, else the tree
            tr = state.get("trace_done")
            src = "reference beams"
            if tr is None and cx is not None:
                try:
                    from cascadexml_fast.ops import search

                    tr = []
                    search.beam_search_with_ops(X, weights, biases, offsets, beams, mc, k, combine, trace=tr,
                                                weight_scales=scales)
                    src = "fused-op beams"
                except Exception:
                    tr = None
            if tr:
                distinct, pairs = rows_from_trace(tr)
            else:
                distinct, pairs = rows_from_tree(tree, B)
                src = "tree block sizes (no trace)"
            nb = op_bytes(distinct, pairs, B=B, D=D, k=k, s_w=s_w, s_b=s_b, s_x=X[0].element_size(), s_scale=s_scale)
            flops = op_flops(pairs, D)
            roof = harness.roofline(nb["bytes"], flops, bandwidth[tkey], peaks[(tkey, dname)])
            roof_nd = harness.roofline(nb["bytes_no_dedup"], flops, bandwidth[tkey], peaks[(tkey, dname)])
            extra = dict(bytes=nb["bytes"], bytes_no_dedup=nb["bytes_no_dedup"], flops=flops,
                         rows_distinct=distinct, rows_pairs=pairs, rows_touched=sum(distinct),
                         rows_per_doc=sum(pairs) / B, rows_source=src, roofline_ms=roof["ms"],
                         roofline_bound=roof["bound"], roofline_no_dedup_ms=roof_nd["ms"])
            roof_rec = dict(base, **extra, method="roofline", ms=roof["ms"], ms_per_doc=roof["ms"] / B,
                            docs_per_s=B / (roof["ms"] * 1e-3), gbps=nb["bytes"] / roof["ms"] / 1e6,
                            pct_roofline=100.0, note=f"{roof['bound']}-bound; rows from {src}")
            for r in case_recs:
                r.update(extra)
                if r.get("ms"):
                    r.update(gbps=nb["bytes"] / r["ms"] / 1e6, tflops=flops / r["ms"] / 1e9,
                             pct_roofline=100.0 * roof["ms"] / r["ms"])
                if r["method"] in ("fused", "fused_graph"):
                    if r["method"] in outs and "reference" in outs:
                        r.update(compare_ids(*outs[r["method"]], *outs["reference"]))
                        if r["check"] != "ok":
                            log(f"  !! {r['method']} {dname} {base['shape']}: {r['check']} vs reference "
                                f"(ids equal {r['ids_equal']:.4f}, rows {r['bad_rows']})")
                    elif r["method"] in outs:
                        r.setdefault("check", "unchecked (no reference)")
                if r["method"] == "dense" and not r.get("note"):
                    r["note"] = "all L labels"
                if r["method"] == "fused_loop" and not r.get("note"):
                    r["note"] = f"{LOOP_DOCUMENTS} documents in turn, caches not flushed"
            records += [roof_rec] + case_recs
            state.clear()
            outs.clear()
            del X
            if cuda:
                torch.cuda.empty_cache()
        del weights, biases, scales
    fp32_cache.clear()
    return records


def fill_ratios(records: List[Dict[str, Any]]) -> None:
    """x_vs_ref / x_vs_dense: the reference cascade's / dense's median of the same tree, dtype, B and threads (same
    run) over this row's median. On a roofline row: the most any method could gain over that baseline. None on
    fused_loop rows: they run with warm caches, the baselines with flushed ones."""
    key = lambda r: (r["tree"], r["dtype"], r["B"], r["threads"])  # noqa: E731
    base: Dict[Tuple, float] = {}
    for r in records:
        if r["method"] in ("reference", "dense") and r.get("ms"):
            base[key(r) + (r["method"],)] = r["ms"]
    for r in records:
        for m, col in (("reference", "x_vs_ref"), ("dense", "x_vs_dense")):
            b = base.get(key(r) + (m,))
            r[col] = b / r["ms"] if (b and r.get("ms") and r["method"] != "fused_loop") else None


# ----------------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    _bt.common_args(p)
    p.add_argument("--trees", default=None, help="comma list to keep: 670k, 2.8m")
    p.add_argument("--batches", default=None, help="comma list of B to keep, e.g. 1,256")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: all planned)")
    p.add_argument("--k", type=int, default=None, help="labels returned per document (default 100; tiny 10)")
    p.add_argument("--dim", type=int, default=None, help="feature dim D (default 768; tiny 64)")
    p.add_argument("--combine", choices=("leaf", "leaf_x_parent"), default="leaf")
    harness.add_table_memory_arg(p)
    p.add_argument("--tag", default=None,
                   help="results go to <name>_<tag>_<device>.* (a partial run never overwrites the full one)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    harness.set_table_memory(args.table_memory)
    t_start = time.perf_counter()
    device, preset, timing = _bt.setup_run(args)
    cuda = device.type == "cuda"
    cases = plan(device.type, preset)
    for opt, attr, conv in ((args.dtypes, "dtype", str), (args.trees, "tree", str), (args.batches, "B", int)):
        if opt:
            keep = {conv(v) for v in opt.split(",")}
            cases = [c for c in cases if getattr(c, attr) in keep]
    methods = args.methods.split(",") if args.methods else None
    tiny = preset == "tiny"
    D = args.dim or (64 if tiny else 768)
    k = args.k or (10 if tiny else 100)

    cx, cx_desc, cx_info = _bt.load_package()
    ref = _bt.load_reference()
    dinfo = harness.device_info(device)
    print(f"# {NAME} on {dinfo['name']} ({device}), torch {dinfo['torch']}, triton {dinfo['triton']}, "
          f"{dinfo['torch_threads']} threads; op: {cx_desc}")
    # ceilings per thread count used (CPU: a one-thread row is held to one thread's copy bandwidth and matmul peak)
    thread_counts = [None] if cuda else sorted({c.threads or torch.get_num_threads() for c in cases})
    bandwidth: Dict[Any, float] = {}
    peaks: Dict[Any, float] = {}
    for tc in thread_counts:
        with harness.num_threads(tc):
            bandwidth[tc] = harness.copy_bandwidth(device, nbytes=(16 << 20) if tiny else None)
            for d in sorted({c.dtype for c in cases}):
                # int8 tables are widened and multiplied in fp32: their compute ceiling is the fp32 peak
                peaks[(tc, d)] = harness.matmul_peak(device, torch.float32 if d == INT8 else DTYPES[d],
                                                     n=256 if tiny else None, reps=3)
    for tc in thread_counts:
        print(f"# {'' if tc is None else f'{tc} thread(s): '}copy bandwidth {bandwidth[tc] / 1e9:.1f} GB/s; matmul "
              + ", ".join(f"{d} {p / 1e9:.4g} GFLOP/s" for (t, d), p in peaks.items() if t == tc))
    print(f"# timing: {timing}; k={k}, D={D}, combine={combine_desc(args.combine)}")

    records = run(cases, device, timing, D=D, k=k, combine=args.combine, bandwidth=bandwidth, peaks=peaks, cx=cx,
                  ref=ref, validate=args.validate, seed=args.seed, methods=methods)
    fill_ratios(records)
    elapsed = time.perf_counter() - t_start
    failed = [r for r in records if str(r.get("check", "ok")).startswith(("MISMATCH", "ERROR"))]
    meta = dict(
        op=NAME,
        command=harness.command_line() if argv is None else f"bench_cascade.main({list(argv)})",
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        preset=preset,
        fused_impl=cx_desc,
        cascadexml_fast_info=cx_info,
        cuda_kernels=_bt.cuda_kernels() if cuda else None,
        device_info=dinfo,
        trees={n: dict(sizes=list(TREES[n].sizes), beams=list(TREES[n].beams), max_children=TREES[n].max_children())
               for n in sorted({c.tree for c in cases})},
        D=D,
        k=k,
        combine=args.combine,
        table_std=SCALE,
        copy_bandwidth_gbs={str(t if t is not None else "device"): b / 1e9 for t, b in bandwidth.items()},
        matmul_peak_tflops={f"{'' if t is None else f'{t}t-'}{d}": p / 1e12 for (t, d), p in peaks.items()},
        timing=dict(timing, method="CUDA events, 256 MiB L2 flush before each call" if cuda else
                    "time.perf_counter, gc paused, cache flush before each call",
                    memory_call="warm-up call 1 runs inside PeakMemory; its output is the one checked; on CPU a "
                                "first call > 250 ms gets no further warm-up"),
        validate=args.validate,
        seed=args.seed,
        checks_failed=len(failed),
        elapsed_s=round(elapsed, 1),
        loadavg_end=harness.loadavg(),
        **harness.table_memory_report(),
    )
    table = harness.format_table(records, COLUMNS, HEADERS)
    print()
    print(table)
    print(f"\n# {len(records)} rows in {elapsed:.0f} s; correctness: "
          + ("no mismatch" if not failed else f"{len(failed)} FAILED ({', '.join(r['shape'] for r in failed)})"))
    paths = {}
    if not args.no_write:
        paths = harness.write_results(
            (NAME if preset == "full" else f"{NAME}_{preset}") + (f"_{args.tag}" if args.tag else ""), records, meta,
            args.out, columns=COLUMNS, headers=HEADERS, plot=dict(x="shape", y="ms_per_doc", series="method", panels=("dtype",)),
            notes="ms = median of one search of B documents; %roof = roofline ms / ms (bytes: distinct table rows "
                  "the batch scores + features + outputs, over the copy bandwidth of this run at the row's thread "
                  "count); x ref / x dense = reference cascade / dense ms over this ms (same run); rows = distinct "
                  "table rows scored (all levels); ids eq = fraction of ids equal to the reference cascade's; see "
                  "benchmarks/README.md.")
        print("# wrote " + ", ".join(str(p) for p in paths.values() if p))
    if args.strict and failed:
        raise SystemExit(1)
    return dict(records=records, meta=meta, paths=paths)


def combine_desc(c: str) -> str:
    return {"leaf": "leaf (sigmoid of the label logit)", "leaf_x_parent": "leaf x parent"}[c]


if __name__ == "__main__":
    main()
