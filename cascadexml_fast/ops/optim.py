"""`sparse_adamw_step`: a fused AdamW update of only the touched rows of a table (in place);
`sparse_rowwise_adagrad_step`: row-wise AdaGrad (one fp32 accumulator per row), likewise.

bf16 / fp16 tables may round the fp32 result stochastically (`stochastic_rounding=True`, `seed`): the rounding is
a counter-based hash of (seed, step, row, column) (ops/reference.py: sr_key, sr_random, stochastic_round), so it
is deterministic and the same on every backend.

Kernels: C++/OpenMP on CPU, Triton on CUDA (the reference where Triton is missing).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _library, reference
from ._validate import check_tensor

sparse_adamw_step_op = _library.op("sparse_adamw_step")
sparse_rowwise_adagrad_step_op = _library.op("sparse_rowwise_adagrad_step")
sparse_adamw8bit_step_op = _library.op("sparse_adamw8bit_step")
_QUALIFIED = _library.NAMESPACE + "::"

@functools.lru_cache(maxsize=None)
def _triton_kernels():
    try:
        from ..kernels.triton import optim as kernels

        return kernels
    except ImportError:
        return None


def _sparse_adamw_step_cuda(param, exp_avg, exp_avg_sq, rows, grad, step, lr, beta1, beta2, eps, weight_decay,
                            last_step=None, lr_history=None, stochastic_rounding=False, seed=0):
    kernels = _triton_kernels()
    args = (param, exp_avg, exp_avg_sq, rows, grad, step, lr, beta1, beta2, eps, weight_decay, last_step, lr_history,
            stochastic_rounding, seed)
    if kernels is None or torch.float64 in (param.dtype, exp_avg.dtype):
        return reference.sparse_adamw_step_sr(*args)
    kernels.sparse_adamw_step(*args)


def _sparse_rowwise_adagrad_step_cuda(param, state_sum, rows, grad, lr, eps, weight_decay, step=0,
                                      stochastic_rounding=False, seed=0):
    kernels = _triton_kernels()
    args = (param, state_sum, rows, grad, lr, eps, weight_decay, step, stochastic_rounding, seed)
    if kernels is None or param.dtype == torch.float64:
        return reference.sparse_rowwise_adagrad_step(*args)
    kernels.sparse_rowwise_adagrad_step(*args)


@functools.lru_cache(maxsize=None)
def _triton_8bit_kernels():
    try:
        from ..kernels.triton import adamw8bit as kernels

        return kernels
    except ImportError:
        return None


def _sparse_adamw8bit_step_cuda(param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows,
                                grad, step, lr, beta1, beta2, eps, weight_decay, stochastic_rounding=False, seed=0):
    kernels = _triton_8bit_kernels()
    args = (param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows, grad, step, lr, beta1,
            beta2, eps, weight_decay, stochastic_rounding, seed)
    if kernels is None:
        return reference.sparse_adamw8bit_step(*args)
    kernels.sparse_adamw8bit_step(*args)


_library.LIBRARY.impl("sparse_adamw_step", _sparse_adamw_step_cuda, "CUDA")
_library.LIBRARY.impl("sparse_rowwise_adagrad_step", _sparse_rowwise_adagrad_step_cuda, "CUDA")
_library.LIBRARY.impl("sparse_adamw8bit_step", _sparse_adamw8bit_step_cuda, "CUDA")


@torch.library.register_fake(_QUALIFIED + "sparse_adamw_step")
def _sparse_adamw_step_fake(param, exp_avg, exp_avg_sq, rows, grad, step, lr, beta1, beta2, eps, weight_decay,
                            last_step=None, lr_history=None, stochastic_rounding=False, seed=0):
    return None


@torch.library.register_fake(_QUALIFIED + "sparse_rowwise_adagrad_step")
def _sparse_rowwise_adagrad_step_fake(param, state_sum, rows, grad, lr, eps, weight_decay, step=0,
                                      stochastic_rounding=False, seed=0):
    return None


@torch.library.register_fake(_QUALIFIED + "sparse_adamw8bit_step")
def _sparse_adamw8bit_step_fake(param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows,
                                grad, step, lr, beta1, beta2, eps, weight_decay, stochastic_rounding=False, seed=0):
    return None


def sparse_adamw_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    last_step: Optional[torch.Tensor] = None,
    lr_history: Optional[torch.Tensor] = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """AdamW (torch.optim.AdamW's update, decoupled weight decay) on the rows `rows` of `param`, in place.

    Args:
        param: [N, D] table (fp32, bf16 or fp16); exp_avg, exp_avg_sq: its moments, [N, D], fp32 or bf16.
        rows: int64 [U], unique and ascending (the indices of a coalesced sparse gradient).
        grad: [U, D] gradients of those rows.
        step: the optimizer step, 1-based (bias correction uses it).
        last_step, lr_history: give both for "exact" semantics: last_step (int64 [N], 0 = never updated) records
            when each row was last updated; a row missing steps replays them as zero-gradient AdamW steps at the
            learning rates lr_history[j - 1] (float64, one per step so far), so its state matches dense AdamW.
            Without them the update is "lazy": untouched rows neither move nor decay.
        stochastic_rounding, seed: with a bf16 / fp16 param, round the fp32 result up or down with probability
            given by its distance (unbiased), from a hash of (seed, step, row, column); ignored for fp32 params.
    """
    for name, value in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad)):
        check_tensor(name, value, dim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("rows", rows, dim=1, dtypes=(torch.int64,))
    for name, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("rows", rows), ("grad", grad)):
        if value.device != param.device:
            raise ValueError(f"{name} is on {value.device} but param is on {param.device}")
    if (last_step is None) != (lr_history is None):
        raise ValueError("exact mode needs both last_step and lr_history (lazy mode neither)")
    sparse_adamw_step_op(param, exp_avg, exp_avg_sq, rows, grad, int(step), float(lr), float(beta1), float(beta2),
                         float(eps), float(weight_decay), last_step, lr_history, bool(stochastic_rounding), int(seed))


def sparse_rowwise_adagrad_step(
    param: torch.Tensor,
    state_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    step: int = 0,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """Row-wise AdaGrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) on the rows `rows` of `param`, in place:
    G_r += mean_d(g_rd^2); p_r = p_r * (1 - lr * weight_decay) - lr * g_r / (sqrt(G_r) + eps).

    Args:
        param: [N, D] table (fp32, bf16 or fp16); state_sum: fp32 [N], one accumulator per row.
        rows: int64 [U], unique and ascending (the indices of a coalesced sparse gradient); grad: [U, D].
        step, seed: feed the stochastic-rounding hash only (stochastic_rounding with a bf16 / fp16 param).
    """
    check_tensor("param", param, dim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("state_sum", state_sum, dim=1, dtypes=(torch.float32,))
    check_tensor("grad", grad, dim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("rows", rows, dim=1, dtypes=(torch.int64,))
    for name, value in (("state_sum", state_sum), ("rows", rows), ("grad", grad)):
        if value.device != param.device:
            raise ValueError(f"{name} is on {value.device} but param is on {param.device}")
    if state_sum.shape[0] != param.shape[0]:
        raise ValueError(f"state_sum must have one entry per row of param ({param.shape[0]}), got "
                         f"{state_sum.shape[0]}")
    sparse_rowwise_adagrad_step_op(param, state_sum, rows, grad, float(lr), float(eps), float(weight_decay),
                                   int(step), bool(stochastic_rounding), int(seed))


def quantized_state_shapes(param: torch.Tensor):
    """((N, D), (N, ceil(D / 256))): shapes of the uint8 codes and the fp32 block scales of one 8-bit moment."""
    N, D = param.shape
    return (N, D), (N, -(-D // reference.QBLOCK))


def sparse_adamw8bit_step(
    param: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_scales: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_scales: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """Lazy AdamW on the rows `rows` of `param` with 8-bit block-quantised moments, in place (only the listed
    rows decay and move; there is no "exact" catch-up mode for 8-bit state).

    State per moment: uint8 codes [N, D] and fp32 scales [N, ceil(D / 256)] (the absmax of each block of 256
    consecutive elements of a row; start from zeros: codes 128 / 0 with scale 0 both decode to 0).
        exp_avg:    code = round((m / absmax) * 127) + 128;    m = (code - 128) * absmax / 127
        exp_avg_sq: code = round(sqrt(v / absmax) * 255);      v = (code / 255)^2 * absmax
    (round half to even; square-root companding keeps relative precision for small second moments). Each touched
    row is dequantised to fp32, updated with exactly AdamW's step (as sparse_adamw_step, lazy) and requantised
    with fresh block absmaxes. Memory: 2 bytes + 8 / 256 bytes per element for both moments.

    Args: as sparse_adamw_step (param fp32 / bf16 / fp16; rows int64 unique ascending; grad [U, D];
    stochastic_rounding, seed for bf16 / fp16 params). Kernels: C++/OpenMP on CPU, Triton on CUDA
    (kernels/triton/adamw8bit.py: one program per touched row and 256-element block), both bit-identical to the
    torch reference.
    """
    check_tensor("param", param, dim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("grad", grad, dim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("rows", rows, dim=1, dtypes=(torch.int64,))
    codes_shape, scales_shape = quantized_state_shapes(param)
    for name, value in (("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes)):
        check_tensor(name, value, dim=2, dtypes=(torch.uint8,))
        if tuple(value.shape) != codes_shape:
            raise ValueError(f"{name} must have the shape of param {codes_shape}, got {tuple(value.shape)}")
    for name, value in (("exp_avg_scales", exp_avg_scales), ("exp_avg_sq_scales", exp_avg_sq_scales)):
        check_tensor(name, value, dim=2, dtypes=(torch.float32,))
        if tuple(value.shape) != scales_shape:
            raise ValueError(f"{name} must have shape {scales_shape} (one fp32 absmax per block of "
                             f"{reference.QBLOCK} elements of a row), got {tuple(value.shape)}")
    for name, value in (("exp_avg_codes", exp_avg_codes), ("exp_avg_scales", exp_avg_scales),
                        ("exp_avg_sq_codes", exp_avg_sq_codes), ("exp_avg_sq_scales", exp_avg_sq_scales),
                        ("rows", rows), ("grad", grad)):
        if value.device != param.device:
            raise ValueError(f"{name} is on {value.device} but param is on {param.device}")
    sparse_adamw8bit_step_op(param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows, grad,
                             int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                             bool(stochastic_rounding), int(seed))
