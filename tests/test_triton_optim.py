"""Triton sparse_adamw_step against the plain-PyTorch reference and the C++ CPU op.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before this module
imports the kernel) on CPU tensors; the C++ op `torch.ops.cascadexml_fast.sparse_adamw_step` runs on copies of
the same inputs. With a GPU the same tests run compiled (the C++ op on CPU copies), and the `requires_cuda`
tests at the end add realistic shapes.

Tolerances, keyed by the dtype an output is stored in:
- against the C++ op (same algorithm, same operation order): fp32 within a few ulps (under the interpreter
  the results are in fact bit-identical; compiled code contracts multiply-adds into FMAs); bf16 and fp16
  within one ulp of their storage (the interpreter truncates f32 -> bf16 where C++ rounds to nearest).
- against the reference (which replays every missed step, without the early stop, and decays m and v one
  step at a time): fp32 as tests/test_optim.py (1e-5 relative); bf16 / fp16 one ulp. Over gaps of thousands
  of steps the reference drifts further: it multiplies p by the fp32-rounded decay factor (1 - lr wd) once
  per step (up to 2^-25 relative error each time), where both kernels apply one float64 product, so the
  long-gap test allows gap * 2^-25 more (TOL_REF_LONG, for gaps up to 3000).
"""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

import cascadexml_fast as cx
from conftest import requires_cuda
from cascadexml_fast.kernels.triton import optim as tk
from cascadexml_fast.ops import reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"

OPS = torch.ops.cascadexml_fast
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ONE_ULP = {BF16: dict(rtol=8e-3, atol=1e-6), F16: dict(rtol=1e-3, atol=1e-6)}
TOL_CPP = {F32: dict(rtol=5e-6, atol=1e-7), **ONE_ULP}
TOL_REF = {F32: dict(rtol=1e-5, atol=1e-6), **ONE_ULP}
TOL_REF_LONG = {F32: dict(rtol=1e-5 + 3000 * 2**-25, atol=1e-6), **ONE_ULP}
BETAS = dict(beta1=0.9, beta2=0.999, eps=1e-8)
WD = 0.05


def make_case(N, D, rows, step, p_dtype=F32, s_dtype=F32, seed=0, device=DEV, p_scale=1.0):
    """(param, exp_avg, exp_avg_sq, last_step, lr_history) with every kind of touched row in `rows`:
    rows[0] never updated (last 0, m = v = 0), rows[1] updated last step (no gap), rows[2] the longest gap,
    rows[3] some m exactly 0 (those lanes skip the replay), rows[4] tiny m (its replay stops at once)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(N, D, generator=gen) * p_scale
    m = torch.randn(N, D, generator=gen) * 0.1
    v = torch.rand(N, D, generator=gen) * 0.01 + 1e-4
    last = torch.randint(1, step, (N,), generator=gen) if step > 1 else torch.zeros(N, dtype=torch.long)
    r = rows.tolist()
    if len(r) > 0:
        last[r[0]] = 0
    if len(r) > 1:
        last[r[1]] = step - 1
    if len(r) > 2:
        last[r[2]] = min(1, step - 1)
    if len(r) > 3:
        m[r[3], ::2] = 0
    if len(r) > 4:
        m[r[4]] *= 1e-9
    never = last == 0
    m[never] = 0
    v[never] = 0
    history = torch.linspace(0.02, 0.005, max(step, 1), dtype=F64)
    history[::3] *= 0.5  # an uneven schedule
    return (p.to(device, p_dtype), m.to(device, s_dtype), v.to(device, s_dtype), last.to(device),
            history.to(device))


def clone(ts):
    return tuple(t.clone() for t in ts)


def to_cpu(ts):
    return tuple(t.cpu().clone() for t in ts)


def run_all(state, rows, grad, step, exact, lr=None):
    """The same step by the Triton kernel, the C++ op (on CPU copies) and the reference (on CPU copies)."""
    p, m, v, last, history = state
    lr = float(history[step - 1]) if lr is None else lr
    args = (rows, grad, step, lr, BETAS["beta1"], BETAS["beta2"], BETAS["eps"], WD)
    out = {}
    for name in ("triton", "cpp", "reference"):
        if name == "triton":
            pt, mt, vt, lt, ht = clone(state)
            tk.sparse_adamw_step(pt, mt, vt, *args, *((lt, ht) if exact else (None, None)))
        else:
            pt, mt, vt, lt, ht = to_cpu(state)
            cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
            fn = OPS.sparse_adamw_step if name == "cpp" else reference.sparse_adamw_step
            fn(pt, mt, vt, *cpu_args, *((lt, ht) if exact else (None, None)))
        out[name] = tuple(t.cpu() for t in (pt, mt, vt, lt))
    return out


def check(out, state, rows, tol_ref=TOL_REF):
    got = out["triton"]
    for want, tol in ((out["cpp"], TOL_CPP), (out["reference"], tol_ref)):
        for a, b in zip(got[:3], want[:3]):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), **tol[a.dtype])
        assert torch.equal(got[3], want[3])  # last_step
    untouched = torch.ones(state[0].shape[0], dtype=torch.bool)
    untouched[rows.cpu()] = False
    for a, before in zip(got, to_cpu(state)):
        assert torch.equal(a[untouched], before[untouched])  # bit for bit


# ----------------------------------------------------------------------------------------- interpreter-sized


@pytest.mark.parametrize("mode", ["lazy", "exact"])
@pytest.mark.parametrize("p_dtype", [F32, BF16, F16])
@pytest.mark.parametrize("s_dtype", [F32, BF16])
@pytest.mark.parametrize("D", [1, 7, 130])
def test_matches_reference_and_cpp_op(mode, p_dtype, s_dtype, D):
    N, step = 23, 20
    rows = torch.tensor([0, 3, 4, 9, 10, 17, 22], device=DEV)
    state = make_case(N, D, rows, step, p_dtype, s_dtype, seed=D)
    grad = torch.randn(rows.numel(), D, device=DEV).to(p_dtype)  # grad in the table's dtype, as autograd gives
    out = run_all(state, rows, grad, step, exact=mode == "exact")
    check(out, state, rows)
    if mode == "exact":
        assert out["triton"][3][rows.cpu()].eq(step).all()


@pytest.mark.parametrize("D", [300, 512])
@pytest.mark.parametrize("p_dtype", [F32, BF16])
def test_several_blocks_per_row(D, p_dtype):
    # D > BLOCK_D (256): several programs per row; 512 is a multiple of it (EVEN_D, no masks along D).
    N, step = 12, 9
    rows = torch.tensor([1, 2, 5, 6, 8, 11], device=DEV)
    state = make_case(N, D, rows, step, p_dtype, F32, seed=1)
    grad = torch.randn(rows.numel(), D, device=DEV)
    check(run_all(state, rows, grad, step, exact=True), state, rows)


def test_long_gaps_stop_early_and_decay_the_rest():
    # Gaps of thousands of steps: each lane's replay stops once the momentum's move is <= 2^-30 |p| (a few
    # hundred steps at lr 1e-3), and the rest is one float64 decay product plus beta^missed. Under the
    # interpreter a replay of every step would take minutes; the early stop makes it a second.
    N, D, step = 6, 9, 3000
    rows = torch.tensor([0, 1, 2, 3, 4, 5], device=DEV)
    state = list(make_case(N, D, rows, step, seed=3))
    state[4] = torch.full((step,), 1e-3, dtype=F64, device=DEV)  # lr_history
    state[4][1000:] = 5e-4
    state[3][3:] = torch.tensor([2000, 500, 2990], device=DEV)  # last_step: gaps 999, 2499, 9
    state = tuple(state)
    grad = torch.randn(rows.numel(), D, device=DEV)
    start = time.perf_counter()
    out = run_all(state, rows, grad, step, exact=True)
    check(out, state, rows, TOL_REF_LONG)
    if DEV == "cpu":
        assert time.perf_counter() - start < 60, "the replay did not stop early"


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_empty_rows_change_nothing(mode):
    N, D, step = 5, 7, 4
    rows = torch.empty(0, dtype=torch.long, device=DEV)
    state = make_case(N, D, rows, step, BF16, BF16)
    # (Not against the reference: in exact mode it fails on empty rows, `zeros_like(p[0])`.)
    p, m, v, last, history = got = clone(state)
    cpp = to_cpu(state)
    ex = mode == "exact"
    args = (torch.empty(0, D, device=DEV), step, 0.01, 0.9, 0.999, 1e-8, WD)
    tk.sparse_adamw_step(p, m, v, rows, *args, *((last, history) if ex else (None, None)))
    OPS.sparse_adamw_step(*cpp[:3], rows.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                          *((cpp[3], cpp[4]) if ex else (None, None)))
    for a, b, c in zip(got, cpp, to_cpu(state)):
        assert torch.equal(a.cpu(), c) and torch.equal(b, c)


def test_zero_width_table_still_records_the_step():
    N, step = 5, 4
    rows = torch.tensor([1, 3], device=DEV)
    p, m, v, last, history = make_case(N, 0, rows, step)
    before = last.clone()
    tk.sparse_adamw_step(p, m, v, rows, torch.empty(2, 0, device=DEV), step, 0.01, 0.9, 0.999, 1e-8, WD,
                         last, history)
    before[rows] = step
    assert torch.equal(last, before)


def test_first_step_exact_equals_lazy():
    # step 1: nothing to replay (lr_history may be empty); exact and lazy give the same update.
    N, D = 6, 5
    rows = torch.tensor([0, 2, 5], device=DEV)
    p, m, v, last, _ = make_case(N, D, rows, 1)
    history = torch.empty(0, dtype=F64, device=DEV)
    grad = torch.randn(3, D, device=DEV)
    lazy, exact = (p.clone(), m.clone(), v.clone()), (p.clone(), m.clone(), v.clone())
    tk.sparse_adamw_step(*lazy, rows, grad, 1, 0.01, 0.9, 0.999, 1e-8, WD)
    tk.sparse_adamw_step(*exact, rows, grad, 1, 0.01, 0.9, 0.999, 1e-8, WD, last, history)
    for a, b in zip(lazy, exact):
        assert torch.equal(a, b)
    assert last[rows].eq(1).all() and last.sum() == 3
    cpp = to_cpu((p, m, v))
    OPS.sparse_adamw_step(*cpp, rows.cpu(), grad.cpu(), 1, 0.01, 0.9, 0.999, 1e-8, WD, None, None)
    for a, b in zip(lazy, cpp):
        torch.testing.assert_close(a.cpu(), b, **TOL_CPP[F32])


@pytest.mark.parametrize("g_dtype", [F64, BF16])
def test_strided_tables_and_any_grad_dtype(g_dtype):
    # Tables that are column slices of wider ones (row stride != D) are updated in place; grad of any float
    # dtype, here also non-contiguous, is upcast (or rounded) to fp32 as the C++ op does.
    N, D, step = 9, 6, 7
    rows = torch.tensor([0, 2, 3, 4, 8], device=DEV)
    p, m, v, last, history = make_case(N, D, rows, step)
    wide = [torch.zeros(N, D + 5, device=DEV, dtype=t.dtype) for t in (p, m, v)]
    for w, t in zip(wide, (p, m, v)):
        w[:, 2:2 + D] = t
    views = tuple(w[:, 2:2 + D] for w in wide)
    grad = torch.randn(D, rows.numel(), device=DEV, dtype=g_dtype).t()
    assert not grad.is_contiguous() and views[0].stride(0) == D + 5
    tk.sparse_adamw_step(*views, rows, grad, step, 0.01, 0.9, 0.999, 1e-8, WD, last.clone(), history)
    want = to_cpu((p, m, v, last))
    OPS.sparse_adamw_step(*want[:3], rows.cpu(), grad.cpu().float(), step, 0.01, 0.9, 0.999, 1e-8, WD, want[3],
                          history.cpu())
    for w, b in zip(wide, want):
        torch.testing.assert_close(w[:, 2:2 + D].cpu(), b, **TOL_CPP[F32])
        assert not w[:, :2].any() and not w[:, 2 + D:].any()  # the rest of the wide tables untouched


def test_out_of_range_row_is_skipped_not_written():
    # The ops layer rejects such ids (with a host sync); the kernel itself must never write out of bounds.
    N, D = 4, 3
    p = torch.randn(N + 1, D, device=DEV)
    table, guard = p[:N], p[N:].clone()
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    tk.sparse_adamw_step(table, m, v, torch.tensor([1, N], device=DEV), torch.ones(2, D, device=DEV), 1, 0.1,
                         0.9, 0.999, 1e-8, 0.0)
    assert torch.equal(p[N:], guard) and m[1].ne(0).all() and m.sum(1).ne(0).sum() == 1


def test_bad_inputs():
    p, m, v, last, history = make_case(8, 3, torch.tensor([1]), 5)
    rows, grad = torch.tensor([1, 2], device=DEV), torch.randn(2, 3, device=DEV)
    args = (5, 0.1, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(ValueError, match=r"grad must have shape \[2, 3\]"):
        tk.sparse_adamw_step(p, m, v, rows, torch.randn(3, 3, device=DEV), *args)
    with pytest.raises(TypeError, match="exp_avg must have dtype"):
        tk.sparse_adamw_step(p, m.half(), v, rows, grad, *args)
    with pytest.raises(TypeError, match="share a dtype"):
        tk.sparse_adamw_step(p, m, v.bfloat16(), rows, grad, *args)
    with pytest.raises(ValueError, match="step must be >= 1"):
        tk.sparse_adamw_step(p, m, v, rows, grad, 0, *args[1:])
    with pytest.raises(ValueError, match="both last_step and lr_history"):
        tk.sparse_adamw_step(p, m, v, rows, grad, *args, last_step=last)
    with pytest.raises(ValueError, match="lr_history must hold the learning rates of steps 1 .. 4"):
        tk.sparse_adamw_step(p, m, v, rows, grad, *args, last_step=last, lr_history=history[:3])
    with pytest.raises(ValueError, match="last_step must be a contiguous int64 tensor of 8 entries"):
        tk.sparse_adamw_step(p, m, v, rows, grad, *args, last_step=last[:4], lr_history=history)
    with pytest.raises(ValueError, match="unit stride"):
        tk.sparse_adamw_step(p.t().contiguous().t(), m, v, rows, grad, *args)
    with pytest.raises(ValueError, match="rows is on meta"):
        tk.sparse_adamw_step(p, m, v, rows.to("meta"), grad, *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the op's CUDA kernel takes this path")
def test_sparse_adamw_on_the_triton_kernel_equals_dense_adamw():
    # The whole user path (SparseAdamW -> op -> kernel, lr_history growing, a StepLR schedule) with the Triton
    # launcher registered as the op's CPU kernel for the duration of the test. Rows are touched on a random
    # subset of steps; "exact" must end where dense torch.optim.AdamW does.
    lib = torch.library.Library("cascadexml_fast", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("sparse_adamw_step", tk.sparse_adamw_step, "CPU")
    try:
        torch.manual_seed(0)
        N, D, steps = 25, 6, 12
        layer = cx.ShortlistedLinear(N, D, bias=False, sparse_grad=True)
        dense = torch.nn.Parameter(layer.weight.detach().clone())
        ours = cx.SparseAdamW([layer.weight], lr=0.02, weight_decay=0.1, mode="exact")
        theirs = torch.optim.AdamW([dense], lr=0.02, weight_decay=0.1)
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (ours, theirs)]
        for step in range(steps):
            idx = torch.randint(0, N, (2, 4)) if step < steps - 1 else torch.arange(N).expand(1, N)
            x, c = torch.randn(idx.shape[0], D), torch.randn(idx.shape)
            (layer(x, idx) * c).sum().backward()
            (torch.einsum("bkd,bd->bk", dense[idx], x) * c).sum().backward()
            for o in (ours, theirs):
                o.step()
                o.zero_grad()
            for s in schedulers:
                s.step()
        torch.testing.assert_close(layer.weight.detach(), dense.detach(), rtol=2e-5, atol=2e-6)
        assert ours.state[layer.weight]["last_step"].eq(steps).all()
    finally:
        lib._destroy()  # restores the C++ kernel


# ------------------------------------------------------------------------------------------------ GPU only


def _gpu_case(N, D, U, step, s_dtype):
    """A realistic table: bf16 params of init scale, most touched rows seen a few steps ago, some never."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randperm(N, device="cuda", generator=g)[:U].sort().values
    p = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(BF16)
    m = torch.zeros(N, D, device="cuda", dtype=s_dtype)
    v = torch.zeros(N, D, device="cuda", dtype=s_dtype)
    last = torch.zeros(N, dtype=torch.long, device="cuda")
    seen = rows[torch.rand(U, device="cuda", generator=g) < 0.8]
    gaps = torch.randint(1, 40, (seen.numel(),), device="cuda", generator=g)
    gaps[::50] = torch.randint(40, step, (gaps[::50].numel(),), device="cuda", generator=g)  # long gaps too
    last[seen] = step - gaps
    m[seen] = (torch.randn(seen.numel(), D, device="cuda", generator=g) * 1e-3).to(s_dtype)
    v[seen] = (torch.rand(seen.numel(), D, device="cuda", generator=g) * 1e-6).to(s_dtype)
    history = torch.full((step,), 1e-3, dtype=F64, device="cuda")
    grad = (torch.randn(U, D, device="cuda", generator=g) * 1e-3).to(BF16)
    return (p, m, v, last, history), rows, grad


@requires_cuda
@pytest.mark.parametrize("mode", ["lazy", "exact"])
@pytest.mark.parametrize("s_dtype", [F32, BF16])
def test_gpu_realistic_table(mode, s_dtype):
    # Amazon-670K: a 670K x 768 bf16 table, 60K touched rows; the C++ op runs on CPU copies of the touched
    # rows only (as a compact table, rows 0 .. U - 1), which is the same computation.
    N, D, U, step = 670_091, 768, 60_000, 1000
    state, rows, grad = _gpu_case(N, D, U, step, s_dtype)
    exact = mode == "exact"
    p, m, v, last, history = state
    compact = tuple(t[rows].cpu() for t in (p, m, v, last))
    ex = (last, history) if exact else (None, None)
    tk.sparse_adamw_step(p, m, v, rows, grad, step, 1e-3, 0.9, 0.999, 1e-8, WD, *ex)
    torch.cuda.synchronize()
    cpu_ex = (compact[3], history.cpu()) if exact else (None, None)
    OPS.sparse_adamw_step(*compact[:3], torch.arange(U), grad.cpu(), step, 1e-3, 0.9, 0.999, 1e-8, WD, *cpu_ex)
    for t, want in zip((p, m, v), compact[:3]):
        torch.testing.assert_close(t[rows].cpu().float(), want.float(), **TOL_CPP[t.dtype])
    if exact:
        assert last[rows].eq(step).all()

    # No host sync on the hot path (the schedule tables are cached by now), and a rough timing.
    state2, rows2, grad2 = _gpu_case(N, D, U, step, s_dtype)
    ex2 = (state2[3], state2[4]) if exact else (None, None)
    torch.cuda.set_sync_debug_mode("error")
    try:
        tk.sparse_adamw_step(*state2[:3], rows2, grad2, step, 1e-3, 0.9, 0.999, 1e-8, WD, *ex2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    tk.sparse_adamw_step(*state2[:3], rows2, grad2, step + 1, 1e-3, 0.9, 0.999, 1e-8, WD, *ex2)
    end.record()
    torch.cuda.synchronize()
    print(f"sparse_adamw_step {mode} {s_dtype}: {start.elapsed_time(end):.3f} ms")


@requires_cuda
def test_gpu_row_offsets_past_2_31():
    # 2.9M x 768 bf16 table and bf16 moments (3 x 4.5 GB): rows near the end sit past 2^31 elements.
    N, D = 2_900_000, 768
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs ~16 GB of free GPU memory")
    p = torch.zeros(N, D, dtype=BF16, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    rows = torch.tensor([5, N - 3, N - 1], device="cuda")
    assert int(rows[-1]) * D > 2**31
    p[rows] = 1.0
    grad = torch.ones(3, D, device="cuda")
    last, history = torch.zeros(N, dtype=torch.long, device="cuda"), torch.full((3,), 1e-2, dtype=F64,
                                                                                 device="cuda")
    tk.sparse_adamw_step(p, m, v, rows, grad, 4, 1e-2, 0.9, 0.999, 1e-8, WD, last, history)
    want = (torch.ones(3, D, dtype=BF16), torch.zeros(3, D, dtype=BF16), torch.zeros(3, D, dtype=BF16))
    OPS.sparse_adamw_step(*want, torch.arange(3), grad.cpu(), 4, 1e-2, 0.9, 0.999, 1e-8, WD,
                          torch.zeros(3, dtype=torch.long), history.cpu())
    for t, w in zip((p, m, v), want):
        torch.testing.assert_close(t[rows].cpu().float(), w.float(), **ONE_ULP[BF16])
    assert int(torch.count_nonzero(p)) == 3 * D and int(torch.count_nonzero(m)) == 3 * D
