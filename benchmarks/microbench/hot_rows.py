"""How fast one core scores table rows that are already in cache: the compute ceiling of shortlist_score's CPU
kernel per table dtype, with no memory traffic to wait for (a 16-row table, B = 32 documents, K = 2,048 ids each,
one thread, no cache flush). Where this is below the copy bandwidth, one thread cannot reach the byte roofline
whatever the prefetching: on the 2-core EPYC (Zen 4: 512-bit vectors run as two 256-bit halves) int8 rows are
widened and multiplied at ~20 GB/s of row bytes. Every vector path this CPU supports is timed (set_cpu_isa), so
the avx512_dot path's dot-product instructions show against the widening ones. Usage:

    python benchmarks/microbench/hot_rows.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cascadexml_fast as cx  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    D, N, B, K, calls = 768, 16, 32, 2048, 20
    table = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    idx = (torch.arange(K) % N).repeat(B, 1)
    x = torch.randn(B, D)
    print(f"# cascadexml_fast {cx.__version__}, torch {torch.__version__}, 1 thread; {B} x {K} dots of D = {D} "
          f"against {N} cached rows, best of 5 x {calls} calls")
    tables = {"fp32": (table, None), "bf16": (table.to(torch.bfloat16), None), "int8": cx.quantize_table(table)}
    try:
        for isa in cx.info()["cpu_isas_supported"] or [cx.info()["cpu_isa"]]:
            if cx.info()["cpu_isas_supported"]:
                cx.set_cpu_isa(isa)
            for name, (W, scale) in tables.items():
                kw = {} if scale is None else {"weight_scale": scale}
                best = float("inf")
                for _ in range(5):
                    cx.shortlist_score(x, W, None, idx, validate=False, **kw)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        cx.shortlist_score(x, W, None, idx, validate=False, **kw)
                    best = min(best, (time.perf_counter() - t0) / calls)
                dots = B * K
                print(f"{isa:>10} {name}: {best * 1e3:.2f} ms, {best / dots * 1e9:.1f} ns a row, "
                      f"{dots * D * W.element_size() / best / 1e9:.1f} GB/s of row bytes")
    finally:
        if cx.info()["cpu_isas_supported"]:
            cx.set_cpu_isa("auto")


if __name__ == "__main__":
    main()
