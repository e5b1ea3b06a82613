"""Benchmark of `cascadexml_fast.topk` against `torch.topk` and the roofline, with a per-row correctness check.

    python benchmarks/bench_topk.py                 # GPU when present, else CPU (full run)
    python benchmarks/bench_topk.py --quick         # fewer shapes / reps
    python benchmarks/bench_topk.py --device cpu --threads 2 --out /tmp/res

The op: top-k values (fp32) and positions (int64) of every row of scores [B, K] (optional bool mask [B, K]),
ranked descending, ties to the lower position, NaN below -inf, missing slots -1 / -inf. The scores are tie-free by
construction (a random permutation of K distinct normal quantiles per row), so torch.topk's positions are the
unique right answer and every row of the fused result is checked against them before it is timed.
See benchmarks/README.md ("bench_topk.py and bench_cascade.py") for every column and the roofline.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parent.parent
try:  # imported as benchmarks.bench_topk (tests), or run as a script from anywhere
    from benchmarks import harness
except ImportError:  # appended, not prepended: an installed cascadexml_fast keeps precedence over the tree
    sys.path.append(str(REPO))
    from benchmarks import harness

NAME = "topk"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

COLUMNS = ["method", "dtype", "B", "K", "k", "mask", "threads", "ms", "p10_ms", "p90_ms", "n", "gbps", "pct_roofline",
           "x_vs_torch", "rows_ok", "check", "note"]
HEADERS = {"p10_ms": "p10", "p90_ms": "p90", "gbps": "GB/s", "pct_roofline": "%roof", "x_vs_torch": "x torch",
           "rows_ok": "rows ok"}


# ----------------------------------------------------------------------------------------------------------
# the op under test


def load_reference():
    """cascadexml_fast/ops/reference.py loaded from its file (works even when the package does not import)."""
    spec = importlib.util.spec_from_file_location("_cx_reference", REPO / "cascadexml_fast" / "ops" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_package() -> Tuple[Any, str, Optional[Dict[str, Any]]]:
    """(cascadexml_fast module or None, description, info() or None)."""
    try:
        import cascadexml_fast as cx
    except Exception as exc:
        return None, f"import cascadexml_fast failed: {type(exc).__name__}: {exc}", None
    try:
        info = cx.info()
    except Exception as exc:  # info() is a convenience: never let it stop a benchmark
        info = {"error": f"{type(exc).__name__}: {exc}"}
    return cx, f"cascadexml_fast {getattr(cx, '__version__', '')}".strip(), info


def cuda_kernels() -> Dict[str, Any]:
    """Which Triton kernel modules the CUDA dispatch finds (a missing one falls back to the reference on CUDA)."""
    try:
        from cascadexml_fast.ops import search

        return {name: search._triton_module(name) is not None for name in ("topk", "block_score")}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------------------------------------
# shapes, inputs, byte counts


@dataclass(frozen=True)
class Case:
    B: int
    K: int
    k: int
    dtype: str = "fp32"
    mask: bool = False
    threads: Optional[int] = None  # CPU: None = all of torch's threads; GPU: None


def plan(device: str, preset: str) -> List[Case]:
    """Shapes per device and preset (full / quick / tiny)."""
    if preset == "tiny":
        return [Case(4, 1024, 16), Case(4, 1024, 16, mask=True), Case(3, 300, 64), Case(2, 50, 64),
                Case(2, 512, 8, "bf16")] + ([Case(4, 1024, 16, threads=1)] if device == "cpu" else [])
    if device == "cuda":
        main = [Case(256, 65536, 512), Case(256, 65536, 512, mask=True)]
        if preset == "quick":
            return main + [Case(1, 65536, 512), Case(256, 4096, 128)]
        grid = [Case(B, K, k) for B in (1, 256) for K in (4096, 65536) for k in (16, 128, 512, 1024)
                if (B, K, k) != (256, 65536, 512)]
        return main + grid + [Case(256, 65536, 512, "bf16")]
    cases = [Case(32, 65536, 100), Case(32, 65536, 512), Case(256, 4096, 128), Case(32, 65536, 512, mask=True)]
    if preset == "quick":
        return cases
    cases.append(Case(256, 4096, 128, "bf16"))
    # the same shapes on one thread: on a shared 2-core machine, all-thread OpenMP regions wait for time slices
    return cases + [Case(c.B, c.K, c.k, c.dtype, c.mask, 1) for c in cases]


def make_scores(B: int, K: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[B, K] tie-free scores: row b holds the K normal quantiles sqrt(2) erfinv(2 (j + 0.5) / K - 1) in a random
    order (distinct in fp32 for K <= 2^22; in bf16/fp16 neighbours can round to equal values, i.e. ties)."""
    g = torch.Generator(device=device).manual_seed(seed)
    perm = torch.rand(B, K, device=device, generator=g).argsort(dim=1)
    u = (perm.double() + 0.5) * (2.0 / K) - 1.0
    return (torch.erfinv(u) * math.sqrt(2.0)).to(dtype)


def make_mask(B: int, K: int, device: torch.device, seed: int, p: float = 0.5) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.rand(B, K, device=device, generator=g) < p


def op_bytes(B: int, K: int, k: int, s_in: int, mask: bool) -> int:
    """Scores read once (+ a bool mask), values fp32 and positions int64 written once."""
    return B * K * s_in + (B * K if mask else 0) + B * k * (4 + 8)


# ----------------------------------------------------------------------------------------------------------
# correctness


def check_rows(values: torch.Tensor, positions: torch.Tensor, want_v: torch.Tensor, want_p: torch.Tensor,
               ) -> Dict[str, Any]:
    """Per row: positions equal to the oracle's on every slot whose oracle value is finite, -1 where the oracle has
    no candidate (-inf under a mask), and values equal (as fp32). Returns rows_ok, rows, bad_rows (first 8), check."""
    v, p = values.float().cpu(), positions.cpu()
    wv, wp = want_v.float().cpu(), want_p.cpu()
    if v.shape != wv.shape:
        return dict(rows_ok=0, rows=int(wv.shape[0]), bad_rows=[], check=f"MISMATCH shape {tuple(v.shape)}")
    fin = torch.isfinite(wv)
    pos_ok = torch.where(fin, p == wp, p == -1)
    val_ok = (v == wv) | (torch.isnan(v) & torch.isnan(wv))
    row_ok = (pos_ok & val_ok).all(dim=1)
    bad = (~row_ok).nonzero().flatten().tolist()
    n_ok = int(row_ok.sum())
    check = "ok" if not bad else f"MISMATCH {len(bad)}/{row_ok.numel()} rows"
    return dict(rows_ok=n_ok, rows=int(row_ok.numel()), bad_rows=bad[:8], check=check)


# ----------------------------------------------------------------------------------------------------------
# measurement


def run(cases: Sequence[Case], device: torch.device, timing: Dict[str, Any], *, bandwidth: Any, cx, ref,
        validate: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    records: List[Dict[str, Any]] = []
    fused_name = "fused" if cx is not None else "reference"
    fused_op = cx.topk if cx is not None else (lambda s, k, m=None, validate=True: ref.topk(s, k, m))
    for c in cases:
        dtype = DTYPES[c.dtype]
        scores = make_scores(c.B, c.K, device, dtype, seed + c.B * 7 + c.K)
        mask = make_mask(c.B, c.K, device, seed) if c.mask else None
        nbytes = op_bytes(c.B, c.K, c.k, scores.element_size(), c.mask)
        threads = None if device.type == "cuda" else (c.threads or torch.get_num_threads())
        bw = bandwidth[threads] if isinstance(bandwidth, dict) else bandwidth
        roof = harness.roofline(nbytes, 0, bw, 0)
        base = dict(device=device.type, dtype=c.dtype, B=c.B, K=c.K, k=c.k, mask=c.mask, bytes=nbytes,
                    roofline_ms=roof["ms"], threads=threads,
                    shape=f"B={c.B} K={c.K} k={c.k}" + (" mask" if c.mask else "")
                    + (f" t{threads}" if threads else ""))
        recs = [dict(base, method="roofline", ms=roof["ms"], gbps=nbytes / roof["ms"] / 1e6, pct_roofline=100.0,
                     note="memory-bound")]
        kk = min(c.k, c.K)
        masked = scores.masked_fill(~mask, float("-inf")) if mask is not None else None

        def torch_call():
            return torch.topk(scores if mask is None else scores.masked_fill(~mask, float("-inf")), kk, dim=1)

        def fused_call():
            return fused_op(scores, c.k, mask, validate=validate)

        # the oracle: torch.topk where the data is tie-free (fp32), the reference (DESIGN.md's tie rule) otherwise
        if c.dtype == "fp32":
            wv, wp = torch.topk(scores if masked is None else masked, kk, dim=1)
            oracle = "torch.topk"
        else:
            wv, wp = ref.topk(scores, kk, mask)
            oracle = "reference.topk"
        if kk < c.k:  # k > K: the op pads with -1 / -inf
            pad = c.k - kk
            wv = torch.cat([wv.float(), wv.new_full((c.B, pad), float("-inf"), dtype=torch.float32)], dim=1)
            wp = torch.cat([wp, wp.new_full((c.B, pad), -1)], dim=1)

        for method, fn in ((fused_name, fused_call), ("torch_topk", torch_call)):
            rec = dict(base, method=method)
            try:
                with harness.num_threads(c.threads if device.type == "cpu" else None):
                    m = harness.measure_call(fn, device, warmup=timing["warmup"], reps=timing["reps"],
                                             min_reps=timing["min_reps"], max_time_s=timing["max_time_s"],
                                             keep_out=method == fused_name)
            except Exception as exc:  # a kernel that fails is a row with its error, not a crashed run
                rec.update(ms=None, check="ERROR", note=f"{type(exc).__name__}: {str(exc)[:200]}")
                recs.append(rec)
                log(f"  {method:10s} {rec['shape']} {c.dtype}: {rec['note']}")
                continue
            if m["out"] is not None:
                rec.update(check_rows(m["out"][0], m["out"][1], wv, wp), oracle=oracle)
                if rec["check"] != "ok":
                    log(f"  !! {method} {rec['shape']} {c.dtype}: {rec['check']} vs {oracle} "
                        f"(first bad rows {rec['bad_rows']})")
            rec.update(ms=m["median_ms"], p10_ms=m["p10_ms"], p90_ms=m["p90_ms"], n=m["n"], extra_mb=m["extra_mb"],
                       gbps=nbytes / m["median_ms"] / 1e6, pct_roofline=100.0 * roof["ms"] / m["median_ms"])
            recs.append(rec)
            log(f"  {method:10s} {c.dtype} {rec['shape']:28s}: {m['median_ms']:.4f} ms (p10 {m['p10_ms']:.4f}, "
                f"p90 {m['p90_ms']:.4f}, n={m['n']}), {rec['pct_roofline']:.1f}% of roofline"
                + (f", check {rec['check']}" if "check" in rec else ""))
        records += recs
        del scores, mask, masked
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def fill_ratios(records: List[Dict[str, Any]]) -> None:
    """x_vs_torch: torch.topk's median / this row's median (same shape, dtype and mask, same run)."""
    key = lambda r: (r["dtype"], r["B"], r["K"], r["k"], r["mask"], r["threads"])  # noqa: E731
    base = {key(r): r["ms"] for r in records if r["method"] == "torch_topk" and r.get("ms")}
    for r in records:
        b = base.get(key(r))
        r["x_vs_torch"] = b / r["ms"] if (b and r.get("ms")) else None


# ----------------------------------------------------------------------------------------------------------
# entry point


def timing_defaults(preset: str, cuda: bool) -> Tuple[int, int, int, float]:
    """(warmup, reps, min_reps, max seconds per measurement)."""
    return {
        "full": (10, 100, 20, 5.0) if cuda else (2, 20, 3, 3.0),
        "quick": (10, 100, 20, 2.0) if cuda else (2, 20, 3, 1.5),
        "tiny": (1, 5, 2, 0.5),
    }[preset]


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer shapes and reps")
    g.add_argument("--tiny", action="store_true", help="toy shapes in seconds (used by the tests)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; OpenMP kernels follow)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 100 GPU, 20 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10 GPU, 2 CPU)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds per measurement; slow calls get fewer reps, never below --min-reps")
    p.add_argument("--min-reps", type=int, default=None, help="floor on reps for slow calls (default 20 GPU, 3 CPU)")
    p.add_argument("--dtypes", default=None, help="comma list to keep, e.g. fp32 or fp32,bf16")
    p.add_argument("--validate", action="store_true", help="call the op with validate=True (default False: hot loop)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a correctness check fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    return p.parse_args(argv)


def setup_run(args: argparse.Namespace) -> Tuple[torch.device, str, Dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = harness.resolve_device(args.device)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    d = timing_defaults(preset, device.type == "cuda")
    pick = lambda v, dflt: dflt if v is None else v  # noqa: E731
    timing = dict(warmup=pick(args.warmup, d[0]), reps=pick(args.reps, d[1]), min_reps=pick(args.min_reps, d[2]),
                  max_time_s=pick(args.max_time, d[3]))
    timing["min_reps"] = min(timing["min_reps"], timing["reps"])
    return device, preset, timing


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device, preset, timing = setup_run(args)
    cuda = device.type == "cuda"
    cases = plan(device.type, preset)
    if args.dtypes:
        keep = set(args.dtypes.split(","))
        cases = [c for c in cases if c.dtype in keep]

    cx, cx_desc, cx_info = load_package()
    ref = load_reference()
    dinfo = harness.device_info(device)
    print(f"# {NAME} on {dinfo['name']} ({device}), torch {dinfo['torch']}, triton {dinfo['triton']}, "
          f"{dinfo['torch_threads']} threads; op: {cx_desc}")
    # copy bandwidth per thread count used (CPU: a one-thread row is held to one thread's bandwidth)
    bw: Dict[Any, float] = {}
    for tc in ([None] if cuda else sorted({c.threads or torch.get_num_threads() for c in cases})):
        with harness.num_threads(tc):
            bw[tc] = harness.copy_bandwidth(device, nbytes=(16 << 20) if preset == "tiny" else None)
    print("# copy bandwidth " + ", ".join(f"{b / 1e9:.1f} GB/s" + ("" if t is None else f" ({t} thread(s))")
                                          for t, b in bw.items()) + f"; timing: {timing}")

    records = run(cases, device, timing, bandwidth=bw, cx=cx, ref=ref, validate=args.validate, seed=args.seed)
    fill_ratios(records)
    elapsed = time.perf_counter() - t_start
    failed = [r for r in records if r.get("check") not in (None, "ok")]
    meta = dict(
        op=NAME,
        command=harness.command_line() if argv is None else f"bench_topk.main({list(argv)})",
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        preset=preset,
        fused_impl=cx_desc,
        cascadexml_fast_info=cx_info,
        cuda_kernels=cuda_kernels() if cuda else None,
        device_info=dinfo,
        copy_bandwidth_gbs={str(t if t is not None else "device"): b / 1e9 for t, b in bw.items()},
        timing=dict(timing, method="CUDA events, 256 MiB L2 flush before each call" if cuda else
                    "time.perf_counter, gc paused, cache flush before each call",
                    memory_call="warm-up call 1 runs inside PeakMemory; its output is the one checked"),
        validate=args.validate,
        seed=args.seed,
        checks_failed=len(failed),
        elapsed_s=round(elapsed, 1),
        loadavg_end=harness.loadavg(),
    )
    table = harness.format_table(records, COLUMNS, HEADERS)
    print()
    print(table)
    print(f"\n# {len(records)} rows in {elapsed:.0f} s; correctness: "
          + ("all rows ok" if not failed else f"{len(failed)} FAILED ({', '.join(r['shape'] for r in failed)})"))
    paths = {}
    if not args.no_write:
        paths = harness.write_results(
            NAME if preset == "full" else f"{NAME}_{preset}", records, meta, args.out, columns=COLUMNS,
            headers=HEADERS, plot=dict(x="shape", y="ms", series="method", panels=("dtype",)),
            notes="ms = median; %roof = roofline ms / ms (bytes: scores (+mask) read once, values + positions "
                  "written once, over the copy bandwidth of this run); x torch = torch.topk ms / ms (same run); "
                  "rows ok = rows whose positions and values equal the oracle's (torch.topk on tie-free fp32 "
                  "data, reference.topk otherwise); see benchmarks/README.md.")
        print("# wrote " + ", ".join(str(p) for p in paths.values() if p))
    if args.strict and failed:
        raise SystemExit(1)
    return dict(records=records, meta=meta, paths=paths)


if __name__ == "__main__":
    main()
