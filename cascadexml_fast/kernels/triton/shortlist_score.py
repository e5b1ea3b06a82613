"""Triton kernels for shortlisted scoring and its gradients.

    s[b, k] = <x[b], W[idx[b, k]]> + bias[idx[b, k]]        (fp32; -inf where idx[b, k] == -1)

Launchers (plain functions, tensors on the kernel's device: CUDA, or CPU under TRITON_INTERPRET=1):

    shortlist_score(x, weight, bias, idx, weight_scale=None)       -> s [B, K] fp32
    shortlist_score_grad_input(grad, weight, idx, weight_scale=None) -> dx [B, D] fp32
    shortlist_score_grad_weight(grad, x, idx, num_rows, det=False) -> dW [num_rows, D] fp32, dbias [num_rows] fp32
    shortlist_score_grad_weight_rows(grad, x, idx)                 -> rows [U] int64, dW_rows [U, D], dbias_rows [U]

Rules every kernel follows (see DESIGN.md):
- x, W, bias, grad may each be stored as fp32, bf16 or fp16; every load is upcast to fp32 at once (the
  interpreter's bf16 arithmetic is wrong, and accumulation is fp32 anyway).
- W may also be an int8 table with per-row fp32 scales (inference): the int8 row is loaded (a quarter of fp32's
  bytes), upcast to fp32, the dot accumulated in fp32 and multiplied by scale[id] once (HAS_SCALE); the input
  gradient scales grad[b, k] by scale[id] before accumulating the upcast rows.
- Ids are cast to int64 before they are multiplied by a row stride: N * D passes 2^31 for real tables
  (3M x 768). Document offsets are int64 too.
- Loads run along D (the contiguous dimension), in power-of-two BLOCK_D chunks, so each row is read with
  coalesced, vectorisable loads. Masks on D are compiled out (EVEN_D) when D is a multiple of BLOCK_D.
- Pads (id -1) are masked out of every load, so they cost no memory traffic, score -inf and get no gradient.

Inputs need a unit stride along D only; row strides are passed to the kernels, so a row-slice of a big table
is not copied. Validation (id range, shapes against each other) is the ops layer's job: these launchers trust
their inputs apart from cheap shape checks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "shortlist_score",
    "shortlist_score_grad_input",
    "shortlist_score_grad_weight",
    "shortlist_score_grad_weight_rows",
]

# Enough programs to fill an H100 (132 SMs) a few times over; below this the launchers shrink their tiles.
_TARGET_PROGRAMS = 4 * 132
# Grid-stride cap for the segment kernel: more segments than this are looped over by the same programs.
_MAX_SEGMENT_PROGRAMS = 16 * 1024


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def gathered_dots(x_row, w_rows, valid, D, EVEN_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """<x, W[row]> for BLOCK_K row pointers `w_rows` (0 where not `valid`), fp32. The [BLOCK_K, BLOCK_D] products
    are accumulated element-wise in registers and reduced over D once at the end (one cross-lane reduction, not
    one per chunk). Shared by the shortlist forward, the fused BCE forward (shortlist_bce.py) and the block
    gather-GEMV (block_score.py)."""
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            xv = tl.load(x_row + offs_d).to(tl.float32)
            w = tl.load(w_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        else:
            d_mask = offs_d < D
            xv = tl.load(x_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            w = tl.load(w_rows[:, None] + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                        other=0.0).to(tl.float32)
        acc += w * xv[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _score_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, idx_ptr, out_ptr, scale_ptr,
    K, D,
    stride_xb, stride_wn, stride_ib, stride_ob,
    HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr = False,
):
    # One program: document b, BLOCK_K shortlist slots. The [BLOCK_K, BLOCK_D] product is accumulated
    # element-wise in registers and reduced over D once at the end (one cross-lane reduction, not one per chunk).
    pid_b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    ids = tl.load(idx_ptr + pid_b * stride_ib + offs_k, mask=k_mask, other=-1).to(tl.int64)
    valid = ids >= 0
    w_rows = w_ptr + tl.where(valid, ids, 0) * stride_wn  # int64 row offsets
    x_row = x_ptr + pid_b * stride_xb

    s = gathered_dots(x_row, w_rows, valid, D, EVEN_D, BLOCK_K, BLOCK_D)
    if HAS_SCALE:  # int8 table: the fp32 sum of x * q, scaled once by the row's scale
        s = s * tl.load(scale_ptr + ids, mask=valid, other=0.0)
    if HAS_BIAS:
        s += tl.load(bias_ptr + ids, mask=valid, other=0.0).to(tl.float32)
    # A NaN in x reaches only this document's row; pads are overwritten whatever x holds.
    s = tl.where(valid, s, float("-inf"))
    tl.store(out_ptr + pid_b * stride_ob + offs_k, s, mask=k_mask)


@triton.jit
def _score_grad_input_kernel(
    grad_ptr, w_ptr, idx_ptr, out_ptr, scale_ptr,
    K, D,
    stride_gb, stride_wn, stride_ib, stride_ob,
    EVEN_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr = False,
):
    # One program: document b, BLOCK_D features; loops over the shortlist in BLOCK_K chunks, in a fixed order
    # (deterministic, no atomics).
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ids = tl.load(idx_ptr + pid_b * stride_ib + offs_k, mask=k_mask, other=-1).to(tl.int64)
        valid = ids >= 0
        # Pads contribute nothing, even if grad holds NaN/inf there.
        g = tl.load(grad_ptr + pid_b * stride_gb + offs_k, mask=valid, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr + ids, mask=valid, other=0.0)
        w_ptrs = w_ptr + tl.where(valid, ids, 0)[:, None] * stride_wn + offs_d[None, :]
        if EVEN_D:
            w = tl.load(w_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        else:
            w = tl.load(w_ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += g[:, None] * w
    dx = tl.sum(acc, axis=0)
    tl.store(out_ptr + pid_b * stride_ob + offs_d, dx, mask=d_mask)


@triton.jit
def _score_grad_weight_atomic_kernel(
    grad_ptr, x_ptr, idx_ptr, dw_ptr, db_ptr,
    K, D,
    stride_gb, stride_xb, stride_ib, stride_dw,
    EVEN_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: document b, BLOCK_K slots; scatters the rank-1 update grad[b, k] * x[b] into dW with
    # atomics (duplicates, within or across documents, add up; the order, hence the rounding, is not fixed).
    pid_b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    ids = tl.load(idx_ptr + pid_b * stride_ib + offs_k, mask=k_mask, other=-1).to(tl.int64)
    valid = ids >= 0
    g = tl.load(grad_ptr + pid_b * stride_gb + offs_k, mask=valid, other=0.0).to(tl.float32)
    tl.atomic_add(db_ptr + ids, g, mask=valid, sem="relaxed")
    dw_rows = dw_ptr + tl.where(valid, ids, 0) * stride_dw  # int64 row offsets
    x_row = x_ptr + pid_b * stride_xb
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            xv = tl.load(x_row + offs_d).to(tl.float32)
            mask = valid[:, None]
        else:
            d_mask = offs_d < D
            xv = tl.load(x_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            mask = valid[:, None] & d_mask[None, :]
        tl.atomic_add(dw_rows[:, None] + offs_d[None, :], g[:, None] * xv[None, :], mask=mask, sem="relaxed")


@triton.jit
def _segment_reduce_kernel(
    grad_ptr, x_ptr, perm_ptr, seg_start_ptr, seg_end_ptr, seg_row_ptr, dw_ptr, db_ptr,
    num_segments, K, D,
    stride_xb, stride_dw,
    DENSE: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Segment s covers sorted entries [seg_start[s], seg_end[s]), all with row id seg_row[s] (-1: skip it).
    # perm maps a sorted entry to its flat position b * K + k in grad / idx. A segment's entries are read
    # BLOCK_E at a time (independent gathers in flight, not a serial chain of dependent loads) and summed in
    # sorted order, fixed by the stable sort, then reduced by a fixed tree: bit-identical run to run. Each
    # output row is written by exactly one program, so no atomics. Programs stride over segments (persistent
    # grid), so an empty segment costs three scalar loads, not a program launch.
    # DENSE: write row seg_row[s] of a [num_rows, D] buffer; else row s of a [U, D] buffer.
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for s in range(pid, num_segments, num_progs):
        start = tl.load(seg_start_ptr + s)
        end = tl.load(seg_end_ptr + s)
        row = tl.load(seg_row_ptr + s).to(tl.int64)
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        g_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for j0 in range(start, end, BLOCK_E):
            offs_e = j0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < end
            pos = tl.load(perm_ptr + offs_e, mask=e_mask, other=0).to(tl.int64)
            g = tl.load(grad_ptr + pos, mask=e_mask, other=0.0).to(tl.float32)
            x_ptrs = x_ptr + (pos // K)[:, None] * stride_xb + offs_d[None, :]
            if EVEN_D:
                xv = tl.load(x_ptrs, mask=e_mask[:, None], other=0.0).to(tl.float32)
            else:
                xv = tl.load(x_ptrs, mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc += g[:, None] * xv
            g_acc += g
        if DENSE:
            out_row = row
        else:
            out_row = tl.cast(s, tl.int64)
        ok = row >= 0
        tl.store(dw_ptr + out_row * stride_dw + offs_d, tl.sum(acc, axis=0), mask=d_mask & ok)
        tl.store(db_ptr + out_row, tl.sum(g_acc, axis=0), mask=ok & (tl.program_id(1) == 0))


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose last dimension has unit stride (rows may be strided): copy only if needed."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t
    return t.contiguous()


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _tile_shape(rows: int, D: int, elem_size: int, outer_programs: int) -> Tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) for a [rows-slice, D-chunk] tile swept along D.

    BLOCK_D: 128 elements for 4-byte storage, 256 for 2-byte (512 bytes per row chunk, 16-byte vectors
    per thread); clipped to D. BLOCK_ROWS * BLOCK_D stays <= 4096 (32 fp32 accumulators per thread at 4
    warps); shrunk while the grid would not fill the GPU (small batches).
    """
    block_d = _pow2(D, 16, 256 if elem_size <= 2 else 128)
    block_r = _pow2(rows, 8, max(8, 4096 // block_d))
    while block_r > 8 and outer_programs * triton.cdiv(rows, block_r) < _TARGET_PROGRAMS:
        block_r //= 2
    return block_r, block_d


def _num_warps(numel: int) -> int:
    return 4 if numel >= 2048 else 2


def _deterministic(deterministic: bool) -> bool:
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _scale_arg(weight: torch.Tensor, weight_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The fp32 per-row scales of an int8 table, contiguous; None for a float table."""
    if weight_scale is None:
        if weight.dtype == torch.int8:
            raise ValueError("an int8 weight needs weight_scale (its per-row fp32 scales)")
        return None
    if weight_scale.dim() != 1 or weight_scale.shape[0] != weight.shape[0]:
        raise ValueError(f"weight_scale must have shape [{weight.shape[0]}], got {tuple(weight_scale.shape)}")
    return weight_scale.contiguous().float()


def shortlist_score(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """s[b, k] = <x[b], W[idx[b, k]]> + bias[idx[b, k]], fp32 [B, K]; -inf at pads (idx == -1). An int8 W comes
    with weight_scale [N] (row r stands for W[r] * weight_scale[r])."""
    _check_2d("x", x)
    _check_2d("weight", weight)
    _check_2d("idx", idx)
    B, D = x.shape
    K = idx.shape[1]
    if idx.shape[0] != B or weight.shape[1] != D:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, idx {tuple(idx.shape)}"
        )
    out = torch.empty(B, K, dtype=torch.float32, device=x.device)
    if B == 0 or K == 0:
        return out
    scale = _scale_arg(weight, weight_scale)
    if D == 0:  # empty dot products: the scores are the biases (no kernel needed)
        valid = idx >= 0
        s = bias[idx.long().clamp(min=0)].float() if bias is not None else torch.zeros_like(out)
        return out.copy_(s.masked_fill(~valid, float("-inf")))
    x = _unit_stride_rows(x)
    weight = _unit_stride_rows(weight)
    idx = idx.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    block_k, block_d = _tile_shape(K, D, weight.element_size(), B)
    grid = (B, triton.cdiv(K, block_k))
    _score_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, idx, out, scale if scale is not None else out,
        K, D,
        x.stride(0), weight.stride(0), idx.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_D=D % block_d == 0,
        BLOCK_K=block_k, BLOCK_D=block_d, HAS_SCALE=scale is not None,
        num_warps=_num_warps(block_k * block_d),
    )
    return out


def shortlist_score_grad_input(grad: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor,
                               weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dx[b] = sum_k grad[b, k] * W[idx[b, k]] over non-pad k, fp32 [B, D] (an int8 W with weight_scale: the
    dequantised rows)."""
    _check_2d("grad", grad)
    _check_2d("weight", weight)
    _check_2d("idx", idx)
    if grad.shape != idx.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and idx {tuple(idx.shape)} must have the same shape")
    B, K = idx.shape
    D = weight.shape[1]
    scale = _scale_arg(weight, weight_scale)
    if B == 0 or D == 0:
        return torch.empty(B, D, dtype=torch.float32, device=weight.device)
    if K == 0:
        return torch.zeros(B, D, dtype=torch.float32, device=weight.device)
    out = torch.empty(B, D, dtype=torch.float32, device=weight.device)
    grad = grad.contiguous()
    weight = _unit_stride_rows(weight)
    idx = idx.contiguous()
    # Here D is split over the grid, so small batches need narrow D chunks to fill the GPU.
    block_d = _pow2(D, 16, 256 if weight.element_size() <= 2 else 128)
    while block_d > 32 and B * triton.cdiv(D, block_d) < _TARGET_PROGRAMS:
        block_d //= 2
    block_k = _pow2(K, 8, max(8, 4096 // block_d))
    grid = (B, triton.cdiv(D, block_d))
    _score_grad_input_kernel[grid](
        grad, weight, idx, out, scale if scale is not None else out,
        K, D,
        grad.stride(0), weight.stride(0), idx.stride(0), out.stride(0),
        EVEN_D=D % block_d == 0,
        BLOCK_K=block_k, BLOCK_D=block_d, HAS_SCALE=scale is not None,
        num_warps=_num_warps(block_k * block_d),
    )
    return out


def _sorted_segments(idx: torch.Tensor):
    """Stable sort of the flat ids; per sorted entry: its flat position, whether it leads a run of a non-pad
    id, and where that run ends. No host sync."""
    flat = idx.reshape(-1).long()
    n = flat.numel()
    sorted_ids, perm = torch.sort(flat, stable=True)  # pads (-1) sort first; equal ids keep position order
    lead = torch.ones(n, dtype=torch.bool, device=flat.device)
    lead[1:] = sorted_ids[1:] != sorted_ids[:-1]
    lead &= sorted_ids >= 0
    run_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    return sorted_ids, perm, lead, run_end


def _launch_segment_reduce(grad, x, perm, seg_start, seg_end, seg_row, dw, db, K, dense: bool) -> None:
    num_segments = seg_start.numel()
    D = x.shape[1]
    # One row chunk is at most 256 wide; BLOCK_E entries of a segment are gathered at once (most segments
    # are short, and masked-off entries cost no memory traffic). A fixed function of D, so that the dense and
    # row-sparse paths sum in the same order and agree bit for bit.
    block_d = _pow2(D, 16, 256)
    block_e = max(2, min(16, 2048 // block_d))
    grid = (min(num_segments, _MAX_SEGMENT_PROGRAMS), triton.cdiv(D, block_d))
    _segment_reduce_kernel[grid](
        grad, x, perm, seg_start, seg_end, seg_row, dw, db,
        num_segments, K, D,
        x.stride(0), dw.stride(0),
        DENSE=dense, EVEN_D=D % block_d == 0,
        BLOCK_E=block_e, BLOCK_D=block_d,
        num_warps=_num_warps(block_e * block_d),
    )


def _check_grad_args(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> None:
    _check_2d("grad", grad)
    _check_2d("x", x)
    _check_2d("idx", idx)
    if grad.shape != idx.shape or x.shape[0] != idx.shape[0]:
        raise ValueError(f"shape mismatch: grad {tuple(grad.shape)}, x {tuple(x.shape)}, idx {tuple(idx.shape)}")


def shortlist_score_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, num_rows: int, deterministic: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense dW [num_rows, D] and dbias [num_rows], fp32, duplicate ids summed.

    Default: atomics (fast, rounding order varies). deterministic=True, or
    torch.are_deterministic_algorithms_enabled(): stable sort + segment reduce, bit-identical run to run.
    Neither mode syncs with the host.
    """
    _check_grad_args(grad, x, idx)
    B, K = idx.shape
    D = x.shape[1]
    dw = torch.zeros(num_rows, D, dtype=torch.float32, device=x.device)
    db = torch.zeros(num_rows, dtype=torch.float32, device=x.device)
    if B == 0 or K == 0 or num_rows == 0:
        return dw, db
    grad = grad.contiguous()
    idx = idx.contiguous()
    if D == 0:  # only dbias is non-empty: a plain index_add (deterministic on CPU; no kernel needed)
        flat = idx.reshape(-1).long()
        keep = flat >= 0
        db.index_add_(0, flat.clamp(min=0), grad.reshape(-1).float().masked_fill(~keep, 0.0))
        return dw, db
    x = _unit_stride_rows(x)
    if _deterministic(deterministic):
        # One segment per sorted entry; only run leaders have a non-empty range and a row to write. This keeps
        # the launch free of a host sync (the number of unique rows is never needed on the host).
        sorted_ids, perm, lead, run_end = _sorted_segments(idx)
        pos = torch.arange(sorted_ids.numel(), device=x.device)
        seg_end = torch.where(lead, run_end, pos)
        seg_row = torch.where(lead, sorted_ids, torch.full_like(sorted_ids, -1))
        _launch_segment_reduce(grad, x, perm, pos, seg_end, seg_row, dw, db, K, dense=True)
        return dw, db
    block_k, block_d = _tile_shape(K, D, x.element_size(), B)
    grid = (B, triton.cdiv(K, block_k))
    _score_grad_weight_atomic_kernel[grid](
        grad, x, idx, dw, db,
        K, D,
        grad.stride(0), x.stride(0), idx.stride(0), dw.stride(0),
        EVEN_D=D % block_d == 0,
        BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=_num_warps(block_k * block_d),
    )
    return dw, db


def shortlist_score_grad_weight_rows(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-sparse gradients: unique ascending row ids [U] int64, dW rows [U, D] fp32, dbias rows [U] fp32.

    Deterministic (stable sort + fixed-order segment sums). One host sync, for U (the output shape).
    """
    _check_grad_args(grad, x, idx)
    B, K = idx.shape
    D = x.shape[1]
    dev = x.device
    if B == 0 or K == 0:
        return (torch.empty(0, dtype=torch.long, device=dev), torch.empty(0, D, dtype=torch.float32, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev))
    grad = grad.contiguous()
    idx = idx.contiguous()
    sorted_ids, perm, lead, run_end = _sorted_segments(idx)
    starts = lead.nonzero().squeeze(1)  # the one host sync: U = number of unique non-pad ids
    rows = sorted_ids[starts]
    U = rows.numel()
    dw = torch.zeros(U, D, dtype=torch.float32, device=dev)
    db = torch.zeros(U, dtype=torch.float32, device=dev)
    if U == 0:
        return rows, dw, db
    if D == 0:  # only dbias: segment sums of the sorted grads, in torch (no kernel needed)
        seg = torch.cumsum(lead.long(), 0) - 1
        keep = sorted_ids >= 0
        db.index_add_(0, seg[keep], grad.reshape(-1).float()[perm[keep]])
        return rows, dw, db
    x = _unit_stride_rows(x)
    _launch_segment_reduce(grad, x, perm, starts, run_end[starts], rows, dw, db, K, dense=False)
    return rows, dw, db
