"""`cascadexml_fast.info()`: versions and which backends are present."""
from __future__ import annotations

import importlib.util
import platform
from typing import Any, Dict

import torch

from .hugepages import thp_mode


def info() -> Dict[str, Any]:
    from . import __version__, _extension

    ext = _extension.module
    report: Dict[str, Any] = {
        "cascadexml_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cpp_extension": ext is not None,
        "cpp_extension_error": _extension.load_error,
        "cpu_kernels": "C++/OpenMP" if ext is not None else "reference (plain PyTorch)",
        "cpu_isa": ext.cpu_isa() if ext is not None else None,
        "cpu_isas_supported": list(_extension.supported_cpu_isas()),
        "transparent_hugepages": thp_mode(),  # CPU tables use them under "always" or "madvise" (hugepages.py)
        "compiler": ext.compiler() if ext is not None else None,
        "cuda_extension": importlib.util.find_spec("cascadexml_fast._C_cuda") is not None,
        "triton": None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        report["triton"] = triton.__version__
    report["gpu_kernels"] = (
        None if report["gpu"] is None else ("Triton" if report["triton"] else "reference (plain PyTorch)")
    )
    return report


def format_info(report: Dict[str, Any]) -> str:
    width = max(map(len, report))
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in report.items())
