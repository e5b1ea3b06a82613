"""`cascadexml-fast train | evaluate | predict | demo` (also `python -m cascadexml_fast ...`).

    cascadexml-fast train --config run.yaml --epochs 3 --set model.max_length=64
    cascadexml-fast train --output-dir runs/x --resume          # continue exactly where the last checkpoint was
    cascadexml-fast evaluate --model runs/x/model --data wn-nouns
    cascadexml-fast predict --model runs/x/model "dog, domestic dog: a member of the genus Canis" -k 5
    cascadexml-fast demo [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


# ------------------------------------------------------------------------------------------------------ parsers
def add_parsers(commands) -> None:
    from .training.config import add_config_flags

    p = commands.add_parser("train", help="train a CascadeXML / LightXML model",
                            description="Train a model. Settings come from --config (YAML/JSON) and flags (flags "
                                        "win); see cascadexml_fast.training.TrainConfig for every field.")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (its saved config is used)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="one process per rank under torchrun (RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on "
                        "CPU): label tables sharded over the ranks, data-parallel encoder "
                        "(cascadexml_fast.distributed)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="S",
                   help="with --distributed: seconds a collective may wait before the run fails (default 1800)")

    p = commands.add_parser("evaluate", help="P@k, nDCG@k, PSP@k of a saved model on a test set")
    p.add_argument("--model", required=True, help="a directory written by train (e.g. runs/x/model)")
    p.add_argument("--data", help="wn-nouns, a raw-text directory or a JSON lines file (default: the model's "
                                  "training data)")
    p.add_argument("--test-data", help="JSON lines test file (with a JSON lines --data)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--limit", type=int, help="evaluate the first N documents only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--propensity-a", type=float, help="recompute propensities from the data's training labels "
                                                      "with this A (default: the ones saved with the model)")
    p.add_argument("--propensity-b", type=float)
    p.add_argument("--no-cache", action="store_true", help="do not use/store cached encoder features "
                                                          "(used only when the model's encoder is frozen)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the metrics to this JSON file")

    p = commands.add_parser("predict", help="top-k labels of texts with a saved model")
    p.add_argument("--model", required=True, help="a directory written by train (e.g. runs/x/model)")
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--input", help="a file with one text per line ('-' = stdin)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.add_argument("--device", default="auto")

    from .training.demo import add_demo_flags

    p = commands.add_parser("demo", help="the main job: train CascadeXML on WN-Nouns and report P@k and timings")
    add_demo_flags(p)


def run(args) -> int:
    handler = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "demo": run_demo}
    try:
        return handler[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cascadexml-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------------- train
def run_train(args) -> int:
    from .training.checkpoint import latest_checkpoint
    from .training.config import TrainConfig, flag_values, merge_config, read_config_file
    from .training.trainer import Trainer, format_metrics

    file_values = read_config_file(args.config) if args.config else {}
    given = flag_values(args)
    config = merge_config(file_values, given, args.assignments)
    if args.resume:
        checkpoint = latest_checkpoint(Path(config.output_dir) / "checkpoints")
        if checkpoint is not None:
            saved = TrainConfig.from_dict(json.loads((checkpoint / "train_config.json").read_text()))
            requested = set(file_values) | set(given) | {a.split("=", 1)[0].split(".")[0] for a in args.assignments}
            config = resume_config(saved, config, requested)
    try:
        if getattr(args, "distributed", False):
            from .distributed.trainer import run_distributed_train

            summary = run_distributed_train(config, resume=args.resume, progress=not args.no_progress,
                                            timeout_s=args.dist_timeout)
            if summary.get("rank", 0) != 0:
                return 0  # rank 0 reports
        else:
            summary = Trainer(config, resume=args.resume, progress=not args.no_progress).prepare().train()
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue from the last checkpoint with `cascadexml-fast train --output-dir "
              f"{config.output_dir} --resume`", file=sys.stderr)
        return 130
    best = summary.get("selection_metrics") or {}
    print(f"best epoch {summary['best_epoch']} on {summary['selection_split']}: {format_metrics(best)}")
    if summary.get("test_metrics") and summary["selection_split"] != "test":
        print(f"test (best model): {format_metrics(summary['test_metrics'])}")
    print(f"model: {summary['model_dir']}")
    return 0


# Fields that may differ on resume without changing the result.
_RESUME_FREE = {"output_dir", "device", "num_threads", "feature_cache_dir", "log_every", "eval_batch_size",
                "embed_batch_size", "checkpoint_every"}


def resume_config(saved, config, requested):
    """The saved config, with the harmless fields among `requested` (the fields this command line set) taken
    from `config`; any other requested difference is an error: a resumed run must be the same run."""
    saved_dict, new = saved.to_dict(), config.to_dict()
    conflicts = sorted(key for key in requested - _RESUME_FREE if new.get(key) != saved_dict.get(key))
    if conflicts:
        raise ValueError("--resume continues the saved run, but these settings differ from its config: "
                         + ", ".join(f"{key} (saved {saved_dict.get(key)!r}, given {new.get(key)!r})"
                                     for key in conflicts))
    for key in requested & _RESUME_FREE:
        saved_dict[key] = new[key]
    saved_dict["output_dir"] = config.output_dir
    return type(saved).from_dict(saved_dict)


# ---------------------------------------------------------------------------------------------------- evaluate
def _load_model(directory: str, device: str):
    from .models import load_pretrained
    from .training.checkpoint import existing_model_dir
    from .training.trainer import resolve_device

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = existing_model_dir(directory)
    return path, load_pretrained(path, device=resolve_device(device))


def _model_training_info(path: Path) -> dict:
    info = path / "training.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def align_labels(data, label_names):
    """`data` with its labels renumbered to the model's label ids (by name); labels the model does not know are
    dropped (counted in the returned int)."""
    import numpy as np

    from .data import LabelVocab, XMCData

    if list(data.vocab.names) == list(label_names):
        return data, 0
    index = {name: i for i, name in enumerate(label_names)}
    mapping = np.array([index.get(name, -1) for name in data.vocab.names], dtype=np.int64)
    new_ids = mapping[data.label_ids]
    keep = new_ids >= 0
    rows = np.repeat(np.arange(data.n_docs), np.diff(data.label_offsets))[keep]
    offsets = np.zeros(data.n_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=data.n_docs), out=offsets[1:])
    ids = new_ids[keep]
    order = np.lexsort((ids, rows))  # each row sorted, as XMCData promises
    aligned = XMCData(offsets, ids[order], LabelVocab(label_names), texts=data.texts, doc_ids=data.doc_ids,
                      stats=dict(data.stats))
    return aligned, int((~keep).sum())


def run_evaluate(args) -> int:
    import numpy as np

    from . import metrics as xmc_metrics
    from .training.datasets import load_source
    from .training.features import cached_features, default_cache_root
    from .training.trainer import format_metrics, predict_features, predict_texts, score_predictions

    path, model = _load_model(args.model, args.device)
    info = _model_training_info(path)
    source = args.data or info.get("train_config", {}).get("data")
    test_source = args.test_data or (info.get("train_config", {}).get("test_data") if not args.data else None)
    if source is None:
        raise ValueError("--data is required (the model records no training data)")
    train, test = load_source(source, test_source)
    data = train if args.split == "train" else test
    if data is None:
        raise ValueError(f"{source} has no {args.split} split")
    names = model.label_names or train.vocab.names
    data, dropped = align_labels(data, names)
    if args.limit:
        data = data.subset(np.arange(min(args.limit, data.n_docs)))
    saved_propensity = path / "inv_propensity.npy"
    if args.propensity_a is None and args.propensity_b is None and saved_propensity.is_file():
        inv_propensity = np.load(saved_propensity)
    else:
        aligned_train, _ = align_labels(train, names)
        inv_propensity = xmc_metrics.compute_inv_propensity(
            (aligned_train.label_offsets, aligned_train.label_ids), args.propensity_a, args.propensity_b,
            num_labels=len(names))
    t0 = time.perf_counter()
    if model.config.freeze_encoder and not args.no_cache:
        features, _ = cached_features(model, data.texts, default_cache_root() / "features",
                                      batch_size=args.batch_size, desc=f"embed {args.split}")
        ids, _ = predict_features(model, features, k=5, batch_size=args.batch_size)
    else:
        ids, _ = predict_texts(model, data.texts, k=5, batch_size=args.batch_size)
    metrics = score_predictions(ids, data, inv_propensity)
    seconds = time.perf_counter() - t0
    print(f"{source} {args.split}: {data.n_docs} documents"
          + (f" ({dropped} label occurrences unknown to the model dropped)" if dropped else "")
          + f", {seconds:.1f}s")
    print(format_metrics(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(model=str(path), data=source, split=args.split,
                                                  documents=data.n_docs, seconds=seconds, **metrics), indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------- predict
def run_predict(args) -> int:
    texts = list(args.texts)
    if args.input:
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream if line.strip()]
    if not texts:
        raise ValueError("give texts to label as arguments or with --input FILE")
    _, model = _load_model(args.model, args.device)
    ids, scores = model.predict(texts, k=args.k, batch_size=args.batch_size)
    names = model.label_names
    for text, row_ids, row_scores in zip(texts, ids, scores):
        labels = [(names[i] if names else str(int(i)), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
        if args.json:
            print(json.dumps(dict(text=text, labels=[dict(label=n, score=s) for n, s in labels]), ensure_ascii=False))
        else:
            print(text)
            for name, score in labels:
                print(f"  {score:.4f}  {name}")
    return 0


def run_demo(args) -> int:
    from .training.demo import run_demo as demo

    return demo(args)


def main(argv=None) -> int:
    from .__main__ import main as package_main

    return package_main(argv)


if __name__ == "__main__":
    sys.exit(main())
