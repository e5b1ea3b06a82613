"""Bad input gets a clear exception naming the argument, and nothing is corrupted."""
import pytest
import torch

import cascadexml_fast as cx

OPS = torch.ops.cascadexml_fast


def good():
    return torch.randn(2, 4), torch.randn(6, 4), torch.randn(6), torch.tensor([[0, 5, -1], [2, 2, 1]])


@pytest.mark.parametrize("bad_id, position", [(6, (1, 2)), (-2, (0, 1)), (10**9, (0, 0))])
def test_out_of_range_id_names_value_and_position(bad_id, position):
    x, w, b, idx = good()
    idx[position] = bad_id
    with pytest.raises(ValueError, match=rf"idx\[{position[0]}, {position[1]}\] = {bad_id} is out of range \[-1, 6\)"):
        cx.shortlist_score(x, w, b, idx)


def test_unvalidated_bad_id_still_raises_in_the_kernel_and_corrupts_nothing():
    layer = cx.ShortlistedLinear(6, 4, validate=False)
    before = [p.detach().clone() for p in layer.parameters()]
    idx = torch.tensor([[0, 7]])
    with pytest.raises(ValueError, match=r"idx\[0, 1\] = 7 is out of range \[-1, 6\) \(-1 is the pad id\)"):
        layer(torch.randn(1, 4), idx)
    for p, q in zip(layer.parameters(), before):
        assert torch.equal(p, q) and p.grad is None


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bias", [False, True])
def test_validated_cpu_call_is_the_op_alone(idx_dtype, bias):
    """On CPU the kernel checks the ids (same ValueError), so validation adds no torch call: at B = 1 each cold call
    costs tens of microseconds, as much as the rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b, idx = good()
    idx = idx.to(idx_dtype)
    with Calls() as calls:
        out = cx.shortlist_score(x, w, b if bias else None, idx)
    assert calls.names == ["cascadexml_fast.shortlist_score.default"]
    assert torch.equal(out, cx.shortlist_score(x, w, b if bias else None, idx, validate=False))
    bad = idx.clone()
    bad[1, 0] = 6
    with pytest.raises(ValueError, match=r"idx\[1, 0\] = 6 is out of range \[-1, 6\)"):
        cx.shortlist_score(x, w, b, bad)


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, r"x must be 2-D"),
        (lambda a: a.update(weight=a["weight"][None]), ValueError, r"weight must be 2-D"),
        (lambda a: a.update(idx=a["idx"][0]), ValueError, r"idx must be 2-D"),
        (lambda a: a.update(bias=a["bias"][None]), ValueError, r"bias must be 1-D"),
        (lambda a: a.update(x=a["x"].int()), TypeError, r"x must have dtype float32, bfloat16, float16"),
        (lambda a: a.update(weight=a["weight"].to(torch.int16)), TypeError, r"weight must have dtype"),
        (lambda a: a.update(weight=a["weight"].to(torch.int8)), TypeError, r"weight is int8 but weight_scale is missing"),
        (lambda a: a.update(idx=a["idx"].float()), TypeError, r"idx must have dtype int32, int64"),
        (lambda a: a.update(idx=a["idx"].to(torch.int16)), TypeError, r"idx must have dtype int32, int64"),
        (lambda a: a.update(x=a["x"].tolist()), TypeError, r"x must be a torch.Tensor, got list"),
        (lambda a: a.update(x=torch.randn(2, 5)), ValueError, r"x has D = 5 features but weight has D = 4"),
        (lambda a: a.update(idx=torch.zeros(3, 3, dtype=torch.long)), ValueError, r"idx has B = 3 rows but x has B = 2"),
        (lambda a: a.update(bias=torch.randn(5)), ValueError, r"bias has 5 entries but weight has N = 6 rows"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, r"weight is on meta but x is on cpu"),
        (lambda a: a.update(weight=a["weight"].to_sparse()), TypeError, r"weight must be a dense"),
    ],
)
def test_bad_arguments(mutate, error, pattern):
    x, w, b, idx = good()
    args = {"x": x, "weight": w, "bias": b, "idx": idx}
    mutate(args)
    with pytest.raises(error, match=pattern):
        cx.shortlist_score(args["x"], args["weight"], args["bias"], args["idx"])


def test_kernel_checks_without_python_validation():
    x, w, b, idx = good()
    with pytest.raises(RuntimeError, match="x has D = 4 but weight has D = 5"):
        OPS.shortlist_score(x, torch.randn(6, 5), None, idx)
    with pytest.raises(RuntimeError, match="idx must be int32 or int64"):
        OPS.shortlist_score(x, w, b, idx.float())
    with pytest.raises(RuntimeError, match="grad must have the shape of idx"):
        OPS.shortlist_score_grad_input(torch.randn(2, 2), w, idx)
    with pytest.raises(ValueError, match=r"idx\[0, 1\] = 5 is out of range \[-1, 3\)"):
        OPS.shortlist_score_grad_weight(torch.randn(2, 3), x, idx, 3)


def test_layer_rejects_negative_sizes():
    with pytest.raises(ValueError, match="num_labels and dim must be >= 0"):
        cx.ShortlistedLinear(-1, 4)
