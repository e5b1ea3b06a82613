"""Every vector path of the C++ CPU kernels (avx512, avx512_dot, avx2, scalar), forced with
cascadexml_fast.set_cpu_isa (the conftest `cpu_isa` fixture), against the reference: shortlist_score forward and
gradients, block_score, cascade_search and topk, on every table dtype. Paths this CPU lacks are skipped (the pytest
header lists them), so CI on any x86 machine covers what it can run. Also CASCADEXML_FAST_CPU_ISA at import, and
bad names."""
import os
import subprocess
import sys

import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast import _extension
from cascadexml_fast.ops import reference
from conftest import CPU_ISAS
from test_search import random_cascade, random_offsets
from test_shortlist_score import GRAD_TOL, STORAGE, TOL, assert_scores_equal, make_inputs

OPS = torch.ops.cascadexml_fast
# D: below one 32-lane block, whole blocks, and a ragged tail after several blocks
DIMS = [5, 64, 77]


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("w_dtype", STORAGE)
@pytest.mark.parametrize("D", DIMS)
def test_shortlist_score_and_gradients_on_every_path(cpu_isa, w_dtype, D):
    gen = torch.Generator().manual_seed(D)
    N, B, K = 90, 6, 40
    x, w, b, idx = make_inputs(B, K, D, N, x_dtype=w_dtype, w_dtype=w_dtype, generator=gen)
    assert cx.info()["cpu_isa"] == cpu_isa
    assert_scores_equal(OPS.shortlist_score(x, w, b, idx), reference.shortlist_score(x, w, b, idx))
    grad = torch.randn(B, K, generator=gen)
    torch.testing.assert_close(OPS.shortlist_score_grad_input(grad, w, idx),
                               reference.shortlist_score_grad_input(grad, w, idx), **GRAD_TOL[w_dtype])
    dw, db = OPS.shortlist_score_grad_weight(grad, x, idx, N)
    ref_dw, ref_db = reference.shortlist_score_grad_weight(grad, x, idx, N)
    torch.testing.assert_close(dw, ref_dw, **GRAD_TOL[w_dtype])
    torch.testing.assert_close(db, ref_db, **TOL)
    rows, rows_w, rows_b = OPS.shortlist_score_grad_weight_rows(grad, x, idx)
    ref_rows, ref_rows_w, ref_rows_b = reference.shortlist_score_grad_weight_rows(grad, x, idx)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(rows_w, ref_rows_w, **GRAD_TOL[w_dtype])
    torch.testing.assert_close(rows_b, ref_rows_b, **TOL)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("k", [1, 3, 40, 130])
def test_topk_on_every_path(cpu_isa, k):
    """topk's chunk test against the bar (topk.cpp, per path): rows of every length around the 16-lane vectors and
    64-score chunks, ties, NaN, +-inf, signed zeros, subnormals, ascending and descending rows, masks."""
    from test_search import assert_topk_equal

    gen = torch.Generator().manual_seed(k)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38])
    for n in (1, 15, 16, 17, 63, 64, 65, 129, 700, 5000):
        scores = torch.randint(-5, 6, (7, n), generator=gen).float()
        scores[1] = torch.randn(n, generator=gen)
        scores[2] = torch.arange(n, dtype=torch.float32)  # ascending: every chunk raises the bar
        scores[3] = -torch.arange(n, dtype=torch.float32)
        scores[4] = specials[torch.randint(0, len(specials), (n,), generator=gen)]
        scores[5, ::3] = float("nan")
        scores[6, n // 2:] = 100.0  # the best arrive late, all tied
        mask = torch.rand(7, n, generator=gen) > 0.4
        assert_topk_equal(OPS.topk(scores, k), reference.topk(scores, k))
        assert_topk_equal(OPS.topk(scores, k, mask), reference.topk(scores, k, mask))


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("k", [16, 128])
def test_topk_first_bar_from_a_sample(cpu_isa, k):
    """Rows of 16k to 64k scores start from a bar taken from a sample of every (2k / 16)-th score (topk.h): right,
    tied with everything, and too high (fewer than k scores reach it: the row is read again)."""
    from test_search import assert_topk_equal

    gen = torch.Generator().manual_seed(k)
    n, stride = 32 * k, 2 * k // 16
    too_high = torch.full((n,), 5.0)
    too_high[::stride] = 0.0
    too_high[: 16 * stride : stride] = 100.0 + torch.arange(16.0)  # the sample's 16 best, and nothing else above 5
    rows = torch.stack([torch.randn(n, generator=gen), torch.ones(n), too_high,
                        torch.randint(-2, 3, (n,), generator=gen).float()])
    mask = torch.rand(rows.shape, generator=gen) > 0.5
    for kk in (k, 2 * k, n // 64):
        assert_topk_equal(OPS.topk(rows, kk), reference.topk(rows, kk))
        assert_topk_equal(OPS.topk(rows, kk, mask), reference.topk(rows, kk, mask))


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("w_dtype", STORAGE)
def test_block_score_and_cascade_search_on_every_path(cpu_isa, w_dtype):
    gen = torch.Generator().manual_seed(3)
    N, D, B = 120, 77, 5
    x, w = torch.randn(B, D, generator=gen), torch.randn(N, D, generator=gen).to(w_dtype)
    b = torch.randn(N, generator=gen)
    offsets = random_offsets(30, N, gen)
    clusters = torch.randint(-1, 30, (B, 4), generator=gen)
    width = int((offsets[1:] - offsets[:-1]).max())
    scores, ids = cx.block_score(x, w, b, clusters, offsets)
    ref_scores, ref_ids = reference.block_score(x, w, b, clusters, offsets, width)
    assert torch.equal(ids, ref_ids)
    assert_scores_equal(scores, ref_scores)
    # integer-valued tables and features: exact dot products, so the ids must match the reference exactly, both on
    # the per-document path (B < 8) and on the batched one (B >= 8) that groups documents by block
    sizes, dims = [6, 25, 90, 300], [7, 40, 6, 77]
    for batch in (3, 12):
        features, weights, biases, offs = random_cascade(sizes, dims, batch, gen, dtype=w_dtype)
        got = cx.cascade_search(features, weights, biases, offs, [3, 5, 9], 10, "leaf_x_parent")
        want = reference.cascade_search(features, weights, biases, offs, [3, 5, 9], 10, "leaf_x_parent")
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], **TOL)


def _table(w_dtype, N, D, gen):
    """(table, scale): a random float table in w_dtype, or an int8 one with its per-row scales."""
    w = torch.randn(N, D, generator=gen)
    return cx.quantize_table(w) if w_dtype == torch.int8 else (w.to(w_dtype), None)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("w_dtype", STORAGE + [torch.int8])
def test_rows_shared_by_documents_score_as_one_document_at_a_time(cpu_isa, w_dtype):
    # The batched kernels (shortlist_score for >= 128 documents in runs, cascade_search for >= 8) score each shared
    # row once for all its documents; per document the bits must be those of a lone document's search on every
    # path. Real-valued inputs, D = 150: two 64-lane blocks and a tail.
    gen = torch.Generator().manual_seed(9)
    N, D, B = 900, 150, 130
    w, scale = _table(w_dtype, N, D, gen)
    idx = ((torch.randint(0, 30, (B, 4), generator=gen) * 30)[..., None] + torch.arange(30)).reshape(B, -1)
    x = torch.randn(B, D, generator=gen)
    out = OPS.shortlist_score(x, w, None, idx, False, False, scale)
    for b in range(0, B, 7):
        assert torch.equal(OPS.shortlist_score(x[b: b + 1], w, None, idx[b: b + 1], False, False, scale)[0], out[b])
    sizes, dims = [5, 40, 300], [150, 150, 150]
    tables = [_table(w_dtype, n, d, gen) for n, d in zip(sizes, dims)]
    weights, scales = [t for t, _ in tables], ([s for _, s in tables] if w_dtype == torch.int8 else None)
    offsets = [random_offsets(n, m, gen) for n, m in zip(sizes[:-1], sizes[1:])]
    features = [torch.randn(12, d, generator=gen) for d in dims]
    ids, scores = cx.cascade_search(features, weights, [None] * 3, offsets, [2, 6], 8, "leaf_x_parent",
                                    weight_scales=scales)
    for b in range(12):
        one_ids, one_scores = cx.cascade_search([f[b: b + 1] for f in features], weights, [None] * 3, offsets, [2, 6],
                                                8, "leaf_x_parent", weight_scales=scales)
        assert torch.equal(one_ids[0], ids[b]) and torch.equal(one_scores[0], scores[b])


def test_paths_agree_with_each_other_within_fma_rounding():
    """The same op on every supported path: equal up to the fused multiply-adds' rounding (avx2 and avx512 use
    FMA, scalar does not), so well within TOL; avx2 and avx512 bit for bit."""
    supported = _extension.supported_cpu_isas()
    if len(supported) < 2:
        pytest.skip(f"only one vector path here ({', '.join(supported) or 'no extension'})")
    gen = torch.Generator().manual_seed(0)
    x, w, b, idx = make_inputs(4, 300, 768, 500, generator=gen)
    outs = {}
    try:
        for name in supported:
            cx.set_cpu_isa(name)
            outs[name] = OPS.shortlist_score(x, w, b, idx)
    finally:
        cx.set_cpu_isa("auto")
    first = outs[supported[0]]
    for name, out in outs.items():
        assert_scores_equal(out, first)
    if {"avx512", "avx2"} <= set(outs):  # the same 32 lanes and FMAs: bit-identical
        assert torch.equal(outs["avx512"], outs["avx2"])
    for name in ("avx512_vnni", "avx512_dot"):  # fp32 rows: avx512's code on the dot-product paths
        if {name, "avx512"} <= set(outs):
            assert torch.equal(outs[name], outs["avx512"])
    if "scalar" in outs:  # no FMA on the baseline: some last bits differ, which shows the path really switched
        assert not torch.equal(outs["scalar"], first)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("D", [5, 77, 768])
def test_avx512_and_avx2_rows_have_the_same_bits(w_dtype, D):
    """avx512 and avx2 keep the same 64 lanes, FMAs and reduction for rows widened to fp32 (fp32, bf16, int8 rows
    without prepared parts: avx512 itself, and bf16 rows on avx512_vnni), ragged tails included (D = 5: only a tail;
    77: one block and a tail), in the per-document shortlist, the grouped one (B >= 128 in runs) and block_score.
    Before the tails' multiply-adds were explicit, fp32 rows with a tail differed in the last bit."""
    supported = set(_extension.supported_cpu_isas())
    if not {"avx512", "avx2"} <= supported:
        pytest.skip("needs the avx512 and avx2 paths")
    gen = torch.Generator().manual_seed(21)
    N = 700
    w, scale = _table(w_dtype, N, D, gen)
    b = torch.randn(N, generator=gen)
    x, _, _, scattered = make_inputs(3, 203, D, N, generator=gen)
    X = torch.randn(130, D, generator=gen)
    runs = ((torch.randint(0, 23, (130, 3), generator=gen) * 30)[..., None] + torch.arange(29)).reshape(130, -1)
    offsets = random_offsets(60, N, gen)
    clusters = torch.randint(-1, 60, (5, 7), generator=gen)
    paths = ["avx512", "avx2"] + (["avx512_vnni"] if w_dtype == torch.bfloat16 and "avx512_vnni" in supported else [])
    outs = {}
    try:
        for name in paths:
            cx.set_cpu_isa(name)
            outs[name] = (OPS.shortlist_score(x, w, b, scattered, False, False, scale),
                          OPS.shortlist_score(X, w, None, runs, False, False, scale),
                          cx.block_score(X[:5], w, b, clusters, offsets, weight_scale=scale)[0])
    finally:
        cx.set_cpu_isa("auto")
    for name in paths[:1] + paths[2:]:
        for got, want in zip(outs[name], outs["avx2"]):
            assert torch.equal(got, want), name


def test_set_cpu_isa_errors_and_auto():
    if _extension.module is None:
        pytest.skip("the C++ extension is not loaded")
    best = _extension.supported_cpu_isas()[0]
    assert cx.set_cpu_isa("auto") == best == cx.info()["cpu_isa"]
    assert cx.info()["cpu_isas_supported"] == list(_extension.supported_cpu_isas())
    with pytest.raises(ValueError, match="name must be one of"):
        cx.set_cpu_isa("neon")
    lacking = [name for name in CPU_ISAS if name not in _extension.supported_cpu_isas()]
    if lacking:
        with pytest.raises(RuntimeError, match="does not support"):
            cx.set_cpu_isa(lacking[0])
    assert cx.info()["cpu_isa"] == best  # a refused request changes nothing


def _isa_at_import(value):
    env = dict(os.environ, CASCADEXML_FAST_CPU_ISA=value)
    code = "import warnings, cascadexml_fast as cx; print(cx.info()['cpu_isa'])"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


def test_environment_variable_forces_the_path_at_import():
    if _extension.module is None:
        pytest.skip("the C++ extension is not loaded")
    assert _isa_at_import("scalar")[0] == "scalar"
    chosen, err = _isa_at_import("sve")  # unknown: a warning, and the default path
    assert chosen == _extension.supported_cpu_isas()[0] and "CASCADEXML_FAST_CPU_ISA='sve' ignored" in err


def _optimizer_steps():
    """One sparse AdamW step of each kind on fixed inputs: lazy, exact with rows that replay missed steps (some
    elements stop early: zero or tiny momentum), bf16 state, 8-bit state."""
    gen = torch.Generator().manual_seed(3)
    N, D = 40, 300  # D: a ragged tail after whole vectors, and two 8-bit blocks (256 + 44)
    p0 = torch.randn(N, D, generator=gen)
    m0 = torch.randn(N, D, generator=gen) * 0.01
    v0 = torch.rand(N, D, generator=gen) * 1e-4
    m0[::7] = 0
    m0[1::5, :100] = 1e-12
    rows = torch.arange(1, N, 2)
    grad = torch.randn(rows.numel(), D, generator=gen)
    history = torch.rand(64, dtype=torch.float64, generator=gen) * 1e-2
    out = {}
    for mode in ("lazy", "exact"):
        for state_dtype in (torch.float32, torch.bfloat16):
            p, m, v = p0.clone(), m0.to(state_dtype), v0.to(state_dtype)
            last = torch.randint(0, 40, (N,), generator=torch.Generator().manual_seed(4)) if mode == "exact" else None
            OPS.sparse_adamw_step(p, m, v, rows, grad, 50, 0.01, 0.9, 0.999, 1e-8, 0.05, last,
                                  history if mode == "exact" else None, False, 0)
            out[(mode, str(state_dtype))] = (p, m, v)
    p = p0.clone()
    codes = [torch.randint(0, 256, (N, D), dtype=torch.uint8, generator=gen) for _ in range(2)]
    scales = [torch.rand(N, 2, generator=gen) * 0.1 for _ in range(2)]
    OPS.sparse_adamw8bit_step(p, codes[0], scales[0], codes[1], scales[1], rows, grad, 50, 0.01, 0.9, 0.999, 1e-8,
                              0.05, False, 0)
    out["8bit"] = (p, *codes, *scales)
    return out


def test_sparse_adamw_is_bit_identical_on_every_path():
    """The optimizer kernels are compiled without FMA contraction (to keep the reference's bits), so every vector
    path, the replay of missed steps in exact mode included, gives the same bits."""
    supported = _extension.supported_cpu_isas()
    if len(supported) < 2:
        pytest.skip(f"only one vector path here ({', '.join(supported) or 'no extension'})")
    results = {}
    try:
        for name in supported:
            cx.set_cpu_isa(name)
            results[name] = _optimizer_steps()
    finally:
        cx.set_cpu_isa("auto")
    first = results[supported[0]]
    for name, out in results.items():
        for key, tensors in out.items():
            for a, b in zip(tensors, first[key]):
                assert torch.equal(a, b), (name, key)
