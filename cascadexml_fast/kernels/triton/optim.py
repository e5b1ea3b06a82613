"""Triton kernel of the fused row-sparse AdamW step (`ops.reference.sparse_adamw_step`, csrc/cpu/optim.cpp).

Launcher (plain function, tensors on the kernel's device: CUDA, or CPU under TRITON_INTERPRET=1):

    sparse_adamw_step(param, exp_avg, exp_avg_sq, rows, grad, step, lr, beta1, beta2, eps, weight_decay,
                      last_step=None, lr_history=None) -> None          (in place)

Semantics, exactly those of the C++ CPU kernel:
- Lazy (last_step None): each listed row gets one AdamW step with the bias correction of the global `step`;
  untouched rows neither move nor decay.
- Exact (last_step int64 [N], lr_history float64 [>= step - 1]): a listed row first replays the steps
  j = last_step[row] + 1 .. step - 1 it missed as zero-gradient AdamW steps at lr_history[j - 1]. Per element,
  the replay stops early once the momentum's move is <= 2^-30 |p| (or m == 0: a row never updated has
  m = v = 0); the steps left are pure decay, applied at once: p *= prod_j (1 - lr_j wd) (a float64 product),
  m *= beta1^missed, v *= beta2^missed. Then the row's real step, and last_step[rows] = step.

Kernel. Grid (U, cdiv(D, BLOCK_D)): one program per (touched row, BLOCK_D slice of it). It loads p, m, v, g
for its slice once (upcast to fp32 at once), replays in registers (exact mode: a `while` loop whose trip
count is data-dependent, bounded by step - last_step[row] - 1, that runs while any lane of the slice still
moves), applies the update and stores each of p, m, v once. Lanes that stopped early sit masked in the loop.
Math follows the C++ kernel operation by operation (same association, the same fp32 scalars; sqrt and
division correctly rounded via sqrt_rn / div_rn, as in C++): under the interpreter the results equal the C++
op's bit for bit (in every test case); compiled code contracts multiply-adds into FMAs, an ulp or so apart.

Schedule. The replay's per-step constants (fp32 decay 1 - lr_j wd, step size lr_j / (1 - b1^j),
1 / sqrt(1 - b2^j); float64 tail products prod_{i=j}^{step-1} (1 - lr_i wd); fp32 b1^k and b2^k) are
computed with torch ops on the table's device for all steps [1, step): no host sync (the C++ kernel starts
at min(last_step[rows]) + 1, which would need one). The lr-independent ones are cached per (device, betas)
with power-of-two capacity; per call only about ten elementwise ops over step - 1 entries remain.

Validation (ids in range, unique ascending rows, last_step in [0, step)) is the ops layer's job: it costs a
host sync. This launcher does only the cheap checks (dims, shapes, dtypes, devices). The kernel skips an
out-of-range row id (never a wild write; in exact mode the final `last_step.index_fill_` then raises, or
asserts on a GPU) and clamps the replay of a last_step outside [0, step) to [1, step).
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["sparse_adamw_step", "sparse_rowwise_adagrad_step"]

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _fmix32(h):
    """MurmurHash3's finaliser on uint32 (ops/reference.py fmix32, csrc/cpu/sr.h)."""
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _round_out(x, row, offs_d, key, out_ty: tl.constexpr, SR: tl.constexpr, IS_F16: tl.constexpr):
    """fp32 x -> out_ty: round to nearest, or (SR) stochastically with fmix32(fmix32(row32 ^ key) ^ col),
    bit for bit as ops/reference.py stochastic_round."""
    if SR:
        row_key = _fmix32(row.to(tl.uint32) ^ key.to(tl.uint32, bitcast=True))
        rnd = _fmix32(row_key ^ offs_d.to(tl.uint32))
        bits = x.to(tl.uint32, bitcast=True)
        if IS_F16:
            expo = ((bits >> 23) & 0xFF).to(tl.int32)
            drop = tl.minimum(13 + tl.maximum(113 - expo, 0), 23).to(tl.uint32)
        else:
            drop = tl.full([], 16, tl.uint32)
        mask = (tl.full([], 1, tl.uint32) << drop) - 1
        rounded = (((bits + (rnd & mask)) >> drop) << drop).to(tl.float32, bitcast=True)
        finite = tl.abs(x) < float("inf")
        x = tl.where(finite, rounded, x)
    return x.to(out_ty)


@triton.jit
def _sparse_adamw_kernel(
    p_ptr, m_ptr, v_ptr, rows_ptr, g_ptr, last_ptr,
    decay_ptr, step_size_ptr, inv_sqrt_bc2_ptr, tail_ptr, b1_pow_ptr, b2_pow_ptr,
    N, D, step,
    stride_p, stride_m, stride_v, stride_g,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, step_size, inv_sqrt_bc2,
    key,
    EXACT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr, SR: tl.constexpr, IS_F16: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(rows_ptr + u).to(tl.int64)
    ok = (row >= 0) & (row < N)  # an out-of-range id (the ops layer rejects it) is skipped, never written
    row = tl.where(ok, row, 0)
    if EVEN_D:
        mask = ok & (offs_d >= 0)
    else:
        mask = ok & (offs_d < D)
    p_ptrs = p_ptr + row * stride_p + offs_d  # int64 row offsets: N * D passes 2^31 for real tables
    m_ptrs = m_ptr + row * stride_m + offs_d
    v_ptrs = v_ptr + row * stride_v + offs_d
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + u * stride_g + offs_d, mask=mask, other=0.0).to(tl.float32)

    if EXACT:
        # Catch up on steps first .. step - 1 with zero gradients. jn: per lane, the first step not replayed
        # (the C++ loop's j after it ends). A lane runs while m != 0 and its last move exceeded 2^-30 |p|.
        last = tl.load(last_ptr + row, mask=ok, other=0)
        first = tl.maximum(last + 1, 1)
        j = first
        jn = tl.zeros([BLOCK_D], dtype=tl.int64) + first
        run = mask & (m != 0.0)
        # Step j's constants sit at index j - 1; the next step's are loaded one iteration ahead, so their
        # latency overlaps this step's math (the loop is a serial chain otherwise).
        has = first < step
        i0 = tl.where(has, first - 1, 0)
        dj = tl.load(decay_ptr + i0, mask=has, other=1.0)
        sj = tl.load(step_size_ptr + i0, mask=has, other=0.0)
        cj = tl.load(inv_sqrt_bc2_ptr + i0, mask=has, other=1.0)
        while (j < step) & (tl.max(run.to(tl.int32), axis=0) > 0):
            nxt = j + 1 < step
            i1 = tl.where(nxt, j, 0)
            dn = tl.load(decay_ptr + i1, mask=nxt, other=1.0)
            sn = tl.load(step_size_ptr + i1, mask=nxt, other=0.0)
            cn = tl.load(inv_sqrt_bc2_ptr + i1, mask=nxt, other=1.0)
            p1 = p * dj
            m1 = m * beta1
            v1 = v * beta2
            delta = tl.div_rn(sj * m1, tl.sqrt_rn(v1) * cj + eps)
            p1 = p1 - delta
            p = tl.where(run, p1, p)
            m = tl.where(run, m1, m)
            v = tl.where(run, v1, v)
            jn = tl.where(run, j + 1, jn)
            # `not <=` rather than `>`: a NaN lane keeps running, as in C++.
            run = run & (m1 != 0.0) & ~(tl.abs(delta) <= 9.313225746154785e-10 * tl.abs(p1))  # 2^-30
            j += 1
            dj = dn
            sj = sn
            cj = cn
        # The rest, steps jn .. step - 1, is pure decay of p, m and v.
        rest = mask & (jn < step)
        missed = tl.where(rest, step - jn, 0)
        tail = tl.load(tail_ptr + tl.where(rest, jn - 1, 0), mask=rest, other=1.0)
        p = tl.where(rest, (p.to(tl.float64) * tail).to(tl.float32), p)
        m = tl.where(rest, m * tl.load(b1_pow_ptr + missed, mask=rest, other=1.0), m)
        v = tl.where(rest, v * tl.load(b2_pow_ptr + missed, mask=rest, other=1.0), v)

    # The step itself (torch.optim.AdamW's update, association as in the C++ kernel).
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    p = p - tl.div_rn(step_size * m, tl.sqrt_rn(v) * inv_sqrt_bc2 + eps)
    tl.store(p_ptrs, _round_out(p, row, offs_d, key, p_ptr.dtype.element_ty, SR, IS_F16), mask=mask)
    tl.store(m_ptrs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Schedule (per-step constants of the replay), on the table's device, without a host sync
# ---------------------------------------------------------------------------------------------------------


def _as_f32(x: float) -> float:
    """x rounded to the nearest float32 (what the C++ kernel's float(x) gives)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=8)
def _beta_tables(device: torch.device, beta1: float, beta2: float, capacity: int):
    """Steps j = 1 .. capacity: 1 - b1^j (float64), 1 / sqrt(1 - b2^j) (fp32); powers k = 0 .. capacity - 1
    of the fp32 betas: b1^k, b2^k (fp32, from float64 powers: pow(float, float) to within an ulp)."""
    k = torch.arange(capacity, dtype=torch.float64, device=device)
    j = k + 1
    one_minus_b1_pow = 1.0 - torch.pow(beta1, j)
    inv_sqrt_bc2 = (1.0 / torch.sqrt(1.0 - torch.pow(beta2, j))).float()
    b1_pow = torch.pow(_as_f32(beta1), k).float()
    b2_pow = torch.pow(_as_f32(beta2), k).float()
    return one_minus_b1_pow, inv_sqrt_bc2, b1_pow, b2_pow


def _schedule(step: int, lr_history: torch.Tensor, beta1: float, beta2: float, weight_decay: float, device):
    """Per-step tensors for steps [1, step), index j - 1: decay, step_size, inv_sqrt_bc2 (fp32 [step - 1]);
    tail (float64 [step]: tail[j - 1] = prod_{i=j}^{step-1} (1 - lr_i wd), tail[step - 1] = 1);
    b1_pow, b2_pow (fp32, index = number of missed steps). Each has at least one entry."""
    n = step - 1
    capacity = triton.next_power_of_2(max(step, 16))
    one_minus_b1_pow, inv_sqrt_bc2, b1_pow, b2_pow = _beta_tables(device, float(beta1), float(beta2), capacity)
    lr = lr_history[:n].to(device=device, dtype=torch.float64)
    decay64 = 1.0 - lr * weight_decay
    tail = torch.ones(max(step, 1), dtype=torch.float64, device=device)
    if n > 0:
        # Products from step - 1 down to j, in that order (as the C++ kernel), in float64.
        tail[:n] = decay64.flip(0).cumprod(0).flip(0)
        decay = decay64.float()
        step_size = (lr / one_minus_b1_pow[:n]).float()
    else:
        decay = step_size = tail.float()  # never read (no step to replay); a valid pointer
    return decay, step_size, inv_sqrt_bc2, tail, b1_pow, b2_pow


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------


def _check(name: str, t: torch.Tensor, dim: int, dtypes, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but param is on {device}")


def _unit_stride_d(name: str, t: torch.Tensor) -> None:
    """Tables are updated in place, so they cannot be copied: each row must be contiguous."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension (rows may be strided)")


def _block_d(D: int) -> Tuple[int, int]:
    """(BLOCK_D, num_warps): at most 256 elements per program (768 = 3 programs per row, no masked lanes),
    4 per thread (16-byte fp32 vectors); a narrow slice keeps the replay loop's any-lane reduction cheap."""
    block_d = max(16, min(256, triton.next_power_of_2(max(D, 1))))
    return block_d, max(1, min(4, block_d // 128))


def sparse_adamw_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    last_step: Optional[torch.Tensor] = None,
    lr_history: Optional[torch.Tensor] = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """AdamW on rows `rows` of `param` (and of its moments), in place; see the module docstring.

    param [N, D] fp32/bf16/fp16; exp_avg, exp_avg_sq [N, D] fp32 or bf16 (one dtype); rows [U] int64 (or
    int32), unique and ascending; grad [U, D] any float dtype; step >= 1. Exact mode: last_step int64 [N]
    (contiguous; updated to `step` at `rows`) and lr_history float64 [>= step - 1]. Tables need unit stride
    along D only. No host sync.
    """
    device = param.device
    _check("param", param, 2, PARAM_DTYPES, device)
    _check("exp_avg", exp_avg, 2, STATE_DTYPES, device)
    _check("exp_avg_sq", exp_avg_sq, 2, STATE_DTYPES, device)
    _check("rows", rows, 1, (torch.int64, torch.int32), device)
    _check("grad", grad, 2, GRAD_DTYPES, device)
    N, D = param.shape
    U = rows.shape[0]
    if exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape:
        raise ValueError(f"exp_avg {tuple(exp_avg.shape)} and exp_avg_sq {tuple(exp_avg_sq.shape)} must have the "
                         f"shape of param {tuple(param.shape)}")
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError(f"exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must share a dtype")
    if tuple(grad.shape) != (U, D):
        raise ValueError(f"grad must have shape [{U}, {D}] (one row per id in rows), got {tuple(grad.shape)}")
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based), got {step}")
    exact = last_step is not None
    if exact != (lr_history is not None):
        raise ValueError("exact mode needs both last_step and lr_history (lazy mode neither)")
    if exact:
        _check("last_step", last_step, 1, (torch.int64,), device)
        _check("lr_history", lr_history, 1, (torch.float64,), device)
        if last_step.shape[0] != N or not last_step.is_contiguous():
            raise ValueError(f"last_step must be a contiguous int64 tensor of {N} entries, got shape "
                             f"{tuple(last_step.shape)}")
        if lr_history.shape[0] < step - 1:
            raise ValueError(f"lr_history must hold the learning rates of steps 1 .. {step - 1}, got "
                             f"{lr_history.shape[0]} entries")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _unit_stride_d(name, t)
    if U > 0 and D > 0:
        rows_c = rows.contiguous()
        if grad.shape[1] > 1 and grad.stride(1) != 1:
            grad = grad.contiguous()
        if exact:
            decay_t, step_size_t, inv_sqrt_bc2_t, tail_t, b1_pow_t, b2_pow_t = _schedule(
                step, lr_history, beta1, beta2, weight_decay, device)
            last_t = last_step
        else:  # never read (EXACT=False compiles the replay out); any valid pointers
            decay_t = step_size_t = inv_sqrt_bc2_t = tail_t = b1_pow_t = b2_pow_t = last_t = param
        # fp32 scalars exactly as the C++ kernel forms them (float64 math rounded once; 1 - b in fp32, which
        # is exact from the fp32 b). Rounded here, so the interpreter (which keeps Python floats as float64
        # constants) and the compiled kernel (fp32 arguments) see the same values.
        b1, b2 = _as_f32(beta1), _as_f32(beta2)
        block_d, num_warps = _block_d(D)
        grid = (U, triton.cdiv(D, block_d))
        _sparse_adamw_kernel[grid](
            param, exp_avg, exp_avg_sq, rows_c, grad, last_t,
            decay_t, step_size_t, inv_sqrt_bc2_t, tail_t, b1_pow_t, b2_pow_t,
            N, D, step,
            param.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0), grad.stride(0),
            b1, b2, _as_f32(1.0 - b1), _as_f32(1.0 - b2), _as_f32(eps), _as_f32(1.0 - lr * weight_decay),
            _as_f32(lr / (1.0 - math.pow(beta1, step))), _as_f32(1.0 / math.sqrt(1.0 - math.pow(beta2, step))),
            _sr_key_arg(seed, step),
            EXACT=exact, EVEN_D=D % block_d == 0, BLOCK_D=block_d,
            SR=bool(stochastic_rounding) and param.dtype != torch.float32, IS_F16=param.dtype == torch.float16,
            num_warps=num_warps,
        )
    if exact and U > 0:
        # After the kernel (stream order): every program of a row has read the old value.
        last_step.index_fill_(0, rows.long(), step)


# ---------------------------------------------------------------------------------------------------------
# Stochastic rounding key; row-wise AdaGrad
# ---------------------------------------------------------------------------------------------------------


def _sr_key_arg(seed: int, step: int) -> int:
    """ops.reference.sr_key as a signed 32-bit value (a Python int that Triton passes as int32; the kernel
    bitcasts it to uint32)."""
    from ...ops.reference import sr_key

    key = sr_key(seed, step)
    return key - (1 << 32) if key >= (1 << 31) else key


@triton.jit
def _rowwise_adagrad_kernel(
    p_ptr, sum_ptr, rows_ptr, g_ptr,
    N, D, stride_p, stride_g,
    lr, eps, decay, key,
    BLOCK_D: tl.constexpr, SR: tl.constexpr, IS_F16: tl.constexpr,
):
    """One program per touched row: pass 1 sums g^2 in float64 over BLOCK_D slices; pass 2 updates the row."""
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u).to(tl.int64)
    ok = (row >= 0) & (row < N)  # an out-of-range id (the ops layer rejects it) is skipped, never written
    row = tl.where(ok, row, 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        g = tl.load(g_ptr + u * stride_g + offs, mask=ok & (offs < D), other=0.0).to(tl.float32).to(tl.float64)
        acc += g * g
    mean_sq = (tl.sum(acc, axis=0) / D).to(tl.float32)
    G = tl.load(sum_ptr + row, mask=ok, other=0.0) + mean_sq
    tl.store(sum_ptr + row, G, mask=ok)
    scale = tl.div_rn(tl.zeros_like(G) + lr, tl.sqrt_rn(G) + eps)  # lr, eps: fp32-rounded by the launcher
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        mask = ok & (offs < D)
        g = tl.load(g_ptr + u * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        p_ptrs = p_ptr + row * stride_p + offs
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        p = p * decay - scale * g
        tl.store(p_ptrs, _round_out(p, row, offs, key, p_ptr.dtype.element_ty, SR, IS_F16), mask=mask)


def sparse_rowwise_adagrad_step(
    param: torch.Tensor,
    state_sum: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float,
    weight_decay: float,
    step: int = 0,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """Row-wise AdaGrad (ops.reference.sparse_rowwise_adagrad_step) on rows `rows` of `param`, in place.

    param [N, D] fp32/bf16/fp16 (unit stride along D); state_sum fp32 [N] (contiguous); rows [U] int64/int32,
    unique; grad [U, D] any float dtype. The row's sum of squares is taken in float64, as the other backends do,
    so the fp32 accumulator agrees bit for bit. No host sync.
    """
    device = param.device
    _check("param", param, 2, PARAM_DTYPES, device)
    _check("state_sum", state_sum, 1, (torch.float32,), device)
    _check("rows", rows, 1, (torch.int64, torch.int32), device)
    _check("grad", grad, 2, GRAD_DTYPES, device)
    N, D = param.shape
    U = rows.shape[0]
    if state_sum.shape[0] != N or not state_sum.is_contiguous():
        raise ValueError(f"state_sum must be a contiguous fp32 tensor of {N} entries, got shape "
                         f"{tuple(state_sum.shape)}")
    if tuple(grad.shape) != (U, D):
        raise ValueError(f"grad must have shape [{U}, {D}] (one row per id in rows), got {tuple(grad.shape)}")
    _unit_stride_d("param", param)
    if U == 0:
        return
    if grad.shape[1] > 1 and grad.stride(1) != 1:
        grad = grad.contiguous()
    block_d = max(16, min(1024, triton.next_power_of_2(max(D, 1))))
    _rowwise_adagrad_kernel[(U,)](
        param, state_sum, rows.contiguous(), grad,
        N, D, param.stride(0), grad.stride(0),
        _as_f32(lr), _as_f32(eps), _as_f32(1.0 - lr * weight_decay), _sr_key_arg(seed, step),
        BLOCK_D=block_d, SR=bool(stochastic_rounding) and param.dtype != torch.float32,
        IS_F16=param.dtype == torch.float16, num_warps=max(1, min(8, block_d // 256)),
    )
