"""Loads the compiled CPU kernels, or falls back to the plain-PyTorch reference ops.

The extension is compiled against the torch present at install time. If it cannot load (torch changed since,
a missing library, or CASCADEXML_FAST_DISABLE_EXT=1), `import cascadexml_fast` still works: a warning is issued
once, the reference implementations are registered as the CPU kernels, and `info()` reports why.
"""
import os
import warnings

from .ops import _library, reference

DISABLE_ENV = "CASCADEXML_FAST_DISABLE_EXT"
ISA_ENV = "CASCADEXML_FAST_CPU_ISA"
CPU_ISAS = ("avx512_vnni", "avx512", "avx512_dot", "avx2", "scalar")  # auto: the first supported but avx512_dot

# Reference implementations, keyed by op name, with the schema's extra arguments dropped.
FALLBACKS = {
    "shortlist_score": lambda x, w, b, idx, sparse_grad=False, deterministic=False, weight_scale=None: (
        reference.shortlist_score(x, w, b, idx, weight_scale)
    ),
    "shortlist_score_grad_input": reference.shortlist_score_grad_input,
    "shortlist_score_grad_weight": lambda g, x, idx, n, deterministic=False, dtype=None: (
        reference.shortlist_score_grad_weight(g, x, idx, n, dtype)
    ),
    "shortlist_score_grad_weight_rows": reference.shortlist_score_grad_weight_rows,
    "topk": reference.topk,
    "block_score": reference.block_score,
    "cascade_search": lambda f, w, b, o, beams, widths, k, combine="leaf", weight_scales=None: (
        reference.cascade_search(f, w, b, o, beams, k, combine, widths, weight_scales)
    ),
    "sparse_adamw_step": reference.sparse_adamw_step_sr,
    "sparse_rowwise_adagrad_step": reference.sparse_rowwise_adagrad_step,
    "sparse_adamw8bit_step": reference.sparse_adamw8bit_step,
    "shortlist_bce": lambda x, w, b, idx, po, pi, lw=1.0, sparse_grad=False, deterministic=False: (
        reference.shortlist_bce(x, w, b, idx, po, pi, lw)
    ),
}

module = None  # the loaded cascadexml_fast._C, or None
load_error = None  # why it is None


def _load():
    global module, load_error
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        load_error = f"disabled by {DISABLE_ENV}"
    else:
        try:
            from . import _C  # noqa: F401  (loading the .so registers its kernels)

            module = _C
            _isa_from_environment()
            return
        except (ImportError, OSError) as exc:
            load_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "cascadexml_fast: the compiled extension could not be loaded "
                f"({load_error}); using the slow reference ops on CPU. Reinstall the package against the current "
                "torch (`pip install --no-build-isolation --force-reinstall --no-deps .`) to get the fast kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
    for name in _library.SCHEMAS:
        _library.LIBRARY.impl(name, FALLBACKS[name], "CPU")


def set_cpu_isa(name: str = "auto") -> str:
    """Forces the vector path of every C++ CPU kernel: "avx512_vnni" (x86-64-v4 with AVX512_VNNI: int8 table rows
    through vpdpwssd), "avx512_dot" (also AVX512_BF16: bf16 rows through vdpbf16ps too; opt-in), "avx512"
    (x86-64-v4), "avx2" (AVX2 + FMA, x86-64-v3), "scalar" (the baseline build) or "auto" (the default: the best the
    CPU supports but avx512_dot). Returns the path now in use.

    Results of the paths agree within the ops' stated tolerances: the fused multiply-adds of avx2/avx512 round
    differently from scalar; avx512 and avx2 give the same bits; avx512_vnni and avx512_dot give avx512's bits
    but on int8 (and, avx512_dot, bf16) tables, whose products take features split into two parts (README, "CPU
    vector paths"). Force "avx512" for int8 results bit-identical to an AVX2 machine's. Raises ValueError for an
    unknown name and RuntimeError when this CPU lacks the path or the compiled extension is not loaded. The
    environment variable CASCADEXML_FAST_CPU_ISA does the same at import."""
    if module is None:
        raise RuntimeError(f"set_cpu_isa: the compiled extension is not loaded ({load_error})")
    if name not in (*CPU_ISAS, "auto"):
        raise ValueError(f"set_cpu_isa: name must be one of {', '.join(CPU_ISAS)} or auto, got {name!r}")
    if not module._set_cpu_isa(name):
        raise RuntimeError(f"set_cpu_isa: this CPU does not support {name!r} (supported: "
                           f"{', '.join(module.supported_isas())})")
    return module.cpu_isa()


def supported_cpu_isas() -> tuple:
    """The vector paths this CPU and build can run, the default ("auto") first (empty without the extension)."""
    return tuple(module.supported_isas()) if module is not None else ()


def _isa_from_environment() -> None:
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted or wanted == "auto":
        return
    try:
        set_cpu_isa(wanted)
    except (ValueError, RuntimeError) as exc:
        warnings.warn(f"cascadexml_fast: {ISA_ENV}={wanted!r} ignored: {exc}; using {module.cpu_isa()}",
                      RuntimeWarning, stacklevel=4)


_load()
