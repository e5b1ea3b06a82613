"""Triton sparse_adamw8bit_step (kernels/triton/adamw8bit.py) against the torch reference and the C++ op.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before this module
imports the kernel) on CPU tensors; with a GPU the same tests run compiled, and the `requires_cuda` tests at the
end add a realistic table and the no-host-sync check.

Standard: bit-identical. Codes, scales and parameters equal the reference's (and the C++ op's, itself bit-exact
with the reference: tests/test_optim_8bit.py) for fp32, bf16 and fp16 tables, with and without stochastic
rounding. The kernel follows the reference's operation order with correctly rounded division and sqrt, no fused
multiply-adds (enable_fp_fusion=False), round-half-even by the 1.5 * 2^23 trick and, for bf16 without stochastic
rounding, a round-to-nearest-even bit trick (the interpreter's own f32 -> bf16 cast truncates; the existing
Triton AdamW kernel is held to one bf16 ulp for that reason, this one to zero).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import cascadexml_fast as cx
from conftest import requires_cuda
from cascadexml_fast.kernels.triton import adamw8bit as tk
from cascadexml_fast.ops import optim as optim_module
from cascadexml_fast.ops import reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"

OPS = torch.ops.cascadexml_fast
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
HYPER = (1e-2, 0.9, 0.999, 1e-8, 0.1)  # lr, beta1, beta2, eps, weight_decay


def zero_state(param):
    codes_shape, scales_shape = optim_module.quantized_state_shapes(param)
    dev = param.device
    return [torch.full(codes_shape, 128, dtype=torch.uint8, device=dev), torch.zeros(scales_shape, device=dev),
            torch.zeros(codes_shape, dtype=torch.uint8, device=dev), torch.zeros(scales_shape, device=dev)]


def grads(U, D, step, gen):
    g = torch.randn(U, D, generator=gen) * torch.logspace(-4, 0, D)[torch.randperm(D, generator=gen)]
    if step % 3 == 0 and U:
        g[0] = 0  # a row whose gradient is exactly zero
    return g


def bits(t):
    return t.view(torch.int16) if t.dtype in (BF16, F16) else t


def assert_same(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits(a.cpu()), bits(b.cpu())), (a, b)


def run_steps(N, D, dtype, sr, steps=4, U=None, seed=0, hyper=HYPER):
    """The same sequence of steps by the Triton kernel and the reference (and, every step, compared)."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(N, D, generator=gen).to(dtype)
    ours = [param.to(DEV)] + zero_state(param.to(DEV))
    ref = [param.clone()] + zero_state(param)
    U = N // 2 + 1 if U is None else U
    for step in range(1, steps + 1):
        rows = torch.randperm(N, generator=gen)[:U].sort().values
        g = grads(U, D, step, gen).to(dtype)
        tk.sparse_adamw8bit_step(*ours, rows.to(DEV), g.to(DEV), step, *hyper, sr, 7)
        reference.sparse_adamw8bit_step(*ref, rows, g, step, *hyper, sr, 7)
        assert_same(ours, ref)
    return ours, ref


# ----------------------------------------------------------------------------------------- interpreter-sized


@pytest.mark.parametrize("D", [1, 5, 255, 256, 300, 513])
@pytest.mark.parametrize("dtype,sr", [(F32, False), (BF16, False), (BF16, True), (F16, False), (F16, True)])
def test_bit_identical_to_reference(D, dtype, sr):
    ours, _ = run_steps(11, D, dtype, sr, steps=3, seed=D)
    assert ours[1].ne(128).any() and ours[2].gt(0).any()  # the state really moved


def test_untouched_rows_keep_every_bit():
    N, D = 9, 300
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(N, D, generator=gen).to(DEV)
    state = zero_state(p)
    tk.sparse_adamw8bit_step(p, *state, torch.arange(N, device=DEV), torch.randn(N, D, device=DEV), 1, *HYPER)
    before = [t.clone() for t in [p] + state]
    rows = torch.tensor([2, 5, 8], device=DEV)
    tk.sparse_adamw8bit_step(p, *state, rows, torch.randn(3, D, device=DEV), 2, *HYPER)
    keep = torch.tensor([0, 1, 3, 4, 6, 7], device=DEV)
    for a, b in zip([p] + state, before):
        assert torch.equal(a[keep], b[keep]) and not torch.equal(a[rows], b[rows])


def test_ties_round_half_to_even():
    # beta1 = 0 makes m the gradient itself, so the codes' ties can be built: with absmax 127 * 2^-3, a gradient of
    # (k + 1/2) * 2^-3 maps to exactly k + 1/2 before rounding; both backends must round those to the even code.
    D = 20
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 127.0] * 2)[:D] / 8
    g = halves.unsqueeze(0).repeat(3, 1)
    t = (g[0] / g[0].abs().max()) * 127
    assert bool(((t - t.floor()) == 0.5).sum() >= 8)  # the ties are real
    hyper = (1e-2, 0.0, 0.999, 1e-8, 0.0)
    p = torch.zeros(3, D)
    ours = [p.to(DEV)] + zero_state(p.to(DEV))
    ref = [p.clone()] + zero_state(p)
    rows = torch.arange(3)
    tk.sparse_adamw8bit_step(*ours, rows.to(DEV), g.to(DEV), 1, *hyper)
    reference.sparse_adamw8bit_step(*ref, rows, g, 1, *hyper)
    assert_same(ours, ref)
    want = torch.round(t) + 128  # torch.round: half to even
    assert torch.equal(ours[1][0].cpu().float(), want)


def test_matches_cpp_op_over_many_steps_bf16_sr():
    # Longer run against the C++ op (and the reference, step by step) on a bf16 table with stochastic rounding.
    ours, ref = run_steps(14, 70, BF16, True, steps=12, U=6, seed=3)
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(14, 70, generator=gen).to(BF16)
    cpp = [param] + zero_state(param)
    for step in range(1, 13):
        rows = torch.randperm(14, generator=gen)[:6].sort().values
        OPS.sparse_adamw8bit_step(*cpp, rows, grads(6, 70, step, gen).to(BF16), step, *HYPER, True, 7)
    assert_same(ours, cpp)


@pytest.mark.parametrize("g_dtype", [torch.float64, BF16])
def test_strided_tables_and_any_grad_dtype(g_dtype):
    # Tables that are column slices of wider ones (row stride != D), a transposed (non-contiguous) grad of any
    # float dtype (fp64 rounded to fp32 once, as the C++ op's grad.to(float)).
    N, D = 7, 260
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(N, D, generator=gen)
    wide = [torch.zeros(N, D + 3, device=DEV), torch.zeros(N, D + 3, dtype=torch.uint8, device=DEV),
            torch.zeros(N, 4, device=DEV), torch.zeros(N, D + 3, dtype=torch.uint8, device=DEV),
            torch.zeros(N, 4, device=DEV)]
    wide[0][:, 1:D + 1] = p.to(DEV)
    wide[1][:, 1:D + 1] = 128
    views = [wide[0][:, 1:D + 1], wide[1][:, 1:D + 1], wide[2][:, 1:3], wide[3][:, 1:D + 1], wide[4][:, 1:3]]
    rows = torch.tensor([0, 3, 6])
    g = torch.randn(D, 3, generator=gen, dtype=g_dtype).t()
    assert not g.is_contiguous() and views[0].stride(0) == D + 3
    tk.sparse_adamw8bit_step(*views, rows.to(DEV), g.to(DEV), 1, *HYPER)
    ref = [p] + zero_state(p)
    reference.sparse_adamw8bit_step(*ref, rows, g.float(), 1, *HYPER)
    assert_same(views, ref)
    assert not wide[0][:, 0].any() and not wide[2][:, 0].any() and not wide[2][:, 3].any()  # outside: untouched


def test_empty_rows_and_zero_width():
    p = torch.randn(4, 6, device=DEV)
    state = zero_state(p)
    before = [t.clone() for t in [p] + state]
    tk.sparse_adamw8bit_step(p, *state, torch.empty(0, dtype=torch.long, device=DEV), torch.empty(0, 6, device=DEV),
                             1, *HYPER)
    assert all(torch.equal(a, b) for a, b in zip([p] + state, before))
    q = torch.empty(4, 0, device=DEV)
    tk.sparse_adamw8bit_step(q, *zero_state(q), torch.tensor([1], device=DEV), torch.empty(1, 0, device=DEV), 1,
                             *HYPER)


def test_out_of_range_row_is_skipped_not_written():
    N, D = 4, 3
    p = torch.randn(N + 1, D, device=DEV)
    table, guard = p[:N], p[N:].clone()
    state = zero_state(table)
    tk.sparse_adamw8bit_step(table, *state, torch.tensor([1, N], device=DEV), torch.ones(2, D, device=DEV), 1,
                             *HYPER)
    assert torch.equal(p[N:], guard) and state[1][1].gt(0).all() and state[1].gt(0).any(1).sum() == 1


def test_bad_inputs():
    p = torch.randn(5, 300, device=DEV)
    state = zero_state(p)
    rows, g = torch.tensor([1, 2], device=DEV), torch.randn(2, 300, device=DEV)
    with pytest.raises(ValueError, match=r"grad must have shape \[2, 300\]"):
        tk.sparse_adamw8bit_step(p, *state, rows, g[:, :5], 1, *HYPER)
    with pytest.raises(ValueError, match=r"exp_avg_scales must have shape \(5, 2\)"):
        tk.sparse_adamw8bit_step(p, state[0], state[1][:, :1], *state[2:], rows, g, 1, *HYPER)
    with pytest.raises(TypeError, match="exp_avg_codes must have dtype uint8"):
        tk.sparse_adamw8bit_step(p, state[0].float(), *state[1:], rows, g, 1, *HYPER)
    with pytest.raises(ValueError, match="exp_avg_sq_codes must have the shape of param"):
        tk.sparse_adamw8bit_step(p, *state[:2], state[2][:4], state[3], rows, g, 1, *HYPER)
    with pytest.raises(ValueError, match="step must be >= 1"):
        tk.sparse_adamw8bit_step(p, *state, rows, g, 0, *HYPER)
    with pytest.raises(ValueError, match="unit stride"):
        tk.sparse_adamw8bit_step(p.t().contiguous().t(), *state, rows, g, 1, *HYPER)
    with pytest.raises(ValueError, match="rows is on meta"):
        tk.sparse_adamw8bit_step(p, *state, rows.to("meta"), g, 1, *HYPER)


# ------------------------------------------------------------- the op's CUDA glue, on CPU under the interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests cover this path")
@pytest.mark.parametrize("dtype,sr", [(F32, False), (BF16, True)])
def test_sparse_adamw_uint8_state_through_the_glue_matches_cpp(dtype, sr):
    """SparseAdamW(state_dtype=torch.uint8) with the CUDA glue (-> Triton) registered as the op's CPU kernel,
    against the same optimizer on the C++ op: bit-identical tables and state after a few sparse steps."""
    assert optim_module._triton_8bit_kernels() is tk
    torch.manual_seed(0)
    start = torch.randn(30, 9).to(dtype)
    tables = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [cx.SparseAdamW([t], lr=0.05, weight_decay=0.01, state_dtype=torch.uint8, stochastic_rounding=sr, seed=5)
            for t in tables]
    batches = [(torch.randperm(30)[:7].sort().values, torch.randn(7, 9).to(dtype)) for _ in range(4)]
    for which, (table, opt) in enumerate(zip(tables, opts)):
        lib = torch.library.Library("cascadexml_fast", "IMPL")
        if which == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
                lib.impl("sparse_adamw8bit_step", optim_module._sparse_adamw8bit_step_cuda, "CPU")
        try:
            for rows, values in batches:
                table.grad = torch.sparse_coo_tensor(rows[None], values, (30, 9), check_invariants=True).coalesce()
                opt.step()
                opt.zero_grad()
        finally:
            lib._destroy()  # restores the C++ kernel
    assert torch.equal(bits(tables[0].detach()), bits(tables[1].detach()))
    s0, s1 = opts[0].state[tables[0]], opts[1].state[tables[1]]
    assert set(s0) == set(s1)
    for k in s0:
        if isinstance(s0[k], torch.Tensor):
            assert torch.equal(s0[k], s1[k]), k


# ------------------------------------------------------------------------------------------------ GPU only


@requires_cuda
@pytest.mark.parametrize("sr", [False, True])
def test_gpu_realistic_table_bit_identical_and_no_host_sync(sr):
    # Amazon-670K: a 670K x 768 bf16 table, 60K touched rows with a state from earlier steps; the C++ op runs on CPU
    # copies of the touched rows only (as a compact table, rows 0 .. U - 1: the same computation per row).
    N, D, U, step = 670_091, 768, 60_000, 50
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randperm(N, device="cuda", generator=g)[:U].sort().values
    p = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(BF16)
    state = zero_state(p)
    warm = torch.randperm(N, device="cuda", generator=g)[:200_000].sort().values
    tk.sparse_adamw8bit_step(p, *state, warm, (torch.randn(warm.numel(), D, device="cuda", generator=g) * 1e-3)
                             .to(BF16), step - 1, *HYPER, sr, 3)
    grad = (torch.randn(U, D, device="cuda", generator=g) * 1e-3).to(BF16)
    compact = [t[rows].cpu() for t in [p] + state]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS.sparse_adamw8bit_step(p, *state, rows, grad, step, *HYPER, sr, 3)  # the registered CUDA kernel
    finally:
        torch.cuda.set_sync_debug_mode("default")
    OPS.sparse_adamw8bit_step(*compact, torch.arange(U), grad.cpu(), step, *HYPER, sr, 3)
    assert_same([t[rows] for t in [p] + state], compact)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    tk.sparse_adamw8bit_step(p, *state, rows, grad, step + 1, *HYPER, sr, 3)
    end.record()
    torch.cuda.synchronize()
    print(f"sparse_adamw8bit_step bf16 sr={sr} U={U} D={D}: {start.elapsed_time(end):.3f} ms")


@requires_cuda
def test_gpu_row_offsets_past_2_31():
    # A 2.9M x 768 bf16 table (uint8 codes: 2.2 GB each): rows near the end sit past 2^31 elements.
    N, D = 2_900_000, 768
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GB of free GPU memory")
    p = torch.zeros(N, D, dtype=BF16, device="cuda")
    state = zero_state(p)
    rows = torch.tensor([5, N - 3, N - 1], device="cuda")
    assert int(rows[-1]) * D > 2**31
    grad = torch.ones(3, D, device="cuda")
    tk.sparse_adamw8bit_step(p, *state, rows, grad, 1, *HYPER)
    want = [torch.zeros(3, D, dtype=BF16)] + zero_state(torch.zeros(3, D))
    reference.sparse_adamw8bit_step(*want, torch.arange(3), grad.cpu(), 1, *HYPER)
    assert_same([t[rows] for t in [p] + state], want)
    assert int(torch.count_nonzero(p)) == 3 * D and int(state[1].ne(128).sum()) == 3 * D
