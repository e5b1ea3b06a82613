"""The dot-product CPU paths: avx512_vnni (x86-64-v4 + AVX512_VNNI, the default where present) multiplies int8 table
rows by vpdpwssd, avx512_dot (+ AVX512_BF16, opt-in) also bf16 rows by vdpbf16ps, against each document's features
split into two parts (csrc/cpu/query.h). Their contract, checked against float64 on shortlist_score and
cascade_search:

* int8 rows: x ~ s (hi + lo / 2^15) with int16 parts and s a power of two, integer sums exact, so
  |score - <x, q> scale| <= scale (2^-29 max|x| sum|q|) + one float rounding; integer-valued features are exact.
* bf16 rows: x ~ hi + lo in bf16, so |score - <x, w>| <= 2^-16 sum|x w| + fp32 accumulation.
* a row's bits do not depend on the rows scored beside it (the kernels take 1-4 rows at a time), nor on the batch.
* features the parts cannot hold (NaN, inf, beyond bf16's range) keep the fp32 dot: avx512's bits.
* fp32 and fp16 tables (and bf16 on avx512_vnni): avx512's bits.

Skipped where the CPU lacks the path (the pytest header lists the paths tested)."""
import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast import _extension

OPS = torch.ops.cascadexml_fast

INT8_PATHS = ["avx512_vnni", "avx512_dot"]  # int8 rows through vpdpwssd
BF16_PATHS = ["avx512_dot"]  # bf16 rows through vdpbf16ps
PATH_DTYPES = [(p, torch.int8) for p in INT8_PATHS] + [(p, torch.bfloat16) for p in BF16_PATHS]


@pytest.fixture
def dot_path(request):
    """Forces request.param (a dot-product path) for the test, skipping where the CPU or build lacks it."""
    if request.param not in _extension.supported_cpu_isas():
        pytest.skip(f"this CPU (or build) lacks the {request.param} path")
    try:
        cx.set_cpu_isa(request.param)
        yield request.param
    finally:
        cx.set_cpu_isa("auto")


def _scores(x, w, idx, scale=None, isa="avx512"):
    """shortlist_score on another path (avx512 by default), then back to the one the test runs on."""
    current = cx.info()["cpu_isa"]
    try:
        cx.set_cpu_isa(isa)
        return OPS.shortlist_score(x, w, None, idx, False, False, scale)
    finally:
        cx.set_cpu_isa(current)


def _table(w_dtype, N, D, gen):
    """(table, per-row scales or None): random rows in bf16, or quantised to int8."""
    w = torch.randn(N, D, generator=gen)
    return cx.quantize_table(w) if w_dtype == torch.int8 else (w.bfloat16(), None)


def _exact(x, w_float, idx):
    """<x, w[idx]> in float64 and sum |x w| (the error scale)."""
    xd, wd = x.double()[:, None, :], w_float.double()[idx]
    return (xd * wd).sum(-1), (xd.abs() * wd.abs()).sum(-1)


@pytest.mark.parametrize("D,magnitude", [(5, 1.0), (31, 1.0), (32, 1.0), (77, 1.0), (768, 1.0), (9000, 1.0),
                                         (77, 1e-30), (77, 1e30)])  # exponents beyond +-100: the split in double
@pytest.mark.parametrize("dot_path", INT8_PATHS, indirect=True)
def test_int8_rows_within_the_stated_bound(dot_path, D, magnitude):
    gen = torch.Generator().manual_seed(D)
    N, B, K = 60, 5, 23
    q, scale = cx.quantize_table(torch.randn(N, D, generator=gen))
    x = torch.randn(B, D, generator=gen) * torch.logspace(-3, 3, B)[:, None] * magnitude  # every magnitude
    idx = torch.randint(0, N, (B, K), generator=gen)
    out = OPS.shortlist_score(x, q, None, idx, False, False, scale)
    want = _exact(x, q, idx)[0] * scale.double()[idx]  # the scale applied to the exact <x, q>, as the kernel does
    bound = (scale.double()[idx] * 2.0 ** -29 * x.abs().amax(1, keepdim=True).double()
             * q.double().abs().sum(1)[idx] + want.abs() * 2.0 ** -23)
    assert ((out.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("D", [5, 31, 64, 77, 768, 9000])
@pytest.mark.parametrize("dot_path", BF16_PATHS, indirect=True)
def test_bf16_rows_within_the_stated_bound(dot_path, D):
    gen = torch.Generator().manual_seed(D)
    N, B, K = 60, 5, 23
    w = torch.randn(N, D, generator=gen).bfloat16()
    x = torch.randn(B, D, generator=gen) * torch.logspace(-3, 3, B)[:, None]
    idx = torch.randint(0, N, (B, K), generator=gen)
    out = OPS.shortlist_score(x, w, None, idx, False, False)
    want, magnitude = _exact(x, w.float(), idx)
    assert ((out.double() - want).abs() <= magnitude * (2.0 ** -16 + D * 2.0 ** -24)).all()
    # not avx512's bits: the path really switched
    assert not torch.equal(out, _scores(x, w, idx))


@pytest.mark.parametrize("dot_path", INT8_PATHS, indirect=True)
def test_integer_valued_inputs_are_exact(dot_path):
    gen = torch.Generator().manual_seed(1)
    N, B, K, D = 40, 4, 30, 300
    x = torch.randint(-50, 51, (B, D), generator=gen).float()
    w = torch.randint(-127, 128, (N, D), generator=gen)
    idx = torch.randint(0, N, (B, K), generator=gen)
    want = (x.double()[:, None, :] * w.double()[idx]).sum(-1).float()
    assert torch.equal(OPS.shortlist_score(x, w.to(torch.int8), None, idx, False, False, torch.ones(N)), want)
    assert torch.equal(OPS.shortlist_score(x, w.bfloat16(), None, idx, False, False), want)


@pytest.mark.parametrize("dot_path", INT8_PATHS, indirect=True)
def test_int8_sums_do_not_overflow_past_the_int32_span(dot_path):
    # Every product at its largest (-128 x the largest feature) over more elements than one int32 accumulation holds.
    D, N = 3 * 8192 + 77, 3
    q = torch.full((N, D), -128, dtype=torch.int8)
    q[1] = 127
    q[2, ::2] = 127
    x = torch.full((2, D), -7.5)
    x[1, 1::2] = 3.0
    idx = torch.arange(N).expand(2, N).contiguous()
    out = OPS.shortlist_score(x, q, None, idx, False, False, torch.ones(N))
    want = (x.double() @ q.double().T).float()
    assert torch.equal(out, want)


@pytest.mark.parametrize("dot_path,w_dtype", PATH_DTYPES, indirect=["dot_path"])
def test_a_rows_bits_do_not_depend_on_its_neighbours(dot_path, w_dtype):
    gen = torch.Generator().manual_seed(5)
    N, D = 50, 150
    w, scale = _table(w_dtype, N, D, gen)
    x = torch.randn(1, D, generator=gen)
    # 1 to 9 rows, pads between them: groups of 4 rows, 1-3 left over, every position
    for K in range(1, 10):
        idx = torch.randint(0, N, (1, K), generator=gen)
        idx[0, K // 2] = -1 if K > 2 else idx[0, K // 2]
        out = OPS.shortlist_score(x, w, None, idx, False, False, scale)
        for k in range(K):
            if idx[0, k] < 0:
                assert torch.isneginf(out[0, k])
                continue
            alone = OPS.shortlist_score(x, w, None, idx[:, k: k + 1], False, False, scale)
            assert torch.equal(out[0, k], alone[0, 0])


@pytest.mark.parametrize("dot_path,w_dtype", PATH_DTYPES, indirect=["dot_path"])
def test_features_the_parts_cannot_hold_keep_the_fp32_dot(dot_path, w_dtype):
    gen = torch.Generator().manual_seed(2)
    N, D = 20, 70
    w, scale = _table(w_dtype, N, D, gen)
    x = torch.randn(4, D, generator=gen)
    x[0, 3] = float("nan")
    x[1, 10] = float("inf")
    x[2, 0] = 3e38  # beyond bf16's largest finite value (fine for int16 parts)
    idx = torch.arange(N).expand(4, N).contiguous()
    out = OPS.shortlist_score(x, w, None, idx, False, False, scale)
    fp32_dot = _scores(x, w, idx, scale)
    assert torch.equal(out[:2].isnan(), fp32_dot[:2].isnan())
    assert torch.equal(torch.nan_to_num(out[:2]), torch.nan_to_num(fp32_dot[:2]))
    if w_dtype == torch.bfloat16:
        assert torch.equal(out[2], fp32_dot[2])
    assert not torch.equal(out[3], fp32_dot[3])  # an ordinary document still takes the dot path


@pytest.mark.parametrize("dot_path", INT8_PATHS, indirect=True)
def test_other_tables_keep_avx512_bits(dot_path):
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16) + ((torch.bfloat16,) if dot_path not in BF16_PATHS else ()):
        w = torch.randn(40, 100, generator=gen).to(dtype)
        x = torch.randn(3, 100, generator=gen)
        idx = torch.randint(0, 40, (3, 17), generator=gen)
        assert torch.equal(OPS.shortlist_score(x, w, None, idx, False, False), _scores(x, w, idx))


@pytest.mark.parametrize("dot_path,w_dtype", PATH_DTYPES, indirect=["dot_path"])
def test_cascade_search_on_the_dot_path_matches_float64(dot_path, w_dtype):
    """The search on the dot path ranks as the float64 search does wherever the scores are not near-ties."""
    from cascadexml_fast.ops import reference
    from test_search import random_offsets

    gen = torch.Generator().manual_seed(4)
    sizes, D, B = [6, 40, 300], 96, 10
    floats = [torch.randn(n, D, generator=gen) for n in sizes]
    if w_dtype == torch.int8:
        tables = [cx.quantize_table(w) for w in floats]
        weights, scales = [q for q, _ in tables], [s for _, s in tables]
        exact = [q.double() * s.double()[:, None] for q, s in tables]
    else:
        weights, scales = [w.bfloat16() for w in floats], None
        exact = [w.bfloat16().double() for w in floats]
    offsets = [random_offsets(n, m, gen) for n, m in zip(sizes[:-1], sizes[1:])]
    features = [torch.randn(B, D, generator=gen) for _ in sizes]
    for batch in (1, B):  # the per-document search and the grouped one (B >= 8)
        got = cx.cascade_search([f[:batch] for f in features], weights, [None] * 3, offsets, [3, 6], 8,
                                "leaf_x_parent", weight_scales=scales)
        want = reference.cascade_search([f[:batch].double() for f in features], exact, [None] * 3, offsets, [3, 6],
                                        8, "leaf_x_parent")
        torch.testing.assert_close(got[1].double(), want[1].double(), rtol=1e-5, atol=1e-6)
        assert (got[0] == want[0]).float().mean() > 0.95
