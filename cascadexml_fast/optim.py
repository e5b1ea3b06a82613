"""Optimizers for huge label tables: `SparseAdamW` updates only the rows a step touched."""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Tuple

import torch

from .ops.optim import sparse_adamw_step


def _rows_and_values(grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(unique ascending row ids, their gradient rows) of a sparse COO or dense [N, D] gradient."""
    if not grad.is_sparse:
        return torch.arange(grad.shape[0], device=grad.device), grad
    if not grad.is_coalesced():
        ids = grad._indices()[0]
        # Autograd drops the coalesced flag when it stores .grad although our kernels' gradients are coalesced:
        # check in O(U) instead of re-sorting, and only coalesce what really needs it (accumulated gradients).
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            grad = grad.coalesce()
        else:
            grad = grad._coalesced_(True)
    return grad._indices()[0], grad._values()


def _all_finite(values: torch.Tensor) -> bool:
    """One reduction pass (min and max propagate NaN; inf shows at an end), instead of isfinite's several."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class SparseAdamW(torch.optim.Optimizer):
    """AdamW for tables (and biases) trained with row-sparse gradients (`sparse_grad=True` layers), fused per
    touched row.

    Dense gradients are accepted too (every row counts as touched; the update then equals torch.optim.AdamW).

    Args:
        params: parameters or parameter groups: 2-D tables [N, D] and 1-D biases [N].
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        mode: "lazy" (default): only touched rows move and decay (SparseAdam's semantics + decoupled decay, no
            cost for untouched rows). "exact": a row that missed steps first replays them as zero-gradient AdamW
            steps, so after its update every row holds what dense AdamW would, given the same gradients (up to
            fp32 rounding); keeps an int64 step per row and the learning-rate history. Between its updates a
            row is stale (it catches up when next touched), so a forward pass reads the value of its last update.
        state_dtype: dtype of the moments: torch.float32 (default) or torch.bfloat16 (half the memory).
        skip_nonfinite: a parameter whose gradient holds NaN or inf is not updated that step and a warning is
            issued (default); False raises instead.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        mode: str = "lazy",
        state_dtype: torch.dtype = torch.float32,
        skip_nonfinite: bool = True,
    ):
        if mode not in ("lazy", "exact"):
            raise ValueError(f"mode must be 'lazy' or 'exact', got {mode!r}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid hyper-parameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode,
                        state_dtype=state_dtype, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _state_for(self, p: torch.Tensor, group) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=group["state_dtype"], memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            if group["mode"] == "exact":
                state["last_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                state["lr_history"] = torch.zeros(16, dtype=torch.float64, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() not in (1, 2):
                    raise ValueError(f"SparseAdamW updates 2-D tables and 1-D biases; got shape {tuple(p.shape)}")
                if p.grad.device != p.device:
                    raise ValueError(f"gradient on {p.grad.device} for a parameter on {p.device}")
                rows, values = _rows_and_values(p.grad)
                if not _all_finite(values):
                    if not group["skip_nonfinite"]:
                        raise FloatingPointError("non-finite gradient (NaN or inf) in SparseAdamW")
                    warnings.warn("SparseAdamW: non-finite gradient; this parameter's update is skipped this step",
                                  RuntimeWarning, stacklevel=2)
                    continue
                state = self._state_for(p, group)
                state["step"] += 1
                step = state["step"]
                last_step = lr_history = None
                if group["mode"] == "exact":
                    history = state["lr_history"]
                    if history.numel() < step:  # grow geometrically: amortised O(1) per step
                        grown = torch.zeros(2 * history.numel(), dtype=history.dtype, device=history.device)
                        grown[: history.numel()] = history
                        state["lr_history"] = history = grown
                    history[step - 1] = group["lr"]
                    last_step, lr_history = state["last_step"], history
                as_table = (lambda t: t.view(t.shape[0], -1)) if p.dim() == 1 else (lambda t: t)  # biases: [N, 1]
                sparse_adamw_step(
                    as_table(p), as_table(state["exp_avg"]), as_table(state["exp_avg_sq"]), rows, as_table(values),
                    step=step, lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], last_step=last_step,
                    lr_history=lr_history,
                )
        return loss
