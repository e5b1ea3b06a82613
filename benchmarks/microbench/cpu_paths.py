"""Interleaved A/B of the CPU vector paths on bench_cpu's cold shapes: shortlist_score forward (K = 16 clusters x 128
of a 670,091 x 768 table, B = 32 and 256) and cascade_search on the 670K tree (B = 1, and B = 256 on all threads),
bf16 and int8 tables (the rows the avx512_dot path changes; fp32 and fp16 rows are avx512's code on it).

Separate runs of bench_cpu differ by 20-50% on a shared VM (baselines included), more than the paths do, so the
paths are compared here within one process: every round times each path in turn on the same tables, caches
flushed before each call (harness.time_fn), and the best round per path is reported. Usage:

    python benchmarks/microbench/cpu_paths.py                      # avx512 vs avx512_dot, 1 and 2 threads (~6 min)
    python benchmarks/microbench/cpu_paths.py --paths avx512,avx2 --rounds 3
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cascadexml_fast as cx  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.bench_cascade import make_features, make_tables  # noqa: E402
from benchmarks.bench_shortlist_score import make_shortlist  # noqa: E402
from benchmarks.trees import TREES  # noqa: E402


def shortlist_cases(D, threads):
    L = 670091
    g = torch.Generator().manual_seed(0)
    base = harness.table_empty((L, D), torch.float32)
    base.normal_(generator=g)
    tables = {"bf16": (harness.table_as(base, torch.bfloat16), None), "int8": cx.quantize_table(base)}
    del base
    for B in (32, 256):
        idx, x = make_shortlist(L, B, 16, 128, 0), torch.randn(B, D, generator=g)
        for name, (W, scale) in tables.items():
            kw = {} if scale is None else {"weight_scale": scale}
            for t in threads:
                yield (f"shortlist_score B={B} {name} {t}t", t,
                       lambda x=x, W=W, idx=idx, kw=kw: cx.shortlist_score(x, W, None, idx, validate=False, **kw), 5)


def cascade_cases(D, threads):
    tree = TREES["670k"]
    W32, b32 = make_tables(tree, D, torch.device("cpu"), torch.float32, 0)
    quantised = [cx.quantize_table(w) for w in W32]
    tables = {"bf16": ([harness.table_as(w, torch.bfloat16) for w in W32], [b.bfloat16() for b in b32], None),
              "int8": ([q for q, _ in quantised], b32, [s for _, s in quantised])}
    del W32
    offsets, beams, widths = tree.offsets(), list(tree.beams), tree.max_children()
    for B, t, reps in ((1, 1, 15), (256, max(threads), 3)):
        X = make_features(tree, B, D, torch.device("cpu"), torch.float32, 1)
        for name, (W, b, scales) in tables.items():
            kw = {} if scales is None else {"weight_scales": scales}
            yield (f"cascade_search B={B} {name} {t}t", t,
                   lambda X=X, W=W, b=b, kw=kw: cx.cascade_search(X, W, b, offsets, beams, 100, "leaf_x_parent",
                                                                  max_children=widths, **kw), reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", default="avx512,avx512_dot", help="comma list of vector paths (set_cpu_isa names)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", default=None, help="comma list (default: 1 and all cores)")
    args = p.parse_args()
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    lacking = [s for s in paths if s not in cx.info()["cpu_isas_supported"]]
    if lacking:
        raise SystemExit(f"this CPU or build lacks {', '.join(lacking)} (supported: {cx.info()['cpu_isas_supported']})")
    cores = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    info = harness.device_info("cpu")
    print(f"# {Path(__file__).name} on {info['name']}, torch {info['torch']}, loadavg {harness.loadavg()}; "
          f"best of {args.rounds} rounds, each path in turn; caches flushed before every call; ms")
    print(f"{'case':<34}" + "".join(f"{s:>12}" for s in paths) + f"{'ratio':>8}")
    try:
        for cases in (shortlist_cases(768, threads), cascade_cases(768, threads)):
            for label, t, fn, reps in cases:
                best = {s: float("inf") for s in paths}
                with harness.num_threads(t):
                    for _ in range(args.rounds):
                        for s in paths:
                            cx.set_cpu_isa(s)
                            best[s] = min(best[s], harness.time_fn(fn, warmup=1, reps=reps)["median_ms"])
                ratio = best[paths[0]] / best[paths[-1]]
                print(f"{label:<34}" + "".join(f"{best[s]:>12.3f}" for s in paths) + f"{ratio:>8.2f}", flush=True)
    finally:
        cx.set_cpu_isa("auto")
    print(f"# ratio: {paths[0]} / {paths[-1]} (above 1: {paths[-1]} faster); loadavg at the end {harness.loadavg()}")


if __name__ == "__main__":
    main()
