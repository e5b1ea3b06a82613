"""Test set-up shared by every test module.

Triton kernels run under the interpreter on machines without a GPU: TRITON_INTERPRET must be set before any
module defining @triton.jit kernels is imported, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): a second OpenMP thread
    only adds synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


from cascadexml_fast._extension import CPU_ISAS  # noqa: E402,F401  (the vector path names, the default first)


def _cpu_paths_line() -> str:
    """Which vector paths of the C++ CPU kernels this run covers (tests/test_cpu_isa.py and the int8 tests force
    each one the CPU supports) and which it skips."""
    from cascadexml_fast import _extension

    if _extension.module is None:
        return f"cascadexml_fast CPU vector paths: none (extension not loaded: {_extension.load_error})"
    supported = _extension.supported_cpu_isas()
    skipped = [name for name in CPU_ISAS if name not in supported]
    return (f"cascadexml_fast CPU vector paths: default {_extension.module.cpu_isa()}; tested {', '.join(supported)}; "
            f"skipped (this CPU lacks them): {', '.join(skipped) or 'none'}")


def pytest_report_header(config):
    return _cpu_paths_line()


def pytest_terminal_summary(terminalreporter):
    """Also at the end, where `pytest -q` (CI) still prints it."""
    terminalreporter.write_line(_cpu_paths_line())


@pytest.fixture
def cpu_isa(request):
    """Forces one vector path of the C++ CPU kernels (request.param: a CPU_ISAS name) for a test, skipping
    where the CPU lacks it, then restores the default."""
    import cascadexml_fast as cx
    from cascadexml_fast import _extension

    if _extension.module is None:
        pytest.skip("the C++ extension is not loaded")
    if request.param not in _extension.supported_cpu_isas():
        pytest.skip(f"this CPU lacks the {request.param} path")
    try:
        assert cx.set_cpu_isa(request.param) == request.param
        yield request.param
    finally:
        cx.set_cpu_isa("auto")
