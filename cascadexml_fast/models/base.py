"""What CascadeXML and LightXML share: the HF encoder, tokenization, pooling, prediction, parameter groups and
save/load. Subclasses add a head and implement `feature_layers`, `loss_from_features`,
`predict_from_features` and `_head_param_groups`.

transformers is imported inside the functions that need it, so that `import cascadexml_fast.models` stays cheap.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..tree import LabelTree

FORMAT_NAME = "cascadexml-fast-model"
FORMAT_VERSION = 1
POOLING_MODES = ("cls", "mean")

# model_type (as written in config.json) -> model class; filled by the subclasses' definitions.
MODEL_TYPES: Dict[str, type] = {}


@dataclasses.dataclass
class EncoderConfig:
    """Fields shared by both models.

    encoder: a HF model name or local directory (loaded with AutoModel, pretrained weights).
    encoder_config: instead of `encoder`, a dict of HF config fields for a randomly initialised encoder
        ("model_type" defaults to "bert"), e.g. dict(hidden_size=32, num_hidden_layers=2, ...).
    tokenizer: HF name or directory of the tokenizer; defaults to `encoder` (needed with `encoder_config`).
    max_length: tokens per document after truncation (special tokens included).
    pooling: "cls" (the [CLS] vector, as both papers) or "mean" (mean over the attention mask).
    freeze_encoder: the encoder is not trained (no gradients, kept in eval mode so that its outputs can be
        cached once per document; param_groups omits it).
    sparse_grad: the label tables get row-sparse gradients (param_groups marks them "sparse": optimise them
        with cascadexml_fast.SparseAdamW).
    """

    encoder: Optional[str] = None
    encoder_config: Optional[Dict[str, Any]] = None
    tokenizer: Optional[str] = None
    max_length: int = 128
    pooling: str = "cls"
    freeze_encoder: bool = False
    sparse_grad: bool = True

    def __post_init__(self):
        if self.encoder is not None and self.encoder_config is not None:
            raise ValueError("give one of config.encoder (pretrained) and config.encoder_config (random init), "
                             "not both")
        if self.encoder is None and self.encoder_config is None:
            raise ValueError("config.encoder (a HF name or directory) or config.encoder_config (a dict) is required")
        if self.encoder is None and self.tokenizer is None:
            raise ValueError("config.tokenizer is required when the encoder is built from config.encoder_config")
        if self.encoder is not None:
            self.encoder = os.fspath(self.encoder)
        if self.tokenizer is not None:
            self.tokenizer = os.fspath(self.tokenizer)
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"config.max_length must be an int >= 2, got {self.max_length!r}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"config.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def check_fraction(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _build_encoder(config: EncoderConfig):
    from transformers import AutoConfig, AutoModel

    if config.encoder_config is not None:
        fields = dict(config.encoder_config)
        model_type = fields.pop("model_type", "bert")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **fields))
    return AutoModel.from_pretrained(config.encoder)


def _build_tokenizer(source: Union[str, os.PathLike]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(source))


def _encoder_from_saved_config(fields: Dict[str, Any]):
    from transformers import AutoConfig, AutoModel

    fields = dict(fields)
    model_type = fields.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **fields))


class XMCModel(nn.Module):
    """Base class: an HF encoder whose pooled hidden states feed a label head over a LabelTree."""

    MODEL_TYPE = ""
    CONFIG_CLASS = EncoderConfig

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.MODEL_TYPE:
            MODEL_TYPES[cls.MODEL_TYPE] = cls

    def __init__(self, config: EncoderConfig, tree: LabelTree, label_names: Optional[Sequence[str]] = None, *,
                 encoder: Optional[nn.Module] = None, tokenizer=None):
        super().__init__()
        if not isinstance(config, self.CONFIG_CLASS):
            raise ValueError(f"config must be a {self.CONFIG_CLASS.__name__}, got {type(config).__name__}")
        if not isinstance(tree, LabelTree):
            raise ValueError(f"tree must be a cascadexml_fast.LabelTree, got {type(tree).__name__}")
        self.config = config
        self.tree = tree
        self.num_labels = tree.num_labels
        if label_names is not None:
            label_names = [str(name) for name in label_names]
            if len(label_names) != self.num_labels:
                raise ValueError(f"label_names has {len(label_names)} entries but the tree has {self.num_labels} "
                                 "labels")
        self.label_names = label_names
        self.encoder = encoder if encoder is not None else _build_encoder(config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # neither method reads the pooler; dropping it keeps every parameter trained
        self.tokenizer = tokenizer if tokenizer is not None else _build_tokenizer(config.tokenizer or config.encoder)
        encoder_config = self.encoder.config
        self.encoder_depth = int(getattr(encoder_config, "num_hidden_layers"))
        self.hidden_size = int(getattr(encoder_config, "hidden_size"))
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    # ---- protocol: subclasses implement

    @property
    def feature_layers(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def loss_from_features(self, features: torch.Tensor, positives) -> torch.Tensor:
        raise NotImplementedError

    def predict_from_features(self, features: torch.Tensor, k: int):
        raise NotImplementedError

    def _head_param_groups(self, head_lr: float, head_weight_decay: float) -> List[dict]:
        raise NotImplementedError

    # ---- modes

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()  # a frozen encoder never runs dropout, so cached features equal live ones
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- encoder side

    def tokenize(self, texts: Union[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
        """Token tensors (input_ids, attention_mask, ...) truncated to config.max_length, padded to the longest."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length, padding="longest",
                                 return_tensors="pt")
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}

    def encode(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled vectors of the `feature_layers` hidden states, stacked in that order: [B, S, H]."""
        device = next(self.encoder.parameters()).device
        inputs = {key: value.to(device) for key, value in batch.items()}
        outputs = self.encoder(**inputs, output_hidden_states=True, return_dict=True)
        hidden_states = outputs.hidden_states
        if len(hidden_states) != self.encoder_depth + 1:
            raise ValueError(f"the encoder returned {len(hidden_states)} hidden states, expected "
                             f"num_hidden_layers + 1 = {self.encoder_depth + 1}")
        layers = [hidden_states[i] for i in self.feature_layers]
        if self.config.pooling == "cls":
            pooled = [h[:, 0] for h in layers]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1)
            count = mask.sum(1).clamp(min=1)
            pooled = [(h * mask.to(h.dtype)).sum(1) / count.to(h.dtype) for h in layers]
        return torch.stack(pooled, dim=1)

    def _check_features(self, features: torch.Tensor) -> None:
        S = len(self.feature_layers)
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[1] != S \
                or features.shape[2] != self.hidden_size:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be [B, {S}, {self.hidden_size}] (encode()'s output), got {shape}")

    def _positives_on(self, positives, device: torch.device):
        if not isinstance(positives, (tuple, list)) or len(positives) != 2:
            raise ValueError("positives must be CSR: (offsets int64 [B + 1], label_ids int64)")
        offsets, label_ids = (torch.as_tensor(t) for t in positives)
        return offsets.to(device=device, dtype=torch.int64), label_ids.to(device=device, dtype=torch.int64)

    # ---- protocol: whole-batch helpers

    def loss(self, batch: Dict[str, torch.Tensor], positives) -> torch.Tensor:
        return self.loss_from_features(self.encode(batch), positives)

    def predict(self, texts: Union[str, Sequence[str]], k: int = 5, batch_size: int = 64):
        """Top-k (original label ids, scores) as numpy arrays: [k] for one str, [B, k] for a list; -1 / -inf
        where fewer than k labels were reached. Runs in eval mode; the caller's mode is restored."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        was_training = self.training
        self.eval()
        ids, scores = [], []
        try:
            with torch.no_grad():
                for start in range(0, len(texts), batch_size):
                    features = self.encode(self.tokenize(texts[start:start + batch_size]))
                    chunk_ids, chunk_scores = self.predict_from_features(features, k)
                    ids.append(chunk_ids.cpu().numpy())
                    scores.append(chunk_scores.float().cpu().numpy())
        finally:
            self.train(was_training)
        ids = np.concatenate(ids) if ids else np.zeros((0, k), np.int64)
        scores = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
        return (ids[0], scores[0]) if single else (ids, scores)

    # ---- optimisation

    def param_groups(self, encoder_lr: float, head_lr: float, encoder_weight_decay: float,
                     head_weight_decay: float) -> List[dict]:
        """Optimizer groups: dicts with "params", "lr", "weight_decay", "sparse" (True: row-sparse gradients,
        optimise with cascadexml_fast.SparseAdamW; False: torch.optim.AdamW) and "name". 1-D parameters (biases,
        LayerNorm weights) get no weight decay. With config.freeze_encoder the encoder groups are left out."""
        groups = []
        if not self.config.freeze_encoder:
            groups += split_decay("encoder", self.encoder.named_parameters(), encoder_lr, encoder_weight_decay)
        groups += self._head_param_groups(head_lr, head_weight_decay)
        return [group for group in groups if group["params"]]

    # ---- persistence

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write config.json (model type, config, encoder config), model.safetensors, tree/ (LabelTree.save),
        tokenizer/ and, if given, labels.json (the label names)."""
        from safetensors.torch import save_model

        from .. import __version__

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        head = dict(format=FORMAT_NAME, version=FORMAT_VERSION, model_type=self.MODEL_TYPE,
                    package_version=__version__, num_labels=self.num_labels, config=self.config.to_dict(),
                    encoder_config=self.encoder.config.to_dict())
        save_model(self, str(d / "model.safetensors"), metadata={"format": FORMAT_NAME, "model_type": self.MODEL_TYPE})
        self.tree.save(d / "tree")
        self.tokenizer.save_pretrained(str(d / "tokenizer"))
        labels = d / "labels.json"
        if self.label_names is not None:
            labels.write_text(json.dumps(self.label_names, ensure_ascii=False))
        elif labels.exists():
            labels.unlink()
        # written last: a directory with config.json is a complete checkpoint
        (d / "config.json").write_text(json.dumps(head, indent=1, default=str))
        return d

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
        """Load what save_pretrained wrote (no network: the encoder is rebuilt from the saved config and
        weights)."""
        from safetensors.torch import load_model

        d = Path(directory)
        head = read_model_config(d)
        if cls.MODEL_TYPE and head["model_type"] != cls.MODEL_TYPE:
            raise ValueError(f"{d} holds a {head['model_type']!r} model, not {cls.MODEL_TYPE!r}; use "
                             "cascadexml_fast.models.load_pretrained to load any model type")
        model_cls = MODEL_TYPES[head["model_type"]]
        config = model_cls.CONFIG_CLASS.from_dict(head["config"])
        tree = LabelTree.load(d / "tree")
        labels = d / "labels.json"
        label_names = json.loads(labels.read_text()) if labels.is_file() else None
        encoder = _encoder_from_saved_config(head["encoder_config"])
        tokenizer = _build_tokenizer(d / "tokenizer")
        model = model_cls(config, tree, label_names, encoder=encoder, tokenizer=tokenizer)
        load_model(model, str(d / "model.safetensors"), strict=True)
        return model.to(device)


def read_model_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} does not hold a saved model (no config.json)")
    head = json.loads(path.read_text())
    if head.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} file (format {head.get('format')!r})")
    if not isinstance(head.get("version"), int) or head["version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {head.get('version')!r}; this package reads versions "
                         f"<= {FORMAT_VERSION}")
    if head.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{path}: unknown model_type {head.get('model_type')!r} (known: {sorted(MODEL_TYPES)})")
    return head


def split_decay(name: str, named_parameters, lr: float, weight_decay: float, sparse: bool = False) -> List[dict]:
    """Two groups over the trainable parameters: matrices with `weight_decay`, 1-D ones (biases, norm weights)
    without."""
    decay, no_decay = [], []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, lr=lr, weight_decay=weight_decay, sparse=sparse, name=name),
            dict(params=no_decay, lr=lr, weight_decay=0.0, sparse=sparse, name=name + "_no_decay")]


def load_pretrained(directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> XMCModel:
    """Load a saved CascadeXML or LightXML, whichever config.json names."""
    # importing the package registers both model types
    from . import cascadexml, lightxml  # noqa: F401

    head = read_model_config(Path(directory))
    return MODEL_TYPES[head["model_type"]].from_pretrained(directory, device=device)
