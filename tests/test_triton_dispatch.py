"""The op's CUDA glue (ops/shortlist_score.py -> Triton launchers), exercised on CPU under TRITON_INTERPRET=1.

The functions registered as the ops' CUDA kernels are registered as their CPU kernels for the duration of a
test, so the whole path a GPU user takes (op -> autograd -> Triton launchers) runs here.
"""
import warnings

import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast.ops import reference
from cascadexml_fast.ops import shortlist_score as op_module
from test_shortlist_score import TOL, assert_scores_equal, make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests cover this path on a GPU")

CUDA_IMPLS = {
    "shortlist_score": op_module._forward_cuda,
    "shortlist_score_grad_input": op_module._grad_input_cuda,
    "shortlist_score_grad_weight": op_module._grad_weight_cuda,
    "shortlist_score_grad_weight_rows": op_module._grad_weight_rows_cuda,
}


@pytest.fixture
def triton_as_cpu_kernels():
    assert op_module._triton_kernels() is not None, "Triton kernels failed to import"
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
