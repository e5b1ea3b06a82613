"""The training configuration: one dataclass, read from a YAML/JSON file and/or command-line flags.

Precedence: the defaults here < the config file < flags. Every top-level field has a flag (``epochs`` ->
``--epochs``, ``head_lr`` -> ``--head-lr``); any field, nested ones included, can also be set with
``--set KEY=VALUE`` (``--set model.max_length=32``), where VALUE is parsed as YAML (``[32, 64]``, ``true``,
``1e-3``). ``model`` holds the fields of ``CascadeXMLConfig`` / ``LightXMLConfig`` (encoder, max_length, pooling,
beams, level_layers, top_clusters, ...); its ``freeze_encoder`` comes from the top-level ``freeze_encoder``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

MODEL_TYPES = ("cascadexml", "lightxml")
SCHEDULES = ("one_cycle", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "none")
TREE_FEATURES = ("auto", "encoder", "tfidf")
TABLE_DTYPES = ("float32", "bfloat16")
HEAD_OPTIMIZERS = ("adamw", "rowwise_adagrad")
STATE_DTYPES = ("float32", "bfloat16", "uint8")
_CHOICES = dict(model_type=MODEL_TYPES, schedule=SCHEDULES, amp=AMP_MODES, tree_features=TREE_FEATURES,
                table_dtype=TABLE_DTYPES, head_optimizer=HEAD_OPTIMIZERS, optimizer_state_dtype=STATE_DTYPES)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs. See the README's "Training" section for a worked example.

    data: "wn-nouns" (the bundled dataset), a raw-text directory (train_texts.txt + train_labels.txt and the
        test_ files, the XMC repository / LightXML layout) or a JSON lines training file ({"text", "labels"}).
    test_data: the JSON lines test file (a raw-text directory and WN-Nouns hold their own test split).
    train_limit, test_limit: keep only the first N training / test documents (quick runs).
    valid_size: documents carved out of the training set (at random, from `seed`) for validation and model
        selection: a fraction in (0, 1) or a count >= 1. 0: select on the test set, as CascadeXML's code does
        (the log says so).
    model_type: "cascadexml" or "lightxml".
    model: fields of the model's config (CascadeXMLConfig / LightXMLConfig); the encoder defaults to the
        bundled all-MiniLM-L6-v2.
    tree_level_sizes: node counts of the tree's cluster levels, top first; default from the label count
        (`default_level_sizes`). LightXML takes exactly one level.
    tree_features: label features for the tree: "encoder" = PIFA over the pooled last-layer vectors of the
        (frozen, pretrained) encoder, "tfidf" = PIFA over TF-IDF of the training texts (the originals' way);
        "auto" = "encoder" with freeze_encoder (those vectors are computed anyway), else "tfidf".
    freeze_encoder: train only the heads, on encoder features computed once per document and cached on disk.
    encoder_lr, head_lr, encoder_weight_decay, head_weight_decay: AdamW settings per group (CascadeXML's
        1e-4 / 1e-3, 0.05 / 0.005; biases and LayerNorm weights get no decay).
    table_dtype: dtype of the label tables (the row-sparse "tables" / "label_embedding" groups): "float32" or
        "bfloat16" (half the memory; pair it with stochastic_rounding). Biases and the encoder stay fp32.
    table_lr: learning rate of the row-sparse groups (label tables and their biases); default head_lr.
    head_optimizer: the optimizer of the row-sparse groups: "adamw" (cascadexml_fast.SparseAdamW) or
        "rowwise_adagrad" (cascadexml_fast.SparseRowwiseAdagrad: one accumulator per row, no weight decay).
    optimizer_state_dtype: SparseAdamW's moments: "float32", "bfloat16" or "uint8" (block-wise 8-bit).
    stochastic_rounding: round the updates of bf16 tables stochastically (unbiased; seeded from `seed`).
    schedule: "one_cycle" (CascadeXML: cosine warm-up from lr/10 over warmup_epochs, flat, cosine down to
        lr/1000 over the last 3 epochs, beta1 0.95 -> 0.85 -> 0.95) or "constant".
    amp: mixed precision. CUDA: "auto" = bf16 where supported, else fp16 with a GradScaler. CPU: "bf16" autocasts
        (~1.6x faster fine-tuning on a CPU with AVX-512 bf16), "auto" and "none" stay fp32, "fp16" is refused.
    group_by_length: fine-tuning batches of documents of similar token length (the shuffled epoch order is cut
        into windows of 32 batches, each sorted by length, and the batches shuffled again): less padding, ~2.5x
        less encoder work on WN-Nouns at max_length 48; still a function of (seed, epoch) only. No effect with
        freeze_encoder (cached features have no padding).
    checkpoint_every: also checkpoint every N optimizer steps (0: at the end of each epoch only).
    log_every: optimizer steps per JSON log line.
    feature_cache_dir: where cached encoder features go (default: <cache root>/features, see
        `default_cache_root`).
    num_threads: torch CPU threads (default: torch's choice).
    """

    data: str = "wn-nouns"
    test_data: Optional[str] = None
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    valid_size: float = 0.0
    model_type: str = "cascadexml"
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)
    tree_level_sizes: Optional[List[int]] = None
    tree_features: str = "auto"
    freeze_encoder: bool = False
    epochs: int = 5
    batch_size: int = 64
    encoder_lr: float = 1e-4
    head_lr: float = 1e-3
    encoder_weight_decay: float = 0.05
    head_weight_decay: float = 0.005
    schedule: str = "one_cycle"
    warmup_epochs: float = 1.0
    table_dtype: str = "float32"
    table_lr: Optional[float] = None
    head_optimizer: str = "adamw"
    optimizer_state_dtype: str = "float32"
    stochastic_rounding: bool = False
    amp: str = "auto"
    group_by_length: bool = False
    device: str = "auto"
    seed: int = 0
    eval_batch_size: int = 256
    propensity_a: float = 0.55
    propensity_b: float = 1.5
    output_dir: str = "runs/train"
    checkpoint_every: int = 0
    log_every: int = 50
    feature_cache_dir: Optional[str] = None
    embed_batch_size: int = 64
    num_threads: Optional[int] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def positive_int(name, allow_none=False, allow_zero=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("model_type", MODEL_TYPES)
        choice("schedule", SCHEDULES)
        choice("amp", AMP_MODES)
        choice("tree_features", TREE_FEATURES)
        choice("table_dtype", TABLE_DTYPES)
        choice("head_optimizer", HEAD_OPTIMIZERS)
        choice("optimizer_state_dtype", STATE_DTYPES)
        if self.head_optimizer == "rowwise_adagrad" and self.optimizer_state_dtype != "float32":
            raise ValueError("optimizer_state_dtype applies to head_optimizer='adamw' (row-wise AdaGrad keeps one "
                             f"fp32 value per row), got {self.optimizer_state_dtype!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every", "embed_batch_size"):
            positive_int(name)
        positive_int("checkpoint_every", allow_zero=True)
        positive_int("seed", allow_zero=True)
        for name in ("train_limit", "test_limit", "num_threads"):
            positive_int(name, allow_none=True)
        for name in ("encoder_lr", "head_lr", "encoder_weight_decay", "head_weight_decay", "warmup_epochs",
                     "valid_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.table_lr is not None and (not isinstance(self.table_lr, (int, float)) or isinstance(self.table_lr, bool)
                                          or self.table_lr < 0):
            raise ValueError(f"table_lr must be a number >= 0 or None, got {self.table_lr!r}")
        if self.valid_size >= 1 and self.valid_size != int(self.valid_size):
            raise ValueError(f"valid_size must be a fraction in [0, 1) or a whole count, got {self.valid_size}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of model config fields, got {type(self.model).__name__}")
        if "freeze_encoder" in self.model:
            raise ValueError("set freeze_encoder at the top level of the config, not under model")
        if self.tree_level_sizes is not None:
            sizes = list(self.tree_level_sizes)
            if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
                raise ValueError(f"tree_level_sizes must be a list of positive integers, got {self.tree_level_sizes!r}")
            if self.model_type == "lightxml" and len(sizes) != 1:
                raise ValueError(f"LightXML takes one cluster level (tree_level_sizes: [clusters]), got {sizes}")
            self.tree_level_sizes = sizes
        if not isinstance(self.propensity_b, (int, float)) or self.propensity_b <= -1:
            raise ValueError(f"propensity_b must be > -1, got {self.propensity_b!r}")
        if not isinstance(self.propensity_a, (int, float)) or self.propensity_a <= 0:
            raise ValueError(f"propensity_a must be > 0, got {self.propensity_a!r}")

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def resolved_tree_features(self) -> str:
        if self.tree_features != "auto":
            return self.tree_features
        return "encoder" if self.freeze_encoder else "tfidf"


def read_config_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A YAML or JSON mapping (JSON is YAML), checked to be a mapping."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML/JSON ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the config must be a mapping of field: value, got {type(values).__name__}")
    return values


def parse_assignment(text: str):
    """``"a.b=VALUE"`` -> (["a", "b"], parsed VALUE); VALUE is YAML (so ``[1, 2]``, ``true``, ``null`` work)."""
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: cannot parse {raw!r} ({e})") from None
    return path, value


def set_nested(values: Dict[str, Any], path: List[str], value) -> None:
    node = values
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--set {'.'.join(path)}: {part} is not a mapping")
        node = child
    node[path[-1]] = value


def merge_config(file_values: Optional[Dict[str, Any]] = None, flag_values: Optional[Dict[str, Any]] = None,
                 assignments: Optional[List[str]] = None) -> TrainConfig:
    """defaults < file < flags < --set assignments. `model` mappings are merged key by key."""
    merged: Dict[str, Any] = {}
    for layer in (file_values or {}, flag_values or {}):
        for key, value in layer.items():
            if key == "model" and isinstance(value, dict):
                merged["model"] = {**merged.get("model", {}), **value}
            else:
                merged[key] = value
    for text in assignments or []:
        path, value = parse_assignment(text)
        set_nested(merged, path, value)
    return TrainConfig.from_dict(merged)


def add_config_flags(parser) -> None:
    """One ``--field-name`` flag per top-level field (default None = not given) plus --config and --set."""
    import argparse

    parser.add_argument("--config", help="YAML or JSON config file (flags override it)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="set any field, nested ones too (model.max_length=32); VALUE is YAML")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field)
        if kind is bool:
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction)
        elif kind is list:
            parser.add_argument(flag, dest=field.name, default=None, type=_int_list, metavar="N,N,...")
        else:
            parser.add_argument(flag, dest=field.name, default=None, type=kind, choices=_CHOICES.get(field.name))


def flag_values(args) -> Dict[str, Any]:
    """The config fields given as flags (those that are not None)."""
    out = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            out[field.name] = value
    return out


def _int_list(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _flag_type(field):
    annotation = str(field.type)
    if "List" in annotation:
        return list
    if "bool" in annotation:
        return bool
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str
