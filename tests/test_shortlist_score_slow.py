"""Heavier checks (`make test-slow`): realistic shapes and many more random cases."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascadexml_fast.ops import reference
from test_shortlist_score import ID_DTYPES, OPS, STORAGE, TOL, assert_scores_equal, make_inputs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_realistic_shape_matches_reference(w_dtype):
    # A CascadeXML leaf level in miniature: 200k labels, D = 768, 64 docs x 2048 shortlisted labels given as
    # 16 contiguous clusters of 128 (ids shared across documents).
    N, D, B, clusters, size = 200_000, 768, 64, 16, 128
    w = torch.randn(N, D).to(w_dtype)
    b = torch.randn(N).to(w_dtype)
    x = torch.randn(B, D)
    starts = torch.randint(0, N // size, (B, clusters)) * size
    idx = (starts[:, :, None] + torch.arange(size)).reshape(B, clusters * size)
    idx[:, -7:] = -1
    # Sums of 768 products of magnitude ~1 (and of 64 rows in dW): fp32 order effects reach ~1e-4 absolute.
    big = {"rtol": 1e-4, "atol": 1e-3}
    assert_scores_equal(OPS.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx), big)
    grad = torch.randn(B, clusters * size)
    torch.testing.assert_close(
        OPS.shortlist_score_grad_input(grad, w, idx), reference.shortlist_score_grad_input(grad, w, idx), **big
    )
    rows, dw, db = OPS.shortlist_score_grad_weight_rows(grad, x, idx)
    rrows, rdw, rdb = reference.shortlist_score_grad_weight_rows(grad, x, idx)
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(dw, rdw, **big)
    torch.testing.assert_close(db, rdb, **big)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(0, 9), st.integers(0, 130), st.integers(1, 300), st.integers(1, 500)),
    w_dtype=st.sampled_from(STORAGE),
    id_dtype=st.sampled_from(ID_DTYPES),
    pad_fraction=st.sampled_from([0.0, 0.1, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_many_random_cases(shape, w_dtype, id_dtype, pad_fraction, seed):
    B, K, D, N = shape
    gen = torch.Generator().manual_seed(seed)
    x, w, b, idx = make_inputs(B, K, D, N, torch.float32, w_dtype, w_dtype, id_dtype, pad_fraction, generator=gen)
    assert_scores_equal(OPS.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx))
    grad = torch.randn(B, K, generator=gen)
    dw, db = OPS.shortlist_score_grad_weight(grad, x, idx, N)
    rdw, rdb = reference.shortlist_score_grad_weight(grad, x, idx, N)
    torch.testing.assert_close(dw, rdw, **TOL)
    torch.testing.assert_close(db, rdb, **TOL)
