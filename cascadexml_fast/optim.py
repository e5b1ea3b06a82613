"""Optimizers for huge label tables, updating only the rows a step touched: `SparseAdamW` and
`SparseRowwiseAdagrad` (one fp32 accumulator per row, FBGEMM's EXACT_ROWWISE_ADAGRAD). Both take bf16 / fp16
tables with optional stochastic rounding."""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Tuple

import torch

from .hugepages import table_empty, to_hugepages
from .ops.optim import quantized_state_shapes, sparse_adamw8bit_step, sparse_adamw_step, sparse_rowwise_adagrad_step


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


def _as_table(t: torch.Tensor) -> torch.Tensor:
    """Tables as they are, biases [N] as [N, 1] (also N = 0: an empty shard of a sharded head)."""
    return t.view(t.shape[0], 1) if t.dim() == 1 else t


class _SparseRowOptimizer(torch.optim.Optimizer):
    """What the row-sparse optimizers share: reading a sparse or dense gradient as (rows, values), the checks,
    and the non-finite policy (group["skip_nonfinite"])."""

    def _touched(self, p: torch.Tensor, group) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(rows, values [U, D]) of p's gradient, or None when there is nothing to do (no gradient, or a
        non-finite one that is skipped with a warning)."""
        name = type(self).__name__
        if p.grad is None:
            return None
        if p.dim() not in (1, 2):
            raise ValueError(f"{name} updates 2-D tables and 1-D biases; got shape {tuple(p.shape)}")
        if p.grad.device != p.device:
            raise ValueError(f"gradient on {p.grad.device} for a parameter on {p.device}")
        rows, values = _rows_and_values(p.grad)
        if not _all_finite(values):
            if not group["skip_nonfinite"]:
                raise FloatingPointError(f"non-finite gradient (NaN or inf) in {name}")
            warnings.warn(f"{name}: non-finite gradient; this parameter's update is skipped this step",
                          RuntimeWarning, stacklevel=3)
            return None
        return rows, _as_table(values)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that every state tensor keeps the dtype it was saved with: torch casts floating
        state to its parameter's dtype, which would turn fp32 moments (and 8-bit state scales, row-wise
        accumulators) of a bf16 table into bf16 and the float64 lr history of mode="exact" into the table's."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(ids, params):
            for key, value in saved.get(param_id, {}).items():
                if isinstance(value, torch.Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for state in self.state.values():  # loaded state is plain memory: tables' state goes to huge pages
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = to_hugepages(value)


class SparseAdamW(_SparseRowOptimizer):
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
        state_dtype: dtype of the moments: torch.float32 (default), torch.bfloat16 (half the memory) or
            torch.uint8: 8-bit block-quantised moments (ops.optim.sparse_adamw8bit_step; state "exp_avg_codes",
            "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"; ~2.03 bytes per element for both moments
            instead of 8); needs mode="lazy".
        skip_nonfinite: a parameter whose gradient holds NaN or inf is not updated that step and a warning is
            issued (default); False raises instead.
        stochastic_rounding, seed: with bf16 / fp16 parameters, round each updated value stochastically
            (unbiased; a hash of (seed, step, row, column), so runs are reproducible and backends agree);
            without it updates smaller than half an ulp are lost. Ignored for fp32 parameters.
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
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        if mode not in ("lazy", "exact"):
            raise ValueError(f"mode must be 'lazy' or 'exact', got {mode!r}")
        if state_dtype not in (torch.float32, torch.bfloat16, torch.uint8):
            raise ValueError(f"state_dtype must be torch.float32, torch.bfloat16 or torch.uint8, got {state_dtype}")
        if state_dtype == torch.uint8 and mode != "lazy":
            raise ValueError(f"8-bit state (state_dtype=torch.uint8) supports mode='lazy' only, got mode={mode!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid hyper-parameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode,
                        state_dtype=state_dtype, skip_nonfinite=skip_nonfinite,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        super().__init__(params, defaults)

    def _state_for(self, p: torch.Tensor, group) -> dict:
        state = self.state[p]
        if not state and group["state_dtype"] == torch.uint8:
            codes_shape, scales_shape = quantized_state_shapes(_as_table(p))
            state["step"] = 0
            for name in ("exp_avg", "exp_avg_sq"):
                state[name + "_codes"] = table_empty(codes_shape, torch.uint8, p.device).fill_(
                    128 if name == "exp_avg" else 0)
                state[name + "_scales"] = torch.zeros(scales_shape, dtype=torch.float32, device=p.device)
        if not state:
            state["step"] = 0
            # Huge pages on CPU, as the tables (hugepages.py): the update reads and writes random rows of both.
            state["exp_avg"] = table_empty(p.shape, group["state_dtype"], p.device).zero_()
            state["exp_avg_sq"] = table_empty(p.shape, group["state_dtype"], p.device).zero_()
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
                touched = self._touched(p, group)
                if touched is None:
                    continue
                rows, values = touched
                state = self._state_for(p, group)
                state["step"] += 1
                step = state["step"]
                if group["state_dtype"] == torch.uint8:
                    sparse_adamw8bit_step(
                        _as_table(p), state["exp_avg_codes"], state["exp_avg_scales"], state["exp_avg_sq_codes"],
                        state["exp_avg_sq_scales"], rows, values, step=step, lr=group["lr"], beta1=beta1,
                        beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                        stochastic_rounding=group["stochastic_rounding"], seed=group["seed"],
                    )
                    continue
                last_step = lr_history = None
                if group["mode"] == "exact":
                    history = state["lr_history"]
                    if history.numel() < step:  # grow geometrically: amortised O(1) per step
                        grown = torch.zeros(2 * history.numel(), dtype=history.dtype, device=history.device)
                        grown[: history.numel()] = history
                        state["lr_history"] = history = grown
                    history[step - 1] = group["lr"]
                    last_step, lr_history = state["last_step"], history
                sparse_adamw_step(
                    _as_table(p), _as_table(state["exp_avg"]), _as_table(state["exp_avg_sq"]), rows, values,
                    step=step, lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], last_step=last_step,
                    lr_history=lr_history, stochastic_rounding=group["stochastic_rounding"], seed=group["seed"],
                )
        return loss


class SparseRowwiseAdagrad(_SparseRowOptimizer):
    """Row-wise AdaGrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) for tables trained with row-sparse gradients: one fp32
    accumulator per row (4 bytes per row of state instead of AdamW's 8 bytes per element). Per touched row r:
    G_r += mean_d(g_rd^2); p_r = p_r * (1 - lr * weight_decay) - lr * g_r / (sqrt(G_r) + eps). Untouched rows
    neither move nor decay. Dense gradients are accepted too (every row counts as touched).

    Args:
        params: parameters or parameter groups: 2-D tables [N, D] and 1-D biases [N] (a bias gets one
            accumulator per entry, i.e. plain AdaGrad).
        lr, eps: step size and the denominator's epsilon (default 1e-10, as torch.optim.Adagrad).
        weight_decay: decoupled decay of the touched rows, p *= 1 - lr * weight_decay.
        initial_accumulator_value: the starting G of every row.
        skip_nonfinite, stochastic_rounding, seed: as SparseAdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        *,
        skip_nonfinite: bool = True,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or initial_accumulator_value < 0:
            raise ValueError(f"invalid hyper-parameters: lr={lr}, eps={eps}, weight_decay={weight_decay}, "
                             f"initial_accumulator_value={initial_accumulator_value}")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value,
                        skip_nonfinite=skip_nonfinite, stochastic_rounding=stochastic_rounding, seed=seed)
        super().__init__(params, defaults)

    def _state_for(self, p: torch.Tensor, group) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["sum"] = torch.full((p.shape[0],), float(group["initial_accumulator_value"]), dtype=torch.float32,
                                      device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                touched = self._touched(p, group)
                if touched is None:
                    continue
                rows, values = touched
                state = self._state_for(p, group)
                state["step"] += 1
                sparse_rowwise_adagrad_step(
                    _as_table(p), state["sum"], rows, values, lr=group["lr"], eps=group["eps"],
                    weight_decay=group["weight_decay"], step=state["step"],
                    stochastic_rounding=group["stochastic_rounding"], seed=group["seed"],
                )
        return loss
