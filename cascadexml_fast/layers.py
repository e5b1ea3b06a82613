"""Drop-in nn.Modules built on the ops."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .ops.shortlist_score import shortlist_score


class ShortlistedLinear(nn.Module):
    """A linear layer over `num_labels` outputs that scores only a shortlist of them per row.

    ``layer(x, idx)[b, k] = <x[b], weight[idx[b, k]]> + bias[idx[b, k]]`` in fp32, -inf where ``idx`` is -1;
    ``layer.full(x)`` gives the dense [B, num_labels] scores. Initialised like ``nn.Linear(dim, num_labels)``.

    Args:
        num_labels: rows of the table (N).
        dim: features per row (D).
        bias: learn a per-label bias.
        sparse_grad: gradients of ``weight`` and ``bias`` are coalesced sparse COO tensors of the touched rows
            (use ``torch.optim.SparseAdam`` or the package's fused sparse optimizers).
        deterministic: bit-identical gradients run to run on every device.
        validate: check inputs and id ranges on every call (off for trusted hot loops).
    """

    def __init__(
        self,
        num_labels: int,
        dim: int,
        bias: bool = True,
        *,
        sparse_grad: bool = False,
        deterministic: bool = False,
        validate: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if num_labels < 0 or dim < 0:
            raise ValueError(f"num_labels and dim must be >= 0, got {num_labels} and {dim}")
        factory = {"device": device, "dtype": dtype}
        self.num_labels = num_labels
        self.dim = dim
        self.sparse_grad = sparse_grad
        self.deterministic = deterministic
        self.validate = validate
        self.weight = nn.Parameter(torch.empty(num_labels, dim, **factory))
        self.bias = nn.Parameter(torch.empty(num_labels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: kaiming_uniform_(a=sqrt(5)) on the weight is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # and the bias uses the same bound.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.dim) if self.dim > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return shortlist_score(
            x,
            self.weight,
            self.bias,
            idx,
            sparse_grad=self.sparse_grad,
            deterministic=self.deterministic,
            validate=self.validate,
        )

    def full(self, x: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
        """Dense fp32 scores of every label, [B, num_labels]; low-precision tables are upcast a chunk of
        `chunk_rows` rows at a time so that no fp32 copy of the whole table is made."""
        xf = x.float()
        if self.weight.dtype == torch.float32:
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(xf, self.weight, bias)
        parts = []
        for start in range(0, self.num_labels, chunk_rows):
            rows = slice(start, start + chunk_rows)
            bias = None if self.bias is None else self.bias[rows].float()
            parts.append(nn.functional.linear(xf, self.weight[rows].float(), bias))
        return torch.cat(parts, dim=1) if parts else xf.new_zeros((x.shape[0], 0))

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, dim={self.dim}, bias={self.bias is not None}, "
            f"sparse_grad={self.sparse_grad}, dtype={self.weight.dtype}"
        )
