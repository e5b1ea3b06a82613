"""Low-precision table options: row-wise AdaGrad (sparse_rowwise_adagrad_step, SparseRowwiseAdagrad) and
stochastic rounding of bf16 / fp16 tables (sparse_adamw_step and the row-wise op).

Backends compared: the plain-PyTorch reference, the C++ CPU op, and the Triton launcher (under
TRITON_INTERPRET=1 on CPU). Tolerances:
- fp32 tables and the fp32 row accumulators: bit-identical across all three (same operation order, no FMAs;
  the row's sum of squares is taken in float64 everywhere, so reduction order does not show).
- bf16 / fp16 tables with stochastic rounding: bit-identical (same fp32 value, same hash). Without it the
  Triton interpreter truncates fp32 -> bf16 where C++ rounds to nearest: one ulp.
- sparse_adamw_step with stochastic rounding: bit-identical in lazy mode (the reference then follows the
  kernels' fp32 operation order); exact mode's catch-up differs in rounding (tests/test_optim.py tolerances).
"""
import copy

import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast.kernels.triton import optim as tk
from cascadexml_fast.ops import reference

OPS = torch.ops.cascadexml_fast
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ONE_ULP = {F32: dict(rtol=0, atol=0), BF16: dict(rtol=8e-3, atol=1e-6), F16: dict(rtol=1e-3, atol=1e-6)}
BACKENDS = {
    "reference": reference.sparse_rowwise_adagrad_step,
    "cpp": OPS.sparse_rowwise_adagrad_step,
    "triton": tk.sparse_rowwise_adagrad_step,
}
ADAMW_BACKENDS = {
    "reference": reference.sparse_adamw_step_sr,
    "cpp": OPS.sparse_adamw_step,
    "triton": tk.sparse_adamw_step,
}


def rowwise_case(N, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=gen).to(dtype), torch.rand(N, generator=gen)


def run_rowwise(fn, case, rows, grad, sr, step=3, seed=11, lr=0.05, wd=0.01):
    p, s = (t.clone() for t in case)
    fn(p, s, rows, grad, lr, 1e-10, wd, step, sr, seed)
    return p, s


# ---------------------------------------------------------------------------------------------------------
# Row-wise AdaGrad
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("sr", [False, True])
@pytest.mark.parametrize("D", [1, 37, 300])
def test_rowwise_backends_agree(dtype, sr, D):
    N = 40
    case = rowwise_case(N, D, dtype)
    rows = torch.tensor([0, 5, 6, 21, 39])
    grad = torch.randn(5, D)
    want = run_rowwise(BACKENDS["reference"], case, rows, grad, sr)
    for name in ("cpp", "triton"):
        got = run_rowwise(BACKENDS[name], case, rows, grad, sr)
        assert torch.equal(got[1], want[1]), name  # accumulators: bit-identical
        if sr or dtype == F32 or name == "cpp":
            assert torch.equal(got[0], want[0]), name
        else:
            torch.testing.assert_close(got[0].float(), want[0].float(), **ONE_ULP[dtype])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(want[0][untouched], case[0][untouched]) and torch.equal(want[1][untouched], case[1][untouched])


def test_rowwise_reference_is_fbgemm_exact_rowwise_adagrad():
    """A float64 transcription of the update rule, row by row, against the reference (fp32)."""
    N, D, lr, eps, wd = 9, 13, 0.1, 1e-10, 0.02
    p, s = rowwise_case(N, D, F32)
    rows, grad = torch.tensor([1, 4, 8]), torch.randn(3, D)
    want_p, want_s = p.double().clone(), s.double().clone()
    for i, r in enumerate(rows.tolist()):
        g = grad[i].double()
        want_s[r] += (g * g).mean()
        want_p[r] = want_p[r] * (1 - lr * wd) - lr * g / (want_s[r].sqrt() + eps)
    reference.sparse_rowwise_adagrad_step(p, s, rows, grad, lr, eps, wd)
    torch.testing.assert_close(p.double(), want_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-6, atol=0)


def test_rowwise_on_a_bias_equals_torch_adagrad():
    """D = 1 (a bias, [N] viewed as [N, 1]): row-wise AdaGrad is AdaGrad."""
    torch.manual_seed(3)
    ours = torch.nn.Parameter(torch.randn(17))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = cx.SparseRowwiseAdagrad([ours], lr=0.1, initial_accumulator_value=0.5)
    ref = torch.optim.Adagrad([theirs], lr=0.1, initial_accumulator_value=0.5, eps=1e-10)
    for _ in range(6):
        target = torch.randn(17)
        for p, o in ((ours, opt), (theirs, ref)):
            (p - target).square().sum().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_sparse_rowwise_adagrad_sparse_equals_dense_on_touched_rows():
    """A sparse gradient (ShortlistedLinear, sparse_grad=True) and the same gradient dense with only those rows
    non-zero differ only in the untouched rows (the dense path counts every row as touched: a zero gradient
    adds 0 to G and, without weight decay, moves nothing)."""
    torch.manual_seed(4)
    N, D = 30, 8
    layer = cx.ShortlistedLinear(N, D, bias=False, sparse_grad=True)
    dense = torch.nn.Parameter(layer.weight.detach().clone())
    ours = cx.SparseRowwiseAdagrad([layer.weight], lr=0.05)
    theirs = cx.SparseRowwiseAdagrad([dense], lr=0.05)
    for _ in range(4):
        idx, x = torch.randint(0, N, (3, 5)), torch.randn(3, D)
        layer(x, idx).square().sum().backward()
        torch.einsum("bkd,bd->bk", dense[idx], x).square().sum().backward()
        assert layer.weight.grad.is_sparse and not dense.grad.is_sparse
        ours.step(), theirs.step()
        ours.zero_grad(), theirs.zero_grad()
    torch.testing.assert_close(layer.weight.detach(), dense.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.state[layer.weight]["sum"], theirs.state[dense]["sum"], rtol=1e-6, atol=0)
    assert ours.state[layer.weight]["sum"].shape == (N,)


def test_rowwise_weight_decay_touches_only_listed_rows():
    p, s = rowwise_case(6, 4, F32)
    before = p.clone()
    cx.sparse_rowwise_adagrad_step(p, s, torch.tensor([2]), torch.zeros(1, 4), lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(p[2], before[2] * (1 - 0.05))
    assert torch.equal(p[[0, 1, 3, 4, 5]], before[[0, 1, 3, 4, 5]])


def test_rowwise_bad_inputs_and_nonfinite():
    p, s = rowwise_case(8, 3, F32)
    grad = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="rows must be unique and ascending"):
        cx.sparse_rowwise_adagrad_step(p, s, torch.tensor([4, 4]), grad, lr=0.1)
    with pytest.raises(IndexError, match=r"rows\[1\] = 8 is out of range \[0, 8\)"):
        cx.sparse_rowwise_adagrad_step(p, s, torch.tensor([1, 8]), grad, lr=0.1)
    with pytest.raises(RuntimeError, match="grad must have shape \\[2, 3\\]"):
        cx.sparse_rowwise_adagrad_step(p, s, torch.tensor([1, 2]), torch.randn(3, 3), lr=0.1)
    with pytest.raises(TypeError, match="state_sum must have dtype float32"):
        cx.sparse_rowwise_adagrad_step(p, s.double(), torch.tensor([1, 2]), grad, lr=0.1)
    with pytest.raises(ValueError, match="state_sum must have one entry per row"):
        cx.sparse_rowwise_adagrad_step(p, s[:5], torch.tensor([1, 2]), grad, lr=0.1)
    with pytest.raises(ValueError, match="rows is on meta but param is on cpu"):
        cx.sparse_rowwise_adagrad_step(p, s, torch.tensor([1, 2], device="meta"), grad, lr=0.1)
    with pytest.raises(ValueError, match="invalid hyper-parameters"):
        cx.SparseRowwiseAdagrad([torch.nn.Parameter(p)], lr=-1)
    layer = cx.ShortlistedLinear(6, 2, bias=False, sparse_grad=True)
    before = layer.weight.detach().clone()
    layer(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[1, 2]])).sum().backward()
    with pytest.warns(RuntimeWarning, match="SparseRowwiseAdagrad: non-finite gradient"):
        cx.SparseRowwiseAdagrad([layer.weight]).step()
    assert torch.equal(layer.weight.detach(), before)
    with pytest.raises(FloatingPointError):
        cx.SparseRowwiseAdagrad([layer.weight], skip_nonfinite=False).step()


def test_rowwise_fake_impl_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p, s = torch.empty(10, 4, dtype=BF16), torch.empty(10)
        OPS.sparse_rowwise_adagrad_step(p, s, torch.tensor([1, 3]), torch.empty(2, 4), 0.1, 1e-10, 0.0, 1, True, 5)
        OPS.sparse_adamw_step(p, torch.empty(10, 4), torch.empty(10, 4), torch.tensor([1]), torch.empty(1, 4), 1,
                              0.1, 0.9, 0.999, 1e-8, 0.0, None, None, True, 5)


# ---------------------------------------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_adamw_stochastic_rounding_bit_identical_across_backends(dtype):
    N, D = 20, 300
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(N, D, generator=gen).to(dtype)
    m0, v0 = torch.randn(N, D, generator=gen) * 0.1, torch.rand(N, D, generator=gen) * 0.01
    rows, grad = torch.tensor([0, 3, 7, 19]), torch.randn(4, D, generator=gen)
    outs = {}
    for name, fn in ADAMW_BACKENDS.items():
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        fn(p, m, v, rows, grad, 7, 0.01, 0.9, 0.999, 1e-8, 0.05, None, None, True, 1234)
        outs[name] = (p, m, v)
    for name in ("cpp", "triton"):
        for a, b in zip(outs[name], outs["reference"]):
            assert torch.equal(a, b), name
    # A different seed or step gives different roundings (the hash sees both).
    p = p0.clone()
    OPS.sparse_adamw_step(p, m0.clone(), v0.clone(), rows, grad, 7, 0.01, 0.9, 0.999, 1e-8, 0.05, None, None, True, 1)
    assert not torch.equal(p, outs["cpp"][0])


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_stochastic_rounding_is_unbiased(dtype):
    """p = 1 everywhere, one row-wise AdaGrad step moving every element by -0.3 of an ulp of [0.5, 1): round to
    nearest keeps 1.0; stochastic rounding lands on 1 - ulp with probability 0.3, so the mean is the fp32 value."""
    ulp = 2.0**-8 if dtype == BF16 else 2.0**-11
    N, D = 64, 1024
    for name, fn in BACKENDS.items():
        if name == "triton":
            N = 8  # the interpreter is slow
        p, s = torch.ones(N, D, dtype=dtype), torch.zeros(N)
        fn(p, s, torch.arange(N), torch.ones(N, D), 0.3 * ulp, 0.0, 0.0, 1, True, 7)
        mean = p.double().mean().item()
        n = N * D
        tolerance = 5 * ulp * (0.21 / n) ** 0.5  # five standard deviations of the mean
        assert abs(mean - (1 - 0.3 * ulp)) < tolerance, (name, mean)
        if name == "triton":
            continue  # the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest
        p, s = torch.ones(N, D, dtype=dtype), torch.zeros(N)
        fn(p, s, torch.arange(N), torch.ones(N, D), 0.3 * ulp, 0.0, 0.0, 1, False, 7)
        assert bool((p == 1).all()), name


def test_stochastic_round_reference_edge_cases():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -3.5, 1e-30, 6e-8, 70000.0])
    rnd = reference.sr_random(reference.sr_key(3, 4), torch.tensor([0]), x.numel())[0]
    for dtype in (BF16, F16):
        y = reference.stochastic_round(x, dtype, rnd)
        assert torch.equal(y[:4], x[:4].to(dtype)) and bool(y[4].isnan())
        assert y[5] == 1 and y[6] == -3.5  # representable values are kept exactly
    assert reference.stochastic_round(x[-1:], F16, rnd[-1:]).isinf().all()  # past fp16's range: inf


@pytest.mark.parametrize("opt_name", ["adamw", "rowwise"])
def test_stochastic_rounding_trains_where_round_to_nearest_stalls(opt_name):
    """A bf16 table at 1.0 pulled towards 0.9 with steps of ~1e-4, far below half a bf16 ulp (2^-9 near 1):
    round to nearest never moves; stochastic rounding follows the fp32 trajectory on average."""
    moved = {}
    for sr in (False, True):
        table = torch.nn.Parameter(torch.ones(8, 32, dtype=BF16))
        if opt_name == "adamw":
            opt = cx.SparseAdamW([table], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr, seed=3)
        else:
            opt = cx.SparseRowwiseAdagrad([table], lr=1e-4, initial_accumulator_value=1.0, stochastic_rounding=sr)
        for _ in range(150):
            table.grad = torch.full_like(table, 0.1 if opt_name == "rowwise" else 1.0)  # d/dp of a pull to 0.9
            opt.step()
        moved[sr] = 1.0 - table.detach().double().mean().item()
    assert moved[False] == 0.0
    fp32_move = 150e-4 if opt_name == "adamw" else 1e-4 * 0.1 * sum(1 / (1 + 0.01 * t) ** 0.5 for t in range(1, 151))
    assert abs(moved[True] - fp32_move) < 0.25 * fp32_move, (moved, fp32_move)


@pytest.mark.parametrize("make, dtype", [
    (lambda ps: cx.SparseAdamW(ps, lr=0.05, weight_decay=0.1, mode="exact"), torch.float32),  # float64 lr history
    (lambda ps: cx.SparseAdamW(ps, lr=0.05, weight_decay=0.1, stochastic_rounding=True), torch.bfloat16),
    (lambda ps: cx.SparseAdamW(ps, lr=0.05, state_dtype=torch.uint8), torch.bfloat16),  # uint8 + fp32 scales
    (lambda ps: cx.SparseRowwiseAdagrad(ps, lr=0.05), torch.bfloat16),  # fp32 accumulators
], ids=["exact-fp32", "adamw-bf16-table", "adamw8bit-bf16-table", "rowwise-bf16-table"])
def test_state_dict_round_trip_keeps_state_dtypes_and_continues_exactly(make, dtype):
    """torch's load_state_dict casts floating state to the parameter's dtype; ours must keep the saved dtypes,
    so that a reloaded optimizer continues bit-identically to one that was never saved."""
    torch.manual_seed(0)
    N, D, steps = 40, 16, 6
    start = torch.randn(N, D).to(dtype)
    grads = [torch.randn(N, D) for _ in range(steps)]
    rows = [torch.randperm(N)[:9].sort().values for _ in range(steps)]

    def run(p, opt, lo, hi):
        for s in range(lo, hi):
            p.grad = torch.sparse_coo_tensor(rows[s][None], grads[s][rows[s]].to(dtype), (N, D)).coalesce()
            opt.step()

    straight = torch.nn.Parameter(start.clone())
    opt = make([straight])
    run(straight, opt, 0, steps)

    first = torch.nn.Parameter(start.clone())
    opt1 = make([first])
    run(first, opt1, 0, 3)
    saved = copy.deepcopy(opt1.state_dict())
    dtypes = {k: v.dtype for k, v in opt1.state[first].items() if torch.is_tensor(v)}
    second = torch.nn.Parameter(first.detach().clone())
    opt2 = make([second])
    opt2.load_state_dict(saved)
    assert {k: v.dtype for k, v in opt2.state[second].items() if torch.is_tensor(v)} == dtypes
    run(second, opt2, 3, steps)
    assert torch.equal(second.detach(), straight.detach())
