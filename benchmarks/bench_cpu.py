"""The CPU benchmarks in one run, on this machine, with the targets checked: shortlisted scoring, the cascade
beam search, a head training step and end-to-end WN-Nouns inference.

    python benchmarks/bench_cpu.py              # everything (~6 min on an idle 2-core EPYC; run it on an idle machine)
    python benchmarks/bench_cpu.py --quick      # fewer shapes and repetitions (~5 min)
    python benchmarks/bench_cpu.py --parts cascade,e2e
    python benchmarks/bench_cpu.py --cpu-isa avx512_dot   # another vector path: results in cpu_avx512_dot_<device>
    python benchmarks/bench_cpu.py --runs 3     # shortlist and cascade three times: each check's median run (~20 min)

Parts (each one reuses the benchmark script of its op, so rows, rooflines and baselines are defined once):

- ``shortlist``: ``bench_shortlist_score`` forward, K = 2048, D = 768, L = 670,091, B = 1 / 32 / 256, fp32 / bf16 /
  int8 tables, on 1 and on all threads, against torch gather + bmm on the same table and threads; the roofline
  is the row's unavoidable bytes over the copy bandwidth measured at that thread count.
- ``cascade``: ``bench_cascade`` on the Amazon-670K tree (1024 / 8192 / 65536 / 670,091, beams 128 / 256 / 400),
  B = 1 on one thread and B = 32 / 256 on all, fp32 / bf16 / int8, against the reference cascade and dense.
- ``train``: ``bench_train_step`` on the 670K tree, B = 64, fp32, all threads: fused loss + row-sparse grad + sparse
  AdamW against gather + bmm + BCE + dense grad + torch AdamW.
- ``e2e``: WN-Nouns, per document on one thread: the head alone (``CascadeHead.search`` on the demo model's tree
  shape 256 / 2048 / 17,145, D = 384, beams 32 / 64; fp32 and int8 tables), next to the end-to-end rows of
  ``benchmarks/results/accuracy_wn_nouns.json`` (text -> top-k with the encoder, and the TF-IDF tree baselines),
  with the P@k each reaches.

The summary table lists every target of the CPU-speed issue with the measured value and whether it is met.
On a shared VM one run's rows move by 10-50% with the host (benchmarks/README.md, "Reading CPU numbers"): with
``--runs N`` the shortlist and cascade parts run N times in turn and each of their checks reports its median run
(between the two middle runs of an even N, the worse), every run's value in the note.
Results: ``benchmarks/results/cpu_<device>.{json,md}`` (``cpu_quick_...`` for --quick).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
try:
    from benchmarks import harness
except ImportError:  # run as a script from anywhere
    sys.path.append(str(REPO))
    from benchmarks import harness

PARTS = ("shortlist", "cascade", "train", "e2e")
REPEATED = ("shortlist", "cascade")  # the parts --runs repeats (train and e2e meet their targets by wide margins)
NAME = "cpu"
COLUMNS = ["part", "target", "case", "measured", "goal", "met", "note"]
E2E_COLUMNS = ["method", "P@1", "P@3", "P@5", "PSP@5", "ms_doc_1t", "head_ms_doc_1t", "source"]
E2E_HEADERS = {"ms_doc_1t": "ms/doc (text -> top-k, 1 thread)", "head_ms_doc_1t": "head ms/doc (1 thread)"}


def _restore_threads(fn: Callable[[], Any]) -> Any:
    """The op benchmarks set torch's thread count for their run: put it back afterwards."""
    threads = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _preset_flags(preset: str) -> List[str]:
    return {"full": [], "quick": ["--quick"], "tiny": ["--tiny"]}[preset]


# ------------------------------------------------------------------------------------------------------------ parts
def run_shortlist(preset: str, threads: Sequence[int]) -> List[Dict[str, Any]]:
    from benchmarks import bench_shortlist_score as bench

    records = []
    for t in threads:
        argv = ["--device", "cpu", "--threads", str(t), "--modes", "fwd", "--methods", "gather_bmm", "--no-write",
                *_preset_flags(preset)]
        if preset == "quick":  # the quick preset of the op benchmark has no int8 and no B = 256
            argv += ["--dtypes", "fp32,bf16"]
        result = _restore_threads(lambda: bench.main(argv))
        records += [dict(r, threads=t) for r in result["records"]]
    return records


def run_cascade(preset: str) -> List[Dict[str, Any]]:
    from benchmarks import bench_cascade as bench

    argv = ["--device", "cpu", "--no-write", *_preset_flags(preset)]
    return _restore_threads(lambda: bench.main(argv))["records"]


def run_train(preset: str) -> List[Dict[str, Any]]:
    from benchmarks import bench_train_step as bench

    argv = ["--device", "cpu", "--no-write", *_preset_flags(preset)]
    if preset == "full":
        argv += ["--trees", "670k"]
    return _restore_threads(lambda: bench.main(argv))["records"]


def head_latency(sizes: Sequence[int], dim: int, beams: Sequence[int], *, int8: bool, docs: int, k: int = 5,
                 seed: int = 0) -> float:
    """Median ms of one document's beam search (cascade_search: what CascadeHead.search runs) on one thread, on
    random tables of the given tree shape (evenly split children; the speed does not depend on the values)."""
    import cascadexml_fast as cx
    from benchmarks.trees import Tree

    tree = Tree("e2e", tuple(int(n) for n in sizes), tuple(int(b) for b in beams))
    gen = torch.Generator().manual_seed(seed)
    # in huge pages, as CascadeHead allocates its CPU tables
    weights = [harness.table_empty((n, dim)).copy_(torch.randn(n, dim, generator=gen) * 0.05) for n in tree.sizes]
    biases = [torch.zeros(n) for n in tree.sizes]
    scales = None
    if int8:
        pairs = [cx.quantize_table(w) for w in weights]
        weights, scales = [q for q, _ in pairs], [s for _, s in pairs]
    offsets = tree.offsets()
    feats = [torch.randn(docs, dim, generator=gen) for _ in tree.sizes]
    search = lambda i: cx.cascade_search([f[i:i + 1] for f in feats], weights, biases, offsets, list(tree.beams), k,  # noqa: E731
                                         weight_scales=scales)
    with harness.num_threads(1), torch.inference_mode():
        search(0)  # warm-up
        times = []
        for i in range(docs):
            t0 = time.perf_counter()
            search(i)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def run_e2e(preset: str, accuracy_json: Path) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    accuracy = json.loads(accuracy_json.read_text()) if accuracy_json.is_file() else {"records": []}
    docs = {"full": 2000, "quick": 500, "tiny": 20}[preset]
    for r in accuracy["records"]:
        if r.get("ms_doc_1t") is None:  # the head variants and int8 copies scored from cached features
            continue
        row = {key: r.get(key) for key in ("method", "P@1", "P@3", "P@5", "PSP@5", "ms_doc_1t")}
        row["source"] = f"{accuracy_json.name} ({r.get('date')}, loadavg {r.get('loadavg')})"
        geometry = (r.get("settings") or {}).get("model_config")
        sizes = (r.get("settings") or {}).get("tree_level_sizes")
        if geometry and sizes and geometry.get("beams") and r.get("part") in ("demo", "cascadexml"):
            if len(sizes) == len(geometry["beams"]):  # the cluster levels; the labels are the last level
                sizes = list(sizes) + [int(accuracy["meta"]["dataset"]["labels"])]
            dim = int(geometry.get("head_dim") or 384)  # the tables are as wide as the encoder (MiniLM: 384)
            row["head_ms_doc_1t"] = round(head_latency(sizes, dim, geometry["beams"], int8=False, docs=docs), 4)
            rows.append(row)
            int8 = dict(row, method=row["method"] + " (int8 tables)", **{m: None for m in ("P@1", "P@3", "P@5",
                                                                                              "PSP@5", "ms_doc_1t")})
            int8["head_ms_doc_1t"] = round(head_latency(sizes, dim, geometry["beams"], int8=True, docs=docs), 4)
            int8["source"] = "timed here; accuracy: see the -int8 rows of " + accuracy_json.name
            rows.append(int8)
        else:
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------- targets
def _check(part, target, case, measured, goal, met, note=None, *, value=None, better="higher",
           unit="") -> Dict[str, Any]:
    """One target row; `value` (a number, `better` "higher" or "lower", shown with `unit`) lets runs be combined."""
    return dict(part=part, target=target, case=case, measured=measured, goal=goal,
                met=None if met is None else ("yes" if met else "NO"), note=note, value=value, better=better,
                unit=unit)


def combine_runs(runs: Sequence[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Each check of several runs (the same checks in each, in order of the first): the run whose value is the
    median, the worse of the two middle ones for an even count; the note lists every run's value in run order.
    Checks without a value, or found in one run only, are kept as measured."""
    if len(runs) == 1:
        return list(runs[0])
    by_key: Dict[tuple, List[Dict[str, Any]]] = {}
    for checks in runs:
        for c in checks:
            by_key.setdefault((c["part"], c["target"], c["case"]), []).append(c)
    out = []
    for group in by_key.values():
        if len(group) == 1 or any(c.get("value") is None for c in group):
            out.append(group[0])
            continue
        best_first = sorted(group, key=lambda c: -c["value"] if c["better"] == "higher" else c["value"])
        chosen = best_first[len(group) // 2]
        values = " / ".join(f"{c['value']:.3g}" for c in group)
        out.append(dict(chosen, note=f"{len(group)} runs: {values}{chosen['unit']}"))
    return out


def targets(shortlist, cascade, train) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for r in shortlist:
        if r["method"] != "fused" or not r.get("ms"):
            continue
        case = f"{r['dtype']} B={r['B']} K={r['K']} {r['threads']} thread(s)"
        roof, gather = r.get("pct_roofline"), r.get("x_vs_gather")
        out.append(_check("shortlist_score fwd", ">= 80% of roofline", case,
                          None if roof is None else f"{roof:.0f}%", ">= 80%", None if roof is None else roof >= 80,
                          value=roof, unit="%"))
        out.append(_check("shortlist_score fwd", ">= 4x torch gather + bmm", case,
                          None if gather is None else f"{gather:.1f}x", ">= 4x", None if gather is None else gather >= 4,
                          value=gather, unit="x"))
    roofs = {(r["tree"], r["dtype"], r["B"], r["threads"]): r["ms"] for r in cascade if r["method"] == "roofline"}
    for r in cascade:
        if r["method"] != "fused" or not r.get("ms"):
            continue
        case = f"{r['tree']} {r['dtype']} B={r['B']} {r['threads'] or 'all'} thread(s)"
        roof = roofs.get((r["tree"], r["dtype"], r["B"], r["threads"]))
        if r["B"] == 1:
            if r["dtype"] in ("fp32", "bf16") and roof:
                ratio = r["ms"] / roof
                out.append(_check("cascade_search", "B=1 within 1.25x of bytes roofline", case,
                                  f"{r['ms']:.3g} ms = {ratio:.2f}x of {roof:.3g} ms", "<= 1.25x", ratio <= 1.25,
                                  value=ratio, better="lower", unit="x"))
            if r["dtype"] == "int8":
                out.append(_check("cascade_search", "B=1 int8 <= 1 ms/doc", case, f"{r['ms']:.2f} ms", "<= 1 ms",
                                  r["ms"] <= 1.0, value=r["ms"], better="lower", unit=" ms"))
            if r.get("x_vs_ref"):
                out.append(_check("cascade_search", "B=1 >= 5x reference cascade", case, f"{r['x_vs_ref']:.1f}x",
                                  ">= 5x", r["x_vs_ref"] >= 5, value=r["x_vs_ref"], unit="x"))
        elif r["B"] >= 256 and r.get("x_vs_ref"):
            out.append(_check("cascade_search", "B=256 >= 10x reference cascade", case,
                              f"{r['x_vs_ref']:.1f}x ({r.get('docs_per_s', 0):.0f} docs/s)", ">= 10x",
                              r["x_vs_ref"] >= 10, value=r["x_vs_ref"], unit="x"))
    for r in train:
        if r["method"].startswith("ours") and r.get("x_vs_ref"):
            case = f"{r['tree']} {r['dtype']} B={r['B']} ({r['method']})"
            out.append(_check("head training step", ">= 10x gather+bmm+dense grad+AdamW", case,
                              f"{r['ms']:.0f} ms = {r['x_vs_ref']:.1f}x", ">= 10x", r["x_vs_ref"] >= 10,
                              value=r["x_vs_ref"], unit="x"))
    return out


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer shapes and reps (~5 min on 2 cores)")
    g.add_argument("--tiny", action="store_true", help="toy shapes in seconds (used by the tests)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--threads", default=None,
                   help="thread counts of the shortlist part (default: 1 and all cores)")
    p.add_argument("--accuracy-json", default=None,
                   help="accuracy rows for the e2e table (default benchmarks/results/accuracy_wn_nouns.json)")
    p.add_argument("--cpu-isa", default=None,
                   help="run on this vector path of the C++ kernels (cascadexml_fast.set_cpu_isa: avx512_dot, avx512, "
                        "avx2, scalar); results named cpu_<path>_<device> so the default run is kept")
    p.add_argument("--runs", type=int, default=1,
                   help="run the shortlist and cascade parts this many times; each check reports its median run")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    for part in args.part_list:
        if part not in PARTS:
            p.error(f"--parts: unknown part {part!r}; known: {', '.join(PARTS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    t_start = time.perf_counter()
    cores = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    accuracy_json = Path(args.accuracy_json) if args.accuracy_json else harness.RESULTS_DIR / "accuracy_wn_nouns.json"
    import cascadexml_fast as cx

    if args.cpu_isa:
        cx.set_cpu_isa(args.cpu_isa)  # ValueError / RuntimeError name a path this CPU or build lacks
    info = harness.device_info("cpu")
    print(f"# {NAME} on {info['name']}, torch {info['torch']}, {cores} threads, preset {preset}, parts "
          f"{','.join(args.part_list)}, cpu_isa {cx.info()['cpu_isa']}", flush=True)
    runs: List[Dict[str, List[Dict[str, Any]]]] = []  # per run: part -> records (a part not rerun: only in run 1)
    elapsed: Dict[str, float] = {}
    for run in range(args.runs):
        parts: Dict[str, List[Dict[str, Any]]] = {p: [] for p in PARTS}
        for part in args.part_list:
            if run > 0 and part not in REPEATED:
                continue
            t0 = time.perf_counter()
            print(f"\n## {part}" + (f" (run {run + 1} of {args.runs})" if args.runs > 1 else ""), flush=True)
            if part == "shortlist":
                parts[part] = run_shortlist(preset, threads)
            elif part == "cascade":
                parts[part] = run_cascade(preset)
            elif part == "train":
                parts[part] = run_train(preset)
            else:
                parts[part] = run_e2e(preset, accuracy_json)
            elapsed[part] = round(elapsed.get(part, 0.0) + time.perf_counter() - t0, 1)
        runs.append(parts)
    checks = combine_runs([targets(r["shortlist"], r["cascade"], r["train"]) for r in runs])
    # every run's records, each with its run number (1 for a single run)
    parts = {p: [dict(rec, run=i + 1) for i, r in enumerate(runs) for rec in r[p]] for p in PARTS}
    print("\n" + harness.format_table(checks, COLUMNS))
    if parts["e2e"]:
        print("\n" + harness.format_table(parts["e2e"], E2E_COLUMNS, E2E_HEADERS))
    meta = dict(
        op=NAME, preset=preset, parts=args.part_list, threads=threads, runs=args.runs,
        command=harness.command_line() if argv is None else f"bench_cpu.main({list(argv)})",
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device_info=info, cascadexml_fast_info=cx.info(), elapsed_s=elapsed, loadavg_end=harness.loadavg(),
        details={part: recs for part, recs in parts.items() if part != "e2e"}, e2e=parts["e2e"],
    )
    paths: Dict[str, Any] = {}
    if not args.no_write:
        notes = (f"CPU vector path of the kernels: {meta['cascadexml_fast_info']['cpu_isa']}. "
                 "Targets of the CPU-speed issue, measured in this run (details: the op rows under meta.details; "
                 "each op's own columns are described in benchmarks/README.md). End to end on WN-Nouns:\n\n"
                 + (harness.format_table(parts["e2e"], E2E_COLUMNS, E2E_HEADERS) if parts["e2e"] else "(not run)"))
        name = NAME + (f"_{args.cpu_isa}" if args.cpu_isa else "") + ("" if preset == "full" else f"_{preset}")
        paths = harness.write_results(name, checks, meta, args.out,
                                      columns=COLUMNS, notes=notes)
        print("# wrote " + ", ".join(str(p) for p in paths.values() if p))
    print(f"# {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.cpu_isa:
        cx.set_cpu_isa("auto")
    return dict(checks=checks, parts=parts, meta=meta, paths=paths)


if __name__ == "__main__":
    main()
