"""Triton kernel of the fused `shortlist_bce` forward: shortlisted scoring, BCE targets, loss and its gradient
w.r.t. the logits, in one pass (`ops.reference.shortlist_bce`, csrc/cpu/loss.cpp).

Launcher (plain function, tensors on the kernel's device: CUDA, or CPU under TRITON_INTERPRET=1):

    shortlist_bce(x, weight, bias, idx, pos_offsets, pos_ids, level_weight=1.0)
        -> loss (fp32 0-dim), grad_logits [B, K] fp32, logits [B, K] fp32

Semantics, those of the reference:
    s[b, k]   = <x[b], W[idx[b, k]]> + bias[idx[b, k]]                   (-inf at pads, idx == -1)
    y[b, k]   = idx[b, k] is one of document b's positives pos_ids[pos_offsets[b] : pos_offsets[b + 1]]
                (CSR; any order, repeats allowed)
    loss      = level_weight / n_valid * sum over non-pad (b, k) of max(s, 0) - s y + log1p(exp(-|s|))
    grad[b,k] = level_weight / n_valid * (sigmoid(s) - y)                (0 at pads)
with n_valid = max(#(idx >= 0), 1), counted on the device before the launch (no host sync): a loss over no valid
entry is 0.

Kernel. Grid (B, cdiv(K, BLOCK_K)): one program per document and BLOCK_K shortlist slots. The dot products run
as in shortlist_score's forward kernel (rows gathered along D in BLOCK_D chunks, every load upcast to fp32 at
once, fp32 accumulation, int64 row offsets). Membership is a linear scan of the document's positive segment,
BLOCK_P ids at a time, compared against the BLOCK_K ids as a [BLOCK_K, BLOCK_P] tile: unsorted positives and
repeats need no preprocessing (no sort, no extra launch), and for a document with P positives the scan costs
about K * P compares against the dot products' K * D multiply-adds, so it is the cheaper part whenever P < D
(XMC documents have a handful to a few hundred labels). Each program writes its slots' logits and gradients and
one partial loss sum (already scaled); the loss is the sum of the [B, cdiv(K, BLOCK_K)] partials (a fixed-order
torch reduction: deterministic, no atomics).

Numerics: one exp per entry, t = exp(-|s|) (never overflows); BCE as max(s, 0) - s y + log1p(t), log1p
evaluated as log(u) * t / (u - 1) with u = 1 + t (accurate to a few ulps for tiny t, where log(1 + t) would
return 0); sigmoid(s) = 1 / u for s >= 0, t / u otherwise. The
gradient equals the reference's within fp32 rounding (sigmoid and the scale are computed in a different order),
the loss within the fp32 summation order.

Validation (id ranges, CSR offsets) is the ops layer's job; this launcher does cheap shape / dtype checks only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .shortlist_score import _check_2d, _num_warps, _pow2, _tile_shape, _unit_stride_rows, gathered_dots

__all__ = ["shortlist_bce"]

ID_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _bce_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, idx_ptr, pos_off_ptr, pos_ptr, nvalid_ptr,
    logits_ptr, grad_ptr, partial_ptr,
    K, D, num_kb, level_weight,
    stride_xb, stride_wn, stride_ib, stride_ob,
    HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    ids = tl.load(idx_ptr + pid_b * stride_ib + offs_k, mask=k_mask, other=-1).to(tl.int64)
    valid = ids >= 0
    w_rows = w_ptr + tl.where(valid, ids, 0) * stride_wn  # int64 row offsets
    x_row = x_ptr + pid_b * stride_xb

    s = gathered_dots(x_row, w_rows, valid, D, EVEN_D, BLOCK_K, BLOCK_D)  # the scores, as shortlist_score's
    if HAS_BIAS:
        s += tl.load(bias_ptr + ids, mask=valid, other=0.0).to(tl.float32)

    # Targets: linear scan of the document's positives, BLOCK_P at a time (any order, repeats harmless).
    p_start = tl.load(pos_off_ptr + pid_b)
    p_end = tl.load(pos_off_ptr + pid_b + 1)
    hit = tl.zeros([BLOCK_K], dtype=tl.int32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pos = tl.load(pos_ptr + offs_p, mask=offs_p < p_end, other=-2).to(tl.int64)  # -2 matches no id or pad
        hit = tl.maximum(hit, tl.max((ids[:, None] == pos[None, :]).to(tl.int32), axis=1))
    y = tl.where(valid & (hit > 0), 1.0, 0.0)

    # Loss and its gradient w.r.t. the logits, scaled by level_weight / max(n_valid, 1).
    n_valid = tl.maximum(tl.load(nvalid_ptr), 1).to(tl.float32)
    scale = level_weight / n_valid
    safe = tl.where(valid, s, 0.0)
    t = tl.exp(-tl.abs(safe))
    u = 1.0 + t
    tiny = u == 1.0  # t below half an ulp of 1: log1p(t) = t
    log1p_t = tl.where(tiny, t, tl.log(u) * (t / tl.where(tiny, 1.0, u - 1.0)))
    per_entry = tl.maximum(safe, 0.0) - safe * y + log1p_t
    per_entry = tl.where(valid, per_entry, 0.0)
    sigmoid = tl.where(safe >= 0.0, 1.0 / u, t / u)  # from t = exp(-|s|): never overflows
    grad = tl.where(valid, (sigmoid - y) * scale, 0.0)
    out = pid_b * stride_ob + offs_k
    # A NaN in x reaches only this document's row; pads are overwritten whatever x holds.
    tl.store(logits_ptr + out, tl.where(valid, s, float("-inf")), mask=k_mask)
    tl.store(grad_ptr + out, grad, mask=k_mask)
    tl.store(partial_ptr + pid_b * num_kb + pid_k, tl.sum(per_entry, axis=0) * scale)


def shortlist_bce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    idx: torch.Tensor,
    pos_offsets: torch.Tensor,
    pos_ids: torch.Tensor,
    level_weight: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 0-dim, grad_logits [B, K] fp32, logits [B, K] fp32); see the module docstring.

    x [B, D], weight [N, D], bias [N] or None: fp32 / bf16 / fp16 (each its own); idx [B, K] int32/int64 (pad
    -1); pos_offsets int64 [B + 1], pos_ids int32/int64 [P] (CSR positives, same id space as idx). Tables need
    unit stride along D only. No host sync.
    """
    _check_2d("x", x)
    _check_2d("weight", weight)
    _check_2d("idx", idx)
    B, D = x.shape
    K = idx.shape[1]
    if idx.shape[0] != B or weight.shape[1] != D or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, idx {tuple(idx.shape)}"
                         + ("" if bias is None else f", bias {tuple(bias.shape)}"))
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if idx.dtype not in ID_DTYPES or pos_ids.dtype not in ID_DTYPES:
        raise TypeError(f"idx and pos_ids must be int32 or int64, got {idx.dtype} and {pos_ids.dtype}")
    if pos_offsets.dim() != 1 or pos_offsets.shape[0] != B + 1 or pos_offsets.dtype != torch.int64:
        raise ValueError(f"pos_offsets must be int64 [B + 1] = [{B + 1}], got {pos_offsets.dtype} "
                         f"{tuple(pos_offsets.shape)}")
    dev = x.device
    logits = torch.empty(B, K, dtype=torch.float32, device=dev)
    grad = torch.empty(B, K, dtype=torch.float32, device=dev)
    if B == 0 or K == 0:
        return torch.zeros((), dtype=torch.float32, device=dev), grad, logits
    x = _unit_stride_rows(x)
    weight = _unit_stride_rows(weight)
    idx = idx.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    pos_offsets = pos_offsets.contiguous()
    pos_ids = pos_ids.contiguous()
    if pos_ids.numel() == 0:
        pos_ids = torch.full((1,), -2, dtype=pos_ids.dtype, device=dev)  # a valid pointer, never read
    n_valid = (idx >= 0).sum()  # on the device: no host sync
    block_k, block_d = _tile_shape(K, D, weight.element_size(), B)
    block_d = _pow2(D, 16, block_d)  # D == 0: the loop over D is empty, the scores are the biases
    block_p = 16 if block_k >= 64 else 32  # the [BLOCK_K, BLOCK_P] compare tile stays <= 2048 elements
    num_kb = triton.cdiv(K, block_k)
    partial = torch.empty(B, num_kb, dtype=torch.float32, device=dev)
    _bce_fwd_kernel[(B, num_kb)](
        x, weight, bias if bias is not None else x, idx, pos_offsets, pos_ids, n_valid,
        logits, grad, partial,
        K, D, num_kb, float(level_weight),
        x.stride(0), weight.stride(0), idx.stride(0), logits.stride(0),
        HAS_BIAS=bias is not None, EVEN_D=D > 0 and D % block_d == 0,
        BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_P=block_p,
        num_warps=_num_warps(block_k * block_d),
    )
    return partial.sum(), grad, logits
