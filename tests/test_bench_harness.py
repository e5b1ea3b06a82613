"""Fast checks of the benchmark harness (benchmarks/harness.py) and a smoke run of bench_shortlist_score."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # benchmarks/ is not an installed package; plain `pytest` does not put the root on the path
    sys.path.append(_REPO)

from benchmarks import harness  # noqa: E402
from benchmarks import bench_shortlist_score as bench  # noqa: E402


def test_time_fn_quantiles_ordered():
    x = torch.randn(64, 64)
    t = harness.time_fn(lambda: x @ x, warmup=2, reps=25, device="cpu")
    assert set(t) == {"median_ms", "p10_ms", "p90_ms", "n"}
    assert t["n"] == 25
    assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]


def test_time_fn_budget_cuts_reps_but_not_below_min():
    calls = []
    t = harness.time_fn(lambda: calls.append(1) or sum(range(20000)), warmup=1, reps=1000, device="cpu",
                        min_reps=4, max_time_s=1e-6)
    assert t["n"] == 4
    seen = []
    t = harness.time_fn(lambda: None, warmup=0, reps=6, device="cpu", setup=lambda: seen.append(1))
    assert t["n"] == 6 and len(seen) == 6


@pytest.mark.skipif(not harness.peak_memory_available("cpu"), reason="/proc/self/clear_refs not usable")
def test_peak_memory_sees_large_allocation():
    with harness.PeakMemory("cpu") as pm:
        a = torch.ones(50 * 2 ** 20)  # 200 MiB, every page touched
        a.add_(1)
        del a
    assert pm.extra_bytes is not None
    assert pm.extra_mb >= 150, pm.extra_mb
    with harness.PeakMemory("cpu") as small:
        torch.ones(16)
    assert small.extra_mb < 100


def test_roofline_picks_larger_bound():
    r = harness.roofline(nbytes=1e9, flops=1e9, bandwidth=1e12, peak_flops=1e15)
    assert r["bound"] == "memory" and math.isclose(r["ms"], 1.0)
    r = harness.roofline(nbytes=1e3, flops=1e15, bandwidth=1e12, peak_flops=1e15)
    assert r["bound"] == "compute" and math.isclose(r["ms"], 1e3)


def test_op_bytes_hand_count():
    # L=10 rows, D=4, fp32 W/bias/x, int64 idx; B=2 docs, K=3 each; idx rows {0,1,2} and {2,3,4} -> U=5.
    idx = torch.tensor([[0, 1, 2], [2, 3, 4]])
    U = bench.unique_rows(idx)
    assert U == 5
    kw = dict(L=10, B=2, K=3, D=4, U=U, s_w=4, s_b=4, s_x=4, s_idx=8)
    fwd = bench.op_bytes(mode="fwd", **kw)
    # W rows 5*4*4=80, bias 5*4=20, x 2*4*4=32, idx 6*8=48, out 6*4=24
    assert fwd["bytes"] == 80 + 20 + 32 + 48 + 24
    # no dedup: 6 rows read: 6*16 + 6*4 = 120 instead of 100
    assert fwd["bytes_no_dedup"] == 120 + 32 + 48 + 24
    dense = bench.op_bytes(mode="fwdbwd-dense", **kw)
    # + upstream grad 6*4=24, dx 2*4*4=32, dense dW 10*4*4=160 and dbias 10*4=40
    assert dense["bytes"] == fwd["bytes"] + 24 + 32 + 160 + 40
    sparse = bench.op_bytes(mode="fwdbwd-sparse", **kw)
    # + upstream grad 24, dx 32, U rows of dW 5*16=80, dbias 5*4=20, row ids 5*8=40
    assert sparse["bytes"] == fwd["bytes"] + 24 + 32 + 80 + 20 + 40
    assert bench.op_flops("fwd", 2, 3, 4) == 2 * 2 * 3 * 4
    assert bench.op_flops("fwdbwd-dense", 2, 3, 4) == 6 * 2 * 3 * 4


def test_make_shortlist_is_contiguous_clusters():
    idx = bench.make_shortlist(L=1000, B=3, clusters=4, cluster_size=16, seed=0)
    assert idx.shape == (3, 64) and idx.dtype == torch.int64
    blocks = idx.view(3, 4, 16)
    assert torch.equal(blocks - blocks[..., :1], torch.arange(16).expand(3, 4, 16))
    assert bool((blocks[..., 0] % 16 == 0).all()) and int(idx.max()) < 1000
    for b in range(3):
        assert blocks[b, :, 0].unique().numel() == 4
    assert torch.equal(idx, bench.make_shortlist(L=1000, B=3, clusters=4, cluster_size=16, seed=0))


def test_writers(tmp_path):
    recs = [dict(method="a", mode="fwd", shape="s1", ms=1.5, note=None),
            dict(method="b", mode="fwd", shape="s1", ms=float("nan"), extra=3),
            dict(method="a", mode="fwd", shape="s2", ms=0.25)]
    meta = dict(device_info=harness.device_info("cpu"), command="x", when=torch.float32)
    paths = harness.write_results("unit", recs, meta, tmp_path,
                                  plot=dict(x="shape", y="ms", series="method", panels=("mode",)))
    data = json.loads(paths["json"].read_text())
    assert data["name"] == "unit" and len(data["records"]) == 3
    assert data["records"][1]["ms"] is None  # NaN -> null: strict JSON
    assert data["meta"]["when"] == "torch.float32"
    assert paths["json"].name.startswith("unit_cpu-")
    md = paths["md"].read_text()
    assert "| method" in md and md.count("\n|") >= 4
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["png"] is None
    else:
        assert paths["png"] is not None and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_device_info_cpu():
    info = harness.device_info("cpu")
    for k in ("cpu_model", "cpu_count", "torch", "numpy", "python", "torch_threads"):
        assert info[k] is not None
    assert harness.device_slug(info).startswith("cpu-")


def test_machine_ceilings_small():
    assert harness.copy_bandwidth("cpu", nbytes=8 << 20, reps=3) > 1e8
    assert harness.matmul_peak("cpu", torch.float32, n=128, reps=3) > 1e7


def test_bench_shortlist_score_tiny(tmp_path):
    res = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    recs = res["records"]
    methods = {(r["method"], r["mode"]) for r in recs}
    fused = "fused" if res["meta"]["fused_impl"].startswith("cascadexml_fast") else "reference"
    for m in ("roofline", fused, "gather_bmm", "dense"):
        assert (m, "fwd") in methods and (m, "fwdbwd-dense") in methods
    for r in recs:
        assert r["ms"] is not None and r["ms"] > 0
        if r["method"] != "roofline":
            assert r["p10_ms"] <= r["ms"] <= r["p90_ms"]
        if r["method"] == fused and r["mode"] == "fwd":
            assert r["rel_err_vs_gather"] < 2e-2
        if r["method"] == "gather_bmm":
            assert math.isclose(r["x_vs_gather"], 1.0)
    data = json.loads(res["paths"]["json"].read_text())
    assert data["meta"]["copy_bandwidth_gbs"] > 0 and "device_info" in data["meta"]
    assert res["paths"]["md"].exists()
