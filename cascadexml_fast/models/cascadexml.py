"""CascadeXML (Kharbanda et al., NeurIPS'22): one encoder, each level of the label tree fed by its own layer.

Level l reads the pooled vector of `level_layers[l]` (a tuple = the concatenation of several layers), applies
Dropout(dropouts[l]), then a xavier Linear to the head width where the widths differ (the paper's level-0
1536 -> 768 projection), and scores its shortlist in a CascadeHead: training = teacher-forced summed per-level
BCE (CascadeHead.loss), inference = beam search (CascadeHead.search).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layers import CascadeHead
from .base import EncoderConfig, XMCModel, check_fraction, split_decay

LevelLayers = Union[int, Tuple[int, ...]]


@dataclasses.dataclass
class CascadeXMLConfig(EncoderConfig):
    """CascadeXML's settings (and the encoder's, see EncoderConfig). A level is a cluster level of the tree or
    the label level (the last); per-level lists have one entry per level, top first.

    level_layers: hidden-state index (hs[0] = embeddings, hs[i] = output of layer i) or tuple of indices
        (concatenated) feeding each level; default: `default_level_layers`.
    dropouts: dropout on each level's features; default evenly spaced from 0.2 (top) to 0.5 (labels), as the
        paper's 0.2 / 0.25 / 0.4 / 0.5 for Amazon-670K.
    head_dim: width of the label tables; default the encoder's hidden size.
    beams: nodes kept at each cluster level (one fewer entry than levels); default min(nodes, 128) per level.
    combine: the last level's ranking: "leaf_x_parent" (sigmoid(label) * sigmoid(parent), the paper's
        "weighted") or "leaf" (sigmoid(label) alone, its "level").
    level_weights: weight of each level's BCE in the loss; default 1 each.
    """

    level_layers: Optional[List[LevelLayers]] = None
    dropouts: Optional[List[float]] = None
    head_dim: Optional[int] = None
    beams: Optional[List[int]] = None
    combine: str = "leaf_x_parent"
    level_weights: Optional[List[float]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.level_layers is not None:
            self.level_layers = [layer if isinstance(layer, int) else tuple(layer) for layer in self.level_layers]
        if self.combine not in ("leaf", "leaf_x_parent"):
            raise ValueError(f"config.combine must be 'leaf' or 'leaf_x_parent', got {self.combine!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"config.head_dim must be a positive int, got {self.head_dim!r}")


def default_level_layers(depth: int, num_levels: int) -> List[LevelLayers]:
    """CascadeXML's layer recipe generalised: the label level reads the last layer and each level above reads
    `step` layers shallower, step = clamp((depth - 1) // num_levels, 1, 2) (clamped at layer 1); the top level
    concatenates its layer with the one below it when that one is a transformer layer.

    This gives the paper's recipes for a 12-layer BERT, (5, 6), 8, 10, 12 for 4 levels and (7, 8), 10, 12 for 3,
    and (3, 4), 5, 6 for the 6-layer MiniLM with 3 levels.
    """
    step = max(1, min(2, (depth - 1) // num_levels))
    layers: List[LevelLayers] = [max(1, depth - step * (num_levels - 1 - level)) for level in range(num_levels)]
    if num_levels > 1 and layers[0] - 1 >= 1:
        layers[0] = (layers[0] - 1, layers[0])
    return layers


def _level_list(name: str, values, expected: int, levels_text: str) -> list:
    values = list(values)
    if len(values) != expected:
        raise ValueError(f"config.{name} has {len(values)} entries but {levels_text}")
    return values


class CascadeXML(XMCModel):
    """CascadeXML: an HF encoder + a CascadeHead whose levels read different encoder layers.

    Args:
        config: CascadeXMLConfig.
        tree: a LabelTree; the head has tree.num_levels + 1 levels (its cluster levels and the labels).
        label_names: optional names of the original label ids (saved with the model).
    """

    MODEL_TYPE = "cascadexml"
    CONFIG_CLASS = CascadeXMLConfig

    def __init__(self, config: CascadeXMLConfig, tree, label_names: Optional[Sequence[str]] = None, *,
                 encoder=None, tokenizer=None):
        super().__init__(config, tree, label_names, encoder=encoder, tokenizer=tokenizer)
        num_levels = tree.num_levels + 1
        levels_text = f"the tree has {num_levels} levels ({tree.num_levels} cluster levels + labels)"
        depth = self.encoder_depth

        if config.level_layers is None:
            level_layers = default_level_layers(depth, num_levels)
        else:
            level_layers = _level_list("level_layers", config.level_layers, num_levels, levels_text)
        for level, layers in enumerate(level_layers):
            group = (layers,) if isinstance(layers, int) else tuple(layers)
            if not group or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= depth for i in group):
                raise ValueError(f"config.level_layers[{level}] = {layers!r}: entries must be hidden-state indices in "
                                 f"[0, {depth}] (the encoder has {depth} layers)")
        if config.dropouts is None:
            dropouts = [round(0.2 + 0.3 * level / max(num_levels - 1, 1), 4) for level in range(num_levels)]
            if num_levels == 1:
                dropouts = [0.5]
        else:
            dropouts = _level_list("dropouts", config.dropouts, num_levels, levels_text)
        dropouts = [check_fraction(f"config.dropouts[{level}]", p) for level, p in enumerate(dropouts)]
        if config.beams is None:
            beams = [min(int(size), 128) for size in tree.level_sizes]
        else:
            beams = _level_list("beams", config.beams, num_levels - 1,
                                f"the tree has {num_levels - 1} cluster levels (one beam each)")
        for level, beam in enumerate(beams):
            if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
                raise ValueError(f"config.beams[{level}] must be a positive int, got {beam!r}")
        level_weights = [1.0] * num_levels if config.level_weights is None else \
            [float(w) for w in _level_list("level_weights", config.level_weights, num_levels, levels_text)]
        head_dim = config.head_dim or self.hidden_size
        # the resolved settings are kept in the config, so that a saved model records what it was built with
        self.config = dataclasses.replace(config, level_layers=level_layers, dropouts=dropouts, beams=beams,
                                          level_weights=level_weights, head_dim=head_dim)

        groups = [(layers,) if isinstance(layers, int) else tuple(layers) for layers in level_layers]
        self._feature_layers = tuple(sorted({i for group in groups for i in group}))
        # positions of each level's layers in encode()'s S axis
        self._level_slots = [[self._feature_layers.index(i) for i in group] for group in groups]
        self.dropouts = nn.ModuleList(nn.Dropout(p) for p in dropouts)
        self.projections = nn.ModuleList()
        for group in groups:
            width = len(group) * self.hidden_size
            if width == head_dim:
                self.projections.append(nn.Identity())
            else:
                projection = nn.Linear(width, head_dim)
                nn.init.xavier_uniform_(projection.weight)
                nn.init.zeros_(projection.bias)
                self.projections.append(projection)
        self.head = CascadeHead(tree, dim=head_dim, beams=beams, combine=config.combine, sparse_grad=config.sparse_grad)

    @property
    def feature_layers(self) -> Tuple[int, ...]:
        return self._feature_layers

    def level_features(self, features: torch.Tensor, dropout: bool = True) -> List[torch.Tensor]:
        """One [B, head_dim] input per level from encode()'s [B, S, H]; `dropout` applies each level's dropout
        (active in train mode only)."""
        self._check_features(features)
        out = []
        for level, slots in enumerate(self._level_slots):
            x = features[:, slots[0]] if len(slots) == 1 else features[:, slots].flatten(1)
            if dropout:
                x = self.dropouts[level](x)
            out.append(self.projections[level](x))
        return out

    def loss_from_features(self, features: torch.Tensor, positives) -> torch.Tensor:
        """Sum over levels of level_weights[l] * BCE over that level's teacher-forced shortlist (fp32 scalar)."""
        positives = self._positives_on(positives, features.device)
        return self.head.loss(self.level_features(features), positives, level_weights=self.config.level_weights)

    @torch.no_grad()
    def predict_from_features(self, features: torch.Tensor, k: int):
        """Beam search: (original label ids [B, k] int64, scores [B, k] fp32), -1 / -inf pads. No dropout."""
        return self.head.search(self.level_features(features, dropout=False), k)

    def _head_param_groups(self, head_lr: float, head_weight_decay: float) -> List[dict]:
        sparse = self.config.sparse_grad
        groups = split_decay("projections", self.projections.named_parameters(), head_lr, head_weight_decay)
        groups.append(dict(params=list(self.head.weights), lr=head_lr, weight_decay=head_weight_decay, sparse=sparse,
                           name="tables"))
        if self.head.biases is not None:
            groups.append(dict(params=list(self.head.biases), lr=head_lr, weight_decay=0.0, sparse=sparse,
                               name="table_biases"))
        return groups

    def param_groups(self, encoder_lr: float = 1e-4, head_lr: float = 1e-3, encoder_weight_decay: float = 0.05,
                     head_weight_decay: float = 0.005) -> List[dict]:
        """As XMCModel.param_groups; the defaults are the paper's (encoder 1e-4 / 0.05, head 1e-3 / 0.005)."""
        return super().param_groups(encoder_lr, head_lr, encoder_weight_decay, head_weight_decay)
