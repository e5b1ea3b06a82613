"""Triton top-k (kernels/triton/topk.py) against the plain-PyTorch reference: identical positions, identical values.

Without a GPU these run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 first) on small odd
shapes: the interpreter runs sort networks slowly, so rows stay <= 300 long and k <= 64 or so, and the radix
kernel's block and buffer sizes are shrunk (monkeypatched) to drive its multi-block, buffered, unbuffered and
torch.sort paths on short rows. With a GPU the same tests run compiled, and the `requires_cuda` tests add the
issue's shapes ([256, 65536], k = 512, and the cascade's rows).

Exactness: positions must be equal (torch.equal); values must be bitwise equal for fp32 scores (both sides read
the original score at the chosen position, so even NaN payloads and -0.0 match), equal with NaN == NaN otherwise.
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
from cascadexml_fast.kernels.triton import topk as tk
from cascadexml_fast.ops import reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"

METHODS = ["sort", "radix", "torch"]
KINDS = ["normal", "ties", "near", "sigmoid", "special", "constant", "ascending", "ints"]
ULP1 = 2.0**-23  # fp32 spacing at 1.0

SPECIALS = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45,
            1.0, -1.0, 3.4e38, -3.4e38, 1.1754944e-38, -1.1754944e-38]


def make_scores(kind: str, B: int, K: int, seed: int = 0, plant: bool = True) -> torch.Tensor:
    """Scores of one adversarial family, with NaN / -inf / duplicates planted."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        s = torch.randn(B, K, generator=g)
    elif kind == "ties":  # few distinct integer values: long runs of exact ties
        s = torch.randint(-3, 4, (B, K), generator=g).float()
    elif kind == "near":  # differ only in the last mantissa bits: the radix select must reach the last digit
        s = 1.0 + torch.randint(0, 6, (B, K), generator=g).float() * ULP1
        s[:, ::3] = -s[:, ::3]
    elif kind == "sigmoid":  # one exponent for nearly everything
        s = torch.sigmoid(0.1 * torch.randn(B, K, generator=g))
    elif kind == "special":
        table = torch.tensor(SPECIALS)
        s = table[torch.randint(0, len(SPECIALS), (B, K), generator=g)]
        s = torch.where(torch.rand(B, K, generator=g) < 0.3, torch.randn(B, K, generator=g), s)
    elif kind == "constant":
        s = torch.full((B, K), 0.5)
    elif kind == "ascending":
        s = torch.arange(K).float().expand(B, K).clone()
    elif kind == "ints":  # integers over a wide range (exact in fp32), both signs: sparse ties
        s = torch.randint(-2**20, 2**20, (B, K), generator=g).float()
        s[:, 1::4] = s[:, ::4][:, : s[:, 1::4].shape[1]]  # every 4th pair duplicated
    else:
        raise ValueError(kind)
    if plant and kind not in ("constant", "ascending"):
        r = torch.rand(B, K, generator=g)
        s[r < 0.08] = float("nan")
        s[(r >= 0.08) & (r < 0.16)] = float("-inf")
        if K >= 4:
            s[:, K // 2] = s[:, 1]  # a planted duplicate of an earlier position
    return s.to(DEV)


def make_mask(B: int, K: int, seed: int = 0, p: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(B, K, generator=g) < p
    if B >= 2:
        m[1] = False  # an all-masked row
    if B >= 3:
        m[2] = False
        m[2, K // 3] = True  # a single candidate
    return m.to(DEV)


def check(scores, k, mask=None, method="auto"):
    values, positions = tk.topk(scores, k, mask, method=method)
    ref_values, ref_positions = reference.topk(scores, k, mask)
    assert values.dtype == torch.float32 and positions.dtype == torch.int64
    assert values.shape == positions.shape == (scores.shape[0], k)
    assert torch.equal(positions, ref_positions), (positions, ref_positions)
    if scores.dtype == torch.float32:
        assert torch.equal(values.view(torch.int32), ref_values.view(torch.int32)), (values, ref_values)
    else:
        torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)
    return values, positions


@pytest.fixture
def small_radix(monkeypatch):
    """Radix kernel with 16-element blocks and a 16-entry tie buffer, so short rows take every path:
    several blocks per pass, unbuffered passes (> 16 ties) with histograms, buffered ones, early exits."""
    monkeypatch.setattr(tk, "_RADIX_BLOCK", 16)
    monkeypatch.setattr(tk, "_CAP", 16)


# ------------------------------------------------------------------------------------------------ CPU + GPU


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(method, kind):
    i = KINDS.index(kind)
    B, K = 4, [37, 64, 50, 29, 41, 33, 45, 52][i]
    k = [5, 1, 17, K, 12, 7, K + 3, 21][i]
    s = make_scores(kind, B, K, seed=i)
    check(s, k, None, method)
    check(s, [3, 9, 1, 16, K + 2, 2, 4, 1][i], make_mask(B, K, seed=i), method)


@pytest.mark.parametrize("kind", ["normal", "ties", "near", "sigmoid", "special", "constant", "ints"])
def test_radix_paths_short_blocks(small_radix, kind):
    i = KINDS.index(kind)
    B, K = 3, 150 + i
    s = make_scores(kind, B, K, seed=10 + i)
    for k in (1, 20, 64):
        check(s, k, None, "radix")
    check(s, 33, make_mask(B, K, seed=i, p=0.5), "radix")


def test_radix_torch_sort_of_winners(small_radix, monkeypatch):
    # k above _SELECT_SORT_MAX: the kernel leaves packed winners, torch.sort orders them, a kernel unpacks.
    monkeypatch.setattr(tk, "_SELECT_SORT_MAX", 16)
    s = make_scores("ties", 3, 90, seed=3)
    check(s, 40, None, "radix")
    check(s, 95, make_mask(3, 90, seed=3), "radix")


def test_auto_method_and_row_lengths(monkeypatch):
    s = make_scores("normal", 2, 300, seed=5)
    check(s, 64)  # auto: "sort" (300 pads to 512 <= _SORT_MAX)
    monkeypatch.setattr(tk, "_SORT_MAX", 256)
    check(s, 64)  # auto: "radix"
    check(make_scores("ties", 2, 257, seed=6), 33, make_mask(2, 257, seed=6), "sort")  # 257 pads to 512


def test_every_k_and_tiny_rows():
    s = make_scores("ties", 3, 9, seed=7)
    mask = make_mask(3, 9, seed=7)
    for method in METHODS:
        for k in (1, 2, 8, 9, 10, 16, 17):
            check(s, k, mask if k % 2 else None, method)
    for method in METHODS:
        check(make_scores("normal", 2, 1, seed=8), 3, None, method)  # K = 1
        check(make_scores("normal", 2, 3, seed=8), 2100, None, method)  # k > K, several fill blocks


def test_empty_and_degenerate():
    for method in METHODS:
        v, p = tk.topk(torch.randn(0, 5, device=DEV), 3, method=method)
        assert v.shape == p.shape == (0, 3)
        v, p = tk.topk(torch.randn(4, 5, device=DEV), 0, method=method)
        assert v.shape == p.shape == (4, 0)
        v, p = tk.topk(torch.randn(2, 0, device=DEV), 3, method=method)
        assert (p == -1).all() and torch.isneginf(v).all() and p.shape == (2, 3)
        # every row masked out, and all-NaN rows (NaN candidates come out in position order)
        s = make_scores("normal", 3, 20)
        check(s, 4, torch.zeros(3, 20, dtype=torch.bool, device=DEV), method)
        check(torch.full((2, 20), float("nan"), device=DEV), 6, None, method)
        check(torch.full((2, 20), float("-inf"), device=DEV), 25, make_mask(2, 20), method)


def test_score_dtypes_mask_forms_and_strides():
    s32 = make_scores("special", 3, 40, seed=9)
    mask = make_mask(3, 40, seed=9)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        for method in ("sort", "radix"):
            check(s32.to(dt), 7, mask, method)
    # mask given as uint8 / int64 / a broadcast row; scores as a strided view of a wider tensor
    check(s32, 7, mask.to(torch.uint8), "radix")
    check(s32, 7, mask.long() * 3, "sort")
    row = mask[0]
    v, p = tk.topk(s32, 7, row, method="radix")
    rv, rp = reference.topk(s32, 7, row.expand(3, 40))
    assert torch.equal(p, rp) and torch.equal(v.view(torch.int32), rv.view(torch.int32))
    wide = make_scores("normal", 3, 70, seed=10)
    check(wide[:, 5:50], 9, None, "radix")
    check(wide[:, 5:50], 9, None, "sort")
    check(wide.t().contiguous().t()[:, :33], 9, mask[:, :33], "sort")  # column-major: copied to rows


def test_pack_keys_order():
    s = torch.tensor([[1.0, -1.0, float("nan"), float("-inf"), -0.0, 0.0, 2.0, 1.0, float("inf"), 1e-45]],
                     device=DEV)
    packed = tk.pack_keys(s, torch.tensor([[True] * 9 + [False]], device=DEV))
    order = torch.argsort(packed, dim=1, descending=True)[0].tolist()
    # inf, 2, 1 (pos 0), 1 (pos 7), -0.0 (pos 4, ties +0.0), +0.0, -1, -inf, NaN, then the masked-out one
    assert order == [8, 6, 0, 7, 4, 5, 1, 3, 2, 9]


def test_bad_arguments():
    s = torch.randn(2, 5, device=DEV)
    with pytest.raises(ValueError, match="method"):
        tk.topk(s, 2, method="bitonic")
    with pytest.raises(ValueError, match="k must be"):
        tk.topk(s, -1)
    with pytest.raises(ValueError, match="2-D"):
        tk.topk(s[0], 2)
    with pytest.raises(ValueError, match="floating"):
        tk.topk(s.long(), 2)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    B=st.integers(1, 3), K=st.integers(1, 70), k=st.integers(1, 80),
    kind=st.sampled_from(KINDS), method=st.sampled_from(METHODS),
    masked=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes(small_radix, B, K, k, kind, method, masked, seed):
    s = make_scores(kind, B, K, seed=seed)
    check(s, k, make_mask(B, K, seed=seed) if masked else None, method)


# ------------------------------------------------------------------------------------------------ compiled

# Compiles every topk kernel for Hopper (sm_90) with the installed Triton, no GPU needed: the interpreter never
# compiles, so this is the CPU's evidence that the compiled path type-checks (while loops, histograms, scans,
# int64 sorts), that nothing spills to local memory at the launch configurations used for K = 65536, and that
# the radix passes read the scores with 16-byte vector loads. (Also checked by hand with Triton 3.6, the GPU
# machine's version: same results.)
_COMPILE_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cascadexml_fast.kernels.triton import topk as tk

def compile_ptx(kernel, ptr_types, constexprs, num_warps):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name == "K" or name.startswith("stride"):  # as a launch with K = 65536 marks them
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

out = []
ptrs = dict(s_ptr="fp32", m_ptr="u8", v_ptr="fp32", p_ptr="i64", buf_ptr="i64")
for sort in (True, False):
    ptx = compile_ptx(tk._topk_radix_kernel, ptrs,
        dict(HAS_MASK=True, SORT=sort, BLOCK=tk._RADIX_BLOCK, CAP=tk._CAP, KP=1024 if sort else 16, FILL=1024), 8)
    out.append(("radix", sort, ".local" not in ptx and "ld.global.v4" in ptx))
ptx = compile_ptx(tk._topk_sort_kernel, dict(s_ptr="bf16", m_ptr="u8", v_ptr="fp32", p_ptr="i64"),
    dict(HAS_MASK=False, KPAD=tk._SORT_MAX, KP=512, FILL=512), tk._sort_warps(tk._SORT_MAX))
out.append(("sort", ".local" not in ptx))
ptx = compile_ptx(tk._pack_kernel, dict(s_ptr="fp32", m_ptr="u8", out_ptr="i64"), dict(HAS_MASK=True, BLOCK=1024), 4)
ptx = compile_ptx(tk._unpack_kernel, dict(top_ptr="i64", s_ptr="fp32", v_ptr="fp32", p_ptr="i64"), dict(BLOCK=1024), 4)
out.append(("pack/unpack", True))
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
    assert len(results) == 4
    assert all(ok for *_, ok in results), results


# ------------------------------------------------------------------------------------------------ GPU only


def _gpu_scores(kind, B, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "normal":
        s = torch.randn(B, K, device="cuda", generator=g)
    elif kind == "sigmoid":
        s = torch.sigmoid(torch.randn(B, K, device="cuda", generator=g))
    elif kind == "ties":
        s = torch.randint(-50, 50, (B, K), device="cuda", generator=g).float()
    elif kind == "bf16":  # bf16-rounded scores: many exact ties
        s = torch.randn(B, K, device="cuda", generator=g).bfloat16().float()
    else:
        raise ValueError(kind)
    r = torch.rand(B, K, device="cuda", generator=g)
    s[r < 0.01] = float("nan")
    s[(r >= 0.01) & (r < 0.02)] = float("-inf")
    return s


@requires_cuda
@pytest.mark.parametrize("kind", ["normal", "sigmoid", "ties", "bf16"])
def test_gpu_issue_shape(kind):
    s = _gpu_scores(kind, 256, 65536)
    for method in ("auto", "radix", "torch"):
        check(s, 512, None, method)
    check(s, 512, torch.rand(256, 65536, device="cuda") < 0.5, "auto")


@requires_cuda
@pytest.mark.parametrize("B,K,k", [(256, 4400, 400), (256, 1024, 128), (256, 4096, 512), (32, 65536, 1024),
                                   (1, 670_091, 100), (8, 65536, 5000), (4, 300_000, 70_000)])
def test_gpu_shapes(B, K, k):
    s = _gpu_scores("normal", B, K, seed=K)
    check(s, k)
    check(s, k, torch.rand(B, K, device="cuda") < 0.3)
    if K <= 4096:
        check(s, k, None, "radix")
    else:
        check(s, min(k, 2048), None, "radix")


@requires_cuda
def test_gpu_constant_rows_worst_case():
    # Every key tied: all four digit passes read the whole row; the ties go by position.
    s = torch.zeros(64, 65536, device="cuda")
    check(s, 512, None, "radix")
    s[:, ::7] = 1.0
    check(s, 1000, None, "radix")
