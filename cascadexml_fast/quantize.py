"""int8 label tables for inference: `quantize_table(W)` and `quantize(module)`.

Each row r of a table is stored as int8 codes q[r] in [-127, 127] and one fp32 scale s[r] = max_d |W[r, d]| / 127,
with W[r] ~= q[r] * s[r] (round to nearest). The scale enters `shortlist_score`, `block_score` and `cascade_search`
as `weight_scale` / `weight_scales`; the kernels read the int8 row (a quarter of fp32's bytes, half of bf16's),
accumulate <x, q[r]> in fp32 and multiply the sum by s[r] once.

Why symmetric (no zero point): a zero point z[r] would let a row whose values are not centred on zero use all 255
codes, gaining at most one bit where min and max differ a lot in magnitude. Label-table rows are near zero-mean
(Xavier / nn.Linear init, weight decay, and a 768-long row of roughly symmetric values has max and -min within a
few per cent of each other), so the gain is a small fraction of a bit, while the kernel would pay a second term
per score (z[r] * s[r] * sum_d x[b, d]) and a second per-row array. The per-row scale already adapts to each row's
magnitude, which is what matters for ranking rows against each other.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .hugepages import table_empty
from .ops import reference

__all__ = ["quantize_table", "quantize", "is_quantized"]

_CHUNK_ROWS = 1 << 16  # rows converted at a time: no fp32 copy of a whole table is ever made


@torch.no_grad()
def quantize_table(weight: torch.Tensor, *, chunk_rows: int = _CHUNK_ROWS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8 quantisation of a float table.

    Args:
        weight: [N, D] fp32 / bf16 / fp16 / float64 table, finite.
        chunk_rows: rows converted at a time (bounds the temporary fp32 memory).

    Returns:
        (q, scale): q int8 [N, D] in [-127, 127] and scale fp32 [N], scale[r] = max_d |W[r, d]| / 127 (0 for an
        all-zero row, whose codes are 0), q = round(W / scale) to nearest (ties to even). Every element satisfies
        |q * scale - W| <= scale / 2 (up to fp32 rounding of the division). On W's device; W is not modified.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, D], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float table (fp32, bf16, fp16 or float64), got {weight.dtype}")
    N, D = weight.shape
    q = table_empty((N, D), dtype=torch.int8, device=weight.device)  # huge pages on CPU (hugepages.py)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    for start in range(0, N, max(int(chunk_rows), 1)):
        rows = slice(start, start + chunk_rows)
        block = weight[rows].detach()
        if not bool(torch.isfinite(block).all()):
            bad = (~torch.isfinite(block)).any(dim=1).nonzero()[0, 0] + start
            raise ValueError(f"weight row {int(bad)} holds inf or NaN: it cannot be quantised")
        q[rows], scale[rows] = reference.quantize_table(block)
    return q, scale


def is_quantized(module: nn.Module) -> bool:
    """True for a module whose tables were converted by `quantize`."""
    return bool(getattr(module, "quantized", False))


@torch.no_grad()
def quantize(module: nn.Module) -> nn.Module:
    """Converts, in place, every `ShortlistedLinear` and `CascadeHead` inside `module` (the module itself
    included), and every other submodule that defines `_quantize_()` (LightXML's label embedding), to int8 tables
    with per-row fp32 scales for inference; returns `module`.

    Each table becomes an int8 tensor in place of the float parameter (same name, `requires_grad=False`), its
    scales a buffer (`weight_scale` of a ShortlistedLinear, `weight_scale_<level>` of a CascadeHead,
    `label_embedding_scale` of LightXML); biases stay, converted to fp32 and frozen. `forward`, `full`, `search` and
    `predict` then use the int8 tables; training is refused (`loss` raises; gradients still reach the input
    features). Other submodules (the encoder of a model) are left as they are. Already quantised modules are
    skipped. To load a quantised checkpoint, build the module, call `quantize` on it, then `load_state_dict`
    (models: save the float model and quantise after `load_pretrained`).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(module).__name__}")
    for sub in list(module.modules()):
        if callable(getattr(sub, "_quantize_", None)) and not is_quantized(sub):
            sub._quantize_()
    return module
