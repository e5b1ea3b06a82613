"""The fused Triton shortlist_bce forward (kernels/triton/shortlist_bce.py) against ops/reference.py.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before this module
imports the kernel) on CPU tensors with small odd shapes; with a GPU the same tests run compiled, and the
`requires_cuda` tests at the end add a realistic shape and the no-host-sync check.

Tolerances. The kernel and the reference read the same stored inputs (bf16 / fp16 upcast to fp32), so the logits
differ only by the fp32 summation order: test_triton_shortlist_score.py's TOL (1e-5 fp32 storage, 1e-4 bf16 /
fp16). The gradient and the loss are then compared twice: with the reference on the reference's logits (the same
tolerance, as sigmoid's slope is <= 1/4 and the loss's <= 1), and with the reference formula applied to the
*kernel's* logits, where only the order of fp32 operations differs (rtol 2e-6): that checks targets, pads,
scaling and the BCE itself tightly.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import cascadexml_fast as cx
from conftest import requires_cuda
from cascadexml_fast.kernels.triton import shortlist_bce as tk
from cascadexml_fast.ops import reference
from cascadexml_fast.ops import shortlist_bce as bce_module
from cascadexml_fast.ops import shortlist_score as score_module

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
TOL = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=1e-4, atol=1e-4), F16: dict(rtol=1e-4, atol=1e-4)}
TIGHT = dict(rtol=2e-6, atol=1e-7)


def tol(*dtypes):
    for dt in (BF16, F16):
        if dt in dtypes:
            return TOL[dt]
    return TOL[F32]


def make_case(B, K, D, N, w_dtype=F32, x_dtype=F32, b_dtype=F32, id_dtype=torch.int64, pos_dtype=torch.int64,
              seed=0, scale=1.0):
    """Inputs with pads, duplicate ids within and across documents, and CSR positives (unsorted, with repeats,
    some outside the shortlist, document 1 without any)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * scale
    w = torch.randn(N, D, generator=g)
    b = torch.randn(N, generator=g) if b_dtype is not None else None
    idx = torch.randint(0, N, (B, K), generator=g)
    if K >= 3:
        idx[:, 1] = idx[:, 0]  # duplicate within a row
        idx[1:, 2] = idx[0, 2]  # ... and across rows
    idx[torch.rand(B, K, generator=g) < 0.2] = -1
    rows = []
    for d in range(B):
        if d == 1:
            rows.append(torch.zeros(0, dtype=torch.long))
            continue
        shortlisted = idx[d][idx[d] >= 0]
        take = shortlisted[torch.randperm(shortlisted.numel(), generator=g)[: 3]]
        other = torch.randint(0, N, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
        ids = torch.cat([take, other, take[:1]])  # unsorted, a repeat
        rows.append(ids[torch.randperm(ids.numel(), generator=g)])
    counts = torch.tensor([r.numel() for r in rows], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    pos = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return (x.to(DEV, x_dtype), w.to(DEV, w_dtype), None if b is None else b.to(DEV, b_dtype),
            idx.to(DEV, id_dtype), offsets.to(DEV), pos.to(DEV, pos_dtype))


def from_logits(logits, idx, offsets, pos, N, level_weight):
    """The reference's loss and gradient formula applied to given logits (fp32)."""
    valid = idx >= 0
    y = reference.membership(idx, offsets, pos, N).float()
    safe = logits.masked_fill(~valid, 0.0)
    scale = level_weight / valid.sum().clamp(min=1).float()
    per_entry = torch.nn.functional.binary_cross_entropy_with_logits(safe, y, reduction="none")
    return (per_entry * valid).sum() * scale, ((torch.sigmoid(safe) - y) * valid) * scale


def check(case, level_weight=0.7, tolerance=TOL[F32]):
    x, w, b, idx, offsets, pos = case
    loss, grad, logits = tk.shortlist_bce(x, w, b, idx, offsets, pos, level_weight)
    ref_loss, ref_grad, ref_logits = reference.shortlist_bce(x, w, b, idx, offsets, pos, level_weight)
    assert loss.dtype == grad.dtype == logits.dtype == F32 and loss.dim() == 0
    assert grad.shape == logits.shape == idx.shape
    pads = idx < 0
    assert torch.isneginf(logits[pads]).all() and not torch.isneginf(logits[~pads]).any()
    assert torch.equal(grad[pads], torch.zeros_like(grad[pads]))  # exact zeros at pads
    torch.testing.assert_close(logits.masked_fill(pads, 0), ref_logits.masked_fill(pads, 0), **tolerance)
    torch.testing.assert_close(grad, ref_grad, **tolerance)
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    same_loss, same_grad = from_logits(logits, idx, offsets, pos, w.shape[0], level_weight)
    torch.testing.assert_close(grad, same_grad, **TIGHT)
    torch.testing.assert_close(loss, same_loss, **TIGHT)
    return loss, grad, logits


# ----------------------------------------------------------------------------------------- interpreter-sized


# (B, K, D, N): none a multiple of the block sizes; the last has several D chunks and several K blocks.
@pytest.mark.parametrize("B,K,D,N", [(1, 1, 1, 1), (3, 13, 9, 21), (4, 70, 37, 40), (2, 300, 130, 60)])
@pytest.mark.parametrize("id_dtype,pos_dtype", [(torch.int64, torch.int64), (torch.int32, torch.int32),
                                                (torch.int32, torch.int64)])
def test_matches_reference_shapes_and_id_dtypes(B, K, D, N, id_dtype, pos_dtype):
    check(make_case(B, K, D, N, id_dtype=id_dtype, pos_dtype=pos_dtype, seed=K))


@pytest.mark.parametrize("w_dtype", [F32, BF16, F16])
@pytest.mark.parametrize("x_dtype,b_dtype", [(F32, F32), (BF16, BF16), (F16, None), (F32, F16)])
def test_matches_reference_storage_dtypes(w_dtype, x_dtype, b_dtype):
    check(make_case(3, 17, 33, 25, w_dtype, x_dtype, b_dtype, seed=3), tolerance=tol(w_dtype, x_dtype, b_dtype))


def test_even_d_strided_table_and_level_weight():
    # D = 256 takes the unmasked (EVEN_D) loads; W is a column slice of a wider table (row stride != D, not
    # copied); x is a transposed view (copied).
    x, w, b, idx, offsets, pos = make_case(3, 11, 256, 19, seed=4)
    wide = torch.zeros(19, 261, device=DEV)
    wide[:, 2:258] = w
    xt = x.t().contiguous().t()
    assert wide[:, 2:258].stride(0) == 261 and xt.stride(1) != 1
    check((xt, wide[:, 2:258], b, idx, offsets, pos), level_weight=2.5)


def test_many_positives_scan_several_chunks():
    # A document with more positives than one BLOCK_P chunk (16 / 32): ids matched in the later chunks too.
    x, w, b, idx, _, _ = make_case(2, 40, 7, 200, seed=5)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([torch.randint(0, 200, (70,), generator=g).to(DEV), idx[0][idx[0] >= 0][-5:].long()])
    offsets = torch.tensor([0, first.numel(), first.numel() + 2], device=DEV)
    pos = torch.cat([first, idx[1, :2].clamp(min=0).long()])
    _, grad, _ = check((x, w, b, idx, offsets, pos))
    y = reference.membership(idx, offsets, pos, 200)
    assert y[0].sum() >= 5 and bool((grad[y] < 0).all())  # positives pull their logits up


def test_large_logits_are_stable():
    # |s| up to ~100 and more: no inf / NaN, and the reference's values.
    x, w, b, idx, offsets, pos = make_case(3, 19, 16, 30, seed=6, scale=12.0)
    loss, grad, logits = check((x, w, b, idx, offsets, pos))
    assert logits[idx >= 0].abs().max() > 50
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Only confident right answers (logits +-20 through the bias: +20 for positives, -20 otherwise): every entry's
    # loss is log1p(exp(-20)) = 2.06e-9, below half an ulp of 1, which log(1 + t) would round to 0.
    y = reference.membership(idx[:1], offsets[:2], pos[: int(offsets[1])], 30)
    bias = torch.full((30,), -20.0, device=DEV)
    bias[idx[0][y[0]].long()] = 20.0
    loss1, grad1, _ = tk.shortlist_bce(torch.zeros_like(x[:1]), torch.zeros_like(w), bias, idx[:1], offsets[:2],
                                       pos[: int(offsets[1])], 1.0)
    want = torch.log1p(torch.exp(-torch.tensor(20.0, dtype=F64))).item()
    assert y.any() and (~y[0] & (idx[0] >= 0)).any()
    assert loss1.item() == pytest.approx(want, rel=1e-5)
    assert grad1.abs().max().item() == pytest.approx(torch.sigmoid(torch.tensor(-20.0, dtype=F64)).item()
                                                     / int((idx[0] >= 0).sum()), rel=1e-5)


def test_pads_no_positives_and_empty():
    x, w, b, idx, offsets, pos = make_case(4, 9, 5, 12, seed=7)
    idx[2] = -1  # a fully padded document
    check((x, w, b, idx, offsets, pos))
    # every entry a pad: loss 0, zero gradient, -inf logits
    allpad = torch.full_like(idx, -1)
    loss, grad, logits = tk.shortlist_bce(x, w, b, allpad, offsets, pos, 1.0)
    assert loss.item() == 0.0 and not grad.any() and torch.isneginf(logits).all()
    # no positives at all (pos_ids empty): every target 0
    none = torch.zeros(5, dtype=torch.long, device=DEV)
    check((x, w, b, idx, none, pos[:0]))
    # empty shortlist and empty batch
    for B, K in ((4, 0), (0, 5)):
        loss, grad, logits = tk.shortlist_bce(x[:B], w, b, idx[:B, :K], offsets[: B + 1] * 0, pos[:0], 1.0)
        assert loss.item() == 0.0 and grad.shape == logits.shape == (B, K)
    # D = 0: logits are the biases
    check((x[:, :0], w[:, :0], b, idx, offsets, pos))


def test_nan_stays_in_its_document():
    x, w, b, idx, offsets, pos = make_case(3, 8, 6, 10, seed=8)
    x[0, 2] = float("nan")
    loss, grad, logits = tk.shortlist_bce(x, w, b, idx, offsets, pos, 1.0)
    assert torch.isnan(logits[0][idx[0] >= 0]).all() and torch.isnan(loss)
    assert torch.isfinite(logits[1:][idx[1:] >= 0]).all() and torch.isfinite(grad[1:]).all()
    assert torch.isneginf(logits[idx < 0]).all()


def test_bad_inputs():
    x, w, b, idx, offsets, pos = make_case(2, 5, 4, 6)
    with pytest.raises(ValueError, match="shape mismatch"):
        tk.shortlist_bce(x, w[:, :3], b, idx, offsets, pos)
    with pytest.raises(ValueError, match=r"pos_offsets must be int64 \[B \+ 1\] = \[3\]"):
        tk.shortlist_bce(x, w, b, idx, offsets[:2], pos)
    with pytest.raises(TypeError, match="idx and pos_ids must be int32 or int64"):
        tk.shortlist_bce(x, w, b, idx.float(), offsets, pos)
    with pytest.raises(TypeError, match="weight must be float32, bfloat16 or float16"):
        tk.shortlist_bce(x, w.double(), b, idx, offsets, pos)


# ------------------------------------------------------------- the op's CUDA glue, on CPU under the interpreter

GLUE = {
    "shortlist_bce": bce_module._shortlist_bce_cuda,
    "shortlist_score": score_module._forward_cuda,
    "shortlist_score_grad_input": score_module._grad_input_cuda,
    "shortlist_score_grad_weight": score_module._grad_weight_cuda,
    "shortlist_score_grad_weight_rows": score_module._grad_weight_rows_cuda,
}


@pytest.fixture
def triton_as_cpu_kernels():
    """The functions registered as the ops' CUDA kernels, registered as their CPU kernels for one test: the whole
    path a GPU user takes (op -> autograd -> Triton launchers) runs here."""
    assert bce_module._triton_kernels() is not None, "the Triton kernel failed to import"
    lib = torch.library.Library("cascadexml_fast", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, fn in GLUE.items():
            lib.impl(name, fn, "CPU")
    yield
    lib._destroy()  # restores the C++ kernels


on_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests cover this path")


@on_cpu_only
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("w_dtype", [F32, BF16])
def test_op_through_the_glue_matches_reference(triton_as_cpu_kernels, sparse_grad, w_dtype):
    x, w, b, idx, offsets, pos = make_case(3, 15, 10, 23, w_dtype=w_dtype, b_dtype=w_dtype, seed=9)
    assert bce_module._triton_kernels() is tk

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss, logits = fn(*leaves)
        loss.backward()
        return loss.detach(), logits.detach(), *(t.grad for t in leaves)

    got = run(lambda *t: cx.shortlist_bce(*t, idx, offsets, pos, level_weight=0.5, sparse_grad=sparse_grad))
    want = run(lambda *t: reference.shortlist_bce(*t, idx, offsets, pos, 0.5)[::2])
    tolerance = tol(w_dtype)
    torch.testing.assert_close(got[0], want[0], **tolerance)
    pads = idx < 0
    assert torch.equal(torch.isneginf(got[1]), pads)
    torch.testing.assert_close(got[1].masked_fill(pads, 0), want[1].masked_fill(pads, 0), **tolerance)
    torch.testing.assert_close(got[2], want[2], **tolerance)  # dx
    for g, r in zip(got[3:], want[3:]):  # dW (sparse with sparse_grad), dbias
        assert g.is_sparse == sparse_grad
        g = g.to_dense() if g.is_sparse else g
        grad_tol = tolerance if w_dtype == F32 else dict(rtol=8e-3, atol=8e-3)  # one ulp of the bf16 gradient
        torch.testing.assert_close(g.float(), r.float(), **grad_tol)


@on_cpu_only
def test_float64_takes_the_reference_and_gradchecks(triton_as_cpu_kernels):
    x, w, b, idx, offsets, pos = make_case(2, 7, 4, 9, F64, F64, F64, seed=10)
    got = torch.ops.cascadexml_fast.shortlist_bce(x, w, b, idx, offsets, pos, 0.7, False, False)
    want = reference.shortlist_bce(x, w, b, idx, offsets, pos, 0.7)
    assert got[0].dtype == F64
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    leaves = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: cx.shortlist_bce(*t, idx, offsets, pos, level_weight=0.7)[0], leaves)


@on_cpu_only
def test_cascade_head_loss_through_the_glue_matches_cpu_kernels(triton_as_cpu_kernels):
    tree = type("Tree", (), {})()
    tree.offsets = [torch.tensor([0, 3, 5, 9]), torch.tensor([0, 2, 4, 5, 7, 9, 10, 12, 14, 15])]
    tree.perm = torch.randperm(15)
    head = cx.CascadeHead(tree, dim=6, beams=(2, 3), sparse_grad=True)
    x = [torch.randn(4, 6) for _ in range(3)]
    positives = (torch.tensor([0, 2, 2, 5, 6]), torch.tensor([3, 11, 0, 7, 14, 9]))
    loss, trace = head.loss(x, positives, return_shortlists=True)
    loss.backward()
    grads = [p.grad.to_dense().clone() for p in head.parameters()]
    head.zero_grad()
    lib_off = torch.library.Library("cascadexml_fast", "IMPL")  # back to the C++ kernels for the second run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib_off.impl("shortlist_bce", lambda *a: reference.shortlist_bce(*a[:7]), "CPU")
    try:
        ref_loss, ref_trace = head.loss(x, positives, return_shortlists=True)
        ref_loss.backward()
    finally:
        lib_off._destroy()
    torch.testing.assert_close(loss, ref_loss, **TOL[F32])
    for (ids, logits), (rids, rlogits) in zip(trace, ref_trace):
        assert torch.equal(ids, rids)
        torch.testing.assert_close(logits, rlogits, **TOL[F32])
    for g, p in zip(grads, head.parameters()):
        torch.testing.assert_close(g, p.grad.to_dense(), **TOL[F32])


# ------------------------------------------------------------------------------------------------ GPU only


@requires_cuda
@pytest.mark.parametrize("w_dtype", [F32, BF16])
def test_gpu_realistic_shape_and_no_host_sync(w_dtype):
    # Amazon-670K's leaf level: B = 64 documents, K = 4400 shortlisted labels, D = 768, ~5 positives each.
    B, K, D, N = 64, 4400, 768, 670_091
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).to(w_dtype)
    w = (torch.randn(N, D, device="cuda", generator=g) * 0.05).to(w_dtype)
    b = torch.randn(N, device="cuda", generator=g).to(w_dtype)
    idx = torch.randint(0, N, (B, K), device="cuda", generator=g)
    idx[:, -400:] = -1
    offsets = torch.arange(B + 1, device="cuda") * 5
    pos = idx[:, :5].reshape(-1).clone()
    pos[::3] = torch.randint(0, N, pos[::3].shape, device="cuda", generator=g)
    case = (x, w, b, idx, offsets, pos)
    check(case, tolerance=tol(w_dtype))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.cascadexml_fast.shortlist_bce(*case, 1.0, True, False)  # the registered CUDA kernel
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = reference.shortlist_bce(*case, 1.0)
    torch.testing.assert_close(out[1], ref[1], **tol(w_dtype))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        tk.shortlist_bce(*case, 1.0)
    end.record()
    torch.cuda.synchronize()
    print(f"shortlist_bce fwd {w_dtype} B={B} K={K}: {start.elapsed_time(end) / 10:.3f} ms")


@requires_cuda
def test_gpu_head_loss_and_backward_match_reference():
    x, w, b, idx, offsets, pos = make_case(8, 500, 768, 3000, w_dtype=BF16, b_dtype=BF16, seed=11)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    loss, _ = cx.shortlist_bce(*leaves, idx, offsets, pos, sparse_grad=True)
    loss.backward()
    ref = [t.detach().clone().float().requires_grad_() for t in (x, w, b)]
    ref_loss = reference.shortlist_bce(*ref, idx, offsets, pos)[0]
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL[BF16])
    torch.testing.assert_close(leaves[0].grad.float(), ref[0].grad, rtol=8e-3, atol=1e-4)
    torch.testing.assert_close(leaves[1].grad.to_dense().float(), ref[1].grad, rtol=8e-3, atol=1e-4)
