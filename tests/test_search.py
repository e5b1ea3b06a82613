"""topk, block_score and cascade_search through the registered ops (C++ kernels on CPU) against the reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cascadexml_fast as cx
from cascadexml_fast.ops import reference
from test_shortlist_score import STORAGE, TOL, assert_scores_equal

OPS = torch.ops.cascadexml_fast


def assert_topk_equal(got, want):
    (values, positions), (ref_values, ref_positions) = got, want
    assert positions.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(positions, ref_positions)
    assert torch.equal(torch.isnan(values), torch.isnan(ref_values))
    assert torch.equal(values.nan_to_num(), ref_values.nan_to_num())


def random_offsets(num_nodes, num_children, generator, max_block=None):
    """CSR offsets splitting num_children rows among num_nodes nodes at random (empty and size-1 blocks occur)."""
    if num_nodes <= 1:
        return torch.tensor([0, num_children][: num_nodes + 1])
    cuts = torch.sort(torch.randint(0, num_children + 1, (num_nodes - 1,), generator=generator)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([num_children])])


# ---------------------------------------------------------------------------------------------------------------
# topk


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(0, 5), K=st.integers(0, 70), k=st.integers(0, 80), with_mask=st.booleans(),
    specials=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_topk_matches_reference(B, K, k, with_mask, specials, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-4, 5, (B, K), generator=gen).float()  # few distinct values: many ties
    if specials and B * K:
        flat = scores.view(-1)
        picks = torch.randint(0, B * K, (3,), generator=gen)
        flat[picks[0]], flat[picks[1]], flat[picks[2]] = float("nan"), float("-inf"), float("inf")
    mask = torch.rand(B, K, generator=gen) < 0.7 if with_mask else None
    assert_topk_equal(cx.topk(scores, k, mask), reference.topk(scores, k, mask))


def test_topk_rules_by_hand():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[1.0, nan, 3.0, 3.0, -inf, 2.0]])
    values, positions = cx.topk(scores, 8)
    assert positions.tolist() == [[2, 3, 5, 0, 4, 1, -1, -1]]  # ties -> lower position; NaN below -inf
    assert values[0, :5].tolist() == [3.0, 3.0, 2.0, 1.0, -inf] and torch.isnan(values[0, 5])
    assert values[0, 6:].tolist() == [-inf, -inf]
    mask = torch.tensor([[True, True, False, True, False, False]])
    assert cx.topk(scores, 3, mask)[1].tolist() == [[3, 0, 1]]
    assert cx.topk(scores, 2, torch.zeros_like(mask))[1].tolist() == [[-1, -1]]
    assert cx.topk(torch.tensor([[-0.0, 0.0, -0.0]]), 3)[1].tolist() == [[0, 1, 2]]  # -0.0 == +0.0: a tie


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_topk_other_score_dtypes(dtype):
    scores = torch.randn(4, 50).to(dtype)
    assert_topk_equal(cx.topk(scores, 7), reference.topk(scores, 7))


# ---------------------------------------------------------------------------------------------------------------
# block_score


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(0, 5), C=st.integers(0, 6), nodes=st.integers(1, 12), D=st.integers(1, 40),
    x_dtype=st.sampled_from(STORAGE), w_dtype=st.sampled_from(STORAGE), id32=st.booleans(), bias=st.booleans(),
    extra_width=st.integers(0, 2), seed=st.integers(0, 2**31 - 1),
)
def test_block_score_matches_reference(B, C, nodes, D, x_dtype, w_dtype, id32, bias, extra_width, seed):
    gen = torch.Generator().manual_seed(seed)
    N = int(torch.randint(0, 40, (1,), generator=gen))
    offsets = random_offsets(nodes, N, gen)
    width = int((offsets[1:] - offsets[:-1]).max()) + extra_width
    x = torch.randn(B, D, generator=gen).to(x_dtype)
    w = torch.randn(N, D, generator=gen).to(w_dtype)
    b = torch.randn(N, generator=gen).to(w_dtype) if bias else None
    clusters = torch.randint(-1, nodes, (B, C), generator=gen)
    clusters = clusters.int() if id32 else clusters
    scores, ids = cx.block_score(x, w, b, clusters, offsets, width)
    ref_scores, ref_ids = reference.block_score(x, w, b, clusters, offsets, width)
    assert torch.equal(ids, ref_ids)
    assert_scores_equal(scores, ref_scores)


def test_block_score_default_width_and_errors():
    offsets = torch.tensor([0, 2, 2, 5])
    w, x = torch.randn(5, 3), torch.randn(2, 3)
    clusters = torch.tensor([[2, 1], [0, -1]])
    scores, ids = cx.block_score(x, w, None, clusters, offsets)
    assert ids.tolist() == [[2, 3, 4, -1, -1, -1], [0, 1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match=r"clusters\[0, 0\] = 3 is out of range \[-1, 3\)"):
        cx.block_score(x, w, None, torch.tensor([[3, 0], [0, 0]]), offsets)
    with pytest.raises(ValueError, match="max_children = 2 but a cluster has 3 children"):
        cx.block_score(x, w, None, clusters, offsets, 2)
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        cx.block_score(x, w, None, clusters, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 5\]"):
        cx.block_score(x, w, None, clusters, torch.tensor([0, 2, 2, 6]))
    with pytest.raises(RuntimeError, match="has 3 children but max_children is 2"):
        OPS.block_score(x, w, None, clusters, offsets, 2)  # the kernel checks too
    for validate in (True, False):  # on CPU the kernel's check, in the same words either way
        with pytest.raises(ValueError, match=r"clusters\[1, 1\] = -2 is out of range \[-1, 3\) \(-1 is the pad id\)"):
            cx.block_score(x, w, None, torch.tensor([[2, 1], [0, -2]]), offsets, 3, validate=validate)


# ---------------------------------------------------------------------------------------------------------------
# cascade_search


def random_cascade(sizes, dims, B, generator, bias=True, dtype=torch.float32):
    """Integer-valued features and tables: every dot product is exact in fp32, so all backends see identical
    logits and the ids must agree exactly."""
    offsets = [random_offsets(n, m, generator) for n, m in zip(sizes[:-1], sizes[1:])]
    features = [torch.randint(-2, 3, (B, d), generator=generator).float() for d in dims]
    weights = [torch.randint(-2, 3, (n, d), generator=generator).to(dtype) for n, d in zip(sizes, dims)]
    biases = [torch.randint(-2, 3, (n,), generator=generator).float() if bias else None for n in sizes]
    return features, weights, biases, offsets


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    levels=st.integers(1, 4), B=st.integers(0, 4), k=st.integers(0, 30), combine=st.sampled_from(["leaf", "leaf_x_parent"]),
    bias=st.booleans(), dtype=st.sampled_from(STORAGE), seed=st.integers(0, 2**31 - 1),
)
def test_cascade_search_matches_reference(levels, B, k, combine, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(1, 8, (1,), generator=gen))]
    for _ in range(levels - 1):
        sizes.append(int(torch.randint(0, 4 * sizes[-1] + 3, (1,), generator=gen)))
    dims = [int(torch.randint(1, 9, (1,), generator=gen)) for _ in sizes]
    features, weights, biases, offsets = random_cascade(sizes, dims, B, gen, bias, dtype)
    beams = [int(torch.randint(0, n + 3, (1,), generator=gen)) for n in sizes[:-1]]  # beams may exceed a level
    ids, scores = cx.cascade_search(features, weights, biases, offsets, beams, k, combine)
    ref_ids, ref_scores = reference.cascade_search(features, weights, biases, offsets, beams, k, combine)
    assert ids.shape == (B, k) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert torch.equal(torch.isneginf(scores), ref_ids < 0)
    torch.testing.assert_close(scores.masked_fill(ids < 0, 0), ref_scores.masked_fill(ids < 0, 0), **TOL)


def test_cascade_search_by_hand():
    # Two top nodes; node 0 has labels {0, 1}, node 1 has label {2}. With beam 1 only node 0's labels are seen.
    x = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]])]
    w = [torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0], [3.0], [5.0]])]
    offsets = [torch.tensor([0, 2, 3])]
    ids, scores = cx.cascade_search(x, w, [None, None], offsets, [1], k=3)
    assert ids.tolist() == [[1, 0, -1]]
    torch.testing.assert_close(scores[0, :2], torch.sigmoid(torch.tensor([3.0, 1.0])))
    ids, scores = cx.cascade_search(x, w, [None, None], offsets, [2], k=3, combine="leaf_x_parent")
    expected = torch.sigmoid(torch.tensor([5.0, 3.0, 1.0])) * torch.sigmoid(torch.tensor([1.0, 2.0, 2.0]))
    order = torch.argsort(expected, descending=True)
    assert ids[0].tolist() == torch.tensor([2, 1, 0])[order].tolist()
    torch.testing.assert_close(scores[0], expected[order])


def test_cascade_search_errors():
    gen = torch.Generator().manual_seed(0)
    features, weights, biases, offsets = random_cascade([3, 7], [4, 4], 2, gen)
    with pytest.raises(ValueError, match="beams must have 1 entries"):
        cx.cascade_search(features, weights, biases, offsets, [1, 2], 3)
    with pytest.raises(ValueError, match="combine must be one of"):
        cx.cascade_search(features, weights, biases, offsets, [1], 3, combine="sum")
    with pytest.raises(ValueError, match=r"offsets\[0\] must have 4 entries"):
        cx.cascade_search(features, weights, biases, [offsets[0][:-1]], [1], 3)
    with pytest.raises(ValueError, match=r"features\[1\] has B = 3 rows"):
        cx.cascade_search([features[0], torch.randn(3, 4)], weights, biases, offsets, [1], 3)
    with pytest.raises(ValueError, match=r"features\[1\] has D = 5 features but weights\[1\] has D = 4"):
        cx.cascade_search([features[0], torch.randn(2, 5)], weights, biases, offsets, [1], 3)
    with pytest.raises(ValueError, match=r"max_children\[0\] = 0"):
        cx.cascade_search(features, weights, biases, offsets, [1], 3, max_children=[0])
    with pytest.raises(RuntimeError, match="offsets must have 4 entries"):
        OPS.cascade_search(features, weights, biases, [offsets[0][:-1]], [1], [7], 3, "leaf")
    # The op itself (no Python checks) refuses a block wider than max_children: up front for a batch of >= 8
    # documents, at the block it reads for fewer (the beam of 3 covers every node here, so it reads them all).
    for docs in (1, 9):
        feats = [f[:1].expand(docs, -1).contiguous() for f in features]
        with pytest.raises(RuntimeError, match="max_children = 1"):
            OPS.cascade_search(feats, weights, biases, offsets, [3], [1], 3, "leaf")


def test_opcheck_search_ops():
    gen = torch.Generator().manual_seed(1)
    features, weights, biases, offsets = random_cascade([3, 9], [4, 4], 2, gen)
    torch.library.opcheck(OPS.topk.default, (torch.randn(3, 10), 4, torch.rand(3, 10) > 0.3))
    clusters = torch.tensor([[0, 2], [1, -1]])
    torch.library.opcheck(OPS.block_score.default, (features[1], weights[1], biases[1], clusters, offsets[0], 9))
    torch.library.opcheck(OPS.cascade_search.default, (features, weights, biases, offsets, [2], [9], 4, "leaf"))


@pytest.mark.parametrize("k", [1, 10, 100, 600])
def test_topk_long_rows_with_ties_nan_and_masks(k):
    # Long rows: past the first chunks most scores are tested against the bar only by vector compares; ties,
    # NaN, -inf and masks must not disturb it.
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(-3, 3, (8, 5000), generator=gen).float()
    scores[0, ::7] = float("nan")
    scores[1] = float("nan")
    scores[2, :100] = float("-inf")
    scores[3, 4000:] = 10.0  # the best candidates arrive late
    mask = torch.rand(8, 5000, generator=gen) > 0.3
    assert_topk_equal(cx.topk(scores, k), reference.topk(scores, k))
    assert_topk_equal(cx.topk(scores, k, mask), reference.topk(scores, k, mask))


@pytest.mark.parametrize("combine", ["leaf", "leaf_x_parent"])
def test_cascade_search_batched_path_equals_per_document_calls(combine):
    # Batches (B >= 8) run level by level with blocks grouped across documents; single documents run alone.
    # Both compute the same dot products, so scores must agree bit for bit, and ids with the reference.
    gen = torch.Generator().manual_seed(11)
    sizes, dims = [6, 25, 90, 400], [7, 5, 6, 8]
    features, weights, biases, offsets = random_cascade(sizes, dims, 20, gen)
    features = [f + 0.01 * torch.randn(f.shape, generator=gen) for f in features]  # real-valued scores too
    beams = [3, 5, 9]
    ids, scores = cx.cascade_search(features, weights, biases, offsets, beams, 12, combine)
    for b in range(20):
        one_ids, one_scores = cx.cascade_search([f[b: b + 1] for f in features], weights, biases, offsets, beams, 12,
                                                combine)
        assert torch.equal(one_ids[0], ids[b]) and torch.equal(one_scores[0], scores[b])
    ref_ids, ref_scores = reference.cascade_search(features, weights, biases, offsets, beams, 12, combine)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, **TOL)


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("docs", [1, 9])
def test_cascade_search_reads_bias_in_its_own_dtype(bias_dtype, docs):
    # The kernel reads bf16/fp16 biases as stored (no per-call fp32 copy of the whole bias); integer values are
    # exact in every dtype, so the result must equal the search with the fp32 bias bit for bit.
    gen = torch.Generator().manual_seed(5)
    features, weights, biases, offsets = random_cascade([5, 30, 150], [6, 5, 7], docs, gen)
    weights = [w.to(torch.bfloat16) for w in weights]
    want = cx.cascade_search(features, weights, biases, offsets, [3, 8], 10, "leaf_x_parent")
    got = cx.cascade_search(features, weights, [b.to(bias_dtype) for b in biases], offsets, [3, 8], 10,
                            "leaf_x_parent")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_search_long_rows_across_many_blocks(threads, dtype):
    # Rows of 1-4 KB in blocks of 0-20 rows: the rows prefetched ahead run across block ends, empty blocks and
    # (two threads, one document) the split of a beam between threads; none of it may change a result.
    gen = torch.Generator().manual_seed(6)
    sizes, dims = [16, 180, 1900], [300, 520, 1000]
    features, weights, biases, offsets = random_cascade(sizes, dims, 3, gen, dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for docs in (slice(0, 1), slice(0, 3)):
            feats = [f[docs] for f in features]
            ids, scores = cx.cascade_search(feats, weights, biases, offsets, [9, 40], 50, "leaf_x_parent")
            ref_ids, ref_scores = reference.cascade_search(feats, weights, biases, offsets, [9, 40], 50,
                                                           "leaf_x_parent")
            assert torch.equal(ids, ref_ids)
            torch.testing.assert_close(scores, ref_scores, **TOL)
    finally:
        torch.set_num_threads(previous)


def test_cascade_search_checks_a_tree_again_after_an_in_place_change():
    # Trees are checked once per version of their offsets tensor (the check is O(nodes)); any in-place write
    # through the tensor or a view must bring the check back.
    gen = torch.Generator().manual_seed(8)
    features, weights, biases, offsets = random_cascade([4, 12, 40], [3, 3, 3], 2, gen)
    cx.cascade_search(features, weights, biases, offsets, [2, 3], 5)
    cx.cascade_search(features, weights, biases, offsets, [2, 3], 5)  # the cached answer
    from cascadexml_fast.ops import search as search_ops
    assert all(id(o) in search_ops._checked_offsets for o in offsets)
    saved = offsets[1].clone()
    offsets[1][1:3].copy_(torch.tensor([39, 2]))  # through a view: no longer non-decreasing
    with pytest.raises(ValueError, match=r"offsets\[1\] must be non-decreasing"):
        cx.cascade_search(features, weights, biases, offsets, [2, 3], 5)
    offsets[1].copy_(saved)
    offsets[1][-1] = 41  # past the next level's 40 rows
    with pytest.raises(ValueError, match=r"offsets\[1\] must lie in \[0, 40\]"):
        cx.cascade_search(features, weights, biases, offsets, [2, 3], 5)
    offsets[1].copy_(saved)
    ids, _ = cx.cascade_search(features, weights, biases, offsets, [2, 3], 5)
    assert torch.equal(ids, reference.cascade_search(features, weights, biases, offsets, [2, 3], 5)[0])
    with torch.inference_mode():  # inference tensors keep no version: checked on every call
        fresh = [o.clone() for o in offsets]
        fresh[0][1] = 99
        with pytest.raises(ValueError, match=r"offsets\[0\] must"):
            cx.cascade_search(features, weights, biases, fresh, [2, 3], 5)
