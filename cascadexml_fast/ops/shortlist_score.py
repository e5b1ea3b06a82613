"""`shortlist_score`: s[b, k] = <x[b], W[idx[b, k]]> + bias[idx[b, k]], with dense or row-sparse gradients.

Kernels: C++/OpenMP on CPU (csrc/cpu, attached by the extension), Triton on CUDA (attached here, imported on
first use), the reference (ops/reference.py) wherever neither is available. This module adds the fake (meta)
implementations, the autograd formula and the validated public function.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _library, reference
from ._validate import check_shortlist_inputs

shortlist_score_op = _library.op("shortlist_score")
grad_input_op = _library.op("shortlist_score_grad_input")
grad_weight_op = _library.op("shortlist_score_grad_weight")
grad_weight_rows_op = _library.op("shortlist_score_grad_weight_rows")

_QUALIFIED = _library.NAMESPACE + "::"


# ---------------------------------------------------------------------------------------------------------------
# CUDA: Triton kernels, or the reference where Triton is not installed


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    try:
        from ..kernels.triton import shortlist_score as kernels

        return kernels
    except ImportError:
        return None


def _cuda_kernels(*tensors):
    """The Triton kernels, or None where Triton is missing or an input is float64 (the reference serves it)."""
    if any(t.dtype == torch.float64 for t in tensors if t is not None):
        return None
    return _triton_kernels()


def _deterministic(flag: bool) -> bool:
    return flag or torch.are_deterministic_algorithms_enabled()


def _forward_cuda(x, weight, bias, idx, sparse_grad=False, deterministic=False, weight_scale=None):
    kernels = _cuda_kernels(x, weight, bias)
    if kernels is None:
        return reference.shortlist_score(x, weight, bias, idx, weight_scale)
    return kernels.shortlist_score(x, weight, bias, idx, weight_scale)


def _grad_input_cuda(grad, weight, idx, weight_scale=None):
    kernels = _cuda_kernels(grad, weight)
    if kernels is None:
        return reference.shortlist_score_grad_input(grad, weight, idx, weight_scale)
    return kernels.shortlist_score_grad_input(grad, weight, idx, weight_scale)


def _grad_weight_cuda(grad, x, idx, num_rows, deterministic=False, dtype=None):
    kernels = _cuda_kernels(grad, x)
    if kernels is None:
        return reference.shortlist_score_grad_weight(grad, x, idx, num_rows, dtype)
    dw, db = kernels.shortlist_score_grad_weight(grad, x, idx, num_rows, deterministic=_deterministic(deterministic))
    return dw.to(dtype or dw.dtype), db


def _grad_weight_rows_cuda(grad, x, idx, dtype=None):
    kernels = _cuda_kernels(grad, x)
    if kernels is None:
        return reference.shortlist_score_grad_weight_rows(grad, x, idx, dtype)
    rows, dw, db = kernels.shortlist_score_grad_weight_rows(grad, x, idx)
    return rows, dw.to(dtype or dw.dtype), db


_library.LIBRARY.impl("shortlist_score", _forward_cuda, "CUDA")
_library.LIBRARY.impl("shortlist_score_grad_input", _grad_input_cuda, "CUDA")
_library.LIBRARY.impl("shortlist_score_grad_weight", _grad_weight_cuda, "CUDA")
_library.LIBRARY.impl("shortlist_score_grad_weight_rows", _grad_weight_rows_cuda, "CUDA")


# ---------------------------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only, for torch.compile and FakeTensor


def _acc_dtype(*tensors):
    """fp32, or float64 when an input is float64 (the kernels' rule)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_fake(_QUALIFIED + "shortlist_score")
def _forward_fake(x, weight, bias, idx, sparse_grad=False, deterministic=False, weight_scale=None):
    return x.new_empty((idx.shape[0], idx.shape[1]), dtype=_acc_dtype(x, weight))


@torch.library.register_fake(_QUALIFIED + "shortlist_score_grad_input")
def _grad_input_fake(grad, weight, idx, weight_scale=None):
    return grad.new_empty((idx.shape[0], weight.shape[1]), dtype=_acc_dtype(grad, weight))


@torch.library.register_fake(_QUALIFIED + "shortlist_score_grad_weight")
def _grad_weight_fake(grad, x, idx, num_rows, deterministic=False, dtype=None):
    acc = _acc_dtype(grad, x)
    return x.new_empty((num_rows, x.shape[1]), dtype=dtype or acc), x.new_empty((num_rows,), dtype=acc)


@torch.library.register_fake(_QUALIFIED + "shortlist_score_grad_weight_rows")
def _grad_weight_rows_fake(grad, x, idx, dtype=None):
    unique_rows = torch.library.get_ctx().new_dynamic_size()
    acc = _acc_dtype(grad, x)
    return (
        x.new_empty((unique_rows,), dtype=torch.int64),
        x.new_empty((unique_rows, x.shape[1]), dtype=dtype or acc),
        x.new_empty((unique_rows,), dtype=acc),
    )


# ---------------------------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    x, weight, bias, idx, sparse_grad, deterministic, weight_scale = inputs
    ctx.save_for_backward(x, weight, idx, weight_scale)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic


def _coalesced(ids, values, size):
    # The kernels return unique ascending row ids, so the tensor is coalesced by construction; skipping the
    # invariant check avoids a pass over the ids. (AccumulateGrad drops the flag when it stores .grad, as it does
    # for nn.Embedding(sparse=True); the contents stay unique and sorted.)
    return torch.sparse_coo_tensor(ids, values, size, is_coalesced=True, check_invariants=False)


def _backward(ctx, grad):
    x, weight, idx, weight_scale = ctx.saved_tensors
    if len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]:
        raise RuntimeError("shortlist_score: weight_scale requires grad, but int8 tables are inference-only: no "
                           "gradient flows to an int8 table or its scales (only to x and bias)")
    dx, dw, db = backward_from_logit_grad(
        grad, x, weight, idx, ctx.needs_input_grad[:3], ctx.bias_dtype, ctx.sparse_grad, ctx.deterministic,
        weight_scale,
    )
    return dx, dw, db, None, None, None, None


def backward_from_logit_grad(grad, x, weight, idx, needs_input_grad, bias_dtype, sparse_grad, deterministic,
                             weight_scale=None):
    """(dx, dweight, dbias) of anything computed from shortlisted logits, given d(output)/d(logits) [B, K].
    Shared by every op whose logits are shortlist scores (shortlist_score, shortlist_bce). With an int8 table
    (weight_scale given) dx uses the dequantised rows and there is no dweight (int8 tensors cannot require grad)."""
    need_x, need_w, need_b = needs_input_grad
    need_b = need_b and bias_dtype is not None
    dx = dw = db = None
    if need_x:
        dx = grad_input_op(grad, weight, idx, weight_scale).to(x.dtype)
    if weight_scale is not None:  # an int8 table: never dW; dbias from the row-sparse kernel on 0 feature columns
        if need_w:
            raise RuntimeError("shortlist_score: int8 tables are inference-only; no gradient for the table")
        if need_b:
            num_rows = weight.shape[0]
            rows, _, b_rows = grad_weight_rows_op(grad, x[:, :0], idx)
            if sparse_grad:
                db = _coalesced(rows.unsqueeze(0), b_rows.to(bias_dtype), (num_rows,))
            else:
                db = b_rows.new_zeros(num_rows).index_put_((rows,), b_rows).to(bias_dtype)
        return dx, dw, db
    if need_w or need_b:
        num_rows = weight.shape[0]
        if sparse_grad:
            rows, w_rows, b_rows = grad_weight_rows_op(grad, x, idx, weight.dtype)
            ids = rows.unsqueeze(0)
            if need_w:
                dw = _coalesced(ids, w_rows.to(weight.dtype), (num_rows, weight.shape[1]))
            if need_b:
                db = _coalesced(ids, b_rows.to(bias_dtype), (num_rows,))
        else:
            dw_full, db_full = grad_weight_op(grad, x, idx, num_rows, deterministic, weight.dtype)
            dw = dw_full.to(weight.dtype) if need_w else None
            db = db_full.to(bias_dtype) if need_b else None
    return dx, dw, db


torch.library.register_autograd(_QUALIFIED + "shortlist_score", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public function


def shortlist_score(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    idx: torch.Tensor,
    *,
    sparse_grad: bool = False,
    deterministic: bool = False,
    validate: bool = True,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scores of shortlisted rows: ``s[b, k] = <x[b], weight[idx[b, k]]> + bias[idx[b, k]]``.

    Args:
        x: [B, D] features (fp32, bf16 or fp16; float64 for gradcheck).
        weight: [N, D] table (fp32, bf16 or fp16; may differ from x; float64 for gradcheck), or an int8 table
            (with ``weight_scale``; inference only: gradients reach x and bias, never the table).
        bias: [N] or None.
        idx: [B, K] int32 or int64 row ids; -1 is a pad (score -inf, no gradient). Duplicates are allowed.
        sparse_grad: the gradients of ``weight`` and ``bias`` are coalesced sparse COO tensors holding only the
            touched rows (as ``nn.Embedding(sparse=True)``), instead of dense [N, D] / [N] tensors.
        deterministic: bit-identical gradients run to run (always so on CPU; on CUDA it replaces atomics with a
            sort + segment reduction). ``torch.use_deterministic_algorithms(True)`` has the same effect.
        validate: check shapes, dtypes, devices and id ranges with clear errors (a device sync on CUDA); switch
            off in a trusted hot loop. Skipped automatically while ``torch.compile`` traces.
        weight_scale: [N] fp32 per-row scales of an int8 ``weight`` (``cascadexml_fast.quantize_table``): row r
            stands for ``weight[r].float() * weight_scale[r]``. Required with an int8 table, an error otherwise.

    Returns:
        [B, K] fp32 scores. Accumulation is fp32 whatever the storage dtypes (float64 inputs, meant for
        gradcheck, compute and return float64).
    """
    if validate and not torch.compiler.is_compiling():
        check_shortlist_inputs(x, weight, bias, idx, weight_scale)
    return _library.call(shortlist_score_op, x, weight, bias, idx, sparse_grad, deterministic, weight_scale)
