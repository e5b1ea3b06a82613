"""Package-level behaviour: info(), the CLI, and the fallback when the compiled extension cannot load."""
import json
import os
import subprocess
import sys
import textwrap

import cascadexml_fast as cx


def test_info_reports_backends():
    report = cx.info()
    for key in ("cascadexml_fast", "torch", "cpp_extension", "cpu_kernels", "cpu_isa", "triton", "gpu"):
        assert key in report
    assert report["cpp_extension"] is True, report["cpp_extension_error"]
    assert report["cpu_kernels"] == "C++/OpenMP"


def test_cli_info_json():
    out = subprocess.run(
        [sys.executable, "-m", "cascadexml_fast", "info", "--json"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["cascadexml_fast"] == cx.__version__


BROKEN_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class Broken(importlib.abc.MetaPathFinder):  # what a torch upgrade does to a compiled extension
        def find_spec(self, name, path=None, target=None):
            if name == "cascadexml_fast._C":
                raise ImportError("undefined symbol: _ZN2at4_ops10some_op_that_moved")

    sys.meta_path.insert(0, Broken())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import cascadexml_fast as cx
    messages = [str(w.message) for w in caught if "compiled extension could not be loaded" in str(w.message)]
    assert len(messages) == 1, messages

    import torch
    from cascadexml_fast.ops import reference
    report = cx.info()
    assert report["cpp_extension"] is False and "undefined symbol" in report["cpp_extension_error"]
    assert report["cpu_kernels"].startswith("reference")

    x, w, b = torch.randn(3, 5, requires_grad=True), torch.randn(9, 5), torch.randn(9)
    idx = torch.tensor([[0, 8, -1], [3, 3, 1], [-1, -1, 2]])
    layer = cx.ShortlistedLinear(9, 5, sparse_grad=True)
    out = cx.shortlist_score(x, w, b, idx)
    assert torch.equal(out, reference.shortlist_score(x, w, b, idx))
    layer(x, idx).masked_fill(idx < 0, 0).sum().backward()
    assert layer.weight.grad.is_sparse and x.grad is not None
    try:  # the reference does not check ids itself (-2 would read row 7): the Python check must stay on
        cx.shortlist_score(x, w, b, torch.tensor([[0, -2, 1], [0, 0, 0], [1, 1, 1]]))
        raise AssertionError("an out-of-range id passed")
    except ValueError as exc:
        assert "idx[0, 1] = -2 is out of range [-1, 9)" in str(exc), exc
    print("fallback ok")
    """
)


def test_import_falls_back_to_reference_when_extension_cannot_load():
    env = dict(os.environ)
    env.pop("CASCADEXML_FAST_DISABLE_EXT", None)
    result = subprocess.run([sys.executable, "-c", BROKEN_EXTENSION], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
