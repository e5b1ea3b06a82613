"""What one call of shortlist_score costs besides its rows: the Python and dispatcher path, with warm caches (a
serving loop) and cold ones (bench_cpu's protocol: caches flushed before every call), one thread.

A B = 1 shortlist of int8 rows is ~1.6 MB, 0.06-0.07 ms at this machine's copy bandwidth, so a per-call cost of
tens of microseconds is a large part of it. Timed, interleaved round by round (the VM's noise is larger than the
differences between rounds), median over rounds of each round's median:

    validated     cascadexml_fast.shortlist_score(...) as users call it: the Python checks (validate=True), then
                  the op; on CPU the ids are checked by the kernel, not by torch calls (ops/_validate.py)
    public        cascadexml_fast.shortlist_score(..., validate=False): the op called below the autograd layer when
                  nothing requires grad (ops/_library.py, call)
    autograd      the same op through torch.library's autograd layer (a round trip through Python)
    torch add     x.add(1) on the [1, 768] features: torch's own per-call floor, for scale
    torch gather  W.index_select(0, ids): the first step of the originals' gather + bmm

K = 1 shows the call path alone; K = 2048 (16 clusters x 128) is bench_cpu's B = 1 shortlist. Usage:

    python benchmarks/microbench/call_overhead.py [--rounds 8]
    python benchmarks/microbench/call_overhead.py --tiny   # a 4096 x 64 table, seconds (keeps the script tested)
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cascadexml_fast as cx  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.bench_shortlist_score import make_shortlist  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="a 4096 x 64 table, one round, few calls")
    args = p.parse_args()
    torch.set_num_threads(1)
    L, D = (4096, 64) if args.tiny else (670091, 768)
    rounds = 1 if args.tiny else args.rounds
    g = torch.Generator().manual_seed(0)
    table = harness.table_empty((L, D), torch.float32)
    table.normal_(generator=g)
    q, scale = cx.quantize_table(table)
    x = torch.randn(1, D, generator=g)
    through_autograd = torch.ops.cascadexml_fast.shortlist_score
    info = harness.device_info("cpu")
    print(f"# {Path(__file__).name} on {info['name']}, torch {info['torch']}, loadavg {harness.loadavg()}; one thread; "
          f"median over {rounds} interleaved rounds of each round's median; us per call")
    print(f"{'case':<26}{'validated':>10}{'public':>10}{'autograd':>10}{'torch add':>11}{'torch gather':>14}")
    for K in (1, 2048):
        idx = torch.tensor([[L // 2]]) if K == 1 else make_shortlist(L, 1, 16, 128, 0)
        for name, W, s in (("fp32", table, None), ("int8", q, scale)):
            calls = {
                "validated": lambda W=W, s=s, idx=idx: cx.shortlist_score(x, W, None, idx, weight_scale=s),
                "public": lambda W=W, s=s, idx=idx: cx.shortlist_score(x, W, None, idx, validate=False, weight_scale=s),
                "autograd": lambda W=W, s=s, idx=idx: through_autograd(x, W, None, idx, False, False, s),
                "torch add": lambda: x.add(1),
                "torch gather": lambda idx=idx: table.index_select(0, idx[0]),
            }
            for flush in (False, True):
                per_round = {c: [] for c in calls}
                for _ in range(rounds):
                    for c, fn in calls.items():
                        reps = (3 if flush else 10) if args.tiny else (25 if flush else 200)
                        t = harness.time_fn(fn, warmup=2, reps=reps, flush=flush)
                        per_round[c].append(t["median_ms"] * 1e3)
                med = {c: statistics.median(v) for c, v in per_round.items()}
                label = f"K={K} {name} {'cold' if flush else 'warm'}"
                print(f"{label:<26}{med['validated']:>10.1f}{med['public']:>10.1f}{med['autograd']:>10.1f}"
                      f"{med['torch add']:>11.1f}{med['torch gather']:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
