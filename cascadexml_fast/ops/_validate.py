"""Input checks with messages that name the argument. TypeError for wrong kinds and dtypes, ValueError for
shapes, devices and id ranges."""
from __future__ import annotations

from typing import Optional

import torch

# float64 is accepted and computed in float64 throughout (for gradcheck); it is not a fast path.
FLOAT_STORAGE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, value, *, dim: int, dtypes) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    if value.layout != torch.strided:  # sparse COO / CSR, mkldnn, ...
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")


def check_ids_in_range(name: str, idx: torch.Tensor, num_rows: int) -> None:
    """Every id in [-1, num_rows); otherwise a ValueError naming the first offending value and its position."""
    if idx.numel() == 0:
        return
    bad = (idx < -1) | (idx >= num_rows)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), idx.shape))
        value = int(idx.reshape(-1)[first])
        where = ", ".join(map(str, position))
        raise ValueError(f"{name}[{where}] = {value} is out of range [-1, {num_rows}) (-1 is the pad id)")


def check_weight_scale(weight: torch.Tensor, weight_scale: Optional[torch.Tensor], *, int8_ok: bool = True,
                       weight_name: str = "weight", scale_name: str = "weight_scale") -> None:
    """An int8 table needs its per-row fp32 scale [N] on the table's device; a float table takes no scale."""
    if weight.dtype == torch.int8:
        if not int8_ok:
            raise TypeError(f"{weight_name} is an int8 table: int8 tables are inference-only (no training ops); "
                            "train the float table and quantise it afterwards (cascadexml_fast.quantize)")
        if weight_scale is None:
            raise TypeError(f"{weight_name} is int8 but {scale_name} is missing: an int8 table needs its per-row "
                            f"fp32 scales [N] (cascadexml_fast.quantize_table(W) returns both)")
    elif weight_scale is not None:
        raise TypeError(f"{scale_name} is given but {weight_name} is "
                        f"{str(weight.dtype).replace('torch.', '')}: a scale goes only with an int8 table")
    if weight_scale is None:
        return
    check_tensor(scale_name, weight_scale, dim=1, dtypes=(torch.float32,))
    entries, rows = weight_scale.shape[0], weight.shape[0]
    if entries != rows:
        raise ValueError(f"{scale_name} has {entries} entries but {weight_name} has N = {rows} rows")
    scale_device, device = weight_scale.device, weight.device
    if scale_device != device:
        raise ValueError(f"{scale_name} is on {scale_device} but {weight_name} is on {device}; "
                         "put them on one device")
    if weight_scale.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{scale_name} requires grad, but int8 tables are inference-only: no gradient flows to "
                           "the table or its scales (detach it, or train the float table)")


def check_shortlist_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
    weight_scale: Optional[torch.Tensor] = None, *, int8_ok: bool = True, weight_name: str = "weight",
    scale_name: str = "weight_scale",
) -> None:
    # Each tensor attribute read costs microseconds in a cold call (caches evicted since the last one, as after idle
    # time or under bench_cpu's protocol): every shape and device is read once.
    check_tensor("x", x, dim=2, dtypes=FLOAT_STORAGE)
    check_tensor(weight_name, weight, dim=2, dtypes=FLOAT_STORAGE + (torch.int8,))
    check_weight_scale(weight, weight_scale, int8_ok=int8_ok, weight_name=weight_name, scale_name=scale_name)
    check_tensor("idx", idx, dim=2, dtypes=ID_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, dim=1, dtypes=FLOAT_STORAGE)
    (B, D), (N, table_D) = x.shape, weight.shape
    if D != table_D:
        raise ValueError(f"x has D = {D} features but {weight_name} has D = {table_D}")
    if idx.shape[0] != B:
        raise ValueError(f"idx has B = {idx.shape[0]} rows but x has B = {B}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias has {bias.shape[0]} entries but {weight_name} has N = {N} rows")
    device = x.device
    for name, tensor in ((weight_name, weight), ("idx", idx), ("bias", bias), (scale_name, weight_scale)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {device}; put them on one device")
    if not kernel_checks_ids(idx):
        check_ids_in_range("idx", idx, N)


def kernel_checks_ids(idx: torch.Tensor) -> bool:
    """True when the op's kernel raises check_ids_in_range's ValueError itself: the compiled CPU kernels check every
    id before reading a row (csrc/cpu/checks.h). Checking here too would cost four torch calls, 0.1-0.18 ms of a
    cold B = 1 call. The reference fallback and the CUDA kernels do not check."""
    if idx.device.type != "cpu":
        return False
    from .. import _extension

    return _extension.module is not None
