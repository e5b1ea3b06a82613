"""Training, evaluation and the demo: `cascadexml-fast train | evaluate | predict | demo` run on these.

    from cascadexml_fast.training import TrainConfig, train
    summary = train(TrainConfig(data="wn-nouns", freeze_encoder=True, epochs=3, output_dir="runs/wn"))
"""
from .config import TrainConfig, merge_config, read_config_file
from .datasets import csr_rows, epoch_order, load_source, load_splits
from .features import cached_features, default_cache_root, embed_texts, feature_key
from .schedule import Schedule
from .trainer import (
    Trainer, default_level_sizes, predict_features, predict_texts, score_predictions, selection_score, train,
)

__all__ = [
    "Schedule",
    "TrainConfig",
    "Trainer",
    "cached_features",
    "csr_rows",
    "default_cache_root",
    "default_level_sizes",
    "embed_texts",
    "epoch_order",
    "feature_key",
    "load_source",
    "load_splits",
    "merge_config",
    "predict_features",
    "predict_texts",
    "read_config_file",
    "score_predictions",
    "selection_score",
    "train",
]
