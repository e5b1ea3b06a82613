"""The op's CUDA glue (ops/shortlist_score.py -> Triton launchers), exercised on CPU under TRITON_INTERPRET=1.

The functions registered as the ops' CUDA kernels are registered as their CPU kernels for the duration of a
test, so the whole path a GPU user takes (op -> autograd -> Triton launchers) runs here.
"""
import warnings

import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast.ops import reference
from cascadexml_fast.ops import optim as optim_module
from cascadexml_fast.ops import search as search_module
from cascadexml_fast.ops import shortlist_bce as bce_module
from cascadexml_fast.ops import shortlist_score as op_module
from test_search import random_cascade
from test_shortlist_score import TOL, assert_scores_equal, make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests cover this path on a GPU")

CUDA_IMPLS = {
    "shortlist_score": op_module._forward_cuda,
    "shortlist_score_grad_input": op_module._grad_input_cuda,
    "shortlist_score_grad_weight": op_module._grad_weight_cuda,
    "shortlist_score_grad_weight_rows": op_module._grad_weight_rows_cuda,
    "topk": search_module._topk_cuda,
    "block_score": search_module._block_score_cuda,
    "cascade_search": search_module._cascade_search_cuda,
    "shortlist_bce": bce_module._shortlist_bce_cuda,
    "sparse_adamw_step": optim_module._sparse_adamw_step_cuda,
    "sparse_rowwise_adagrad_step": optim_module._sparse_rowwise_adagrad_step_cuda,
}


@pytest.fixture
def triton_as_cpu_kernels():
    assert op_module._triton_kernels() is not None, "Triton kernels failed to import"
    assert search_module._triton_module("topk") is not None and search_module._triton_module("block_score") is not None
    lib = torch.library.Library("cascadexml_fast", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, fn in CUDA_IMPLS.items():
            lib.impl(name, fn, "CPU")
    yield
    lib._destroy()  # restores the C++ kernels


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_autograd_through_triton_matches_reference(triton_as_cpu_kernels, sparse_grad, deterministic):
    B, K, D, N = 3, 11, 19, 23
    x, w, b, idx = make_inputs(B, K, D, N, pad_fraction=0.25)
    upstream = torch.randn(B, K).masked_fill(idx < 0, 0)

    def run(fn):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs)
        (out.masked_fill(idx < 0, 0) * upstream).sum().backward()
        return out.detach(), xs.grad, ws.grad, bs.grad

    got = run(lambda *t: cx.shortlist_score(*t[:3], idx, sparse_grad=sparse_grad, deterministic=deterministic))
    want = run(lambda *t: reference.shortlist_score(*t[:3], idx))
    assert_scores_equal(got[0], want[0])
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, r, **TOL)
    if sparse_grad:
        assert got[2].is_sparse and got[3].is_sparse


def test_float64_goes_to_the_reference(triton_as_cpu_kernels):
    x, w, b, idx = make_inputs(2, 5, 4, 6, torch.float64, torch.float64, torch.float64)
    assert op_module._cuda_kernels(x, w, b) is None
    assert_scores_equal(torch.ops.cascadexml_fast.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx))


@pytest.mark.parametrize("combine", ["leaf", "leaf_x_parent"])
def test_cascade_search_on_triton_kernels_matches_reference(triton_as_cpu_kernels, combine):
    gen = torch.Generator().manual_seed(2)
    features, weights, biases, offsets = random_cascade([5, 23, 70], [6, 5, 7], 3, gen)
    ids, scores = cx.cascade_search(features, weights, biases, offsets, [3, 6], 9, combine)
    ref_ids, ref_scores = reference.cascade_search(features, weights, biases, offsets, [3, 6], 9, combine)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, **TOL)


def test_shortlist_bce_on_triton_kernels_matches_reference(triton_as_cpu_kernels):
    x, w, b, idx = make_inputs(3, 13, 9, 21, pad_fraction=0.2)
    offsets, ids = torch.tensor([0, 2, 2, 3]), torch.tensor([int(idx[0, 0].clamp(min=0)), 4, 7])
    xs = x.clone().requires_grad_()
    loss, logits = cx.shortlist_bce(xs, w, b, idx, offsets, ids, level_weight=0.5)
    loss.backward()
    xr = x.clone().requires_grad_()
    ref_loss, _, ref_logits = reference.shortlist_bce(xr, w, b, idx, offsets, ids, 0.5)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(xs.grad, xr.grad, **TOL)
    assert_scores_equal(logits, ref_logits.detach())


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_sparse_adamw_on_triton_kernel_matches_reference(triton_as_cpu_kernels, mode):
    assert optim_module._triton_kernels() is not None
    torch.manual_seed(0)
    layers = [cx.ShortlistedLinear(30, 9, sparse_grad=True) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    optimizers = [cx.SparseAdamW(layers[0].parameters(), lr=0.05, mode=mode)]
    state = {}
    for _ in range(4):
        idx, x = torch.randint(0, 30, (3, 5)), torch.randn(3, 9)
        for layer in layers:
            layer(x, idx).sum().backward()
        optimizers[0].step()
        optimizers[0].zero_grad()
        # the second layer: the reference update, by hand, on the same rows
        for p in layers[1].parameters():
            table = p.view(p.shape[0], -1)
            s = state.setdefault(p, dict(step=0, m=torch.zeros_like(table), v=torch.zeros_like(table),
                                         last=torch.zeros(p.shape[0], dtype=torch.long)))
            s["step"] += 1
            grad = p.grad.coalesce()
            rows, values = grad._indices()[0], grad._values().view(-1, table.shape[1])
            exact = (s["last"], torch.full((16,), 0.05, dtype=torch.float64)) if mode == "exact" else (None, None)
            with torch.no_grad():
                reference.sparse_adamw_step(table, s["m"], s["v"], rows, values, s["step"], 0.05, 0.9, 0.999, 1e-8,
                                            1e-2, *exact)
            p.grad = None
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_rowwise_adagrad_on_triton_kernel_matches_reference(triton_as_cpu_kernels, dtype):
    """SparseRowwiseAdagrad through the CUDA glue (Triton) against the reference on the same sparse gradients;
    bf16 with stochastic rounding, so bit-identical."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(30, 9).to(dtype))
    ref_p, ref_sum = table.detach().clone(), torch.zeros(30)
    opt = cx.SparseRowwiseAdagrad([table], lr=0.05, weight_decay=0.01, stochastic_rounding=True, seed=5)
    for step in range(1, 4):
        rows = torch.randperm(30)[:7].sort().values
        values = torch.randn(7, 9)
        table.grad = torch.sparse_coo_tensor(rows[None], values.to(dtype), (30, 9), check_invariants=True).coalesce()
        opt.step()
        reference.sparse_rowwise_adagrad_step(ref_p, ref_sum, rows, values.to(dtype), 0.05, 1e-10, 0.01, step, True, 5)
    assert torch.equal(table.detach(), ref_p) and torch.equal(opt.state[table]["sum"], ref_sum)
