"""shortlist_bce (fused scoring + BCE) against the reference and against plain autograd BCE on gathered logits."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cascadexml_fast as cx
from cascadexml_fast.ops import reference
from test_shortlist_score import GRAD_TOL, STORAGE, TOL, make_inputs

OPS = torch.ops.cascadexml_fast


def random_positives(B, N, generator, idx=None):
    """CSR positives per row; half of them taken from the row's shortlist so targets are not all zero."""
    counts = torch.randint(0, 4, (B,), generator=generator)
    rows = []
    for b in range(B):
        chosen = torch.randint(0, max(N, 1), (int(counts[b]),), generator=generator)
        if idx is not None and idx.shape[1] and counts[b] > 0 and idx[b, 0] >= 0:
            chosen[0] = idx[b, 0]
        rows.append(chosen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return offsets, (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))


def plain_bce(x, w, b, idx, offsets, ids, level_weight):
    """What a user would write: gather logits, dense targets from a Python loop, BCE mean over valid entries."""
    logits = reference.shortlist_score(x, w, b, idx)
    y = torch.zeros_like(logits)
    for row in range(idx.shape[0]):
        positives = set(ids[offsets[row]: offsets[row + 1]].tolist())
        for k in range(idx.shape[1]):
            y[row, k] = float(int(idx[row, k]) in positives)
    valid = idx >= 0
    if not valid.any():
        return (logits.masked_fill(~valid, 0) * 0).sum()
    return level_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits[valid], y[valid])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(0, 5), st.integers(0, 20), st.integers(1, 30), st.integers(1, 40)),
    w_dtype=st.sampled_from(STORAGE), sparse_grad=st.booleans(), bias=st.booleans(),
    level_weight=st.sampled_from([1.0, 0.3]), seed=st.integers(0, 2**31 - 1),
)
def test_loss_and_gradients_match_plain_bce(shape, w_dtype, sparse_grad, bias, level_weight, seed):
    B, K, D, N = shape
    gen = torch.Generator().manual_seed(seed)
    x, w, b, idx = make_inputs(B, K, D, N, torch.float32, w_dtype, w_dtype, bias=bias, generator=gen)
    offsets, ids = random_positives(B, N, gen, idx)

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad if t is not None else None for t in leaves]

    got = run(lambda x, w, b: cx.shortlist_bce(x, w, b, idx, offsets, ids, level_weight=level_weight,
                                               sparse_grad=sparse_grad)[0], x, w, b)
    want = run(lambda x, w, b: plain_bce(x, w, b, idx, offsets, ids, level_weight), x, w.float(),
               None if b is None else b.float())
    torch.testing.assert_close(got[0], want[0].float(), **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    for g, r in zip(got[2:], want[2:]):
        if r is None:
            continue
        g = g.to_dense() if g.is_sparse else g
        torch.testing.assert_close(g.float(), r.to(w_dtype).float(), **GRAD_TOL[w_dtype])


def test_kernel_outputs_match_reference_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x, w, b, idx = make_inputs(4, 11, 6, 15, torch.float64, torch.float64, torch.float64, generator=gen)
    offsets, ids = random_positives(4, 15, gen, idx)
    got = OPS.shortlist_bce(x, w, b, idx, offsets, ids, 0.7, False, False)
    want = reference.shortlist_bce(x, w, b, idx, offsets, ids, 0.7)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: cx.shortlist_bce(x, w, b, idx, offsets, ids, level_weight=0.7)[0],
                                    inputs)


def test_logits_returned_detached_and_pads_excluded():
    x, w, b, idx = make_inputs(2, 5, 3, 6, pad_fraction=0.0)
    idx[0, 1:] = -1
    offsets, ids = torch.tensor([0, 1, 1]), torch.tensor([int(idx[0, 0])])
    loss, logits = cx.shortlist_bce(x.requires_grad_(), w, b, idx, offsets, ids)
    assert not logits.requires_grad and torch.isneginf(logits[0, 1:]).all()
    assert torch.isclose(loss, plain_bce(x, w, b, idx, offsets, ids, 1.0))
    all_pad = torch.full((2, 5), -1)
    loss, _ = cx.shortlist_bce(x, w, b, all_pad, offsets, ids)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


def test_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(5)
    x, w, b, idx = make_inputs(16, 200, 32, 50, generator=gen)
    offsets, ids = random_positives(16, 50, gen, idx)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            out.append(OPS.shortlist_bce(x, w, b, idx, offsets, ids, 1.0, False, False))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(*out):
        assert torch.equal(a, c)


def test_bad_positives():
    x, w, b, idx = make_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="pos_offsets must have B \\+ 1 = 3 entries"):
        cx.shortlist_bce(x, w, b, idx, torch.tensor([0, 1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="must start at 0 and end at len\\(pos_ids\\) = 1"):
        cx.shortlist_bce(x, w, b, idx, torch.tensor([0, 1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="pos_ids holds 5, outside \\[0, 5\\)"):
        cx.shortlist_bce(x, w, b, idx, torch.tensor([0, 1, 1]), torch.tensor([5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        cx.shortlist_bce(x, w, b, idx, torch.tensor([0, 2, 1]), torch.tensor([1]))


def test_evaluation_without_gradients_skips_the_autograd_layer():
    """Under no_grad (validation losses) the loss comes from the kernel called below the autograd key, equal to the
    loss of a call that records gradients."""
    from test_shortlist_score import _python_calls, _through_autograd_layer

    gen = torch.Generator().manual_seed(8)
    x, w, b, idx = make_inputs(4, 13, 16, 30, generator=gen)
    offsets, ids = random_positives(4, 30, gen, idx)
    w.requires_grad_()
    with torch.no_grad():
        (loss, logits), calls = _python_calls(lambda: cx.shortlist_bce(x, w, b, idx, offsets, ids, level_weight=0.5))
    assert not _through_autograd_layer(calls) and loss.grad_fn is None
    (loss_grad, logits_grad), calls = _python_calls(lambda: cx.shortlist_bce(x, w, b, idx, offsets, ids,
                                                                             level_weight=0.5))
    assert _through_autograd_layer(calls) and loss_grad.grad_fn is not None
    assert torch.equal(loss, loss_grad.detach()) and torch.equal(logits, logits_grad)
