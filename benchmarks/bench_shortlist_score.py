"""Benchmark of `cascadexml_fast.shortlist_score` against the originals' gather+bmm, a dense x @ W^T and the roofline.

    python benchmarks/bench_shortlist_score.py                 # GPU when present, else CPU (full run)
    python benchmarks/bench_shortlist_score.py --quick         # a few shapes, ~1 minute on 2 CPU cores
    python benchmarks/bench_shortlist_score.py --device cpu --threads 2 --out /tmp/res

The op: s[b, k] = <x[b], W[idx[b, k]]> + bias[idx[b, k]] (fp32 scores; pad id -1 -> -inf). Shortlists are built as
CascadeXML's leaf level sees them: each document scores `clusters` whole clusters of `cluster_size` contiguous label
ids (tree order), the clusters drawn at random per document (seeded), so K = clusters * cluster_size and U (distinct
rows touched by the batch) is counted and reported. See benchmarks/README.md for every column and the roofline.

dtype "int8": the fp32 table quantised by cascadexml_fast.quantize_table (int8 rows + per-row fp32 scales, passed as
weight_scale), x and bias fp32, forward only; its gather_bmm baseline gathers the int8 rows and dequantises them
before the bmm (W[idx].float() * scale[idx]), and it has no dense baseline (that would dequantise the whole table).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parent.parent
try:  # imported as benchmarks.bench_shortlist_score (tests), or run as a script from anywhere
    from benchmarks import harness
except ImportError:  # appended, not prepended: an installed cascadexml_fast keeps precedence over the tree
    sys.path.append(str(REPO))
    from benchmarks import harness

NAME = "shortlist_score"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
INT8 = "int8"  # x and bias stay fp32; W is int8 with per-row fp32 scales
MODES = ("fwd", "fwdbwd-dense", "fwdbwd-sparse")  # fwdbwd-sparse: fused only (row-sparse COO dW)
METHODS = ("fused", "gather_bmm", "dense")

COLUMNS = ["method", "mode", "dtype", "L", "B", "K", "D", "U", "ms", "p10_ms", "p90_ms", "n", "gbps",
           "pct_roofline", "x_vs_gather", "x_vs_dense", "x_vs_fp32", "extra_mb", "mem_vs_gather", "note"]
HEADERS = {"p10_ms": "p10", "p90_ms": "p90", "gbps": "GB/s", "pct_roofline": "%roof", "x_vs_gather": "x gather",
           "x_vs_dense": "x dense", "x_vs_fp32": "x fp32", "extra_mb": "extra MB", "mem_vs_gather": "mem/gather"}


# ----------------------------------------------------------------------------------------------------------
# the op under test


def _reference_module():
    """cascadexml_fast/ops/reference.py loaded from its file (it imports only torch)."""
    spec = importlib.util.spec_from_file_location("_cx_reference", REPO / "cascadexml_fast" / "ops" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def quantize(table: torch.Tensor):
    """(int8 table, fp32 per-row scales): cascadexml_fast.quantize_table, or the reference's where the package
    does not import."""
    try:
        from cascadexml_fast import quantize_table
    except Exception:
        quantize_table = _reference_module().quantize_table
    return quantize_table(table)


def load_fused() -> Tuple[Callable[..., torch.Tensor], str, Optional[Dict[str, Any]], bool]:
    """(fn, description, cascadexml_fast.info() or None, is the package op). Falls back to the reference file."""
    try:
        import cascadexml_fast as cx

        fn = cx.shortlist_score
        try:
            info = cx.info()
        except Exception as exc:  # info() is a convenience: never let it stop a benchmark
            info = {"error": f"{type(exc).__name__}: {exc}"}
        return fn, "cascadexml_fast.shortlist_score", info, True
    except Exception as exc:
        mod = _reference_module()

        def ref(x, weight, bias, idx, *, sparse_grad=False, deterministic=False, validate=True, weight_scale=None):
            return mod.shortlist_score(x, weight, bias, idx, weight_scale)

        return ref, f"reference.py (import cascadexml_fast failed: {type(exc).__name__}: {exc})", None, False


# ----------------------------------------------------------------------------------------------------------
# shapes, inputs, byte counts


@dataclass(frozen=True)
class Case:
    L: int
    B: int
    clusters: int
    cluster_size: int
    D: int
    dtype: str
    modes: Tuple[str, ...]

    @property
    def K(self) -> int:
        return self.clusters * self.cluster_size


def plan(device: str, preset: str) -> List[Case]:
    """Shapes per device and preset (full / quick / tiny). K = clusters x 128 contiguous labels, D = 768."""
    D, cs = 768, 128
    fwd, dn, sp = ("fwd",), ("fwdbwd-dense", "fwdbwd-sparse"), ("fwd", "fwdbwd-dense", "fwdbwd-sparse")
    cases: List[Case] = []
    if preset == "tiny":  # seconds: for the test that keeps this script from rotting
        return [Case(4096, 2, 4, 16, 64, "fp32", sp), Case(4096, 3, 4, 16, 64, "bf16", sp),
                Case(4096, 2, 4, 16, 64, INT8, fwd)]
    if device == "cuda":
        if preset == "quick":
            return [Case(670091, b, 16, cs, D, "bf16", fwd) for b in (1, 32, 256)] + [
                Case(670091, 64, 16, cs, D, "bf16", dn), Case(2812281, 64, 16, cs, D, "fp32", dn)]
        for L in (670091, 2812281):
            for dt in ("bf16", "fp32"):
                for B in (1, 32, 64, 256):
                    for C in (16, 32):
                        modes = (fwd if B != 64 else ()) + (dn if C == 16 or B == 64 else ())
                        if modes:
                            cases.append(Case(L, B, C, cs, D, dt, modes))
        return cases
    if preset == "quick":
        return [Case(670091, b, 16, cs, D, dt, fwd) for dt in ("fp32", "bf16") for b in (1, 32)] + [
            Case(131072, 32, 16, cs, D, dt, dn) for dt in ("fp32", "bf16")]
    for dt in ("fp32", "bf16"):
        cases += [Case(670091, b, 16, cs, D, dt, fwd) for b in (1, 32, 256)]
        cases += [Case(670091, 32, 16, cs, D, dt, dn)]
    cases += [Case(670091, b, 16, cs, D, INT8, fwd) for b in (1, 32, 256)]
    return cases


def make_shortlist(L: int, B: int, clusters: int, cluster_size: int, seed: int) -> torch.Tensor:
    """idx [B, clusters * cluster_size] int64: per document, `clusters` distinct aligned blocks of contiguous ids."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = L // cluster_size
    if clusters > n_blocks:
        raise ValueError(f"{clusters} clusters of {cluster_size} do not fit in L={L}")
    picks = torch.rand(B, n_blocks, generator=g).argsort(dim=1)[:, :clusters]  # distinct per document
    starts = picks * cluster_size
    return (starts.unsqueeze(-1) + torch.arange(cluster_size)).reshape(B, clusters * cluster_size)


def make_table(L: int, D: int, device: torch.device, seed: int) -> torch.Tensor:
    """fp32 [L, D] with N(0, 0.02^2)-ish values. CPU: a random 8192-row block tiled (full randn of 2 GB takes
    seconds on 2 cores; values do not change the timing); GPU: randn."""
    g = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        gg = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(L, D, device=device, generator=gg) * 0.02
    blk = torch.randn(min(L, 8192), D, generator=g) * 0.02
    W = harness.table_empty((L, D))  # huge pages, as the library's layers allocate CPU tables
    for s in range(0, L, blk.shape[0]):
        n = min(blk.shape[0], L - s)
        W[s:s + n] = blk[:n]
    return W


def unique_rows(idx: torch.Tensor) -> int:
    v = idx[idx >= 0]
    return int(torch.unique(v).numel())


def op_bytes(*, mode: str, L: int, B: int, K: int, D: int, U: int, s_w: int, s_b: int, s_x: int, s_idx: int,
             s_out: int = 4, s_gout: int = 4, s_scale: int = 0) -> Dict[str, int]:
    """Unavoidable bytes of the op (every needed input byte read once, every output byte written once).

    fwd:            read U rows of W (U*D*s_w), of bias (U*s_b) and, for int8 tables, of the per-row scales
                    (U*s_scale, 4 bytes), x (B*D*s_x), idx (B*K*s_idx); write s (B*K*4).
    fwdbwd-dense:   fwd + read the upstream grad (B*K*4); write dx (B*D*s_x) and the dense dW, dbias (L*(D*s_w+s_b)).
    fwdbwd-sparse:  as dense, but dW, dbias are U rows plus their int64 ids: U*(D*s_w + s_b + 8).
    A single fused pass is assumed (W rows read once for forward and backward), so this is a lower bound.
    `no_dedup` replaces the U rows read by B*K rows (no reuse across documents).
    """
    rows_read = lambda r: r * (D * s_w + s_b + s_scale)  # noqa: E731
    common = B * D * s_x + B * K * s_idx + B * K * s_out
    if mode == "fwd":
        extra = 0
    elif mode == "fwdbwd-dense":
        extra = B * K * s_gout + B * D * s_x + L * (D * s_w + s_b)
    elif mode == "fwdbwd-sparse":
        extra = B * K * s_gout + B * D * s_x + U * (D * s_w + s_b + 8)
    else:
        raise ValueError(mode)
    return dict(bytes=rows_read(U) + common + extra, bytes_no_dedup=rows_read(B * K) + common + extra)


def op_flops(mode: str, B: int, K: int, D: int) -> int:
    """2*B*K*D for the scores; fwd+bwd adds dx and dW: 6*B*K*D."""
    return (2 if mode == "fwd" else 6) * B * K * D


# ----------------------------------------------------------------------------------------------------------
# measurement


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def memory_estimate(method: str, mode: str, L: int, B: int, K: int, D: int, U: int, s_w: int) -> int:
    """Generous guess of a call's extra bytes, to skip shapes that cannot fit (never exact)."""
    if method == "dense":
        return B * L * max(s_w, 4) * (2 if mode == "fwd" else 4) + (0 if mode == "fwd" else L * D * 4 * 2)
    if method == "gather_bmm":
        return B * K * D * s_w * (2 if mode == "fwd" else 4) + (0 if mode == "fwd" else L * D * 4 * 2)
    if mode == "fwdbwd-dense":
        return L * D * 4 * 2 + B * K * 16
    return U * D * 8 + B * K * 32


def measure(fn: Callable[[], Any], setup: Callable[[], Any], device: torch.device, timing: Dict[str, Any],
            keep_out: bool = False) -> Tuple[Dict[str, Any], Optional[float], Any]:
    """Warm-up: one plain call (first-call costs: compilation, lazy init), then one call inside PeakMemory (skipped
    first call when warmup < 2), then time_fn with the remaining warm-up. Returns (timing, extra MB, output)."""
    warm = timing["warmup"]
    if warm >= 2:
        setup()
        fn()
    setup()
    with harness.PeakMemory(device) as pm:
        out = fn()
    if not keep_out:
        out = None
    t = harness.time_fn(fn, warmup=max(0, warm - 2), reps=timing["reps"], device=device, setup=setup,
                        min_reps=timing["min_reps"], max_time_s=timing["max_time_s"])
    return t, pm.extra_mb, out


def run(cases: Sequence[Case], device: torch.device, timing: Dict[str, Any], *, seed: int = 0, validate: bool = False,
        bandwidth: float, peaks: Dict[str, float], fused: Callable[..., torch.Tensor], fused_is_package: bool,
        log: Callable[[str], None] = print, keep_methods: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    records: List[Dict[str, Any]] = []
    fused_name = "fused" if fused_is_package else "reference"
    table_cache: Dict[Tuple[int, int], torch.Tensor] = {}
    groups: Dict[Tuple[int, int, str], List[Case]] = {}
    for c in cases:
        groups.setdefault((c.L, c.D, c.dtype), []).append(c)

    for (L, D, dname), group in groups.items():
        dtype = DTYPES[dname]
        if (L, D) not in table_cache:
            table_cache.clear()
            t0 = time.perf_counter()
            table_cache[(L, D)] = make_table(L, D, device, seed)
            log(f"# table L={L} D={D} built in {time.perf_counter() - t0:.1f} s")
        scale = None
        if dname == INT8:  # inference only: int8 rows + fp32 scales, fp32 bias and features, nothing requires grad
            W, scale = quantize(table_cache[(L, D)])
            bias = torch.randn(L, device=device) * 0.02
        else:
            W = harness.table_as(table_cache[(L, D)].detach(), dtype).requires_grad_(True)  # a fresh leaf per dtype
            bias = (torch.randn(L, device=device) * 0.02).to(dtype).requires_grad_(True)
        s_w = W.element_size()
        x_dtype = torch.float32 if dname == INT8 else dtype
        dense_cache: Dict[Tuple[int, str], Dict[str, Any]] = {}  # dense does not depend on K: time once per (B, mode)

        for c in group:
            B, K = c.B, c.K
            idx = make_shortlist(L, B, c.clusters, c.cluster_size, seed + 1000 * B + K).to(device)
            U = unique_rows(idx)
            g = torch.Generator().manual_seed(seed + 7)
            x = (torch.randn(B, D, generator=g)).to(device=device, dtype=x_dtype).requires_grad_(dname != INT8)
            gout = torch.randn(B, K, generator=g).to(device)
            gout_w = gout.to(x_dtype)
            gdense = None
            base = dict(device=device.type, dtype=dname, idx_dtype=str(idx.dtype).replace("torch.", ""), L=L, B=B,
                        K=K, D=D, clusters=c.clusters, cluster_size=c.cluster_size, U=U)

            def drop_grads():
                x.grad = None
                W.grad = None
                bias.grad = None

            for mode in c.modes:
                if mode == "fwdbwd-sparse" and not fused_is_package:
                    continue  # the reference fallback has no row-sparse gradient
                if dname == INT8 and mode != "fwd":
                    continue  # int8 tables are inference-only
                nb = op_bytes(mode=mode, L=L, B=B, K=K, D=D, U=U, s_w=s_w, s_b=bias.element_size(),
                              s_x=x.element_size(), s_idx=idx.element_size(), s_scale=0 if scale is None else 4)
                flops = op_flops(mode, B, K, D)
                roof = harness.roofline(nb["bytes"], flops, bandwidth, peaks[dname])
                roof_nd = harness.roofline(nb["bytes_no_dedup"], flops, bandwidth, peaks[dname])
                common = dict(base, mode=mode, bytes=nb["bytes"], bytes_no_dedup=nb["bytes_no_dedup"], flops=flops,
                              roofline_ms=roof["ms"], roofline_bound=roof["bound"],
                              roofline_no_dedup_ms=roof_nd["ms"])
                mode_recs = [dict(common, method="roofline", ms=roof["ms"], gbps=nb["bytes"] / roof["ms"] / 1e6,
                                  pct_roofline=100.0, note=f"{roof['bound']}-bound")]
                outs: Dict[str, torch.Tensor] = {}

                methods = [fused_name] if mode == "fwdbwd-sparse" else [fused_name, "gather_bmm", "dense"]
                if dname == INT8:
                    methods = [m for m in methods if m != "dense"]  # dense would dequantise the whole table
                if keep_methods is not None:
                    methods = [m for m in methods if m in keep_methods or m == fused_name]
                for method in methods:
                    if method == "dense" and (B, mode) in dense_cache:
                        rec = dict(common, **{k: dense_cache[(B, mode)][k] for k in
                                              ("ms", "p10_ms", "p90_ms", "n", "extra_mb", "note")}, method="dense")
                        rec["gbps"] = nb["bytes"] / rec["ms"] / 1e6 if rec["ms"] else None
                        rec["pct_roofline"] = 100.0 * roof["ms"] / rec["ms"] if rec["ms"] else None
                        mode_recs.append(rec)
                        continue
                    rec = dict(common, method=method)
                    need = memory_estimate(method, mode, L, B, K, D, U, s_w)
                    avail = harness.available_memory_bytes(device)
                    if avail is not None and need > 0.85 * avail:
                        rec.update(ms=None, note=f"skipped: needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB free")
                        mode_recs.append(rec)
                        log(f"  {method:10s} {mode:13s} {dname} L={L} B={B} K={K}: {rec['note']}")
                        continue
                    fn = make_fn(method, mode, fused, x, W, bias, idx, gout, gout_w, validate, lambda: gdense,
                                 scale=scale)
                    if method == "dense" and mode != "fwd" and gdense is None:
                        gdense = torch.randn(B, L, device=device, dtype=dtype)
                    try:
                        t, mb, out = measure(fn, drop_grads, device, timing,
                                             keep_out=mode == "fwd" and method != "dense")
                    except Exception as exc:
                        if not _oom(exc):
                            raise
                        drop_grads()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rec.update(ms=None, note="skipped: out of memory")
                        mode_recs.append(rec)
                        continue
                    if out is not None:
                        outs[method] = out.detach().float()
                    elif method == fused_name and W.grad is not None:
                        rec["w_grad_layout"] = str(W.grad.layout).replace("torch.", "")
                    del out
                    drop_grads()
                    rec.update(ms=t["median_ms"], p10_ms=t["p10_ms"], p90_ms=t["p90_ms"], n=t["n"], extra_mb=mb,
                               gbps=nb["bytes"] / t["median_ms"] / 1e6,
                               tflops=flops / t["median_ms"] / 1e9,
                               pct_roofline=100.0 * roof["ms"] / t["median_ms"])
                    if method == "dense":
                        dense_cache[(B, mode)] = dict(rec, note="timed once per (L, B, dtype, mode), shared over K")
                    mode_recs.append(rec)
                    log(f"  {method:10s} {mode:13s} {dname} L={L} B={B} K={K} U={U}: {t['median_ms']:.3f} ms "
                        f"(p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f}, n={t['n']}), "
                        f"{rec['pct_roofline']:.1f}% of roofline, extra {harness._fmt(mb)} MB")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

                if fused_name in outs and "gather_bmm" in outs:  # a cheap sanity check that the kernel is right
                    a, b = outs[fused_name], outs["gather_bmm"]
                    fin = torch.isfinite(b)
                    err = float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-30))
                    for r in mode_recs:
                        if r["method"] == fused_name:
                            r["rel_err_vs_gather"] = err
                outs.clear()
                records += mode_recs
            del x, idx, gout, gout_w
            gdense = None
        del W, bias
    table_cache.clear()
    return records


def make_fn(method, mode, fused, x, W, bias, idx, gout, gout_w, validate, get_gdense, scale=None) -> Callable[[], Any]:
    """The timed callable. Forward modes run under no_grad; fwd+bwd modes call backward with a random upstream grad
    (fp32 [B, K] for the fused op, storage dtype for gather_bmm, storage-dtype [B, L] for dense). An int8 table
    (`scale` given) goes to the fused op as weight_scale; gather_bmm dequantises the gathered rows."""
    sparse = mode == "fwdbwd-sparse"

    def fused_call():
        if scale is not None:
            return fused(x, W, bias, idx, sparse_grad=sparse, validate=validate, weight_scale=scale)
        return fused(x, W, bias, idx, sparse_grad=sparse, validate=validate)

    def gather_call():
        if scale is not None:
            rows = W[idx].float() * scale[idx].unsqueeze(-1)
            return torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1) + bias[idx]
        return torch.bmm(W[idx], x.unsqueeze(-1)).squeeze(-1) + bias[idx]

    def dense_call():
        return x @ W.T + bias

    call = {"fused": fused_call, "reference": fused_call, "gather_bmm": gather_call, "dense": dense_call}[method]
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return call()
        return fwd

    def fwd_bwd():
        s = call()
        g = get_gdense() if method == "dense" else (gout if s.dtype == torch.float32 else gout_w)
        s.backward(g)
        return s
    return fwd_bwd


def fill_ratios(records: List[Dict[str, Any]]) -> None:
    """x_vs_gather / x_vs_dense: baseline ms / this ms, baselines measured in the same run (for the sparse mode the
    baselines are their dense-gradient fwd+bwd: what the originals run); mem_vs_gather: extra MB / gather_bmm's;
    x_vs_fp32 (fused rows): the fused op's ms on the fp32 table of the same shape and mode / this ms."""
    def key(r, mode):
        return (r["dtype"], r["L"], r["B"], r["K"], r["D"], mode)

    fp32_fused = {(r["L"], r["B"], r["K"], r["D"], r["mode"]): r["ms"] for r in records
                  if r["method"] == "fused" and r["dtype"] == "fp32" and r.get("ms")}
    for r in records:
        f = fp32_fused.get((r["L"], r["B"], r["K"], r["D"], r["mode"]))
        r["x_vs_fp32"] = f / r["ms"] if (f and r.get("ms") and r["method"] == "fused") else None

    base: Dict[Tuple, Dict[str, Any]] = {}
    for r in records:
        if r["method"] in ("gather_bmm", "dense") and r.get("ms"):
            base[key(r, r["mode"]) + (r["method"],)] = r
    for r in records:
        bmode = "fwd" if r["mode"] == "fwd" else "fwdbwd-dense"
        for m, col in (("gather_bmm", "x_vs_gather"), ("dense", "x_vs_dense")):
            b = base.get(key(r, bmode) + (m,))
            r[col] = b["ms"] / r["ms"] if (b and r.get("ms")) else None
        g = base.get(key(r, bmode) + ("gather_bmm",))
        r["mem_vs_gather"] = (r["extra_mb"] / g["extra_mb"] if (g and g.get("extra_mb") and r.get("extra_mb")
                                                                is not None and r["method"] != "roofline") else None)


# ----------------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few shapes, fewer reps (~1 min on 2 CPU cores)")
    g.add_argument("--tiny", action="store_true", help="toy shapes in seconds (used by the tests)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; OpenMP kernels follow)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 100 GPU, 20 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10 GPU, 2 CPU)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds per measurement; slow calls get fewer reps, never below --min-reps")
    p.add_argument("--min-reps", type=int, default=None, help="floor on reps for slow calls (default 20 GPU, 3 CPU)")
    p.add_argument("--dtypes", default=None, help="comma list to keep, e.g. bf16 or fp32,bf16,int8")
    p.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} to keep")
    p.add_argument("--methods", default=None,
                   help="comma list of baselines to time besides the op (gather_bmm, dense); default: all")
    p.add_argument("--tag", default=None,
                   help="results go to <name>_<tag>_<device>.* (a partial run never overwrites the full one)")
    p.add_argument("--validate", action="store_true", help="call the op with validate=True (default False: hot loop)")
    harness.add_table_memory_arg(p)
    p.add_argument("--cluster-size", type=int, default=None,
                   help="contiguous labels per shortlist cluster, K unchanged (default 128; 1 = scattered rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    harness.set_table_memory(args.table_memory)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = harness.resolve_device(args.device)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    cuda = device.type == "cuda"
    defaults = {  # (warmup, reps, min_reps, max seconds per measurement)
        "full": (10, 100, 20, 5.0) if cuda else (2, 20, 3, 3.0),
        "quick": (10, 100, 20, 2.0) if cuda else (2, 20, 3, 1.5),
        "tiny": (1, 5, 2, 0.5),
    }[preset]
    pick = lambda v, d: d if v is None else v  # noqa: E731
    timing = dict(warmup=pick(args.warmup, defaults[0]), reps=pick(args.reps, defaults[1]),
                  min_reps=pick(args.min_reps, defaults[2]), max_time_s=pick(args.max_time, defaults[3]))
    timing["min_reps"] = min(timing["min_reps"], timing["reps"])
    cases = plan(device.type, preset)
    if args.dtypes:
        keep = set(args.dtypes.split(","))
        cases = [c for c in cases if c.dtype in keep]
    if args.modes:
        keep_modes = set(args.modes.split(","))
        cases = [Case(c.L, c.B, c.clusters, c.cluster_size, c.D, c.dtype, tuple(m for m in c.modes if m in keep_modes))
                 for c in cases]
        cases = [c for c in cases if c.modes]
    if args.cluster_size:
        cs = args.cluster_size
        if cs < 1 or any((c.clusters * c.cluster_size) % cs for c in cases):
            raise SystemExit(f"--cluster-size {cs} must be >= 1 and divide every case's K")
        cases = [replace(c, clusters=c.clusters * c.cluster_size // cs, cluster_size=cs) for c in cases]
    keep_methods = args.methods.split(",") if args.methods else None

    fused, fused_desc, cx_info, is_pkg = load_fused()
    dinfo = harness.device_info(device)
    print(f"# {NAME} on {dinfo['name']} ({device}), torch {dinfo['torch']}, triton {dinfo['triton']}, "
          f"{dinfo['torch_threads']} threads; op: {fused_desc}")
    tiny = preset == "tiny"
    bw = harness.copy_bandwidth(device, nbytes=(16 << 20) if tiny else None)
    # int8 tables are widened to fp32 and multiplied in fp32: their compute ceiling is the fp32 matmul peak
    peaks = {d: harness.matmul_peak(device, torch.float32 if d == INT8 else DTYPES[d], n=256 if tiny else None)
             for d in sorted({c.dtype for c in cases})}
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s; matmul peak " +
          ", ".join(f"{d} {p / 1e9:.4g} GFLOP/s" for d, p in peaks.items()))
    print(f"# timing: {timing}")

    records = run(cases, device, timing, seed=args.seed, validate=args.validate, bandwidth=bw, peaks=peaks,
                  fused=fused, fused_is_package=is_pkg, keep_methods=keep_methods)
    fill_ratios(records)
    elapsed = time.perf_counter() - t_start
    meta = dict(
        op=NAME,
        command=harness.command_line() if argv is None else f"bench_shortlist_score.main({list(argv)})",
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        preset=preset,
        fused_impl=fused_desc,
        cascadexml_fast_info=cx_info,
        device_info=dinfo,
        copy_bandwidth_gbs=bw / 1e9,
        matmul_peak_tflops={d: p / 1e12 for d, p in peaks.items()},
        timing=dict(timing, method="CUDA events, 256 MiB L2 flush before each call" if cuda else
                    "time.perf_counter, gc paused", memory_call="warm-up call 2 (call 1 if warmup < 2) runs inside PeakMemory"),
        validate=args.validate,
        seed=args.seed,
        memory_method="torch.cuda max_memory_allocated delta" if cuda else
        "RSS high-water mark (VmHWM after clear_refs) minus VmRSS before",
        elapsed_s=round(elapsed, 1),
        loadavg_end=harness.loadavg(),
        **harness.table_memory_report(),
    )
    table = harness.format_table(records, COLUMNS, HEADERS)
    print()
    print(table)
    print(f"\n# {len(records)} rows in {elapsed:.0f} s")
    paths = {}
    if not args.no_write:
        for r in records:
            r["shape"] = f"L={r['L'] // 1000}k B={r['B']} K={r['K']}"
        paths = harness.write_results(
            (NAME if preset == "full" else f"{NAME}_{preset}") + (f"_{args.tag}" if args.tag else ""), records, meta,
            args.out, columns=COLUMNS, headers=HEADERS,
            plot=dict(x="shape", y="ms", series="method", panels=("mode", "dtype")),
            notes="ms = median; %roof = roofline ms / ms; x gather / x dense = baseline ms / ms (same run); "
                  "extra MB = peak extra memory of one call; see benchmarks/README.md.")
        print("# wrote " + ", ".join(str(p) for p in paths.values() if p))
    return dict(records=records, meta=meta, paths=paths)


if __name__ == "__main__":
    main()
