"""Triton kernel of the row-sparse AdamW step with 8-bit block-quantised moments (`ops.reference.
sparse_adamw8bit_step`, csrc/cpu/adamw8bit.cpp).

Launcher (plain function, tensors on the kernel's device: CUDA, or CPU under TRITON_INTERPRET=1):

    sparse_adamw8bit_step(param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows, grad,
                          step, lr, beta1, beta2, eps, weight_decay, stochastic_rounding=False, seed=0) -> None

State per moment: uint8 codes [N, D] and fp32 scales [N, ceil(D / 256)] (the absmax of each block of 256
consecutive elements of a row). Lazy semantics: only the listed rows decay, move and are re-encoded.

Kernel. Grid (U, ceil(D / 256)): one program per (touched row, quantisation block), so a block's absmax is a
reduction inside one program and no two programs touch the same scale. Per element, in the C++ kernel's order
and with its fp32 constants:
    m = ((code_m - 128) * scale_m) / 127             r = code_v / 255,  v = (r * r) * scale_v
    p = p * decay;  m = b1 m + (1 - b1) g;  v = b2 v + ((1 - b2) g) g
    p = p - (step_size m) / (sqrt(v) inv_sqrt_bc2 + eps)
then p is stored (round to nearest even, or stochastically with the project's counter hash: kernels/triton/
optim.py's _round_out), and m, v are re-encoded against the block's fresh absmax:
    code_m = rne((m / max|m|) * 127) + 128           code_v = rne(sqrt(v / max v) * 255)
(0 / 0 blocks give absmax 0 and codes 128 / 0). Division and sqrt are correctly rounded (div_rn, sqrt_rn) and
the kernel is compiled with enable_fp_fusion=False (no multiply-add contraction), so the fp32 values, hence the
codes, equal the reference's bit for bit; round half to even uses the 1.5 * 2^23 trick (exact for |t| < 2^22).
bf16 tables round to nearest even by a bit trick before the store (the interpreter's own f32 -> bf16 cast
truncates), so bf16 results match the reference with or without stochastic rounding.

Validation (ids in range, unique ascending rows) is the ops layer's job (a host sync). This launcher does only
cheap checks (dims, shapes, dtypes, devices, unit stride along D); an out-of-range row id is skipped, never
written.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .optim import _as_f32, _check, _round_out, _sr_key_arg

__all__ = ["sparse_adamw8bit_step", "QBLOCK"]

QBLOCK = 256  # elements of a row per quantisation block (ops.reference.QBLOCK)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _rne_bf16(x):
    """fp32 -> bf16 rounded to nearest even via the fp32 bit pattern (the conversion of the result is exact);
    NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    y = rounded.to(tl.float32, bitcast=True)
    return tl.where(x == x, y, x).to(tl.bfloat16)


@triton.jit
def _adamw8bit_kernel(
    p_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr, rows_ptr, g_ptr,
    N, D,
    stride_p, stride_mc, stride_ms, stride_vc, stride_vs, stride_g,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, step_size, inv_sqrt_bc2,
    key,
    BLOCK: tl.constexpr, SR: tl.constexpr, IS_F16: tl.constexpr, IS_BF16: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs_d = blk * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + u).to(tl.int64)
    ok = (row >= 0) & (row < N)  # an out-of-range id (the ops layer rejects it) is skipped, never written
    row = tl.where(ok, row, 0)
    mask = ok & (offs_d < D)
    # int64 row offsets: N * D passes 2^31 for real tables.
    p_ptrs = p_ptr + row * stride_p + offs_d
    mc_ptrs = mc_ptr + row * stride_mc + offs_d
    vc_ptrs = vc_ptr + row * stride_vc + offs_d
    ms_ptr_b = ms_ptr + row * stride_ms + blk
    vs_ptr_b = vs_ptr + row * stride_vs + blk
    m_scale = tl.load(ms_ptr_b, mask=ok, other=0.0)
    v_scale = tl.load(vs_ptr_b, mask=ok, other=0.0)

    # Decode (fp32, the C++ kernel's order).
    cm = tl.load(mc_ptrs, mask=mask, other=128).to(tl.float32)
    cv = tl.load(vc_ptrs, mask=mask, other=0).to(tl.float32)
    m = tl.div_rn((cm - 128.0) * m_scale, tl.full([], 127.0, tl.float32))
    r = tl.div_rn(cv, tl.full([], 255.0, tl.float32))
    v = r * r * v_scale
    g = tl.load(g_ptr + u * stride_g + offs_d, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)

    # AdamW (association as in the C++ kernel and the reference).
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    p = p - tl.div_rn(step_size * m, tl.sqrt_rn(v) * inv_sqrt_bc2 + eps)
    if IS_BF16 and not SR:
        tl.store(p_ptrs, _rne_bf16(p), mask=mask)
    else:
        tl.store(p_ptrs, _round_out(p, row, offs_d, key, p_ptr.dtype.element_ty, SR, IS_F16), mask=mask)

    # Re-encode against the block's fresh absmax (lanes past D hold 0, so they change no maximum).
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    m_max = tl.max(tl.abs(m), axis=0)
    v_max = tl.max(v, axis=0)
    tm = tl.where(m_max > 0.0, tl.div_rn(m, tl.where(m_max > 0.0, m_max, 1.0)), 0.0) * 127.0
    tv = tl.where(v_max > 0.0, tl.div_rn(v, tl.where(v_max > 0.0, v_max, 1.0)), 0.0)
    tv = tl.sqrt_rn(tv) * 255.0
    # Round half to even: (t + 1.5 * 2^23) - 1.5 * 2^23 is exact rounding for |t| < 2^22 (here |t| <= 255).
    qm = (tm + 12582912.0) - 12582912.0
    qv = (tv + 12582912.0) - 12582912.0
    tl.store(mc_ptrs, (qm.to(tl.int32) + 128).to(tl.uint8), mask=mask)
    tl.store(vc_ptrs, qv.to(tl.int32).to(tl.uint8), mask=mask)
    tl.store(ms_ptr_b, m_max, mask=ok)
    tl.store(vs_ptr_b, v_max, mask=ok)


def _unit_stride(name: str, t: torch.Tensor) -> None:
    """State is updated in place, so it cannot be copied: each row must be contiguous."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension (rows may be strided)")


def sparse_adamw8bit_step(
    param: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_scales: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_scales: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """Lazy AdamW with 8-bit state on rows `rows` of `param`, in place; see the module docstring.

    param [N, D] fp32/bf16/fp16; codes uint8 [N, D]; scales fp32 [N, ceil(D / 256)]; rows [U] int64 (or int32),
    unique; grad [U, D] any float dtype; step >= 1. Tensors need unit stride along their last dimension only.
    No host sync.
    """
    device = param.device
    _check("param", param, 2, PARAM_DTYPES, device)
    for name, t in (("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes)):
        _check(name, t, 2, (torch.uint8,), device)
    for name, t in (("exp_avg_scales", exp_avg_scales), ("exp_avg_sq_scales", exp_avg_sq_scales)):
        _check(name, t, 2, (torch.float32,), device)
    _check("rows", rows, 1, (torch.int64, torch.int32), device)
    _check("grad", grad, 2, GRAD_DTYPES, device)
    N, D = param.shape
    U = rows.shape[0]
    nb = triton.cdiv(D, QBLOCK)
    for name, t in (("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes)):
        if t.shape != param.shape:
            raise ValueError(f"{name} must have the shape of param {tuple(param.shape)}, got {tuple(t.shape)}")
    for name, t in (("exp_avg_scales", exp_avg_scales), ("exp_avg_sq_scales", exp_avg_sq_scales)):
        if tuple(t.shape) != (N, nb):
            raise ValueError(f"{name} must have shape {(N, nb)} (one fp32 absmax per block of {QBLOCK} elements of "
                             f"a row), got {tuple(t.shape)}")
    if tuple(grad.shape) != (U, D):
        raise ValueError(f"grad must have shape [{U}, {D}] (one row per id in rows), got {tuple(grad.shape)}")
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based), got {step}")
    for name, t in (("param", param), ("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes),
                    ("exp_avg_scales", exp_avg_scales), ("exp_avg_sq_scales", exp_avg_sq_scales)):
        _unit_stride(name, t)
    if U == 0 or D == 0:
        return
    if grad.shape[1] > 1 and grad.stride(1) != 1:
        grad = grad.contiguous()
    # fp32 scalars exactly as the C++ kernel forms them (float64 math rounded once; 1 - b in fp32, exact from the
    # fp32 b), rounded here so that the interpreter (float64 Python constants) and compiled code agree.
    b1, b2 = _as_f32(beta1), _as_f32(beta2)
    sr = bool(stochastic_rounding) and param.dtype != torch.float32
    _adamw8bit_kernel[(U, nb)](
        param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows.contiguous(), grad,
        N, D,
        param.stride(0), exp_avg_codes.stride(0), exp_avg_scales.stride(0), exp_avg_sq_codes.stride(0),
        exp_avg_sq_scales.stride(0), grad.stride(0),
        b1, b2, _as_f32(1.0 - b1), _as_f32(1.0 - b2), _as_f32(eps), _as_f32(1.0 - lr * weight_decay),
        _as_f32(lr / (1.0 - math.pow(beta1, step))), _as_f32(1.0 / math.sqrt(1.0 - math.pow(beta2, step))),
        _sr_key_arg(seed, step),
        BLOCK=QBLOCK, SR=sr, IS_F16=param.dtype == torch.float16, IS_BF16=param.dtype == torch.bfloat16,
        num_warps=2, enable_fp_fusion=False,
    )
