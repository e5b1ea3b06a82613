"""sparse_adamw_step and SparseAdamW against the reference and against torch.optim.AdamW on a dense copy."""
import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast.ops import reference

OPS = torch.ops.cascadexml_fast
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
# fp32 state: the kernel and the reference differ only in rounding order (a few ulps over several steps).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_state(N, D, p_dtype=torch.float32, s_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(N, D, generator=gen).to(p_dtype)
    m = (torch.randn(N, D, generator=gen) * 0.1).to(s_dtype)
    v = (torch.rand(N, D, generator=gen) * 0.01).to(s_dtype)
    return p, m, v


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_lazy_step_matches_reference(p_dtype, s_dtype):
    N, D = 40, 19
    rows = torch.tensor([0, 3, 4, 17, 39])
    grad = torch.randn(5, D)
    kernel, ref = make_state(N, D, p_dtype, s_dtype), make_state(N, D, p_dtype, s_dtype)
    before = kernel[0].clone()
    cx.sparse_adamw_step(*kernel, rows, grad, step=7, lr=0.01, **HYPER)
    reference.sparse_adamw_step(*ref, rows, grad, 7, 0.01, *HYPER.values())
    one_ulp = {torch.float32: TOL, torch.bfloat16: {"rtol": 8e-3, "atol": 1e-5}, torch.float16: {"rtol": 1e-3, "atol": 1e-6}}
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a.float(), b.float(), **one_ulp[a.dtype])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(kernel[0][untouched], before[untouched])


def test_exact_step_matches_reference_with_catch_up():
    N, D = 12, 7
    p, m, v = make_state(N, D)
    m[5:] = 0  # rows never touched so far: zero moments
    v[5:] = 0
    ref = (p.clone(), m.clone(), v.clone())
    last = torch.tensor([0, 3, 8, 9, 1, 0, 0, 0, 0, 0, 0, 0])
    ref_last = last.clone()
    history = torch.linspace(0.02, 0.01, 10, dtype=torch.float64)
    rows = torch.tensor([0, 1, 2, 4, 6, 11])
    grad = torch.randn(6, D)
    cx.sparse_adamw_step(p, m, v, rows, grad, step=10, lr=0.01, last_step=last, lr_history=history, **HYPER)
    reference.sparse_adamw_step(*ref, rows, grad, 10, 0.01, *HYPER.values(), ref_last, history)
    for a, b in zip((p, m, v), ref):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.equal(last, ref_last) and last[rows].eq(10).all() and last[3] == 9


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_equals_torch_adamw_when_every_row_is_touched(mode):
    N, D = 30, 11
    layer = cx.ShortlistedLinear(N, D, bias=False, sparse_grad=True)
    dense = torch.nn.Parameter(layer.weight.detach().clone())
    ours = cx.SparseAdamW([layer.weight], lr=0.01, weight_decay=0.1, mode=mode)
    theirs = torch.optim.AdamW([dense], lr=0.01, weight_decay=0.1)
    all_rows = torch.arange(N).expand(3, N)
    for _ in range(5):
        x = torch.randn(3, D)
        layer(x, all_rows).square().sum().backward()
        (x @ dense.T).square().sum().backward()
        ours.step(), theirs.step()
        ours.zero_grad(), theirs.zero_grad()
    torch.testing.assert_close(layer.weight.detach(), dense.detach(), rtol=1e-5, atol=1e-6)


def test_exact_mode_equals_dense_adamw_on_a_sparse_schedule():
    # Rows are touched on a random subset of steps; dense AdamW sees zero gradients for the others. With "exact"
    # every row touched at the end must equal the dense result; "lazy" must not (it skipped the decay). The loss
    # is linear in the table so both see the same gradients: a row's value between its updates is stale in
    # exact mode (it catches up when next updated), so a loss that reads it would see different numbers.
    torch.manual_seed(0)
    N, D, steps = 25, 6, 12
    layer = cx.ShortlistedLinear(N, D, bias=False, sparse_grad=True)
    lazy_layer = cx.ShortlistedLinear(N, D, bias=False, sparse_grad=True)
    lazy_layer.load_state_dict(layer.state_dict())
    dense = torch.nn.Parameter(layer.weight.detach().clone())
    exact = cx.SparseAdamW([layer.weight], lr=0.02, weight_decay=0.1, mode="exact")
    lazy = cx.SparseAdamW([lazy_layer.weight], lr=0.02, weight_decay=0.1, mode="lazy")
    theirs = torch.optim.AdamW([dense], lr=0.02, weight_decay=0.1)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (exact, lazy, theirs)]
    for step in range(steps):
        idx = torch.randint(0, N, (2, 4)) if step < steps - 1 else torch.arange(N).expand(1, N)
        x = torch.randn(idx.shape[0], D)
        c = torch.randn(idx.shape)
        (layer(x, idx) * c).sum().backward()
        (lazy_layer(x, idx) * c).sum().backward()
        (torch.einsum("bkd,bd->bk", dense[idx], x) * c).sum().backward()
        for o in (exact, lazy, theirs):
            o.step()
            o.zero_grad()
        for s in schedulers:
            s.step()
    torch.testing.assert_close(layer.weight.detach(), dense.detach(), rtol=2e-5, atol=2e-6)
    assert not torch.allclose(lazy_layer.weight.detach(), dense.detach(), rtol=1e-4, atol=1e-5)


def test_bf16_state_within_tolerance_of_fp32_state():
    torch.manual_seed(1)
    N, D = 50, 16
    tables = [cx.ShortlistedLinear(N, D, sparse_grad=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    opts = [cx.SparseAdamW(t.parameters(), lr=0.01, state_dtype=dt) for t, dt in zip(tables, (torch.float32, torch.bfloat16))]
    for _ in range(10):
        idx, x = torch.randint(0, N, (4, 8)), torch.randn(4, D)
        for t, o in zip(tables, opts):
            t(x, idx).square().mean().backward()
            o.step()
            o.zero_grad()
    assert opts[1].state[tables[1].weight]["exp_avg"].dtype == torch.bfloat16
    # bf16 moments carry ~3 significant digits; after 10 steps of lr 0.01 the tables differ by far less than lr.
    assert (tables[0].weight - tables[1].weight).abs().max() < 2e-3


def test_accumulated_uncoalesced_gradients_are_summed():
    layer = cx.ShortlistedLinear(10, 4, bias=False, sparse_grad=True)
    dense = torch.nn.Parameter(layer.weight.detach().clone())
    x, idx = torch.randn(2, 4), torch.tensor([[1, 2, 3], [3, 4, 1]])
    for _ in range(2):  # two backward passes: .grad holds concatenated, uncoalesced rows
        layer(x, idx).sum().backward()
        torch.einsum("bkd,bd->bk", dense[idx], x).sum().backward()
    assert not layer.weight.grad.is_coalesced()
    cx.SparseAdamW([layer.weight], lr=0.1, weight_decay=0.0).step()
    opt = torch.optim.AdamW([dense], lr=0.1, weight_decay=0.0)
    opt.step()
    touched = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(layer.weight.detach()[touched], dense.detach()[touched], rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    p, m, v = make_state(8, 3)
    grad = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="rows must be unique and ascending"):
        cx.sparse_adamw_step(p, m, v, torch.tensor([4, 4]), grad, step=1, lr=0.1)
    with pytest.raises(IndexError, match=r"rows\[1\] = 8 is out of range \[0, 8\)"):
        cx.sparse_adamw_step(p, m, v, torch.tensor([1, 8]), grad, step=1, lr=0.1)
    with pytest.raises(RuntimeError, match="grad must have shape \\[2, 3\\]"):
        cx.sparse_adamw_step(p, m, v, torch.tensor([1, 2]), torch.randn(3, 3), step=1, lr=0.1)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        cx.sparse_adamw_step(p, m, v, torch.tensor([1, 2]), grad, step=0, lr=0.1)
    with pytest.raises(ValueError, match="rows is on meta but param is on cpu"):
        cx.sparse_adamw_step(p, m, v, torch.tensor([1, 2], device="meta"), grad, step=1, lr=0.1)
    with pytest.raises(ValueError, match="needs both last_step and lr_history"):
        cx.sparse_adamw_step(p, m, v, torch.tensor([1, 2]), grad, step=1, lr=0.1, last_step=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="mode must be 'lazy' or 'exact'"):
        cx.SparseAdamW([torch.nn.Parameter(p)], mode="eager")


def test_nonfinite_gradient_skips_with_a_warning_or_raises():
    layer = cx.ShortlistedLinear(6, 2, bias=False, sparse_grad=True)
    before = layer.weight.detach().clone()
    x = torch.tensor([[float("nan"), 1.0]])
    layer(x, torch.tensor([[1, 2]])).sum().backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        cx.SparseAdamW([layer.weight]).step()
    assert torch.equal(layer.weight.detach(), before)
    with pytest.raises(FloatingPointError):
        cx.SparseAdamW([layer.weight], skip_nonfinite=False).step()
