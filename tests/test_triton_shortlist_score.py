"""Triton kernels of shortlist_score and its gradients against the plain-PyTorch reference.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before this module
imports the kernels), on CPU tensors, with small odd shapes: the interpreter is slow. With a GPU the same tests
run compiled, and the `requires_cuda` tests below add large shapes.

Tolerances (one dict, keyed by the lowest-precision storage dtype among the inputs). The reference is always
computed on the *same* stored inputs (bf16/fp16 values upcast to fp32), so only the fp32 accumulation order
differs between kernel and reference: 1e-5 for fp32 storage, 1e-4 for bf16/fp16 storage (their values, and
so the sums, are larger relative to fp32's last bits after a few additions; 1e-4 leaves headroom).

Not tested here: int64 row offsets beyond 2^31 elements would need a table of more than 2^31 elements (8 GiB in
fp32); on CPU that is out of reach, so the kernels cast ids to int64 before multiplying by the row stride (see
the kernel source) and the GPU-only `test_gpu_row_offsets_past_2_31` checks it on a 2.2e9-element bf16 table.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import requires_cuda
from cascadexml_fast.kernels.triton import shortlist_score as tk
from cascadexml_fast.ops import reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    # The kernels can only run on CPU tensors under the interpreter; conftest.py must have set this first.
    assert os.environ.get("TRITON_INTERPRET") == "1"

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
TOL = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=1e-4, atol=1e-4), F16: dict(rtol=1e-4, atol=1e-4)}
N = 50  # table rows for the small tests


def tol(*dtypes):
    """Tolerance of the least precise storage dtype present."""
    for dt in (BF16, F16):
        if dt in dtypes:
            return TOL[dt]
    return TOL[F32]


def make_idx(B, K, n=N, dtype=torch.int64, device=DEV):
    """Random ids with pads (-1) and forced duplicates, within a row and across rows."""
    idx = torch.randint(0, n, (B, K))
    idx[torch.rand(B, K) < 0.25] = -1
    if B >= 1 and K >= 3:
        idx[:, 0] = idx[:, 0].clamp(min=3)
        idx[1:, 0] = idx[0, 0]  # duplicate across rows ...
        idx[:, 1] = idx[:, 2] = idx[:, 0]  # ... and within each row
    if B >= 1 and K >= 2:
        idx[0, K - 1] = -1  # at least one pad
    return idx.to(dtype=dtype, device=device)


def rand(*shape, dtype=F32):
    return torch.randn(*shape, device=DEV).to(dtype)


def assert_scores_equal(got, want, **tolerance):
    """Pads must be exactly -inf in both; finite entries within tolerance."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    pads = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), pads)
    torch.testing.assert_close(got[~pads], want[~pads], **tolerance)


# (B, K, D): none a multiple of the block sizes; the last has several D chunks (fp32 BLOCK_D is 128, bf16 256)
# and, for the gradient of x, several K chunks.
SHAPES = [(1, 1, 1), (3, 7, 37), (5, 33, 70), (2, 150, 300)]


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("B,K,D", SHAPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_shapes_and_id_dtypes(B, K, D, id_dtype):
    x, w, b = rand(B, D), rand(N, D), rand(N)
    idx = make_idx(B, K, dtype=id_dtype)
    assert_scores_equal(tk.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx), **TOL[F32])


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("b_dtype", DTYPES + [None])
def test_forward_dtype_combinations(x_dtype, w_dtype, b_dtype):
    B, K, D = 3, 7, 37
    x, w = rand(B, D, dtype=x_dtype), rand(N, D, dtype=w_dtype)
    b = rand(N, dtype=b_dtype) if b_dtype is not None else None
    idx = make_idx(B, K, dtype=torch.int32)
    assert_scores_equal(tk.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx),
                        **tol(x_dtype, w_dtype, b_dtype))


def test_forward_even_d_path_and_strided_rows():
    # D = 256 (two chunks of 128) takes the unmasked (EVEN_D) loads; W is a row slice of a wider table (row
    # stride != D), which the launcher must not copy, and x is a transposed view (not unit-stride), which it
    # must copy.
    B, K, D = 3, 9, 256
    big = rand(N, D + 5)
    w = big[:, 2:D + 2]
    x = rand(D, B).t()
    b = rand(N)
    idx = make_idx(B, K)
    assert w.stride(0) == D + 5 and x.stride(1) != 1
    assert_scores_equal(tk.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx), **TOL[F32])


def test_forward_pads_and_nan_isolation():
    B, K, D = 3, 7, 5
    x, w, b = rand(B, D), rand(N, D), rand(N)
    idx = make_idx(B, K)
    idx[2, :] = -1  # a fully padded document
    x[1, 3] = float("nan")
    s = tk.shortlist_score(x, w, b, idx)
    assert torch.isneginf(s[idx < 0]).all()  # pads exactly -inf, NaN doc included
    assert torch.isnan(s[1][idx[1] >= 0]).all()  # NaN reaches its own document ...
    assert torch.isfinite(s[0][idx[0] >= 0]).all()  # ... and no other
    ref = reference.shortlist_score(x, w, b, idx)
    torch.testing.assert_close(s, ref, equal_nan=True, **TOL[F32])


def test_forward_empty_and_degenerate():
    w, b = rand(N, 37), rand(N)
    assert tk.shortlist_score(rand(0, 37), w, b, make_idx(0, 4)).shape == (0, 4)
    assert tk.shortlist_score(rand(3, 37), w, b, make_idx(3, 0)).shape == (3, 0)
    allpad = torch.full((3, 5), -1, dtype=torch.int64, device=DEV)
    s = tk.shortlist_score(rand(3, 37), w, b, allpad)
    assert s.dtype == F32 and torch.isneginf(s).all()
    # D = 0: the dot products are empty, the scores are the biases
    idx = make_idx(3, 5)
    for bias in (b, None):
        assert_scores_equal(tk.shortlist_score(rand(3, 0), rand(N, 0), bias, idx),
                            reference.shortlist_score(rand(3, 0), rand(N, 0), bias, idx), **TOL[F32])


# ------------------------------------------------------------------------------------------------ gradients


def grad_for(idx, dtype=F32):
    """Upstream gradient with NaN at the pads: a kernel that lets pads contribute fails loudly."""
    g = rand(*idx.shape, dtype=dtype)
    return g.masked_fill(idx < 0, float("nan"))


def scatter_rows(rows, dw_rows, db_rows, num_rows):
    dw = torch.zeros(num_rows, dw_rows.shape[1], dtype=F32, device=dw_rows.device)
    db = torch.zeros(num_rows, dtype=F32, device=dw_rows.device)
    dw[rows] = dw_rows
    db[rows] = db_rows
    return dw, db


def check_all_grads(g, w, x, idx, tolerance, num_rows=N):
    dx = tk.shortlist_score_grad_input(g, w, idx)
    torch.testing.assert_close(dx, reference.shortlist_score_grad_input(g, w, idx), **tolerance)
    dw_ref, db_ref = reference.shortlist_score_grad_weight(g, x, idx, num_rows)
    for det in (False, True):
        dw, db = tk.shortlist_score_grad_weight(g, x, idx, num_rows, deterministic=det)
        assert dw.dtype == db.dtype == F32 and dw.shape == dw_ref.shape and db.shape == db_ref.shape
        torch.testing.assert_close(dw, dw_ref, **tolerance)
        torch.testing.assert_close(db, db_ref, **tolerance)
    rows, dw_rows, db_rows = tk.shortlist_score_grad_weight_rows(g, x, idx)
    rows_ref, dw_rows_ref, db_rows_ref = reference.shortlist_score_grad_weight_rows(g, x, idx)
    assert rows.dtype == torch.int64 and torch.equal(rows, rows_ref)
    torch.testing.assert_close(dw_rows, dw_rows_ref, **tolerance)
    torch.testing.assert_close(db_rows, db_rows_ref, **tolerance)


@pytest.mark.parametrize("B,K,D", SHAPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_grads_shapes_and_id_dtypes(B, K, D, id_dtype):
    idx = make_idx(B, K, dtype=id_dtype)
    check_all_grads(grad_for(idx), rand(N, D), rand(B, D), idx, TOL[F32])


@pytest.mark.parametrize("data_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", [F32, BF16])
def test_grads_dtype_combinations(data_dtype, grad_dtype):
    B, K, D = 3, 7, 37
    idx = make_idx(B, K, dtype=torch.int32)
    check_all_grads(grad_for(idx, grad_dtype), rand(N, D, dtype=data_dtype), rand(B, D, dtype=data_dtype), idx,
                    tol(data_dtype, grad_dtype))


def test_grads_even_d_and_strided_rows():
    B, K, D = 3, 9, 256
    idx = make_idx(B, K)
    w = rand(N, D + 3)[:, :D]
    x = rand(B, D + 7)[:, 7:]
    check_all_grads(grad_for(idx), w, x, idx, TOL[F32])


def test_grads_duplicates_are_summed():
    # One row used five times (three times in doc 0, twice in doc 1), another once: exact small-integer sums.
    idx = torch.tensor([[4, 4, 7, 4], [-1, 4, 4, -1]], device=DEV)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [float("nan"), 5.0, 6.0, float("nan")]], device=DEV)
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]], device=DEV)
    want_dw4 = 7.0 * x[0] + 11.0 * x[1]
    for det in (False, True):
        dw, db = tk.shortlist_score_grad_weight(g, x, idx, 9, deterministic=det)
        assert torch.equal(dw[4], want_dw4) and torch.equal(dw[7], 3.0 * x[0])
        assert torch.equal(db, torch.tensor([0, 0, 0, 0, 18.0, 0, 0, 3.0, 0], device=DEV))
        assert (dw[[0, 1, 2, 3, 5, 6, 8]] == 0).all()
    rows, dw_rows, db_rows = tk.shortlist_score_grad_weight_rows(g, x, idx)
    assert rows.tolist() == [4, 7]
    assert torch.equal(dw_rows, torch.stack([want_dw4, 3.0 * x[0]]))
    assert db_rows.tolist() == [18.0, 3.0]
    dx = tk.shortlist_score_grad_input(g, torch.arange(27.0, device=DEV).reshape(9, 3), idx)
    assert torch.isfinite(dx).all()  # NaN grads at the pads contribute nothing


def test_grads_hot_row():
    # One id taken 50 times: its segment spans several BLOCK_E chunks of the segment-reduce kernel.
    B, K, D = 5, 33, 37
    idx = make_idx(B, K)
    idx[:, 3:13] = 7
    check_all_grads(grad_for(idx), rand(N, D), rand(B, D), idx, TOL[F32])


def test_deterministic_dense_is_bitwise_and_matches_rows():
    B, K, D = 5, 33, 70
    idx = make_idx(B, K)
    g, x = grad_for(idx), rand(B, D)
    dw1, db1 = tk.shortlist_score_grad_weight(g, x, idx, N, deterministic=True)
    dw2, db2 = tk.shortlist_score_grad_weight(g, x, idx, N, deterministic=True)
    assert torch.equal(dw1, dw2) and torch.equal(db1, db2)
    # Same kernel, same order: the row-sparse result scattered into a dense buffer is bit-identical.
    dw3, db3 = scatter_rows(*tk.shortlist_score_grad_weight_rows(g, x, idx), N)
    assert torch.equal(dw1, dw3) and torch.equal(db1, db3)
    # The atomic path agrees within rounding.
    dw4, db4 = tk.shortlist_score_grad_weight(g, x, idx, N, deterministic=False)
    torch.testing.assert_close(dw4, dw1, **TOL[F32])
    torch.testing.assert_close(db4, db1, **TOL[F32])


def test_deterministic_algorithms_flag_selects_sorted_path(monkeypatch):
    calls = []
    real = tk._launch_segment_reduce

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dense", args[-1] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "_launch_segment_reduce", spy)
    idx = make_idx(3, 7)
    g, x = grad_for(idx), rand(3, 37)
    tk.shortlist_score_grad_weight(g, x, idx, N)
    assert calls == []  # default: atomics
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        dw, db = tk.shortlist_score_grad_weight(g, x, idx, N)
    finally:
        torch.use_deterministic_algorithms(before)
    assert calls == [True]
    dw_ref, db_ref = reference.shortlist_score_grad_weight(g, x, idx, N)
    torch.testing.assert_close(dw, dw_ref, **TOL[F32])
    torch.testing.assert_close(db, db_ref, **TOL[F32])


def test_grads_empty_and_degenerate():
    D = 37
    w = rand(N, D)
    for B, K in ((0, 4), (3, 0)):
        idx = make_idx(B, K)
        g, x = rand(B, K), rand(B, D)
        dx = tk.shortlist_score_grad_input(g, w, idx)
        assert dx.shape == (B, D) and dx.dtype == F32 and (dx == 0).all()
        for det in (False, True):
            dw, db = tk.shortlist_score_grad_weight(g, x, idx, N, deterministic=det)
            assert dw.shape == (N, D) and db.shape == (N,) and (dw == 0).all() and (db == 0).all()
        rows, dw_rows, db_rows = tk.shortlist_score_grad_weight_rows(g, x, idx)
        assert rows.shape == (0,) and rows.dtype == torch.int64 and dw_rows.shape == (0, D) and db_rows.shape == (0,)
    # all pads: no gradient anywhere, even with NaN upstream
    idx = torch.full((3, 5), -1, dtype=torch.int32, device=DEV)
    g, x = grad_for(idx), rand(3, D)
    assert (tk.shortlist_score_grad_input(g, w, idx) == 0).all()
    for det in (False, True):
        dw, db = tk.shortlist_score_grad_weight(g, x, idx, N, deterministic=det)
        assert (dw == 0).all() and (db == 0).all()
    rows, dw_rows, db_rows = tk.shortlist_score_grad_weight_rows(g, x, idx)
    assert rows.numel() == 0 and dw_rows.shape == (0, D) and db_rows.numel() == 0
    # D = 0: dW is empty but dbias is not
    idx = make_idx(3, 7)
    check_all_grads(grad_for(idx), rand(N, 0), rand(3, 0), idx, TOL[F32])


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    B=st.integers(0, 5), K=st.integers(0, 40), D=st.integers(0, 300), n=st.integers(1, 60),
    id_dtype=st.sampled_from([torch.int32, torch.int64]),
    x_dtype=st.sampled_from(DTYPES), w_dtype=st.sampled_from(DTYPES), b_dtype=st.sampled_from(DTYPES + [None]),
    pad=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_all_launchers(B, K, D, n, id_dtype, x_dtype, w_dtype, b_dtype, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (B, K), generator=gen)
    idx[torch.rand(B, K, generator=gen) < pad] = -1
    idx = idx.to(device=DEV, dtype=id_dtype)
    x = torch.randn(B, D, generator=gen).to(device=DEV, dtype=x_dtype)
    w = torch.randn(n, D, generator=gen).to(device=DEV, dtype=w_dtype)
    b = torch.randn(n, generator=gen).to(device=DEV, dtype=b_dtype) if b_dtype is not None else None
    g = torch.randn(B, K, generator=gen).to(DEV).masked_fill(idx < 0, float("nan"))
    assert_scores_equal(tk.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx),
                        **tol(x_dtype, w_dtype, b_dtype))
    check_all_grads(g, w, x, idx, tol(x_dtype, w_dtype), num_rows=n)


# ------------------------------------------------------------------------------------------------ compiled

# Compiles every kernel for Hopper (sm_90) with the installed Triton, no GPU needed, and checks that the
# EVEN_D row loads along D became 16-byte vector loads. The interpreter never compiles, so this is the CPU's
# only evidence that the compiled path type-checks. Runs in a subprocess without TRITON_INTERPRET; the
# argument attributes mimic a launch with D = 768 (Triton marks integers divisible by 16 and aligned pointers).
_COMPILE_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cascadexml_fast.kernels.triton import shortlist_score as tk

def compile_ptx(kernel, ptr_types, constexprs, num_warps=4):
    names = kernel.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name == "D" or name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

out = []
for st, bd in (("fp32", 128), ("bf16", 256)):
    for ids in ("i32", "i64"):
        ptx = compile_ptx(tk._score_fwd_kernel,
            dict(x_ptr=st, w_ptr=st, bias_ptr=st, idx_ptr=ids, out_ptr="fp32", scale_ptr="fp32"),
            dict(HAS_BIAS=True, EVEN_D=True, BLOCK_K=4096 // bd, BLOCK_D=bd, HAS_SCALE=False))
        out.append(("fwd", st, ids, "ld.global.v4" in ptx))
    ptx = compile_ptx(tk._score_fwd_kernel,
        dict(x_ptr=st, w_ptr=st, bias_ptr=st, idx_ptr="i64", out_ptr="fp32", scale_ptr="fp32"),
        dict(HAS_BIAS=False, EVEN_D=False, BLOCK_K=8, BLOCK_D=bd, HAS_SCALE=False), num_warps=2)
    ptx = compile_ptx(tk._score_grad_input_kernel,
        dict(grad_ptr="fp32", w_ptr=st, idx_ptr="i32", out_ptr="fp32", scale_ptr="fp32"),
        dict(EVEN_D=True, BLOCK_K=16, BLOCK_D=bd, HAS_SCALE=False))
    out.append(("grad_input", st, "i32", "ld.global.v4" in ptx))
    ptx = compile_ptx(tk._score_grad_weight_atomic_kernel,
        dict(grad_ptr="fp32", x_ptr=st, idx_ptr="i64", dw_ptr="fp32", db_ptr="fp32"),
        dict(EVEN_D=False, BLOCK_K=16, BLOCK_D=bd))
    out.append(("atomic", st, "i64", "atom.global" in ptx or "red.global" in ptx))
    for dense in (True, False):
        ptx = compile_ptx(tk._segment_reduce_kernel,
            dict(grad_ptr="fp32", x_ptr=st, perm_ptr="i64", seg_start_ptr="i64", seg_end_ptr="i64",
                 seg_row_ptr="i64", dw_ptr="fp32", db_ptr="fp32"),
            dict(DENSE=dense, EVEN_D=True, BLOCK_E=8, BLOCK_D=256))
        out.append(("segment", st, dense, "ld.global.v4" in ptx))
# int8 tables with per-row scales (inference): 16-byte vector loads of the int8 rows
ptx = compile_ptx(tk._score_fwd_kernel,
    dict(x_ptr="fp32", w_ptr="i8", bias_ptr="fp32", idx_ptr="i64", out_ptr="fp32", scale_ptr="fp32"),
    dict(HAS_BIAS=True, EVEN_D=True, BLOCK_K=16, BLOCK_D=256, HAS_SCALE=True))
out.append(("fwd", "int8", "i64", "ld.global.v4" in ptx))
ptx = compile_ptx(tk._score_grad_input_kernel,
    dict(grad_ptr="fp32", w_ptr="i8", idx_ptr="i32", out_ptr="fp32", scale_ptr="fp32"),
    dict(EVEN_D=True, BLOCK_K=16, BLOCK_D=256, HAS_SCALE=True))
out.append(("grad_input", "int8", "i32", "ld.global" in ptx))
print("RESULT", out)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90_with_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = ast.literal_eval(proc.stdout.split("RESULT", 1)[1].strip())
    assert len(results) == 14
    assert all(ok for *_, ok in results), results


# ------------------------------------------------------------------------------------------------ GPU only


@requires_cuda
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_large_shapes(dtype):
    B, K, D, n = 64, 2048, 768, 100_000
    x, w, b = rand(B, D, dtype=dtype), rand(n, D, dtype=dtype), rand(n, dtype=dtype)
    idx = make_idx(B, K, n=n)
    # Larger sums than the small tests: scale the tolerance with sqrt(D) for the accumulation order.
    big = dict(rtol=1e-4, atol=1e-4 * D ** 0.5)
    assert_scores_equal(tk.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx), **big)
    g = grad_for(idx)
    check_all_grads(g, w, x, idx, big, num_rows=n)
    dw1, db1 = tk.shortlist_score_grad_weight(g, x, idx, n, deterministic=True)
    dw2, db2 = tk.shortlist_score_grad_weight(g, x, idx, n, deterministic=True)
    assert torch.equal(dw1, dw2) and torch.equal(db1, db2)
    assert torch.equal(dw1, scatter_rows(*tk.shortlist_score_grad_weight_rows(g, x, idx), n)[0])


@requires_cuda
def test_gpu_row_offsets_past_2_31():
    # A bf16 table of 2.9M x 768 = 2.2e9 elements (4.5 GB): rows near the end sit past 2^31 elements, so an
    # int32 row offset would wrap. The reference reads only the gathered rows.
    n, D = 2_900_000, 768
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GB of free GPU memory")
    w = torch.empty(n, D, dtype=BF16, device="cuda")
    w[-4096:].normal_()
    w[:4096].normal_()
    idx = torch.randint(n - 4096, n, (8, 256), device="cuda")
    idx[:, ::2] = torch.randint(0, 4096, (8, 128), device="cuda")
    idx[0, 0] = -1
    x = rand(8, D, dtype=BF16)
    assert n * D > 2**31 and int(idx.max()) * D > 2**31
    assert_scores_equal(tk.shortlist_score(x, w, None, idx), reference.shortlist_score(x, w, None, idx),
                        rtol=1e-4, atol=1e-3)
    g = grad_for(idx)
    torch.testing.assert_close(tk.shortlist_score_grad_input(g, w, idx),
                               reference.shortlist_score_grad_input(g, w, idx), rtol=1e-4, atol=1e-3)
    rows, dw_rows, db_rows = reference.shortlist_score_grad_weight_rows(g, x, idx)
    for det in (False, True):
        dw, db = tk.shortlist_score_grad_weight(g, x, idx, n, deterministic=det)  # 8.9 GB fp32 dense gradient
        torch.testing.assert_close(dw[rows], dw_rows, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(db[rows], db_rows, rtol=1e-4, atol=1e-4)
        assert int(torch.count_nonzero(db)) <= rows.numel()
        del dw, db
    rows_k, dw_rows_k, db_rows_k = tk.shortlist_score_grad_weight_rows(g, x, idx)
    assert torch.equal(rows_k, rows)
    torch.testing.assert_close(dw_rows_k, dw_rows, rtol=1e-4, atol=1e-4)
