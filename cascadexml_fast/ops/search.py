"""Inference ops: `topk`, `block_score` and the whole `cascade_search`.

Kernels: C++/OpenMP on CPU (csrc/cpu/search.cpp), Triton on CUDA for topk and block_score, and on CUDA the
cascade is the reference algorithm (`reference.beam_search`) run over those device ops, so the data never
leaves the device between levels. None of these ops has a gradient: training builds its shortlists with them
and scores them with `shortlist_score`.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional, Sequence, Tuple

import torch

from . import _library, reference
from ._validate import (FLOAT_STORAGE, check_ids_in_range, check_shortlist_inputs, check_tensor, check_weight_scale,
                        kernel_checks_ids)

topk_op = _library.op("topk")
block_score_op = _library.op("block_score")
cascade_search_op = _library.op("cascade_search")

_QUALIFIED = _library.NAMESPACE + "::"
COMBINE_MODES = ("leaf", "leaf_x_parent")


# ---------------------------------------------------------------------------------------------------------------
# CUDA


@functools.lru_cache(maxsize=None)
def _triton_module(name: str):
    try:
        import importlib

        return importlib.import_module(f"cascadexml_fast.kernels.triton.{name}")
    except ImportError:
        return None


def _topk_cuda(scores, k, mask=None):
    kernels = _triton_module("topk")
    return (kernels or reference).topk(scores, k, mask)


def _block_score_cuda(x, weight, bias, clusters, offsets, max_children, weight_scale=None):
    kernels = _triton_module("block_score")
    if kernels is None or torch.float64 in (x.dtype, weight.dtype):
        return reference.block_score(x, weight, bias, clusters, offsets, max_children, weight_scale)
    return kernels.block_score(x, weight, bias, clusters, offsets, max_children, weight_scale=weight_scale)


def beam_search_with_ops(features, weights, biases, offsets, beams, max_children, k, combine="leaf", trace=None,
                         weight_scales=None):
    """The cascade algorithm run over the registered ops (device kernels, no host sync between levels)."""
    return reference.beam_search(
        features, weights, biases, offsets, beams, max_children, k, combine,
        score_fn=_library.op("shortlist_score"), block_score_fn=block_score_op, topk_fn=topk_op, trace=trace,
        weight_scales=weight_scales,
    )


def _cascade_search_cuda(features, weights, biases, offsets, beams, max_children, k, combine="leaf",
                         weight_scales=None):
    return beam_search_with_ops(features, weights, biases, offsets, beams, max_children, k, combine,
                                weight_scales=weight_scales)


_library.LIBRARY.impl("topk", _topk_cuda, "CUDA")
_library.LIBRARY.impl("block_score", _block_score_cuda, "CUDA")
_library.LIBRARY.impl("cascade_search", _cascade_search_cuda, "CUDA")


# ---------------------------------------------------------------------------------------------------------------
# fake impls


@torch.library.register_fake(_QUALIFIED + "topk")
def _topk_fake(scores, k, mask=None):
    B = scores.shape[0]
    return scores.new_empty((B, k), dtype=torch.float32), scores.new_empty((B, k), dtype=torch.int64)


@torch.library.register_fake(_QUALIFIED + "block_score")
def _block_score_fake(x, weight, bias, clusters, offsets, max_children, weight_scale=None):
    shape = (clusters.shape[0], clusters.shape[1] * max_children)
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake(_QUALIFIED + "cascade_search")
def _cascade_search_fake(features, weights, biases, offsets, beams, max_children, k, combine="leaf",
                         weight_scales=None):
    B = features[0].shape[0]
    return features[0].new_empty((B, k), dtype=torch.int64), features[0].new_empty((B, k), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# validation shared by the public functions


# Offsets already checked, by id(tensor): (weak reference, the tensor's version and storage when checked, the
# bounds checked against, the largest block). Checking a tree costs O(nodes): ~60 us for a 65,536-node level, which
# was a fifth of a B = 1 search on CPU, so a tree is checked once per version: every in-place write (through any
# view) bumps a tensor's version, and then it is checked again.
_checked_offsets: dict = {}


def _offsets_key(offsets: torch.Tensor, num_nodes: int, num_children: int):
    try:
        version = offsets._version
    except RuntimeError:  # inference tensors keep no version counter: no caching for them
        return None
    return (version, offsets.data_ptr(), offsets.device, num_nodes, num_children)


def _forget_offsets(ident: int):
    return lambda _ref: _checked_offsets.pop(ident, None)


def check_offsets(name: str, offsets: torch.Tensor, num_nodes: int, num_children: int) -> int:
    """CSR offsets of `num_nodes` nodes into `num_children` rows; returns the largest block (a host sync the
    first time a tensor is seen; later calls on the unchanged tensor reuse that answer)."""
    check_tensor(name, offsets, dim=1, dtypes=(torch.int64,))
    if offsets.shape[0] != num_nodes + 1:
        raise ValueError(f"{name} must have {num_nodes + 1} entries (nodes + 1), got {offsets.shape[0]}")
    key = _offsets_key(offsets, num_nodes, num_children)
    cached = _checked_offsets.get(id(offsets))
    if key is not None and cached is not None and cached[0]() is offsets and cached[1] == key:
        return cached[2]
    sizes = offsets[1:] - offsets[:-1]
    if num_nodes and bool((sizes < 0).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(offsets[0]) < 0 or int(offsets[-1]) > num_children:
        raise ValueError(f"{name} must lie in [0, {num_children}] (the rows of the next level)")
    largest = int(sizes.max()) if num_nodes else 0
    if key is not None:
        _checked_offsets[id(offsets)] = (weakref.ref(offsets, _forget_offsets(id(offsets))), key, largest)
    return largest


def check_level_inputs(level: int, x, weight, bias, scale, B: Optional[int]) -> None:
    """One level of a cascade: features [B, D], table [N, D] (int8 with its scales), bias [N], one device. Checked
    on every validated search, so kept to plain attribute checks (a B = 1 search takes well under a millisecond)."""
    x_name, w_name, b_name = f"features[{level}]", f"weights[{level}]", f"biases[{level}]"
    check_tensor(x_name, x, dim=2, dtypes=FLOAT_STORAGE)
    check_tensor(w_name, weight, dim=2, dtypes=FLOAT_STORAGE + (torch.int8,))
    check_weight_scale(weight, scale, weight_name=w_name, scale_name=f"weight_scales[{level}]")
    if x.shape[0] != B:
        raise ValueError(f"{x_name} has B = {x.shape[0]} rows but features[0] has B = {B}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{x_name} has D = {x.shape[1]} features but {w_name} has D = {weight.shape[1]}")
    if weight.device != x.device:
        raise ValueError(f"{w_name} is on {weight.device} but {x_name} is on {x.device}; put them on one device")
    if bias is not None:
        check_tensor(b_name, bias, dim=1, dtypes=FLOAT_STORAGE)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{b_name} has {bias.shape[0]} entries but {w_name} has N = {weight.shape[0]} rows")
        if bias.device != x.device:
            raise ValueError(f"{b_name} is on {bias.device} but {x_name} is on {x.device}; put them on one device")


# ---------------------------------------------------------------------------------------------------------------
# public functions


def topk(
    scores: torch.Tensor, k: int, mask: Optional[torch.Tensor] = None, *, validate: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k values (fp32) and positions (int64) per row of scores [B, K].

    Candidates are the positions where `mask` is True (every position without a mask), ranked by score
    (NaN below -inf), ties to the lower position; slots past the number of candidates hold -1 and -inf.
    The positions are identical on every backend.
    """
    if validate and not torch.compiler.is_compiling():
        check_tensor("scores", scores, dim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
        if mask is not None:
            check_tensor("mask", mask, dim=2, dtypes=(torch.bool,))
            if mask.shape != scores.shape or mask.device != scores.device:
                raise ValueError(f"mask must match scores in shape and device, got {tuple(mask.shape)} on "
                                 f"{mask.device} vs {tuple(scores.shape)} on {scores.device}")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
    return topk_op(scores, k, mask)


def block_score(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clusters: torch.Tensor,
    offsets: torch.Tensor,
    max_children: Optional[int] = None,
    *,
    validate: bool = True,
    weight_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and tree-order ids of whole children blocks: for clusters [B, C] (pad -1), the children of cluster c
    are rows [offsets[c], offsets[c+1]) of weight. Returns scores [B, C * max_children] fp32 and ids int64, padded
    slots -inf and -1. `max_children` defaults to the largest block (computing it syncs with the device).
    An int8 `weight` needs `weight_scale` [N] fp32 (row r stands for weight[r].float() * weight_scale[r])."""
    if validate and not torch.compiler.is_compiling():
        check_tensor("clusters", clusters, dim=2, dtypes=(torch.int32, torch.int64))
        check_shortlist_inputs(x, weight, bias, clusters.new_zeros((x.shape[0], 0)), weight_scale)
        if clusters.shape[0] != x.shape[0]:
            raise ValueError(f"clusters has B = {clusters.shape[0]} rows but x has B = {x.shape[0]}")
        largest = check_offsets("offsets", offsets, offsets.shape[0] - 1 if offsets.dim() == 1 else 0, weight.shape[0])
        if not kernel_checks_ids(clusters):
            check_ids_in_range("clusters", clusters, offsets.shape[0] - 1)
        if max_children is not None and max_children < largest:
            raise ValueError(f"max_children = {max_children} but a cluster has {largest} children")
    if max_children is None:
        max_children = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return block_score_op(x, weight, bias, clusters, offsets, max_children, weight_scale)


def cascade_search(
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    offsets: Sequence[torch.Tensor],
    beams: Sequence[int],
    k: int,
    combine: str = "leaf",
    max_children: Optional[Sequence[int]] = None,
    *,
    validate: bool = True,
    weight_scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam search down a label tree in one op; returns tree-order ids [B, k] of the last level and their scores.

    Level 0 scores all of its nodes with features[0]; level i >= 1 scores the children (rows
    [offsets[i-1][c], offsets[i-1][c+1]) of weights[i]) of the beams[i-1] best nodes of level i-1 by raw score.
    The last level's candidates are ranked by `combine`: "leaf" = sigmoid(logit), "leaf_x_parent" =
    sigmoid(logit) * sigmoid(parent logit). Missing slots: id -1, score -inf. `max_children[i]` (the padded width
    of level i's blocks) defaults to the largest block of offsets[i], which costs a device sync to compute:
    pass it (CascadeHead does) to keep the call sync-free. `weight_scales` (None, or one entry per level: None
    for a float table, the [N_l] fp32 per-row scales for an int8 table) lets int8 tables take part.
    """
    levels = len(weights)
    if validate and not torch.compiler.is_compiling():
        if levels < 1:
            raise ValueError("cascade_search needs at least one level")
        for name, seq, n in (("features", features, levels), ("biases", biases, levels), ("offsets", offsets, levels - 1),
                             ("beams", beams, levels - 1)) + ((("weight_scales", weight_scales, levels),)
                                                              if weight_scales is not None else ()):
            if len(seq) != n:
                raise ValueError(f"{name} must have {n} entries for {levels} levels, got {len(seq)}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        B = features[0].shape[0] if isinstance(features[0], torch.Tensor) else None
        for level in range(levels):
            check_level_inputs(level, features[level], weights[level], biases[level],
                               weight_scales[level] if weight_scales is not None else None, B)
        for level in range(levels - 1):
            largest = check_offsets(f"offsets[{level}]", offsets[level], weights[level].shape[0],
                                    weights[level + 1].shape[0])
            if max_children is not None and max_children[level] < largest:
                raise ValueError(f"max_children[{level}] = {max_children[level]} but a node has {largest} children")
            if beams[level] < 0:
                raise ValueError(f"beams[{level}] must be >= 0, got {beams[level]}")
    if max_children is None:
        max_children = [int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0 for o in offsets]
    scales = None if weight_scales is None or all(s is None for s in weight_scales) else list(weight_scales)
    return cascade_search_op(list(features), list(weights), list(biases), list(offsets), list(beams),
                             list(max_children), k, combine, scales)
