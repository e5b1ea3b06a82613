"""shortlist_score through the registered op (C++ kernels on CPU) against ops/reference.py."""
import io
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cascadexml_fast as cx
from cascadexml_fast.ops import reference

OPS = torch.ops.cascadexml_fast
STORAGE = [torch.float32, torch.bfloat16, torch.float16]
ID_DTYPES = [torch.int32, torch.int64]

# The reference computes on the same (possibly low-precision) inputs upcast to fp32, so whatever the storage
# dtype only the fp32 summation order differs: these tolerances hold for every storage dtype. Scores are fp32.
TOL = {"rtol": 1e-5, "atol": 5e-5}
# Gradients that come back in a low-precision parameter dtype carry that dtype's rounding (one ulp).
GRAD_TOL = {torch.float32: TOL, torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3}, torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


def make_inputs(B, K, D, N, x_dtype=torch.float32, w_dtype=torch.float32, b_dtype=torch.float32, id_dtype=torch.int64,
                pad_fraction=0.2, bias=True, generator=None):
    g = generator
    x = torch.randn(B, D, generator=g).to(x_dtype)
    w = torch.randn(N, D, generator=g).to(w_dtype)
    b = torch.randn(N, generator=g).to(b_dtype) if bias else None
    idx = torch.randint(0, max(N, 1), (B, K), generator=g)
    if K > 1 and B > 0:
        idx[:, -1] = idx[:, 0]  # a duplicate within each row; rows also share ids across documents
    pads = torch.rand(B, K, generator=g) < pad_fraction
    idx = idx.masked_fill(pads, -1).to(id_dtype)
    return x, w, b, idx


def assert_scores_equal(out, ref, tol=TOL):
    assert out.dtype == ref.dtype
    pad = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(out), pad)
    torch.testing.assert_close(out.masked_fill(pad, 0), ref.masked_fill(pad, 0), **tol)


shapes = st.tuples(
    st.integers(0, 6), st.integers(0, 41), st.integers(1, 75), st.integers(1, 60)
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    x_dtype=st.sampled_from(STORAGE),
    w_dtype=st.sampled_from(STORAGE),
    b_dtype=st.sampled_from(STORAGE),
    id_dtype=st.sampled_from(ID_DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_kernel_matches_reference(shape, x_dtype, w_dtype, b_dtype, id_dtype, bias, seed):
    B, K, D, N = shape
    gen = torch.Generator().manual_seed(seed)
    x, w, b, idx = make_inputs(B, K, D, N, x_dtype, w_dtype, b_dtype, id_dtype, bias=bias, generator=gen)
    assert_scores_equal(OPS.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx))

    grad = torch.randn(B, K, generator=gen)
    torch.testing.assert_close(
        OPS.shortlist_score_grad_input(grad, w, idx), reference.shortlist_score_grad_input(grad, w, idx), **TOL
    )
    dw, db = OPS.shortlist_score_grad_weight(grad, x, idx, N)
    rdw, rdb = reference.shortlist_score_grad_weight(grad, x, idx, N)
    torch.testing.assert_close(dw, rdw, **TOL)
    torch.testing.assert_close(db, rdb, **TOL)
    rows, rows_w, rows_b = OPS.shortlist_score_grad_weight_rows(grad, x, idx)
    rrows, rrows_w, rrows_b = reference.shortlist_score_grad_weight_rows(grad, x, idx)
    assert torch.equal(rows, rrows)
    torch.testing.assert_close(rows_w, rrows_w, **TOL)
    torch.testing.assert_close(rows_b, rrows_b, **TOL)


@pytest.mark.parametrize("w_dtype", STORAGE)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_autograd_matches_reference_autograd(w_dtype, sparse_grad):
    B, K, D, N = 5, 33, 37, 47
    x, w, b, idx = make_inputs(B, K, D, N, torch.float32, w_dtype, w_dtype, pad_fraction=0.3)
    upstream = torch.randn(B, K).masked_fill(idx < 0, 0)  # pads have -inf scores: give them no upstream grad

    def run(fn, *tensors):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in tensors)
        (fn(xs, ws, bs).masked_fill(idx < 0, 0) * upstream).sum().backward()
        return xs.grad, ws.grad, bs.grad

    got = run(lambda xs, ws, bs: cx.shortlist_score(xs, ws, bs, idx, sparse_grad=sparse_grad), x, w, b)
    # Oracle: reference autograd on fp32 copies of the same values (autograd through a bf16 gather would sum
    # the gradient in bf16), rounded once to the parameter dtype as the op's gradient is.
    want = run(lambda xs, ws, bs: reference.shortlist_score(xs, ws, bs, idx), x, w.float(), b.float())
    want = (want[0], want[1].to(w_dtype), want[2].to(w_dtype))
    dx, dw, db = got
    assert dx.dtype == x.dtype and dw.dtype == w_dtype and db.dtype == w_dtype
    if sparse_grad:
        assert dw.is_sparse and db.is_sparse
        dw, db = dw.to_dense(), db.to_dense()
    torch.testing.assert_close(dx, want[0], **TOL)
    torch.testing.assert_close(dw.float(), want[1].float(), **GRAD_TOL[w_dtype])
    torch.testing.assert_close(db.float(), want[2].float(), **GRAD_TOL[w_dtype])


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_gradcheck_float64(id_dtype):
    B, K, D, N = 3, 9, 5, 11
    x, w, b, idx = make_inputs(B, K, D, N, torch.float64, torch.float64, torch.float64, id_dtype, pad_fraction=0.3)
    idx[0, :3] = 4  # repeated id within a row
    idx[1, 0] = 4  # and across rows
    inputs = tuple(t.requires_grad_() for t in (x, w, b))

    def scores(x, w, b):  # -inf at pads has no finite difference: mask those outputs out
        return cx.shortlist_score(x, w, b, idx).masked_fill(idx < 0, 0)

    assert torch.autograd.gradcheck(scores, inputs)


def test_sparse_grad_is_coalesced_and_equals_dense():
    N, D = 40, 13
    layer = cx.ShortlistedLinear(N, D, sparse_grad=True)
    dense = cx.ShortlistedLinear(N, D)
    dense.load_state_dict(layer.state_dict())
    x, _, _, idx = make_inputs(6, 25, D, N, pad_fraction=0.25)
    seen = []
    layer.weight.register_hook(lambda g: seen.append((g.is_coalesced(), g)))
    layer(x, idx).masked_fill(idx < 0, 0).sum().backward()
    dense(x, idx).masked_fill(idx < 0, 0).sum().backward()
    flag, handed_out = seen[0]
    assert flag, "the op hands autograd a coalesced sparse gradient"
    ids = layer.weight.grad._indices()[0]
    assert torch.equal(ids, torch.unique(idx[idx >= 0].long()))  # unique, ascending, exactly the touched rows
    torch.testing.assert_close(layer.weight.grad.to_dense(), dense.weight.grad, **TOL)
    torch.testing.assert_close(layer.bias.grad.to_dense(), dense.bias.grad, **TOL)


def test_sparse_adam_updates_only_touched_rows():
    N, D = 30, 8
    layer = cx.ShortlistedLinear(N, D, sparse_grad=True)
    before = layer.weight.detach().clone()
    idx = torch.tensor([[1, 5, 5, -1], [5, 7, -1, -1]])
    optimizer = torch.optim.SparseAdam(list(layer.parameters()), lr=0.1)
    layer(torch.randn(2, D), idx).masked_fill(idx < 0, 0).sum().backward()
    optimizer.step()
    changed = (layer.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 5, 7]


def test_deterministic_bitwise_across_runs_and_thread_counts():
    x, w, b, idx = make_inputs(16, 300, 96, 50, pad_fraction=0.1)  # many duplicate ids per row
    grad = torch.randn(16, 300)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, threads):
            torch.set_num_threads(n)
            results.append(
                (OPS.shortlist_score(x, w, b, idx), OPS.shortlist_score_grad_input(grad, w, idx),
                 *OPS.shortlist_score_grad_weight(grad, x, idx, 50), *OPS.shortlist_score_grad_weight_rows(grad, x, idx))
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_empty_batch_and_empty_shortlist():
    w = torch.randn(10, 4)
    for B, K in ((0, 5), (3, 0), (0, 0)):
        x = torch.randn(B, 4, requires_grad=True)
        idx = torch.zeros(B, K, dtype=torch.long)
        out = cx.shortlist_score(x, w, None, idx)
        assert out.shape == (B, K) and out.dtype == torch.float32
        out.sum().backward()
        assert x.grad.shape == (B, 4) and not x.grad.any()


def test_all_pads_give_minus_inf_and_no_gradient():
    layer = cx.ShortlistedLinear(7, 3)
    idx = torch.full((2, 4), -1)
    x = torch.randn(2, 3, requires_grad=True)
    out = layer(x, idx)
    assert torch.isneginf(out).all()
    out.masked_fill(idx < 0, 0).sum().backward()
    assert not x.grad.any() and not layer.weight.grad.any() and not layer.bias.grad.any()


def test_nan_in_x_stays_in_its_row():
    x, w, b, idx = make_inputs(4, 9, 6, 12, pad_fraction=0.0)
    x[2, 3] = float("nan")
    out = cx.shortlist_score(x, w, b, idx)
    assert torch.isnan(out[2]).all()
    assert not torch.isnan(out[[0, 1, 3]]).any()


def test_mixed_dtypes_and_autocast_do_not_cast():
    x, w, b, idx = make_inputs(3, 10, 16, 20, torch.bfloat16, torch.float32, torch.float16)
    plain = cx.shortlist_score(x, w, b, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = cx.shortlist_score(x, w, b, idx)
    assert cast.dtype == torch.float32
    assert torch.equal(cast, plain)


@pytest.mark.skipif(
    not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4"
)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(w_dtype):
    x, w, b, idx = make_inputs(3, 8, 5, 9, torch.float32, w_dtype, torch.float32, torch.int32)
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(OPS.shortlist_score.default, (x, w, b, idx, False, False))
    grad = torch.randn(3, 8)
    torch.library.opcheck(OPS.shortlist_score_grad_input.default, (grad, w.detach(), idx))
    torch.library.opcheck(OPS.shortlist_score_grad_weight.default, (grad, x, idx, 9, False, w_dtype))


def test_torch_compile_fullgraph_forward_and_dense_backward():
    layer = cx.ShortlistedLinear(50, 12)
    x, _, _, idx = make_inputs(4, 17, 12, 50)

    def loss(x, idx):
        return layer(x, idx).masked_fill(idx < 0, 0).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    xs = x.clone().requires_grad_()
    out = compiled(xs, idx)
    out.backward()
    got = (out.detach(), xs.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    xe = x.clone().requires_grad_()
    expected = loss(xe, idx)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach())
    torch.testing.assert_close(got[1], xe.grad)
    torch.testing.assert_close(got[2], layer.weight.grad)
    torch.testing.assert_close(got[3], layer.bias.grad)


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.skipif(_mem_available_gib() < 6, reason="needs ~4.5 GiB of address space backed on touch")
def test_row_offsets_past_2_pow_31_elements():
    # 2^22 + 16 rows x 512 bf16 columns = 2^31 + 8192 elements: the last rows start past int32 range. torch.empty
    # leaves pages untouched, so only the rows written here cost memory.
    N, D = 2**22 + 16, 512
    w = torch.empty(N, D, dtype=torch.bfloat16)
    high = torch.arange(N - 8, N)
    w[high] = torch.randn(8, D).to(torch.bfloat16)
    w[:8] = torch.randn(8, D).to(torch.bfloat16)
    assert int(high[0]) * D > 2**31
    idx = torch.cat([high, torch.arange(8)]).reshape(2, 8)
    x = torch.randn(2, D)
    expected = torch.einsum("bkd,bd->bk", w[idx].float(), x)
    torch.testing.assert_close(OPS.shortlist_score(x, w, None, idx), expected, **TOL)
    grad = torch.randn(2, 8)
    torch.testing.assert_close(
        OPS.shortlist_score_grad_input(grad, w, idx), torch.einsum("bk,bkd->bd", grad, w[idx].float()), **TOL
    )
    rows, _, _ = OPS.shortlist_score_grad_weight_rows(grad, x, idx)
    assert torch.equal(rows, torch.sort(idx.flatten()).values)


def test_layer_init_and_full_scores():
    torch.manual_seed(1)
    layer = cx.ShortlistedLinear(200, 64)
    bound = 1 / math.sqrt(64)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.std() > bound / 3  # uniform over the whole range, not a constant
    x = torch.randn(3, 64)
    all_ids = torch.arange(200).expand(3, 200)
    torch.testing.assert_close(layer.full(x), layer(x, all_ids), **TOL)
    half = cx.ShortlistedLinear(100, 16, dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16
    x = torch.randn(2, 16)
    torch.testing.assert_close(half.full(x, chunk_rows=7), half(x, torch.arange(100).expand(2, 100)), **TOL)
    assert "num_labels=100" in repr(half)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_gradients_written_in_the_table_dtype(dtype):
    # Accumulated in fp32, rounded once (to nearest even) to the requested dtype: no fp32 [N, D] copy is made.
    x, _, _, idx = make_inputs(4, 30, 40, 25)
    grad = torch.randn(4, 30)
    dw, db = OPS.shortlist_score_grad_weight(grad, x, idx, 25, False, dtype)
    rows, w_rows, b_rows = OPS.shortlist_score_grad_weight_rows(grad, x, idx, dtype)
    ref_dw, ref_db = OPS.shortlist_score_grad_weight(grad, x, idx, 25)
    assert dw.dtype == dtype and w_rows.dtype == dtype and db.dtype == torch.float32
    assert torch.equal(dw, ref_dw.to(dtype))
    assert torch.equal(w_rows, ref_dw[rows].to(dtype))
    assert torch.equal(b_rows, ref_db[rows])


def clustered_shortlists(B, clusters, cluster_size, N, generator):
    """idx [B, clusters * cluster_size]: per document, runs of consecutive ids (the labels of random clusters, so
    documents share runs), some cut short, shifted off the cluster grid or padded, and one document of scattered ids."""
    g = generator
    n_clusters = N // cluster_size
    starts = torch.randint(0, n_clusters, (B, clusters), generator=g) * cluster_size
    starts[:, 1] += torch.randint(0, 5, (B,), generator=g)  # runs overlapping another document's run
    idx = (starts.unsqueeze(-1) + torch.arange(cluster_size)).clamp(max=N - 1).reshape(B, -1)
    idx[0] = torch.randint(0, N, (idx.shape[1],), generator=g)  # scattered
    idx[1, : cluster_size] = idx[1, cluster_size: 2 * cluster_size]  # the same run twice in one document
    pads = torch.rand(B, idx.shape[1], generator=g) < 0.05
    return idx.masked_fill(pads, -1)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("D", [37, 150])
def test_batches_grouped_by_shared_runs_equal_per_document_scores(w_dtype, id_dtype, D):
    # Batches of >= 128 documents whose ids come in runs of consecutive rows are scored run by run, each run's rows
    # read once for all documents that hold it. Same dot products as one document at a time: same bits.
    gen = torch.Generator().manual_seed(21)
    B, N = 140, 3000
    idx = clustered_shortlists(B, 5, 40, N, gen).to(id_dtype)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64 if w_dtype == torch.float64 else torch.float32)
    scale = None
    if w_dtype == torch.int8:
        w, scale = cx.quantize_table(torch.randn(N, D, generator=gen))
    else:
        w = torch.randn(N, D, generator=gen).to(w_dtype)
    bias = torch.randn(N, generator=gen)
    kw = {} if scale is None else {"weight_scale": scale}
    out = cx.shortlist_score(x, w, bias, idx, **kw)
    for b in range(B):
        one = cx.shortlist_score(x[b: b + 1], w, bias, idx[b: b + 1], **kw)
        assert torch.equal(one[0], out[b]), f"document {b}"
    ref_w = w.float() * scale[:, None] if scale is not None else w
    assert_scores_equal(out, reference.shortlist_score(x, ref_w, bias, idx.long()),
                        TOL if w_dtype != torch.float64 else {"rtol": 1e-12, "atol": 1e-12})


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_batches_of_scattered_ids_and_long_runs(threads, one_thread):
    # Scattered ids fall back to the per-document path; a level scored in full (one run of every row per document)
    # is cut into pieces that spread over the threads. Both must equal the reference.
    gen = torch.Generator().manual_seed(22)
    torch.set_num_threads(threads)
    x = torch.randn(130, 24, generator=gen)
    w = torch.randn(700, 24, generator=gen)
    for idx in (torch.randint(-1, 700, (130, 50), generator=gen), torch.arange(700).expand(130, 700)):
        assert_scores_equal(cx.shortlist_score(x, w, None, idx), reference.shortlist_score(x, w, None, idx))


def _python_calls(fn):
    """(result, names of the Python functions fn ran, as 'file:function')."""
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            seen.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, seen


def _through_autograd_layer(calls):
    return any("torch/_library/autograd.py" in c for c in calls)


@pytest.mark.parametrize("case", ["plain", "no_grad", "int8"])
def test_calls_without_gradients_skip_the_autograd_layer(case):
    """Nothing requires grad, or grad mode is off: the kernel runs below the autograd key (no round trip through
    torch.library's Python autograd layer) and gives exactly what the op gives through it."""
    gen = torch.Generator().manual_seed(5)
    x, w, b, idx = make_inputs(3, 19, 24, 40, generator=gen)
    scale = None
    if case == "int8":
        w, scale = cx.quantize_table(w)
    if case == "no_grad":
        x.requires_grad_()
        b.requires_grad_()
    expected = OPS.shortlist_score(x.detach(), w, b.detach(), idx, False, False, scale)
    with torch.set_grad_enabled(case != "no_grad"):
        out, calls = _python_calls(lambda: cx.shortlist_score(x, w, b, idx, weight_scale=scale, validate=False))
    assert not _through_autograd_layer(calls)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, expected)


def test_calls_that_need_gradients_keep_the_autograd_layer():
    gen = torch.Generator().manual_seed(6)
    x, w, b, idx = make_inputs(3, 19, 24, 40, generator=gen)
    w.requires_grad_()
    out, calls = _python_calls(lambda: cx.shortlist_score(x, w, b, idx, validate=False))
    assert _through_autograd_layer(calls)
    assert out.grad_fn is not None
    out.masked_fill(idx < 0, 0).sum().backward()
    expected = torch.zeros_like(w)
    for bi in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if idx[bi, k] >= 0:
                expected[idx[bi, k]] += x[bi]
    torch.testing.assert_close(w.grad, expected, **TOL)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_dense_weight_gradient_of_a_large_table(w_dtype):
    """A dense gradient of >= 2 MiB comes from a lazily zeroed mapping (csrc/cpu/hugepage_alloc.h): the rows no
    shortlist holds must read as zeros, and the tensor must behave as any other: accumulated into by a second
    backward, changed in place, saved and loaded."""
    gen = torch.Generator().manual_seed(9)
    N, D = 4096, 384  # 6 MiB fp32, 3 MiB bf16
    x, w, b, idx = make_inputs(3, 50, D, N, w_dtype=w_dtype, b_dtype=w_dtype, generator=gen)
    upstream = torch.randn(3, 50, generator=gen).masked_fill(idx < 0, 0)
    ws = w.clone().requires_grad_()
    for _ in range(2):  # the second backward accumulates into the first's gradient
        (cx.shortlist_score(x, ws, b, idx).masked_fill(idx < 0, 0) * upstream).sum().backward()
    wf = w.float().requires_grad_()
    (reference.shortlist_score(x, wf, b.float(), idx).masked_fill(idx < 0, 0) * upstream).sum().backward()
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx[idx >= 0]] = False
    assert ws.grad.dtype == w_dtype and bool(untouched.any())
    assert not ws.grad[untouched].any()
    torch.testing.assert_close(ws.grad.float(), (2 * wf.grad).to(w_dtype).float(), **GRAD_TOL[w_dtype])
    ws.grad.mul_(0.5)
    buffer = io.BytesIO()
    torch.save(ws.grad, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer).float(), wf.grad.to(w_dtype).float(), **GRAD_TOL[w_dtype])


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_dense_weight_gradient_touches_only_the_shortlisted_rows():
    """The 256 MiB dense gradient of a 262,144 x 256 table whose shortlists hold ~2,000 rows: resident memory
    grows by the written rows, not by the whole gradient (at::zeros wrote all of it)."""
    N, D = 262144, 256
    w = torch.zeros(N, D).normal_().requires_grad_()
    x, idx = torch.randn(4, D), torch.randint(0, N, (4, 512))
    scores = cx.shortlist_score(x, w, None, idx)
    before = _rss_mib()
    scores.sum().backward()
    grown = _rss_mib() - before
    assert grown < 64, f"resident memory grew by {grown:.0f} MiB for a 256 MiB gradient of ~2,000 written rows"
    expected = torch.zeros(N, D).index_add_(0, idx.reshape(-1), x.repeat_interleave(512, dim=0))
    torch.testing.assert_close(w.grad, expected)
