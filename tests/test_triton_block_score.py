"""Triton block_score (kernels/triton/block_score.py) against the plain-PyTorch reference.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 first) on small odd
shapes; with a GPU the same tests run compiled and the `requires_cuda` tests add the Amazon-670K leaf level
(B = 256, C = 400, 670,091 bf16 rows under 65,536 clusters of 10 or 11 children) and an upper level that "auto"
sends to the tensor-core grouped path.

Ids must be identical. Scores: pads exactly -inf on both sides, the rest within the tolerance of the least
precise storage dtype (the reference is computed on the same stored values, so only the fp32 summation order
differs): 1e-5 for fp32, 1e-4 for bf16/fp16 storage, as in test_triton_shortlist_score.py.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import requires_cuda
from cascadexml_fast.kernels.triton import block_score as bk
from cascadexml_fast.ops import reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
TOL = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=1e-4, atol=1e-4), F16: dict(rtol=1e-4, atol=1e-4)}
METHODS = ["gemv", "grouped"]

# Block sizes with empty, single-row and full (= max_children) blocks; 12 clusters, 30 rows.
SIZES = [3, 0, 1, 5, 2, 5, 4, 0, 1, 3, 5, 1]
M = 5


def tol(*dtypes):
    for dt in (BF16, F16):
        if dt in dtypes:
            return TOL[dt]
    return TOL[F32]


def make_offsets(sizes):
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64).cumsum(0)]).to(DEV)


OFFSETS = make_offsets(SIZES)
N = sum(SIZES)


def make_clusters(B, C, n_clusters=len(SIZES), dtype=torch.int64, pad=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cl = torch.randint(0, n_clusters, (B, C), generator=g)
    cl[torch.rand(B, C, generator=g) < pad] = -1
    if B >= 2 and C >= 1:
        cl[1] = -1  # a document with only pads
    if B >= 3 and C >= 2:
        cl[2, 0] = cl[2, 1] = 3  # a cluster twice in one row
    return cl.to(device=DEV, dtype=dtype)


def rand(*shape, dtype=F32):
    return torch.randn(*shape, device=DEV).to(dtype)


def check(x, w, b, clusters, offsets, max_children, method, tolerance=None):
    scores, ids = bk.block_score(x, w, b, clusters, offsets, max_children, method=method)
    ref_scores, ref_ids = reference.block_score(x, w, b, clusters, offsets, max_children)
    B, C = clusters.shape
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert scores.shape == ids.shape == (B, C * max_children)
    assert torch.equal(ids, ref_ids)
    pads = torch.isneginf(ref_scores)
    assert torch.equal(torch.isneginf(scores), pads)
    assert torch.equal(pads, ref_ids < 0)
    if tolerance is None:
        tolerance = tol(x.dtype, w.dtype, b.dtype if b is not None else F32)
    torch.testing.assert_close(scores[~pads], ref_scores[~pads], **tolerance)
    return scores, ids


# ------------------------------------------------------------------------------------------------ CPU + GPU


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,C,D", [(1, 1, 1), (3, 4, 37), (17, 5, 70), (4, 3, 300)])
def test_shapes_and_id_dtypes(method, id_dtype, B, C, D):
    x, w, b = rand(B, D), rand(N, D), rand(N)
    check(x, w, b, make_clusters(B, C, dtype=id_dtype, seed=B + C), OFFSETS, M, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_dtype_combinations(method, x_dtype, w_dtype):
    B, C, D = 5, 3, 40
    clusters = make_clusters(B, C, seed=1)
    x, w = rand(B, D, dtype=x_dtype), rand(N, D, dtype=w_dtype)
    for b_dtype in DTYPES + [None]:
        b = rand(N, dtype=b_dtype) if b_dtype is not None else None
        check(x, w, b, clusters, OFFSETS, M, method)


@pytest.mark.parametrize("method", METHODS)
def test_widths_and_truncation(method):
    B, D = 6, 33
    x, w, b = rand(B, D), rand(N, D), rand(N)
    clusters = make_clusters(B, 4, seed=2)
    check(x, w, b, clusters, OFFSETS, 7, method)  # wider than every block: trailing slots padded
    check(x, w, b, clusters, OFFSETS, 3, method)  # narrower than some blocks: cut to the first 3 (as the reference)
    check(x, w, b, clusters, OFFSETS, 1, method)


@pytest.mark.parametrize("method", METHODS)
def test_wide_blocks_and_many_docs_per_cluster(method):
    # Blocks of 70 and 65 children (the grouped path splits them over two 64-wide tiles) and 40 documents all
    # on the same two clusters (split over several 16-document tiles).
    sizes = [70, 65, 2]
    offsets = make_offsets(sizes)
    n, D, B = sum(sizes), 24, 40
    x, w, b = rand(B, D), rand(n, D), rand(n)
    clusters = torch.tensor([[0, 1], [1, 2]], device=DEV).repeat(B // 2, 1)
    clusters[3, 1] = -1
    check(x, w, b, clusters, offsets, 70, method)


@pytest.mark.parametrize("method", METHODS)
def test_strided_rows_and_no_bias(method):
    B, C, D = 4, 3, 48
    xw, ww = rand(B, D + 10), rand(N, D + 6)
    clusters = make_clusters(B, C, seed=3)
    check(xw[:, 5:5 + D], ww[:, :D], None, clusters, OFFSETS, M, method)
    check(xw[:, :D], ww[:, 3:3 + D], rand(2 * N)[::2], clusters.t().contiguous().t(), OFFSETS, M, method)


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_degenerate(method):
    D = 16
    w, b = rand(N, D), rand(N)
    for B, C, width in [(0, 3, M), (3, 0, M), (3, 2, 0)]:
        s, i = bk.block_score(rand(B, D), w, b, make_clusters(B, C), OFFSETS, width, method=method)
        assert s.shape == i.shape == (B, C * width) and s.dtype == F32 and i.dtype == torch.int64
    # all pads
    check(rand(3, D), w, b, torch.full((3, 4), -1, device=DEV), OFFSETS, M, method)
    # D = 0: the scores are the biases
    check(rand(3, 0), rand(N, 0), b, make_clusters(3, 4), OFFSETS, M, method)
    # a tree with no rows at all (every block empty)
    check(rand(3, D), rand(0, D), rand(0), make_clusters(3, 2, n_clusters=4), make_offsets([0] * 4), 2, method)
    # NaN in one document's features stays in that document's row; pads stay -inf
    x = rand(3, D)
    x[0, 3] = float("nan")
    clusters = make_clusters(3, 4, pad=0.0, seed=4)
    s, i = bk.block_score(x, w, b, clusters, OFFSETS, M, method=method)
    assert torch.isnan(s[0][i[0] >= 0]).all() and torch.isneginf(s[0][i[0] < 0]).all()
    assert not torch.isnan(s[1:]).any()


def test_grouped_tiles():
    # runs: pad x3, cluster 0 x1, cluster 2 x5 (two tiles of <= 4), cluster 5 x4 (one tile)
    clusters = torch.tensor([[2, 5, -1, 2], [5, 2, 0, 5], [-1, 2, 5, -1], [2, 9, 9, 9]], device=DEV)
    sorted_ids, perm, tiles = bk.grouped_tiles(clusters, num_clusters=10, block_b=4)
    flat = clusters.reshape(-1)
    assert torch.equal(sorted_ids.long(), torch.sort(flat).values)
    assert torch.equal(flat[perm].long(), sorted_ids.long())
    assert tiles.numel() == min(16, 10 + 1 + 4)
    starts = tiles[tiles >= 0].tolist()
    # expected: every run start plus every 4th entry within a run
    s = sorted_ids.tolist()
    expected = [i for i in range(16) if i == 0 or s[i] != s[i - 1] or (i - s.index(s[i])) % 4 == 0]
    assert starts == expected
    assert (tiles[len(starts):] == -1).all()


def test_auto_heuristic():
    # Amazon-670K tree at B = 256: levels of 1024 / 8192 / 65536 clusters, beams 128 / 256 / 400.
    assert bk._use_grouped(256, 128, 1024) and bk._use_grouped(256, 256, 8192)
    assert not bk._use_grouped(256, 400, 65536)
    assert not bk._use_grouped(1, 400, 1024)  # B = 1: always GEMV
    assert not bk._use_grouped(8, 4096, 16)  # too few documents for a tensor-core tile
    # and "auto" runs whichever it picks
    x, w, b = rand(20, 16), rand(N, 16), rand(N)
    check(x, w, b, make_clusters(20, 6, seed=5), OFFSETS, M, "auto")  # 120 pairs >= 4 * 12 clusters: grouped
    check(x[:3], w, b, make_clusters(3, 6, seed=5), OFFSETS, M, "auto")  # GEMV


def test_bad_arguments():
    x, w, b = rand(3, 8), rand(N, 8), rand(N)
    cl = make_clusters(3, 2)
    with pytest.raises(ValueError, match="method"):
        bk.block_score(x, w, b, cl, OFFSETS, M, method="dense")
    with pytest.raises(ValueError, match="shape mismatch"):
        bk.block_score(x, w, b, cl[:2], OFFSETS, M)
    with pytest.raises(ValueError, match="shape mismatch"):
        bk.block_score(x, w[:, :4], b, cl, OFFSETS, M)
    with pytest.raises(ValueError, match="offsets"):
        bk.block_score(x, w, b, cl, OFFSETS.reshape(1, -1), M)
    with pytest.raises(ValueError, match="max_children"):
        bk.block_score(x, w, b, cl, OFFSETS, -1)
    with pytest.raises(ValueError, match="2-D"):
        bk.block_score(x, w, b, cl[0], OFFSETS, M)


@settings(max_examples=16, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    B=st.integers(1, 20), C=st.integers(1, 6), D=st.integers(0, 80), width=st.integers(1, 7),
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=9),
    id_dtype=st.sampled_from([torch.int32, torch.int64]),
    x_dtype=st.sampled_from(DTYPES), w_dtype=st.sampled_from(DTYPES), b_dtype=st.sampled_from(DTYPES + [None]),
    method=st.sampled_from(METHODS + ["auto"]), pad=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
)
def test_random(B, C, D, width, sizes, id_dtype, x_dtype, w_dtype, b_dtype, method, pad, seed):
    offsets = make_offsets(sizes)
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    clusters = torch.randint(0, len(sizes), (B, C), generator=g)
    clusters[torch.rand(B, C, generator=g) < pad] = -1
    x = torch.randn(B, D, generator=g).to(device=DEV, dtype=x_dtype)
    w = torch.randn(n, D, generator=g).to(device=DEV, dtype=w_dtype)
    b = torch.randn(n, generator=g).to(device=DEV, dtype=b_dtype) if b_dtype is not None else None
    check(x, w, b, clusters.to(device=DEV, dtype=id_dtype), offsets, width, method,
          tol(x_dtype, w_dtype, b_dtype if b_dtype is not None else F32))


# ------------------------------------------------------------------------------------------------ compiled

# Compiles both kernels for Hopper (sm_90) with the installed Triton, no GPU needed (the interpreter never
# compiles): the GEMV kernel's EVEN_D row loads must become 16-byte vector loads, and the grouped kernel with
# bf16 storage and LOWP must issue bf16 tensor-core MMAs (fp32 accumulation) fed by 16-byte async copies.
# (Also checked by hand with Triton 3.6, the GPU machine's version: same results.)
_COMPILE_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cascadexml_fast.kernels.triton import block_score as bk

def compile_ptx(kernel, ptr_types, constexprs, num_warps=4):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name == "D" or name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

out = []
for st, bd in (("fp32", 128), ("bf16", 256)):
    for ids in ("i32", "i64"):
        ptx = compile_ptx(bk._block_gemv_kernel,
            dict(x_ptr=st, w_ptr=st, bias_ptr=st, clusters_ptr=ids, offsets_ptr="i64", out_ptr="fp32", ids_ptr="i64",
                 scale_ptr="fp32"),
            dict(HAS_BIAS=True, EVEN_D=True, BLOCK_K=4096 // bd, BLOCK_D=bd, HAS_SCALE=False))
        out.append(("gemv", st, ids, "ld.global.v4" in ptx))
grouped = dict(x_ptr="bf16", w_ptr="bf16", bias_ptr="bf16", sorted_ptr="i32", perm_ptr="i64", tiles_ptr="i64",
               offsets_ptr="i64", out_ptr="fp32", ids_ptr="i64", scale_ptr="fp32")
ptx = compile_ptx(bk._block_grouped_kernel, grouped,
    dict(HAS_BIAS=True, EVEN_D=True, LOWP=True, BLOCK_B=32, BLOCK_M=16, BLOCK_D=64, HAS_SCALE=False))
out.append(("grouped-lowp", "mma.sync.aligned" in ptx and ".bf16.bf16.f32" in ptx and "cp.async.cg" in ptx))
ptx = compile_ptx(bk._block_grouped_kernel, dict(grouped, x_ptr="fp32", w_ptr="bf16"),
    dict(HAS_BIAS=False, EVEN_D=False, LOWP=False, BLOCK_B=16, BLOCK_M=16, BLOCK_D=64, HAS_SCALE=False))
out.append(("grouped-fp32", ".bf16.bf16" not in ptx))
# int8 tables with per-row scales (inference), both paths
ptx = compile_ptx(bk._block_gemv_kernel,
    dict(x_ptr="fp32", w_ptr="i8", bias_ptr="fp32", clusters_ptr="i64", offsets_ptr="i64", out_ptr="fp32",
         ids_ptr="i64", scale_ptr="fp32"),
    dict(HAS_BIAS=True, EVEN_D=True, BLOCK_K=16, BLOCK_D=256, HAS_SCALE=True))
out.append(("gemv", "int8", "i64", "ld.global.v4" in ptx))
ptx = compile_ptx(bk._block_grouped_kernel, dict(grouped, x_ptr="fp32", w_ptr="i8", bias_ptr="fp32"),
    dict(HAS_BIAS=True, EVEN_D=True, LOWP=False, BLOCK_B=16, BLOCK_M=16, BLOCK_D=64, HAS_SCALE=True))
out.append(("grouped-int8", "ld.global" in ptx))
print("RESULT", out)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = ast.literal_eval(proc.stdout.split("RESULT", 1)[1].strip())
    assert len(results) == 8
    assert all(ok for *_, ok in results), results


# ------------------------------------------------------------------------------------------------ GPU only


def _tree(num_labels, num_clusters):
    """Balanced CSR blocks: num_labels rows under num_clusters clusters (sizes differ by at most one)."""
    base, extra = divmod(num_labels, num_clusters)
    sizes = torch.full((num_clusters,), base, dtype=torch.int64)
    sizes[:extra] += 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).cuda(), base + (extra > 0)


@requires_cuda
@pytest.mark.parametrize("method", ["auto", "gemv", "grouped"])
def test_gpu_amazon670k_leaf_level(method):
    # 670,091 labels under 65,536 clusters: 10 or 11 children; beam 400; bf16 table, D = 768.
    L, nc, B, C, D = 670_091, 65_536, 256, 400, 768
    offsets, width = _tree(L, nc)
    assert width == 11
    w = torch.randn(L, D, device="cuda", dtype=BF16)
    b = torch.randn(L, device="cuda", dtype=BF16)
    x = torch.randn(B, D, device="cuda", dtype=BF16)
    # realistic overlap: a beam draws from a popular subset of clusters, plus pads at the end of some beams
    hot = torch.randint(0, nc, (4096,), device="cuda")
    clusters = hot[torch.randint(0, 4096, (B, C), device="cuda")]
    clusters[:, -7:] = -1
    big = dict(rtol=1e-4, atol=1e-4 * D ** 0.5)
    check(x, w, b, clusters, offsets, width, method, big)


@requires_cuda
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_gpu_upper_level_grouped(dtype):
    # 8192 nodes under 1024 clusters (8 children), beam 128: "auto" groups (32 documents per cluster) and
    # bf16/fp16 run on the tensor cores.
    nc, n, B, C, D = 1024, 8192, 256, 128, 768
    offsets, width = _tree(n, nc)
    assert bk._use_grouped(B, C, nc)
    w, b, x = rand(n, D, dtype=dtype), rand(n, dtype=dtype), rand(B, D, dtype=dtype)
    clusters = torch.randint(0, nc, (B, C), device="cuda")
    clusters[::3, -5:] = -1
    big = dict(rtol=1e-4, atol=1e-4 * D ** 0.5)
    for method in ("auto", "gemv"):
        check(x, w, b, clusters, offsets, width, method, big)
