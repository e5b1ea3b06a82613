"""benchmarks/bench_distributed.py: the byte accounting, the cost model files, and one tiny gloo run whose
wrapped-collective bytes must equal the computed ones."""
import json

import pytest
import torch.distributed as dist

from benchmarks import bench_distributed as bench
from benchmarks.trees import TREES


def test_accounting_and_cost_model(tmp_path):
    tree = TREES["670k"]
    dims = [768] * tree.levels
    one = bench.head_step_volume(tree.sizes, tree.beams, dims, 64, 1, nnz_max=400)
    assert one["total"] == 0  # a single rank sends nothing
    two = bench.head_step_volume(tree.sizes, tree.beams, dims, 64, 2, nnz_max=400)
    # R = 2: features [32, 4 x 768] fp32 gathered and their gradients reduce-scattered, 3 top-k all-gathers
    assert two["parts"]["features (all-gather)"] == two["parts"]["feature grads (reduce-scatter)"] == 32 * 3072 * 4
    assert two["parts"]["top-k merges"] == 64 * (128 + 256 + 400) * 8
    dense = bench.dense_allreduce_volume(tree.sizes, dims, 2)
    assert dense["gradient_bytes"] == sum(tree.sizes) * 769 * 4 and dense["total"] == dense["gradient_bytes"]
    result = bench.main(["--no-gloo", "--out", str(tmp_path)])
    assert {(r["tree"], r["R"], r["scaling"]) for r in result["records"]} == {
        (t, R, s) for t in ("670k", "2.8m") for R in (8, 64) for s in ("weak", "strong")}
    assert all(r["ratio"] > 10 for r in result["records"])
    saved = json.loads((tmp_path / "distributed_cost_model.json").read_text())
    assert saved["meta"]["fabrics"]["64"]["busbw_GBps"] == 40.0
    assert "Assumptions (not measurements)" in (tmp_path / "distributed_cost_model.md").read_text()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_tiny_gloo_run_measures_the_computed_bytes():
    row = bench.gloo_run("tiny", 2, B=8, D=16, steps=1, timeout_s=120)
    assert row["match"] and row["measured_wire_bytes"] == row["computed_wire_bytes"] > 0
    assert row["dense_wire_bytes"] > row["measured_wire_bytes"]
