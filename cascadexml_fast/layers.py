"""Drop-in nn.Modules built on the ops."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .hugepages import table_empty
from .ops import reference
from .ops.search import beam_search_with_ops, cascade_search, topk
from .ops.shortlist_bce import shortlist_bce
from .ops.shortlist_score import shortlist_score


class ShortlistedLinear(nn.Module):
    """A linear layer over `num_labels` outputs that scores only a shortlist of them per row.

    ``layer(x, idx)[b, k] = <x[b], weight[idx[b, k]]> + bias[idx[b, k]]`` in fp32, -inf where ``idx`` is -1;
    ``layer.full(x)`` gives the dense [B, num_labels] scores. Initialised like ``nn.Linear(dim, num_labels)``.

    Args:
        num_labels: rows of the table (N).
        dim: features per row (D).
        bias: learn a per-label bias.
        sparse_grad: gradients of ``weight`` and ``bias`` are coalesced sparse COO tensors of the touched rows
            (use ``torch.optim.SparseAdam`` or the package's fused sparse optimizers).
        deterministic: bit-identical gradients run to run on every device.
        validate: check inputs and id ranges on every call (off for trusted hot loops).

    ``cascadexml_fast.quantize(layer)`` converts the table to int8 with per-row fp32 scales (``weight_scale``) for
    inference; the layer then refuses to train its table (gradients still reach ``x``).
    """

    def __init__(
        self,
        num_labels: int,
        dim: int,
        bias: bool = True,
        *,
        sparse_grad: bool = False,
        deterministic: bool = False,
        validate: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if num_labels < 0 or dim < 0:
            raise ValueError(f"num_labels and dim must be >= 0, got {num_labels} and {dim}")
        factory = {"device": device, "dtype": dtype}
        self.num_labels = num_labels
        self.dim = dim
        self.sparse_grad = sparse_grad
        self.deterministic = deterministic
        self.validate = validate
        self.weight = nn.Parameter(table_empty((num_labels, dim), **factory))  # huge pages on CPU
        self.bias = nn.Parameter(torch.empty(num_labels, **factory)) if bias else None
        self.quantized = False
        self.register_buffer("weight_scale", None)  # per-row fp32 scales once quantised (int8 weight)
        self.reset_parameters()

    @torch.no_grad()
    def _quantize_(self) -> None:
        """In place: int8 table + per-row fp32 scales, fp32 bias, nothing trainable (see cascadexml_fast.quantize)."""
        from .quantize import quantize_table

        q, scale = quantize_table(self.weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().float(), requires_grad=False)
        self.quantized = True

    def reset_parameters(self) -> None:
        # nn.Linear's default: kaiming_uniform_(a=sqrt(5)) on the weight is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # and the bias uses the same bound.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.dim) if self.dim > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return shortlist_score(
            x,
            self.weight,
            self.bias,
            idx,
            sparse_grad=self.sparse_grad,
            deterministic=self.deterministic,
            validate=self.validate,
            weight_scale=self.weight_scale,
        )

    def full(self, x: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
        """Dense fp32 scores of every label, [B, num_labels]; low-precision (and int8) tables are upcast
        (dequantised) a chunk of `chunk_rows` rows at a time so that no fp32 copy of the whole table is made."""
        xf = x.float()
        if self.weight.dtype == torch.float32:
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(xf, self.weight, bias)
        parts = []
        for start in range(0, self.num_labels, chunk_rows):
            rows = slice(start, start + chunk_rows)
            bias = None if self.bias is None else self.bias[rows].float()
            w = self.weight[rows].float()
            if self.weight_scale is not None:
                w = reference.dequantize_table(self.weight[rows], self.weight_scale[rows])
            parts.append(nn.functional.linear(xf, w, bias))
        return torch.cat(parts, dim=1) if parts else xf.new_zeros((x.shape[0], 0))

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, dim={self.dim}, bias={self.bias is not None}, "
            f"sparse_grad={self.sparse_grad}, dtype={self.weight.dtype}" + (", quantized" if self.quantized else "")
        )


def head_geometry(tree, dim, beams, combine):
    """A head's tree as tensors plus its checked per-level settings: (offsets, perm, level sizes, dims, beams).
    Shared by CascadeHead and the distributed ShardedCascadeHead."""
    offsets = [torch.as_tensor(o, dtype=torch.int64) for o in tree.offsets]
    perm = torch.as_tensor(tree.perm, dtype=torch.int64)
    sizes = [int(offsets[0].numel()) - 1] + [int(o[-1]) for o in offsets] if offsets else [int(perm.numel())]
    levels = len(sizes)
    if sizes[-1] != perm.numel():
        raise ValueError(f"the tree's last level has {sizes[-1]} nodes but its permutation {perm.numel()} labels")
    dims = [int(dim)] * levels if isinstance(dim, int) else [int(d) for d in dim]
    if len(dims) != levels:
        raise ValueError(f"dim needs one entry per level ({levels}), got {len(dims)}")
    beams = [int(b) for b in beams]
    if len(beams) != levels - 1:
        raise ValueError(f"beams needs one entry per level but the last ({levels - 1}), got {len(beams)}")
    if combine not in ("leaf", "leaf_x_parent"):
        raise ValueError(f"combine must be 'leaf' or 'leaf_x_parent', got {combine!r}")
    return offsets, perm, sizes, dims, beams


class CascadeHead(nn.Module):
    """Per-level label tables over a label tree, searched level by level (CascadeXML / LightXML inference).

    Level 0 holds the top nodes of the tree, each further level the children of the one above, the last level
    the labels. Level l has a table [nodes_l, dims[l]] (+ bias), stored in tree order: the children of node c of
    level l are rows [offsets[l][c], offsets[l][c+1]) of level l+1's table.

    Args:
        tree: a `LabelTree`, or any object with `offsets` (one int64 CSR tensor per cluster level, the last one
            pointing at labels) and `perm` (tree-order position -> original label id).
        dim: features per level: an int for all levels, or one int per level.
        beams: nodes kept at every level but the last (len = levels - 1).
        combine: how the last level ranks its candidates: "leaf" (sigmoid of the label's logit) or
            "leaf_x_parent" (times the sigmoid of its parent's logit: CascadeXML's "weighted", LightXML's scheme).
        bias: per-node biases.
        sparse_grad: the tables' gradients from `loss` are row-sparse (use cx.SparseAdamW).
        dtype, device: of the tables.

    ``cascadexml_fast.quantize(head)`` converts every level's table to int8 with per-row fp32 scales
    (``weight_scales``) for inference: ``search`` and ``shortlists`` use them, ``loss`` refuses to run.

    Tables start as in CascadeXML: Xavier-uniform weights, zero biases.
    """

    def __init__(self, tree, dim, beams, *, combine: str = "leaf", bias: bool = True, sparse_grad: bool = False,
                 dtype=None, device=None):
        super().__init__()
        offsets, perm, sizes, dims, beams = head_geometry(tree, dim, beams, combine)
        levels = len(sizes)
        self.level_sizes = sizes
        self.dims = dims
        self.beams = beams
        self.combine = combine
        self.sparse_grad = sparse_grad
        # The padded width of each level's children blocks, known now so that search() never syncs to find it.
        self.max_children = [int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0 for o in offsets]
        factory = {"device": device, "dtype": dtype}
        # Tables in huge pages on CPU (hugepages.py): random rows are read with fewer TLB misses.
        self.weights = nn.ParameterList([nn.Parameter(table_empty((n, d), **factory)) for n, d in zip(sizes, dims)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n, **factory)) for n in sizes]) if bias else None
        for level, o in enumerate(offsets):
            self.register_buffer(f"offsets_{level}", o.to(device))
        self.register_buffer("perm", perm.to(device))
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        self.register_buffer("inverse_perm", inverse.to(device))  # original label id -> tree position
        # parent_l[c] = the node of level l whose children block holds node c of level l + 1
        for level, o in enumerate(offsets):
            parent = torch.repeat_interleave(torch.arange(o.numel() - 1), o[1:] - o[:-1])
            self.register_buffer(f"parent_{level}", parent.to(device))
        self.quantized = False
        for level in range(levels):  # per-row fp32 scales of each level's int8 table, once quantised
            self.register_buffer(f"weight_scale_{level}", None)
        self.reset_parameters()

    @property
    def weight_scales(self):
        """Per level, the [N_l] fp32 scales of the int8 table (after `cascadexml_fast.quantize`), else None."""
        if not self.quantized:
            return None
        return [getattr(self, f"weight_scale_{level}") for level in range(self.num_levels)]

    @torch.no_grad()
    def _quantize_(self) -> None:
        """In place: int8 tables + per-row fp32 scales, fp32 biases, nothing trainable (cascadexml_fast.quantize)."""
        from .quantize import quantize_table

        for level in range(self.num_levels):
            q, scale = quantize_table(self.weights[level])
            self.weights[level] = nn.Parameter(q, requires_grad=False)
            setattr(self, f"weight_scale_{level}", scale)
            if self.biases is not None:
                self.biases[level] = nn.Parameter(self.biases[level].detach().float(), requires_grad=False)
        self.quantized = True

    @property
    def offsets(self):
        return [getattr(self, f"offsets_{level}") for level in range(len(self.level_sizes) - 1)]

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def reset_parameters(self) -> None:
        for w in self.weights:
            nn.init.xavier_uniform_(w)
        if self.biases is not None:
            for b in self.biases:
                nn.init.zeros_(b)

    def _level_inputs(self, level_features):
        if isinstance(level_features, torch.Tensor):
            level_features = [level_features] * self.num_levels
        features = list(level_features)
        if len(features) != self.num_levels:
            raise ValueError(f"level_features needs one [B, D] tensor per level ({self.num_levels}), got {len(features)}")
        biases = list(self.biases) if self.biases is not None else [None] * self.num_levels
        return features, list(self.weights), biases

    def to_label_ids(self, tree_ids: torch.Tensor) -> torch.Tensor:
        """Original label ids of tree-order ids of the last level (-1 stays -1)."""
        return torch.where(tree_ids >= 0, self.perm[tree_ids.clamp(min=0)], tree_ids)

    @torch.no_grad()
    def search(self, level_features, k: int, *, beams=None, combine=None, validate: bool = True):
        """Top-k labels per document: (original label ids [B, k] int64, scores [B, k] fp32), -1 / -inf where
        fewer than k labels were reached. `level_features`: one [B, dims[l]] tensor per level (or one tensor
        for all levels)."""
        features, weights, biases = self._level_inputs(level_features)
        tree_ids, scores = cascade_search(
            features, weights, biases, self.offsets, self.beams if beams is None else list(beams), k,
            self.combine if combine is None else combine, self.max_children, validate=validate,
            weight_scales=self.weight_scales,
        )
        return self.to_label_ids(tree_ids), scores

    @torch.no_grad()
    def shortlists(self, level_features, *, beams=None):
        """The candidates every level scored during the search: a list with, per level, (tree-order ids [B, K_l],
        logits [B, K_l] fp32), pads -1 / -inf. Level 0 lists all its nodes. Training (teacher forcing, fused
        losses) builds on these."""
        features, weights, biases = self._level_inputs(level_features)
        trace = []
        beam_search_with_ops(
            features, weights, biases, self.offsets, self.beams if beams is None else list(beams), self.max_children,
            0, self.combine, trace=trace, weight_scales=self.weight_scales,
        )
        return trace

    def level_positives(self, positives):
        """Per level, the CSR positives (offsets [B + 1], tree-order node ids) of a batch whose labels are given as
        CSR (offsets, original label ids): the labels' tree positions, then their ancestors level by level."""
        offsets, label_ids = positives
        num_labels = self.level_sizes[-1]
        if label_ids.numel() and (int(label_ids.min()) < 0 or int(label_ids.max()) >= num_labels):
            raise ValueError(f"positive label ids must lie in [0, {num_labels})")
        ids = self.inverse_perm[label_ids.long()]
        per_level = [ids]
        for level in range(self.num_levels - 2, -1, -1):
            ids = getattr(self, f"parent_{level}")[ids]
            per_level.append(ids)
        return [(offsets, ids) for ids in reversed(per_level)]

    def loss(self, level_features, positives, *, level_weights=None, beams=None, return_shortlists: bool = False):
        """Training loss: sum over levels of level_weights[l] * BCE over that level's teacher-forced shortlist.

        Level 0 scores all of its nodes. Each further level scores the children of the beams[l-1] nodes of the
        level above ranked by sigmoid(logit) + target, so every positive node comes first (CascadeXML's teacher
        forcing; positives beyond the beam are not re-inserted). The BCE is the mean over the valid entries of a
        level (shortlist_bce: fused scoring + loss, row-sparse table gradients if sparse_grad).

        Args:
            level_features: one [B, dims[l]] tensor per level (or one tensor for all).
            positives: (offsets int64 [B + 1], label ids) CSR of each document's labels, in original label ids.
            return_shortlists: also return [(tree-order ids, detached logits)] of every level.
        """
        if self.quantized:
            raise RuntimeError("CascadeHead.loss: this head holds int8 tables (cascadexml_fast.quantize), which are "
                               "inference-only; train the float head and quantise it afterwards")
        features, weights, biases = self._level_inputs(level_features)
        beams = self.beams if beams is None else list(beams)
        level_weights = [1.0] * self.num_levels if level_weights is None else list(level_weights)
        targets = self.level_positives(positives)
        B = features[0].shape[0]
        ids = torch.arange(self.level_sizes[0], device=features[0].device).expand(B, -1)
        total = features[0].new_zeros((), dtype=torch.float32)
        trace = []
        for level in range(self.num_levels):
            pos_offsets, pos_ids = targets[level]
            loss, logits = shortlist_bce(
                features[level], weights[level], biases[level], ids, pos_offsets, pos_ids,
                level_weight=level_weights[level], sparse_grad=self.sparse_grad,
            )
            total = total + loss
            trace.append((ids, logits))
            if level + 1 < self.num_levels:
                forced = torch.sigmoid(logits) + reference.membership(ids, pos_offsets, pos_ids, self.level_sizes[level])
                _, pos = topk(forced, beams[level], ids >= 0, validate=False)
                nodes = reference.ids_at(ids, pos)
                ids = reference.block_ids(nodes, self.offsets[level], self.max_children[level])
        return (total, trace) if return_shortlists else total

    def extra_repr(self) -> str:
        return (f"level_sizes={self.level_sizes}, dims={self.dims}, beams={self.beams}, combine={self.combine!r}, "
                f"dtype={self.weights[0].dtype}" + (", quantized" if self.quantized else ""))
