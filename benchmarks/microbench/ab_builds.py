"""A/B of two builds of the extension on bench_cpu's cold CPU shapes, in alternating processes.

On a shared VM separate runs of one build differ by 10-50% (benchmarks/README.md, "Reading CPU numbers"), so a
kernel change cannot be judged from two bench_cpu runs. This runs the same cases on two checkouts, each with its
extension built in place, in alternating worker processes (base, head, head, base, ...), and reports per case the
median of each build and the ratio base / head of every round (above 1: head faster). Two builds cannot share a
process (both register the cascadexml_fast torch library), so drift of the host shows as spread of the ratios
rather than as a bias. Cases are `op:dtype:B:threads`, on bench_cpu's shapes (D = 768):

    shortlist:fp32:32:1    shortlist_score forward, K = 16 clusters x 128 of a 670,091-row table, no bias
                           (bench_cpu's rows add one: its pass shows there, not here)
    cascade:bf16:1:1       cascade_search on the 670K tree (beams 128 / 256 / 400, k = 100)

Usage (the base: a worktree of the commit to compare against, built once):

    git worktree add /tmp/cxf-base HEAD && (cd /tmp/cxf-base && python setup.py build_ext --inplace)
    python benchmarks/microbench/ab_builds.py --base /tmp/cxf-base                  # default cases, 4 rounds
    python benchmarks/microbench/ab_builds.py --base /tmp/cxf-base --cases shortlist:int8:256:2 --rounds 6

--tiny runs the cases on toy tables (4,096 rows, the 4,000-leaf tree) for the tests.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
DEFAULT_CASES = ("shortlist:fp32:1:1,shortlist:fp32:32:1,shortlist:fp32:256:1,shortlist:bf16:32:1,"
                 "shortlist:bf16:256:1,shortlist:int8:32:2,cascade:fp32:1:1,cascade:bf16:1:1")
DTYPES = ("fp32", "bf16", "int8")


def parse_case(text: str) -> Dict[str, object]:
    parts = text.strip().split(":")
    if len(parts) != 4 or parts[0] not in ("shortlist", "cascade") or parts[1] not in DTYPES:
        raise argparse.ArgumentTypeError(f"case {text!r}: expected op:dtype:B:threads, op in shortlist / cascade, "
                                         f"dtype in {' / '.join(DTYPES)}")
    try:
        B, threads = int(parts[2]), int(parts[3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r}: B and threads must be integers") from None
    if B < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"case {text!r}: B and threads must be >= 1")
    return {"op": parts[0], "dtype": parts[1], "B": B, "threads": threads, "name": text.strip()}


def parse_cases(text: str) -> List[Dict[str, object]]:
    cases = [parse_case(c) for c in text.split(",") if c.strip()]
    if not cases:
        raise argparse.ArgumentTypeError("no cases")
    return cases


# ---------------------------------------------------------------------------------------------------------
# worker: one process, one build


def run_worker(checkout: Path, cases: Sequence[Dict[str, object]], reps: int, tiny: bool = False) -> Dict[str, float]:
    """Median ms of each case on the build in `checkout` (imported from there, not from this file's checkout)."""
    sys.path.insert(0, str(REPO))  # the benchmark helpers: this checkout's
    import torch
    from benchmarks import harness

    sys.path.insert(0, str(checkout))
    for name in [m for m in sys.modules if m == "cascadexml_fast" or m.startswith("cascadexml_fast.")]:
        del sys.modules[name]
    import cascadexml_fast as cx
    if not Path(cx.__file__).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"imported {cx.__file__}, not the build in {checkout}")
    from benchmarks.bench_cascade import make_features, make_tables
    from benchmarks.bench_shortlist_score import make_shortlist, make_table
    from benchmarks.trees import TREES

    D, L = 768, (4096 if tiny else 670091)
    tree, k = (TREES["tiny"], 10) if tiny else (TREES["670k"], 100)
    results: Dict[str, float] = {}

    def as_dtype(table, dtype):  # (table, scale)
        return cx.quantize_table(table) if dtype == "int8" else (
            harness.table_as(table, torch.bfloat16) if dtype == "bf16" else table, None)

    shortlist = [c for c in cases if c["op"] == "shortlist"]
    if shortlist:
        base = make_table(L, D, torch.device("cpu"), 0)
        tables = {d: as_dtype(base, d) for d in sorted({c["dtype"] for c in shortlist})}
        for c in shortlist:
            W, scale = tables[c["dtype"]]
            idx = make_shortlist(L, c["B"], 16, 128, 0)
            x = torch.randn(c["B"], D, generator=torch.Generator().manual_seed(1))
            kw = {} if scale is None else {"weight_scale": scale}
            with harness.num_threads(c["threads"]):
                fn = lambda: cx.shortlist_score(x, W, None, idx, validate=False, **kw)  # noqa: E731
                results[c["name"]] = harness.time_fn(fn, warmup=2, reps=reps)["median_ms"]
        del base, tables
    cascade = [c for c in cases if c["op"] == "cascade"]
    if cascade:
        W32, b32 = make_tables(tree, D, torch.device("cpu"), torch.float32, 0)
        offsets, beams, widths = tree.offsets(), list(tree.beams), tree.max_children()
        for dtype in sorted({c["dtype"] for c in cascade}):
            pairs = [as_dtype(w, dtype) for w in W32]
            W, scales = [w for w, _ in pairs], ([s for _, s in pairs] if dtype == "int8" else None)
            b = [v.bfloat16() for v in b32] if dtype == "bf16" else b32
            kw = {} if scales is None else {"weight_scales": scales}
            for c in (c for c in cascade if c["dtype"] == dtype):
                X = make_features(tree, c["B"], D, torch.device("cpu"), torch.float32, 1)
                with harness.num_threads(c["threads"]):
                    fn = lambda: cx.cascade_search(X, W, b, offsets, beams, k, "leaf_x_parent",  # noqa: E731
                                                   max_children=widths, validate=False, **kw)
                    results[c["name"]] = harness.time_fn(fn, warmup=2, reps=reps)["median_ms"]
    return results


# ---------------------------------------------------------------------------------------------------------
# driver


def commit_of(checkout: Path) -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "?"
    return sha + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def summarise(cases: Sequence[Dict[str, object]], runs: Dict[str, List[Dict[str, float]]]) -> List[Dict[str, object]]:
    rows = []
    for c in cases:
        name = c["name"]
        base = [r[name] for r in runs["base"]]
        head = [r[name] for r in runs["head"]]
        ratios = [b / h for b, h in zip(base, head)]
        rows.append({"case": name, "base_ms": statistics.median(base), "head_ms": statistics.median(head),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "ratios": ratios})
    return rows


def markdown(rows: Sequence[Dict[str, object]], meta: Dict[str, object]) -> str:
    lines = [f"# ab_builds on {meta['device']}", "",
             f"- command: `{meta['command']}`", f"- base: `{meta['base']}` ({meta['base_commit']})",
             f"- head: `{meta['head']}` ({meta['head_commit']})",
             f"- {meta['rounds']} rounds of alternating worker processes, median of {meta['reps']} flushed calls each; "
             f"loadavg {meta['loadavg_start']} -> {meta['loadavg_end']}", "",
             "| case | base ms | head ms | base / head (median) | min | max |",
             "|------|---------|---------|----------------------|-----|-----|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['base_ms']:.3f} | {r['head_ms']:.3f} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_min']:.3f} | {r['ratio_max']:.3f} |")
    lines += ["", "Above 1: head faster. A change is outside the noise when min and max are on the same side of 1."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=False, help="checkout (with its extension built in place) to compare")
    p.add_argument("--head", type=Path, default=REPO, help="the other checkout (default: this one)")
    p.add_argument("--cases", type=parse_cases, default=parse_cases(DEFAULT_CASES),
                   help=f"comma list of op:dtype:B:threads (default {DEFAULT_CASES})")
    p.add_argument("--rounds", type=int, default=4, help="worker processes per build")
    p.add_argument("--reps", type=int, default=10, help="timed calls per case and process")
    p.add_argument("--out", default="ab_builds", help="results name under benchmarks/results ('' for none)")
    p.add_argument("--tiny", action="store_true", help="toy tables (tests)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run the cases on this checkout
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.cases, args.reps, args.tiny)))
        return {}
    if args.base is None:
        p.error("--base is required (a checkout with its extension built: see the usage above)")
    for name in ("base", "head"):
        path = getattr(args, name)
        if not (path / "cascadexml_fast").is_dir():
            p.error(f"--{name} {path}: no cascadexml_fast package there")
    sys.path.insert(0, str(REPO))
    from benchmarks import harness

    case_arg = ",".join(c["name"] for c in args.cases)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs: Dict[str, List[Dict[str, float]]] = {"base": [], "head": []}
    loadavg_start = harness.loadavg()
    for r in range(args.rounds):
        for name in (("base", "head") if r % 2 == 0 else ("head", "base")):
            out = subprocess.run([sys.executable, str(HERE), "--worker", str(getattr(args, name)), "--cases", case_arg,
                                  "--reps", str(args.reps)] + (["--tiny"] if args.tiny else []), env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"worker on {name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"# round {r + 1} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[name][-1].items()),
                  flush=True)
    rows = summarise(args.cases, runs)
    info = harness.device_info("cpu")
    meta = {"device": info["name"], "command": harness.command_line(), "base": str(args.base),
            "head": str(args.head), "base_commit": commit_of(args.base), "head_commit": commit_of(args.head),
            "rounds": args.rounds, "reps": args.reps, "loadavg_start": loadavg_start,
            "loadavg_end": harness.loadavg(), "device_info": info, "runs": runs}
    text = markdown(rows, meta)
    print(text)
    if args.out:
        results = REPO / "benchmarks" / "results"
        stem = f"{args.out}_{harness.device_slug(info)}"
        (results / f"{stem}.json").write_text(json.dumps({"name": args.out, "meta": meta, "records": rows}, indent=1))
        (results / f"{stem}.md").write_text(text)
        print(f"# wrote {results / stem}.json, .md")
    return {"meta": meta, "records": rows}


if __name__ == "__main__":
    main()
