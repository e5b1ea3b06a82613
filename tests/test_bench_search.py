"""Fast checks of benchmarks/bench_topk.py and benchmarks/bench_cascade.py: byte counts, trees, the correctness
checks they run before timing, the harness helpers they added, and a tiny run of each script (CPU, seconds)."""
import json
import math
import sys
from pathlib import Path

import torch

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # benchmarks/ is not an installed package; plain `pytest` does not put the root on the path
    sys.path.append(_REPO)

from benchmarks import harness  # noqa: E402
from benchmarks import bench_cascade as bc  # noqa: E402
from benchmarks import bench_topk as bt  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# harness helpers


def test_num_threads_restores():
    before = torch.get_num_threads()
    with harness.num_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with harness.num_threads(None) as n:
        assert n == before


def test_measure_call_keeps_first_output():
    calls = []

    def fn():
        calls.append(1)
        return torch.full((2,), float(len(calls)))

    m = harness.measure_call(fn, "cpu", warmup=2, reps=4, keep_out=True, slow_ms=float("inf"))
    assert m["n"] == 4 and len(calls) == 1 + 1 + 4  # call 1 (memory), 1 more warm-up, 4 timed
    assert torch.equal(m["out"], torch.full((2,), 1.0))
    assert m["first_ms"] > 0 and m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
    m = harness.measure_call(fn, "cpu", warmup=3, reps=2)
    assert m["out"] is None


# ---------------------------------------------------------------------------------------------------------------
# topk


def test_topk_scores_tie_free_and_normal():
    s = bt.make_scores(3, 4096, torch.device("cpu"), torch.float32, seed=0)
    assert s.shape == (3, 4096) and s.dtype == torch.float32
    for row in s:
        assert row.unique().numel() == 4096
    assert torch.equal(s[0].sort().values, s[1].sort().values)  # same quantiles, different order
    assert not torch.equal(s[0], s[1])
    assert abs(float(s.std()) - 1.0) < 0.05
    assert torch.equal(s, bt.make_scores(3, 4096, torch.device("cpu"), torch.float32, seed=0))


def test_topk_bytes_hand_count():
    # scores 2 x 10 fp32 = 80, mask 20, values 2 x 3 x 4 = 24, positions 2 x 3 x 8 = 48
    assert bt.op_bytes(2, 10, 3, 4, False) == 80 + 24 + 48
    assert bt.op_bytes(2, 10, 3, 4, True) == 80 + 20 + 24 + 48


def test_topk_check_rows_flags_a_bad_row():
    s = bt.make_scores(4, 64, torch.device("cpu"), torch.float32, seed=1)
    v, p = torch.topk(s, 5)
    assert bt.check_rows(v, p, v, p)["check"] == "ok"
    p2 = p.clone()
    p2[2, 1] = p2[2, 0]
    r = bt.check_rows(v, p2, v, p)
    assert r["rows_ok"] == 3 and r["bad_rows"] == [2] and r["check"].startswith("MISMATCH")
    # masked-out slots: oracle -inf, the op must say -1 there
    wv = torch.tensor([[1.0, float("-inf")]])
    assert bt.check_rows(wv, torch.tensor([[3, -1]]), wv, torch.tensor([[3, 7]]))["check"] == "ok"
    assert bt.check_rows(wv, torch.tensor([[3, 7]]), wv, torch.tensor([[3, 7]]))["check"] != "ok"


# ---------------------------------------------------------------------------------------------------------------
# cascade


def test_trees_have_the_issue_shapes():
    t = bc.TREES["670k"]
    offs = t.offsets()
    assert [int(o[-1]) for o in offs] == [8192, 65536, 670091]
    assert [o.numel() - 1 for o in offs] == [1024, 8192, 65536]
    sizes = [set((o[1:] - o[:-1]).tolist()) for o in offs]
    assert sizes == [{8}, {8}, {10, 11}]
    assert t.max_children() == [8, 8, 11] and t.beams == (128, 256, 400)
    assert bc.TREES["2.8m"].max_children() == [16, 16, 11] and bc.TREES["2.8m"].L == 2812281
    for o in bc.TREES["tiny"].offsets():
        assert int(o[0]) == 0 and bool((o[1:] >= o[:-1]).all())


def test_cascade_bytes_hand_count():
    # 2 levels, D = 4, fp32 tables and biases (row = 4*4 + 4 = 20 bytes), B = 2 docs, k = 3
    # level 0: 4 rows (all), level 1: ids {0,1,2} and {2,3,-1} -> 4 distinct rows, 5 (doc, row) pairs
    trace = [(torch.arange(4).expand(2, 4), None), (torch.tensor([[0, 1, 2], [2, 3, -1]]), None)]
    distinct, pairs = bc.rows_from_trace(trace)
    assert distinct == [4, 4] and pairs == [8, 5]
    nb = bc.op_bytes(distinct, pairs, B=2, D=4, k=3, s_w=4, s_b=4, s_x=4)
    feats = 2 * 2 * 4 * 4  # 2 levels of x [2, 4] fp32
    outs = 2 * 3 * (8 + 4)  # ids int64 + scores fp32
    assert nb["bytes"] == 8 * 20 + feats + outs
    assert nb["bytes_no_dedup"] == 13 * 20 + feats + outs
    assert bc.op_flops(pairs, 4) == 2 * 4 * 13
    # the tree fallback: level 0 all, level i the beam x mean children
    d, p = bc.rows_from_tree(bc.TREES["670k"], 1)
    assert d[0] == 1024 and p[1] == 128 * 8 and p[2] == 256 * 8 and abs(p[3] - 400 * 670091 / 65536) < 1


def test_compare_ids_classifies():
    ids = torch.tensor([[5, 3, 1], [2, 4, -1]])
    sc = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, float("-inf")]])
    r = bc.compare_ids(ids, sc, ids, sc)
    assert r["check"] == "ok" and r["ids_equal"] == 1.0 and r["rows_equal"] == 1.0
    swapped = torch.tensor([[5, 1, 3], [2, 4, -1]])  # a flip between two (near-)equal scores
    near = torch.tensor([[0.9, 0.8, 0.8], [0.6, 0.5, float("-inf")]])
    r = bc.compare_ids(swapped, near, ids, near)
    assert r["check"].startswith("near-tie 1/2") and math.isclose(r["ids_equal"], 4 / 6)
    wrong = torch.tensor([[5, 9, 1], [2, 4, -1]])
    r = bc.compare_ids(wrong, torch.tensor([[0.9, 0.6, 0.7], [0.6, 0.5, float("-inf")]]), ids, sc)
    assert r["check"].startswith("MISMATCH") and r["bad_rows"] == [0]
    r = bc.compare_ids(ids, sc + 0.1, ids, sc)  # right ids, wrong scores
    assert r["check"].startswith("MISMATCH scores")


# ---------------------------------------------------------------------------------------------------------------
# tiny runs of both scripts


def test_bench_topk_tiny(tmp_path):
    res = bt.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--strict"])
    recs = res["records"]
    fused = "fused" if res["meta"]["fused_impl"].startswith("cascadexml_fast") else "reference"
    assert {r["method"] for r in recs} == {"roofline", fused, "torch_topk"}
    assert any(r["mask"] for r in recs) and any(r["k"] > r["K"] for r in recs)
    assert {r["threads"] for r in recs} == {1, torch.get_num_threads()}
    for r in recs:
        assert r["ms"] is not None and r["ms"] > 0
        if r["method"] == fused:
            assert r["check"] == "ok" and r["rows_ok"] == r["B"]
            assert r["x_vs_torch"] > 0
        if r["method"] == "torch_topk":
            assert math.isclose(r["x_vs_torch"], 1.0)
    data = json.loads(res["paths"]["json"].read_text())
    assert min(data["meta"]["copy_bandwidth_gbs"].values()) > 0 and data["meta"]["checks_failed"] == 0
    assert res["paths"]["md"].exists() and res["paths"]["json"].name.startswith("topk_tiny_cpu-")


def test_bench_cascade_tiny(tmp_path):
    res = bc.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--strict"])
    recs = res["records"]
    assert res["meta"]["fused_impl"].startswith("cascadexml_fast")
    methods = {r["method"] for r in recs}
    assert methods == {"roofline", "fused", "reference", "dense", "fused_loop"}
    assert {r["threads"] for r in recs} == {1, torch.get_num_threads()}
    for r in recs:
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["rows_source"] == "reference beams"
        assert r["bytes"] <= r["bytes_no_dedup"]
        if r["method"] == "fused":
            assert r["check"] == "ok" and r["ids_equal"] == 1.0
            assert r["x_vs_ref"] > 0 and (r["dtype"] == "int8" or r["x_vs_dense"] > 0)  # int8: no dense baseline
            assert math.isclose(r["ms_per_doc"] * r["B"], r["ms"])
        if r["method"] == "reference":
            assert math.isclose(r["x_vs_ref"], 1.0)
        if r["method"] == "fused_loop":  # B = 1 on CPU only; warm caches, so no ratio to the flushed baselines
            assert r["B"] == 1 and r["x_vs_ref"] is None and "not flushed" in r["note"]
    data = json.loads(res["paths"]["json"].read_text())
    meta = data["meta"]
    assert meta["trees"]["tiny"]["sizes"] == list(bc.TREES["tiny"].sizes)
    assert meta["checks_failed"] == 0 and set(meta["copy_bandwidth_gbs"]) == {"1", str(torch.get_num_threads())}
    assert res["paths"]["md"].exists()
