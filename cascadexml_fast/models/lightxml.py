"""LightXML (Jiang et al., AAAI'21): a cluster meta-classifier plus a label ranker over the top clusters' labels.

e = Dropout(concat of the pooled vectors of the last `num_concat_layers` layers); g = Linear(e -> clusters);
the ranker scores s = <E[label], Linear(e -> ranker_dim)> (no label bias) over a shortlist: the labels of the
`top_clusters` best clusters by sigmoid(g) (+ the cluster targets in training, so positive clusters come first),
with every true label forced in (dynamic negative sampling). Loss = BCE over the shortlist + BCE over all
clusters. Inference = sigmoid(s) * sigmoid(g of the label's cluster), top-k: the 2-level cascade_search (level 0
the clusters with bias, level 1 the labels without, combine "leaf_x_parent").
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..hugepages import table_empty
from ..ops import reference
from ..ops.search import cascade_search, topk
from ..ops.shortlist_bce import shortlist_bce
from .base import EncoderConfig, XMCModel, check_fraction, split_decay


@dataclasses.dataclass
class LightXMLConfig(EncoderConfig):
    """LightXML's settings (and the encoder's, see EncoderConfig).

    num_concat_layers: how many of the last layers' pooled vectors are concatenated (the paper: 5).
    dropout: on the concatenated vector (the paper: 0.5).
    top_clusters: clusters whose labels form the shortlist, in training and inference (the paper: 75 for
        Amazon-670K, 32 for Wiki-500K; its code's default 10).
    ranker_dim: width of the ranker's bottleneck and label embedding (the paper: 300, 400 for Amazon-670K,
        500 for Wiki-500K).
    """

    num_concat_layers: int = 5
    dropout: float = 0.5
    top_clusters: int = 10
    ranker_dim: int = 300

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_concat_layers", "top_clusters", "ranker_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        self.dropout = check_fraction("config.dropout", self.dropout)


def _row_owner(pos_offsets: torch.Tensor, count: int) -> torch.Tensor:
    B = pos_offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(B, device=pos_offsets.device), pos_offsets[1:] - pos_offsets[:-1],
                                   output_size=count)


def cluster_targets(pos_offsets: torch.Tensor, pos_ids: torch.Tensor, cluster_offsets: torch.Tensor) -> torch.Tensor:
    """Dense 0/1 float [B, C]: the clusters holding each row's positives (CSR, tree-order label ids);
    `cluster_offsets` [C + 1]: cluster c holds tree-order labels [cluster_offsets[c], cluster_offsets[c+1])."""
    B, C = pos_offsets.numel() - 1, cluster_offsets.numel() - 1
    targets = torch.zeros(B, C, device=pos_offsets.device)
    clusters = torch.searchsorted(cluster_offsets, pos_ids, right=True) - 1
    targets[_row_owner(pos_offsets, pos_ids.numel()), clusters] = 1.0
    return targets


def force_positives(ids: torch.Tensor, pos_offsets: torch.Tensor, pos_ids: torch.Tensor,
                    num_labels: int) -> torch.Tensor:
    """Every positive of a row that is missing from its shortlist `ids` [B, K] (tree-order, -1 pads) takes a
    slot that holds no positive: pads first, then the non-positive labels from the end of the row (the
    lowest-ranked cluster's), so the hardest negatives stay. Where a row has more missing positives than free
    slots, pad columns are appended (for the whole batch) and filled from the left. Returns the new ids (a new
    tensor when anything changed)."""
    B, K = ids.shape
    device = ids.device
    span = num_labels + 2
    owner = _row_owner(pos_offsets, pos_ids.numel())
    keys = torch.unique(owner * span + pos_ids + 1)  # sorted by (row, id), each positive once
    slot_keys = torch.sort((torch.arange(B, device=device).unsqueeze(1) * span + ids + 1).reshape(-1)).values
    if slot_keys.numel():
        where = torch.searchsorted(slot_keys, keys).clamp(max=slot_keys.numel() - 1)
        present = slot_keys[where] == keys
    else:
        present = torch.zeros_like(keys, dtype=torch.bool)
    missing = keys[~present]
    if missing.numel() == 0:
        return ids
    missing_owner, missing_ids = missing // span, missing % span - 1
    is_positive = reference.membership(ids, pos_offsets, pos_ids, num_labels)
    need = torch.bincount(missing_owner, minlength=B)
    extra = int((need - (~is_positive).sum(1)).max().clamp(min=0))
    width = K
    if extra:
        ids = torch.cat([ids, ids.new_full((B, extra), -1)], dim=1)
        is_positive = torch.cat([is_positive, is_positive.new_zeros((B, extra))], dim=1)
        K += extra
    column = torch.arange(K, device=device).expand(B, K)
    # slot preference: the shortlist's pads (0), then its non-positive labels from the last column back
    # (1..width), then the appended columns in order, never a positive; so a row's result does not depend on
    # how many columns other rows of the batch needed
    preference = torch.where(ids < 0, 0, width - column)
    preference = torch.where(column >= width, column + 1, preference)
    preference = torch.where(is_positive, K + 1, preference)
    order = torch.argsort(preference, dim=1, stable=True)
    first_of_row = torch.cumsum(need, 0) - need
    rank = torch.arange(missing.numel(), device=device) - first_of_row[missing_owner]
    ids = ids.clone()
    ids[missing_owner, order[missing_owner, rank]] = missing_ids
    return ids


def build_shortlist(cluster_logits: torch.Tensor, cluster_offsets: torch.Tensor, top_clusters: int,
                    positives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *,
                    max_children: Optional[int] = None) -> torch.Tensor:
    """LightXML's dynamic negative sampling: tree-order label ids [B, K] (-1 pads) of the `top_clusters` best
    clusters by sigmoid(cluster_logits) (detached). With `positives` (CSR of tree-order label ids: training)
    the cluster targets are added first, so positive clusters rank first, and every positive still missing
    (more positive clusters than top_clusters) is forced in (`force_positives`)."""
    C = cluster_logits.shape[1]
    if max_children is None:
        max_children = int((cluster_offsets[1:] - cluster_offsets[:-1]).max()) if C else 0
    scores = torch.sigmoid(cluster_logits.detach().float())
    if positives is not None:
        scores = scores + cluster_targets(positives[0], positives[1], cluster_offsets)
    # level 0 lists every cluster in order, so top-k positions are cluster ids
    _, clusters = topk(scores, min(int(top_clusters), C), validate=False)
    ids = reference.block_ids(clusters, cluster_offsets, max_children)
    if positives is None:
        return ids
    return force_positives(ids, positives[0], positives[1], int(cluster_offsets[-1]))


class LightXML(XMCModel):
    """LightXML: an HF encoder, a cluster meta-classifier and a shortlisted label ranker.

    Args:
        config: LightXMLConfig.
        tree: a LabelTree with one cluster level (clusters -> labels), e.g. LabelTree.build(features,
            level_sizes=(C,)) or LabelTree.from_clusters(LightXML's cluster list).
        label_names: optional names of the original label ids (saved with the model).
    """

    MODEL_TYPE = "lightxml"
    CONFIG_CLASS = LightXMLConfig

    def __init__(self, config: LightXMLConfig, tree, label_names: Optional[Sequence[str]] = None, *,
                 encoder=None, tokenizer=None):
        super().__init__(config, tree, label_names, encoder=encoder, tokenizer=tokenizer)
        if tree.num_levels != 1:
            raise ValueError(f"LightXML needs a tree with exactly one cluster level (clusters -> labels), got "
                             f"{tree.num_levels}; build one with LabelTree.build(features, level_sizes=(C,)) or "
                             "LabelTree.from_clusters(clusters)")
        depth = self.encoder_depth
        if config.num_concat_layers > depth:
            raise ValueError(f"config.num_concat_layers = {config.num_concat_layers} but the encoder has {depth} "
                             "layers")
        self._feature_layers = tuple(range(depth - config.num_concat_layers + 1, depth + 1))
        width = config.num_concat_layers * self.hidden_size
        self.num_clusters = tree.level_sizes[0]
        self.max_children = tree.max_children(0)
        self.dropout = nn.Dropout(config.dropout)
        self.cluster_classifier = nn.Linear(width, self.num_clusters)
        self.bottleneck = nn.Linear(width, config.ranker_dim)
        # [L, ranker_dim] in tree order (the children of a cluster are contiguous rows); xavier as the paper
        self.label_embedding = nn.Parameter(table_empty((self.num_labels, config.ranker_dim)))  # huge pages on CPU
        nn.init.xavier_uniform_(self.label_embedding)
        self.register_buffer("cluster_offsets", tree.offsets[0].clone())
        self.register_buffer("perm", tree.perm.clone())
        self.register_buffer("inverse_perm", tree.inv_perm.clone())
        self.quantized = False  # cascadexml_fast.quantize: int8 label embedding + label_embedding_scale
        self.register_buffer("label_embedding_scale", None)

    @torch.no_grad()
    def _quantize_(self) -> None:
        """For inference (cascadexml_fast.quantize): the label embedding becomes int8 rows + per-row fp32 scales;
        the cluster classifier (small) stays float. Training is refused afterwards."""
        from ..quantize import quantize_table

        q, scale = quantize_table(self.label_embedding)
        self.label_embedding = nn.Parameter(q, requires_grad=False)
        self.label_embedding_scale = scale
        self.quantized = True

    @property
    def feature_layers(self) -> Tuple[int, ...]:
        return self._feature_layers

    @property
    def top_clusters(self) -> int:
        return min(self.config.top_clusters, self.num_clusters)

    def tree_positives(self, positives, device: torch.device):
        """CSR positives in original label ids -> (offsets, tree-order ids) on `device`, range-checked."""
        offsets, label_ids = self._positives_on(positives, device)
        if label_ids.numel() and (int(label_ids.min()) < 0 or int(label_ids.max()) >= self.num_labels):
            raise ValueError(f"positive label ids must lie in [0, {self.num_labels})")
        if offsets.dim() != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != label_ids.numel():
            raise ValueError(f"positives offsets must be [B + 1] from 0 to len(label_ids) = {label_ids.numel()}")
        return offsets, self.inverse_perm[label_ids]

    def loss_from_features(self, features: torch.Tensor, positives) -> torch.Tensor:
        """BCE (mean over valid entries) of the ranker over the shortlist + BCE (mean) of the meta-classifier over
        all clusters; fp32 scalar."""
        self._check_features(features)
        if self.quantized:
            raise RuntimeError("LightXML.loss: the label embedding is an int8 table (cascadexml_fast.quantize), "
                               "which is inference-only; train the float model and quantise it afterwards")
        pos_offsets, pos_ids = self.tree_positives(positives, features.device)
        if pos_offsets.numel() != features.shape[0] + 1:
            raise ValueError(f"positives offsets have {pos_offsets.numel()} entries for a batch of "
                             f"{features.shape[0]} (expected B + 1)")
        e = self.dropout(features.flatten(1))
        cluster_logits = self.cluster_classifier(e)
        targets = cluster_targets(pos_offsets, pos_ids, self.cluster_offsets)
        cluster_loss = F.binary_cross_entropy_with_logits(cluster_logits.float(), targets)
        shortlist = build_shortlist(cluster_logits, self.cluster_offsets, self.top_clusters, (pos_offsets, pos_ids),
                                    max_children=self.max_children)
        rank_loss, _ = shortlist_bce(self.bottleneck(e), self.label_embedding, None, shortlist, pos_offsets, pos_ids,
                                     sparse_grad=self.config.sparse_grad)
        return rank_loss + cluster_loss

    @torch.no_grad()
    def predict_from_features(self, features: torch.Tensor, k: int):
        """(original label ids [B, k] int64, scores sigmoid(s) * sigmoid(g) [B, k] fp32), -1 / -inf pads. No
        dropout."""
        self._check_features(features)
        e = features.flatten(1)
        tree_ids, scores = cascade_search(
            [e, self.bottleneck(e)], [self.cluster_classifier.weight, self.label_embedding],
            [self.cluster_classifier.bias, None], [self.cluster_offsets], [self.top_clusters], k, "leaf_x_parent",
            [self.max_children], weight_scales=None if not self.quantized else [None, self.label_embedding_scale],
        )
        label_ids = torch.where(tree_ids >= 0, self.perm[tree_ids.clamp(min=0)], tree_ids)
        return label_ids, scores

    def _head_param_groups(self, head_lr: float, head_weight_decay: float) -> List[dict]:
        dense = [(name, p) for name, p in self.named_parameters()
                 if name.startswith(("cluster_classifier.", "bottleneck."))]
        groups = split_decay("head", dense, head_lr, head_weight_decay)
        groups.append(dict(params=[self.label_embedding], lr=head_lr, weight_decay=head_weight_decay,
                           sparse=self.config.sparse_grad, name="label_embedding"))
        return groups

    def param_groups(self, encoder_lr: float = 1e-4, head_lr: float = 1e-4, encoder_weight_decay: float = 0.01,
                     head_weight_decay: float = 0.01) -> List[dict]:
        """As XMCModel.param_groups; the defaults are the paper's (lr 1e-4 and weight decay 0.01 for all)."""
        return super().param_groups(encoder_lr, head_lr, encoder_weight_decay, head_weight_decay)
