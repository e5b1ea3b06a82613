"""`shortlist_bce`: shortlisted scoring fused with BCE-with-logits over the shortlist (mean over valid entries).

The forward pass computes the loss and its gradient w.r.t. the logits together (Renee's idea); backward turns
that [B, K] gradient into dx, dbias and a dense or row-sparse dW with shortlist_score's gradient kernels, so the
logits are never kept for backward. Kernels: C++ on CPU; on CUDA one fused Triton kernel (kernels/triton/
shortlist_bce.py: scores, targets from the CSR positives, loss partial sums and the logit gradient in one pass, no
host sync); float64 inputs take the reference.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _library, reference
from ._validate import check_shortlist_inputs, check_tensor
from .shortlist_score import backward_from_logit_grad

shortlist_bce_op = _library.op("shortlist_bce")
_QUALIFIED = _library.NAMESPACE + "::"


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    try:
        from ..kernels.triton import shortlist_bce as kernels

        return kernels
    except ImportError:
        return None


def _shortlist_bce_cuda(x, weight, bias, idx, pos_offsets, pos_ids, level_weight=1.0, sparse_grad=False,
                        deterministic=False):
    """CUDA: the fused Triton kernel (scores, targets, loss and d loss / d logits in one pass, no host sync);
    float64 inputs (or no Triton) take the reference. sparse_grad / deterministic concern backward only."""
    kernels = _triton_kernels()
    if kernels is None or any(t is not None and t.dtype == torch.float64 for t in (x, weight, bias)):
        return reference.shortlist_bce(x, weight, bias, idx, pos_offsets, pos_ids, level_weight,
                                       score_fn=_library.op("shortlist_score"))
    return kernels.shortlist_bce(x, weight, bias, idx, pos_offsets, pos_ids, level_weight)


_library.LIBRARY.impl("shortlist_bce", _shortlist_bce_cuda, "CUDA")


@torch.library.register_fake(_QUALIFIED + "shortlist_bce")
def _shortlist_bce_fake(x, weight, bias, idx, pos_offsets, pos_ids, level_weight=1.0, sparse_grad=False,
                        deterministic=False):
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    shape = (idx.shape[0], idx.shape[1])
    return x.new_empty((), dtype=dtype), x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, idx, _, _, _, sparse_grad, deterministic = inputs
    _, grad_logits, _ = output
    ctx.save_for_backward(x, weight, idx, grad_logits)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic


def _backward(ctx, grad_loss, _grad_of_grad_logits, _grad_of_logits):
    x, weight, idx, grad_logits = ctx.saved_tensors
    dx, dw, db = backward_from_logit_grad(
        grad_logits * grad_loss, x, weight, idx, ctx.needs_input_grad[:3], ctx.bias_dtype, ctx.sparse_grad,
        ctx.deterministic,
    )
    return dx, dw, db, None, None, None, None, None, None


torch.library.register_autograd(_QUALIFIED + "shortlist_bce", _backward, setup_context=_setup_context)


def check_positives(pos_offsets: torch.Tensor, pos_ids: torch.Tensor, batch: int, num_ids: int) -> None:
    check_tensor("pos_offsets", pos_offsets, dim=1, dtypes=(torch.int64,))
    check_tensor("pos_ids", pos_ids, dim=1, dtypes=(torch.int32, torch.int64))
    if pos_offsets.shape[0] != batch + 1:
        raise ValueError(f"pos_offsets must have B + 1 = {batch + 1} entries, got {pos_offsets.shape[0]}")
    if int(pos_offsets[0]) != 0 or int(pos_offsets[-1]) != pos_ids.shape[0]:
        raise ValueError(f"pos_offsets must start at 0 and end at len(pos_ids) = {pos_ids.shape[0]}")
    if batch and bool((pos_offsets[1:] < pos_offsets[:-1]).any()):
        raise ValueError("pos_offsets must be non-decreasing")
    if pos_ids.numel() and (int(pos_ids.min()) < 0 or int(pos_ids.max()) >= num_ids):
        bad = pos_ids[(pos_ids < 0) | (pos_ids >= num_ids)][0]
        raise ValueError(f"pos_ids holds {int(bad)}, outside [0, {num_ids})")


def shortlist_bce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    idx: torch.Tensor,
    pos_offsets: torch.Tensor,
    pos_ids: torch.Tensor,
    *,
    level_weight: float = 1.0,
    sparse_grad: bool = False,
    deterministic: bool = False,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BCE-with-logits of shortlisted scores: returns (loss, logits).

    loss = level_weight * mean over the non-pad entries (idx >= 0) of BCEWithLogits(s[b, k], y[b, k]), with
    s[b, k] = <x[b], weight[idx[b, k]]> + bias[idx[b, k]] and y[b, k] = 1 iff idx[b, k] is one of row b's
    positives, given as CSR: pos_ids[pos_offsets[b] : pos_offsets[b + 1]] (ids in the same space as idx; order
    and repeats do not matter). Gradients reach x, weight (dense, or row-sparse with sparse_grad) and bias. The
    returned logits [B, K] (fp32, -inf at pads) are detached: for choosing the next level's beam, not for loss
    terms.
    """
    if validate and not torch.compiler.is_compiling():
        check_shortlist_inputs(x, weight, bias, idx, int8_ok=False)
        check_positives(pos_offsets, pos_ids, x.shape[0], weight.shape[0])
    loss, _, logits = _library.call(shortlist_bce_op, x, weight, bias, idx, pos_offsets, pos_ids, float(level_weight),
                                    sparse_grad, deterministic)
    return loss, logits.detach()


__all__ = ["shortlist_bce"]
