"""Fast checks of benchmarks/bench_train_step.py: the plain-torch reference path it times against (children table,
per-level positives, teacher-forced loss == CascadeHead.loss on the same weights), and a --tiny run (CPU, seconds)."""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # benchmarks/ is not an installed package; plain `pytest` does not put the root on the path
    sys.path.append(_REPO)

import cascadexml_fast as cx  # noqa: E402
from cascadexml_fast.ops import reference as cref  # noqa: E402
from benchmarks import bench_train_step as bts  # noqa: E402

TINY = bts.TREES["tiny"]


def _head(dtype=torch.float32, D=16):
    torch.manual_seed(0)
    tree = SimpleNamespace(offsets=TINY.offsets(), perm=torch.arange(TINY.L))
    return cx.CascadeHead(tree, D, list(TINY.beams), sparse_grad=True, dtype=dtype)


def test_tree_shapes():
    for t in bts.TREES.values():
        offs = t.offsets()
        assert len(offs) == t.levels - 1
        for o, n, m, mc in zip(offs, t.sizes[:-1], t.sizes[1:], t.max_children()):
            assert o.numel() == n + 1 and int(o[0]) == 0 and int(o[-1]) == m
            assert int((o[1:] - o[:-1]).max()) == mc and int((o[1:] - o[:-1]).min()) >= 1
    assert bts.TREES["670k"].widths() == [1024, 1024, 2048, 4400]
    assert bts.TREES["2.8m"].L == 2812281


def test_children_table_matches_block_ids():
    for o, mc in zip(TINY.offsets(), TINY.max_children()):
        tab = bts.children_table(o, mc)
        n = o.numel() - 1
        assert tab.shape == (n + 1, mc) and bool((tab[n] == -1).all())
        nodes = torch.tensor([[0, 3, n - 1], [n - 1, 1, 2]])
        assert torch.equal(tab[nodes].reshape(2, -1), cref.block_ids(nodes, o, mc))


def test_level_positive_ids_match_head():
    head = _head()
    off, ids = bts.make_positives(5, TINY.L, seed=3)
    assert off.shape == (6,) and int(off[-1]) == ids.numel()
    for b in range(5):
        row = ids[off[b]:off[b + 1]]
        assert 1 <= row.numel() <= 10 and row.unique().numel() == row.numel()
    pad = bts.level_positive_ids(TINY.offsets(), off, ids)
    for level, (p_off, p_ids) in enumerate(head.level_positives((off, ids))):
        for b in range(5):
            want = set(p_ids[p_off[b]:p_off[b + 1]].tolist())
            got = set(pad[level][b].tolist()) - {-2}
            assert got == want


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_reference_loss_matches_head(dtype, tol):
    head = _head(dtype)
    B = 6
    X = bts.make_features(TINY.levels, B, 16, torch.device("cpu"), dtype, seed=1)
    off, ids = bts.make_positives(B, TINY.L, seed=2)
    pad = bts.level_positive_ids(TINY.offsets(), off, ids)
    ref = bts.Reference([w.detach() for w in head.weights], [b.detach() for b in head.biases], TINY,
                        torch.device("cpu"))
    with torch.no_grad():
        ours, trace = head.loss(X, (off, ids), return_shortlists=True)
        ours_ids = [t for t, _ in trace]
        same, _ = ref.loss(X, pad, forced_ids=ours_ids)
        own, ref_ids = ref.loss(X, pad)
    assert abs(float(ours) - float(same)) <= tol * abs(float(same))
    if dtype == torch.float32:  # fp32: the plain-torch teacher forcing picks the same shortlists
        assert bts.shortlist_match(ours_ids, ref_ids) == 1.0
        assert abs(float(ours) - float(own)) <= tol * abs(float(own))
    assert [t.shape for t in ours_ids] == [r.shape for r in ref_ids]


def test_reference_step_trains_with_dense_grads():
    head = _head()
    params = [torch.nn.Parameter(w.detach().clone()) for w in list(head.weights) + list(head.biases)]
    ref = bts.Reference(params[:TINY.levels], params[TINY.levels:], TINY, torch.device("cpu"))
    X = bts.make_features(TINY.levels, 4, 16, torch.device("cpu"), torch.float32, seed=1)
    off, ids = bts.make_positives(4, TINY.L, seed=2)
    pad = bts.level_positive_ids(TINY.offsets(), off, ids)
    loss, _ = ref.loss(X, pad)
    loss.backward()
    assert all(p.grad is not None and p.grad.layout == torch.strided for p in params)
    assert all(x.grad is not None for x in X)


def test_tiny_run(tmp_path):
    out = bts.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--strict"])
    recs = out["records"]
    assert {r["method"] for r in recs} == set(bts.METHODS)
    for r in recs:
        assert r["ms"] is not None and r["ms"] > 0 and r["p10_ms"] <= r["ms"] <= r["p90_ms"], r
        assert r["state_mb"] > 0 and r["weights_mb"] > 0
        assert math.isclose(r["total_mb"], r["weights_mb"] + r["state_mb"] + (r["extra_mb"] or 0.0))
        assert math.isfinite(r["loss"])
        if r["method"] == "reference":
            assert r["x_vs_ref"] == pytest.approx(1.0)
        else:
            assert r["agree"] is True and r["x_vs_ref"] > 0
            assert r["first_step_loss"] == pytest.approx(r["loss"], rel=1e-5)
    lazy = {r["dtype"]: r for r in recs if r["method"] == "ours-lazy"}
    half = {r["dtype"]: r for r in recs if r["method"] == "ours-lazy-bf16state"}
    assert half["fp32"]["state_mb"] == pytest.approx(lazy["fp32"]["state_mb"] / 2)
    data = json.loads(Path(out["paths"]["json"]).read_text())
    assert data["meta"]["preset"] == "tiny" and data["meta"]["checks_failed"] == 0
    assert Path(out["paths"]["md"]).read_text().count("ours-exact") >= 2
    assert torch.get_num_threads() >= 1
