"""benchmarks/bench_cpu.py: the target checks on hand-made rows, and a tiny end-to-end run (files written)."""
import json
import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # benchmarks/ is not an installed package
    sys.path.append(_REPO)

from benchmarks import bench_cpu  # noqa: E402


def test_targets_are_checked_against_the_issue_goals():
    shortlist = [dict(method="fused", dtype="int8", B=32, K=2048, threads=1, ms=5.0, pct_roofline=85.0, x_vs_gather=3.5),
                 dict(method="gather_bmm", dtype="int8", B=32, K=2048, threads=1, ms=20.0)]
    cascade = [dict(method="roofline", tree="670k", dtype="fp32", B=1, threads=1, ms=2.0),
               dict(method="fused", tree="670k", dtype="fp32", B=1, threads=1, ms=2.4, x_vs_ref=6.0),
               dict(method="fused", tree="670k", dtype="int8", B=1, threads=1, ms=1.2, x_vs_ref=7.0),
               dict(method="fused", tree="670k", dtype="bf16", B=256, threads=None, ms=100.0, x_vs_ref=9.0,
                    docs_per_s=2560.0)]
    train = [dict(method="ours-lazy", tree="670k", dtype="fp32", B=64, ms=50.0, x_vs_ref=12.0),
             dict(method="reference", tree="670k", dtype="fp32", B=64, ms=600.0, x_vs_ref=1.0)]
    checks = {(c["target"], c["case"]): c["met"] for c in bench_cpu.targets(shortlist, cascade, train)}
    assert checks[(">= 80% of roofline", "int8 B=32 K=2048 1 thread(s)")] == "yes"
    assert checks[(">= 4x torch gather + bmm", "int8 B=32 K=2048 1 thread(s)")] == "NO"
    assert checks[("B=1 within 1.25x of bytes roofline", "670k fp32 B=1 1 thread(s)")] == "yes"  # 1.2x
    assert checks[("B=1 int8 <= 1 ms/doc", "670k int8 B=1 1 thread(s)")] == "NO"
    assert checks[("B=1 >= 5x reference cascade", "670k int8 B=1 1 thread(s)")] == "yes"
    assert checks[("B=256 >= 10x reference cascade", "670k bf16 B=256 all thread(s)")] == "NO"
    assert checks[(">= 10x gather+bmm+dense grad+AdamW", "670k fp32 B=64 (ours-lazy)")] == "yes"
    assert len(checks) == 8  # the baselines' own rows are not targets


def test_tiny_run_writes_the_summary_and_the_e2e_table(tmp_path):
    accuracy = dict(meta=dict(dataset=dict(labels=300)), records=[
        dict(method="omikuji-bonsai", **{"P@1": 80.0, "P@3": 70.0, "P@5": 60.0, "PSP@5": 40.0}, ms_doc_1t=5.0),
        dict(method="cascadexml-frozen", part="demo", **{"P@1": 74.0, "P@3": 65.0, "P@5": 55.0, "PSP@5": 41.0},
             ms_doc_1t=18.0, settings=dict(model_config=dict(beams=[4, 8], head_dim=16), tree_level_sizes=[8, 40])),
        dict(method="cascadexml-frozen-int8", part="demo", **{"P@1": 73.9}),  # scored from features: no timing
    ])
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps(accuracy))
    res = bench_cpu.main(["--tiny", "--parts", "cascade,e2e", "--accuracy-json", str(path), "--out",
                          str(tmp_path / "out")])
    e2e = {r["method"]: r for r in res["parts"]["e2e"]}
    assert set(e2e) == {"omikuji-bonsai", "cascadexml-frozen", "cascadexml-frozen (int8 tables)"}
    assert e2e["cascadexml-frozen"]["head_ms_doc_1t"] > 0 and e2e["omikuji-bonsai"].get("head_ms_doc_1t") is None
    assert any(c["target"] == "B=1 >= 5x reference cascade" for c in res["checks"])
    md = res["paths"]["md"].read_text()
    assert "| part" in md and "cascadexml-frozen (int8 tables)" in md


def test_cpu_isa_option_names_the_results_and_restores_the_default(tmp_path):
    import cascadexml_fast as cx
    from cascadexml_fast import _extension

    if "scalar" not in _extension.supported_cpu_isas():
        pytest.skip("the C++ extension is not loaded")
    default = cx.info()["cpu_isa"]
    res = bench_cpu.main(["--tiny", "--parts", "shortlist", "--threads", "1", "--cpu-isa", "scalar", "--out",
                          str(tmp_path)])
    assert res["meta"]["cascadexml_fast_info"]["cpu_isa"] == "scalar"
    assert res["paths"]["md"].name.startswith("cpu_scalar_tiny_")
    assert "CPU vector path of the kernels: scalar" in res["paths"]["md"].read_text()
    assert cx.info()["cpu_isa"] == default


def test_runs_combine_into_each_checks_median_run():
    def checks(roof, ratio, extra=True):
        shortlist = [dict(method="fused", dtype="fp32", B=1, K=2048, threads=1, ms=1.0, pct_roofline=roof,
                          x_vs_gather=5.0)]
        cascade = [dict(method="roofline", tree="670k", dtype="fp32", B=1, threads=1, ms=1.0),
                   dict(method="fused", tree="670k", dtype="fp32", B=1, threads=1, ms=ratio, x_vs_ref=6.0)]
        train = [dict(method="ours-lazy", tree="670k", dtype="fp32", B=64, ms=50.0, x_vs_ref=12.0)] if extra else []
        return bench_cpu.targets(shortlist, cascade, train)

    def row(out, target):
        return next(c for c in out if c["target"] == target)

    three = bench_cpu.combine_runs([checks(70.0, 1.4), checks(90.0, 1.2, extra=False), checks(81.0, 1.3, False)])
    roof = row(three, ">= 80% of roofline")
    assert (roof["measured"], roof["met"], roof["note"]) == ("81%", "yes", "3 runs: 70 / 90 / 81%")
    ratio = row(three, "B=1 within 1.25x of bytes roofline")  # lower is better: the median is still 1.3
    assert ratio["measured"].startswith("1.3 ms") and ratio["met"] == "NO" and ratio["note"] == "3 runs: 1.4 / 1.2 / 1.3x"
    train = row(three, ">= 10x gather+bmm+dense grad+AdamW")  # measured in one run only: kept as it is
    assert train["note"] is None and train["met"] == "yes"
    two = bench_cpu.combine_runs([checks(90.0, 1.2), checks(70.0, 1.4)])  # even count: the worse middle run
    assert row(two, ">= 80% of roofline")["measured"] == "70%"
    assert row(two, "B=1 within 1.25x of bytes roofline")["measured"].startswith("1.4 ms")
    one = checks(75.0, 1.1)
    assert bench_cpu.combine_runs([one]) == one


def test_tiny_run_with_two_runs_keeps_every_runs_records(tmp_path):
    res = bench_cpu.main(["--tiny", "--parts", "cascade", "--runs", "2", "--out", str(tmp_path)])
    assert {r["run"] for r in res["parts"]["cascade"]} == {1, 2} and res["meta"]["runs"] == 2
    combined = [c for c in res["checks"] if c["target"] == "B=1 >= 5x reference cascade"]
    assert combined and all(c["note"].startswith("2 runs: ") for c in combined)
    assert "2 runs: " in res["paths"]["md"].read_text()
    with pytest.raises(SystemExit):
        bench_cpu.main(["--tiny", "--runs", "0"])
