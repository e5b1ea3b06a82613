"""Plain-PyTorch definitions of every op: the specification kernels are tested against.

These are written for clarity, not speed (they materialise the [B, K, D] gather that the kernels avoid), and
follow DESIGN.md's rules of the house: pad id -1 scores -inf and gets no gradient, accumulation is fp32,
scores are fp32, ids are int64 where returned.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

PAD_ID = -1


def shortlist_score(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor
) -> torch.Tensor:
    """s[b, k] = <x[b], W[idx[b, k]]> + bias[idx[b, k]] in fp32; -inf where idx is the pad id -1.

    Differentiable with ordinary autograd (gather + bmm), which is also the originals' path. float64 inputs
    are computed in float64 (for gradcheck); every other dtype is accumulated in fp32.
    """
    acc = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    idx = idx.long()
    valid = idx >= 0
    safe = idx.clamp(min=0)
    rows = weight[safe].to(acc)  # [B, K, D], gathered in storage dtype, then upcast
    scores = torch.bmm(rows, x.to(acc).unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        scores = scores + bias[safe].to(acc)
    return scores.masked_fill(~valid, float("-inf"))


def shortlist_score_grad_input(grad: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """dx[b] = sum_k grad[b, k] * W[idx[b, k]] over non-pad k, fp32 [B, D]."""
    acc = torch.float64 if torch.float64 in (grad.dtype, weight.dtype) else torch.float32
    idx = idx.long()
    g = grad.to(acc).masked_fill(idx < 0, 0.0)
    rows = weight[idx.clamp(min=0)].to(acc)
    return torch.bmm(g.unsqueeze(1), rows).squeeze(1)


def _flat_pairs(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor):
    """Non-pad entries as (row id, grad value, fp32 doc features), in row-major position order."""
    acc = torch.float64 if torch.float64 in (grad.dtype, x.dtype) else torch.float32
    idx = idx.long()
    B, K = idx.shape
    flat = idx.reshape(-1)
    keep = flat >= 0
    doc = torch.arange(B, device=idx.device).repeat_interleave(K)[keep]
    return flat[keep], grad.reshape(-1)[keep].to(acc), x[doc].to(acc)


def shortlist_score_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, num_rows: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense gradients: dW [num_rows, D] and dbias [num_rows], duplicates summed, fp32."""
    rows, g, xs = _flat_pairs(grad, x, idx)
    dw = torch.zeros(num_rows, x.shape[1], dtype=xs.dtype, device=x.device)
    dw.index_add_(0, rows, g.unsqueeze(1) * xs)
    db = torch.zeros(num_rows, dtype=xs.dtype, device=x.device)
    db.index_add_(0, rows, g)
    return dw, db


def shortlist_score_grad_weight_rows(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-sparse gradients: unique sorted row ids [U] (int64), their dW rows [U, D] and dbias values [U]."""
    rows, g, xs = _flat_pairs(grad, x, idx)
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    dw = torch.zeros(unique.numel(), x.shape[1], dtype=xs.dtype, device=x.device)
    dw.index_add_(0, inverse, g.unsqueeze(1) * xs)
    db = torch.zeros(unique.numel(), dtype=xs.dtype, device=x.device)
    db.index_add_(0, inverse, g)
    return unique, dw, db
