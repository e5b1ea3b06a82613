"""Builds the compiled extensions of cascadexml-fast against the torch that is already installed.

- `cascadexml_fast._C`: the C++/OpenMP CPU kernels from csrc/ (always built).
- `cascadexml_fast._C_cuda`: CUDA kernels from csrc/cuda/*.cu, built only where torch is a CUDA build, nvcc is
  found and there is a .cu file. CASCADEXML_FAST_CUDA=0 forces it off, =1 forces it on (failing loudly).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only seen by people installing without torch
    raise SystemExit(
        "cascadexml-fast compiles its kernels against your installed torch, which was not found.\n"
        "Install torch first (CPU: `pip install torch==2.13.0`), then install this package with\n"
        "`pip install --no-build-isolation .` so the build sees that torch."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _want_cuda():
    flag = os.getenv("CASCADEXML_FAST_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None and bool(_sources("csrc/cuda/**/*.cu"))
    if flag in ("1", "on", "true", "yes") and not available:
        raise SystemExit("CASCADEXML_FAST_CUDA=1 but a CUDA torch, nvcc (CUDA_HOME) or csrc/cuda/*.cu is missing")
    return available


cxx_flags = ["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno", "-g0"]  # -g0: no debug info (12 MB -> ~0.6 MB)
ext_modules = [
    CppExtension(
        "cascadexml_fast._C",
        _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
]
if _want_cuda():
    ext_modules.append(
        CUDAExtension(
            "cascadexml_fast._C_cuda",
            _sources("csrc/cuda/**/*.cu") + _sources("csrc/cuda/**/*.cpp"),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            py_limited_api=True,
        )
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
