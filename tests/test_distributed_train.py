"""`train --distributed` (DistributedTrainer): the Trainer with a label-sharded head on 2 and 3 gloo ranks, against
the single-process Trainer on the same config. Dropout is off everywhere (the tiny encoder's too), so the runs
must log the same losses (to fp32 summation order) and end with the same model; a run interrupted on 2 ranks is
resumed on 3 from the single-process-format checkpoint that rank 0 wrote. Heavier than test_distributed.py
(three trainings, each rank loading transformers): marked slow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_workers as workers
import training_fixtures as fixtures
from dist_harness import World

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]


def no_dropout_encoder(directory: Path) -> Path:
    fixtures.write_tiny_encoder(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def config_fields(tmp_path: Path, output_dir: Path) -> dict:
    return dict(data=str(fixtures.write_raw_text_dataset(tmp_path / "data")), model_type="cascadexml",
                model=dict(encoder=str(no_dropout_encoder(tmp_path / "encoder")), max_length=16, beams=[2, 4],
                           dropouts=[0.0, 0.0, 0.0]),
                tree_level_sizes=[2, 6], tree_features="tfidf", epochs=2, batch_size=8, head_lr=1e-2,
                encoder_lr=1e-3, log_every=1, checkpoint_every=3, output_dir=str(output_dir),
                feature_cache_dir=str(tmp_path / "cache"), eval_batch_size=16, device="cpu", num_threads=1,
                amp="none")


def losses(output_dir: Path):
    lines = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [(line["global_step"], line["loss"]) for line in lines if line["type"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run: (work dir, output dir, summary)."""
    from cascadexml_fast.training import TrainConfig, Trainer

    work = tmp_path_factory.mktemp("distributed-train")
    output = work / "one"
    summary = Trainer(TrainConfig(**config_fields(work, output)), log=lambda *_: None, progress=False).prepare().train()
    return work, output, summary


def test_distributed_training_matches_one_process_and_resumes_on_more_ranks(reference):
    from cascadexml_fast.models import load_pretrained

    tmp_path, reference_dir, reference = reference
    sharded_dir = tmp_path / "sharded"
    fields = config_fields(tmp_path, sharded_dir)
    two = World(2)
    try:
        first = two.run(workers.trainer_run, fields, 5, False, timeout_s=240)
    finally:
        two.close()
    assert first[0]["summary"]["interrupted"] and first[0]["rows"] != first[1]["rows"]
    assert (sharded_dir / "checkpoints" / "LATEST").read_text().strip().endswith("3")
    three = World(3)
    try:
        final = three.run(workers.trainer_run, fields, None, True, timeout_s=240)
    finally:
        three.close()
    assert final[0]["summary"]["best_epoch"] == reference["best_epoch"]
    assert final[0]["summary"]["selection_metrics"] == reference["selection_metrics"]

    expected, got = losses(reference_dir), losses(sharded_dir)
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, 17))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected)) < 1e-5
    one, sharded = load_pretrained(reference_dir / "model"), load_pretrained(sharded_dir / "model")
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        if a.is_floating_point():
            assert float((a - b).abs().max()) < 1e-5, name
    assert not (sharded_dir / ".distributed" / "init-model").exists()


def test_train_distributed_cli_under_torchrun(reference):
    tmp_path, reference_dir, reference = reference
    output = tmp_path / "torchrun"
    fields = config_fields(tmp_path, output)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(fields))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "cascadexml_fast", "train", "--distributed", "--config", str(config),
                             "--no-progress", "--dist-timeout", "120"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\nbest epoch ") == 1 and "distributed: 2 ranks (gloo)" in result.stdout  # rank 0 only
    expected, got = losses(reference_dir), losses(output)
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected)) < 1e-5
    assert (output / "model" / "config.json").is_file() and (output / "checkpoints" / "LATEST").is_file()
