"""Learning-rate schedules, applied per optimizer step to every parameter group (relative to its base lr)."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple


def _cosine(start: float, end: float, fraction: float) -> float:
    """From `start` (fraction 0) to `end` (fraction 1) along half a cosine."""
    fraction = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


class Schedule:
    """``factor(step)`` scales each group's base lr; ``beta1(step)`` is the AdamW beta1 to use (None: keep).

    kind="one_cycle": CascadeXML's three-phase one-cycle (its training_schedule): a cosine warm-up from
    max/10 to max over `warmup_epochs`, flat at max, then a cosine down to max/1000 over the last
    min(3, epochs - warmup) epochs; beta1 follows 0.95 -> 0.85 during warm-up and back to 0.95 during the decay.
    kind="constant": factor 1, betas untouched.
    """

    WARMUP_START = 0.1
    FINAL = 1e-3
    DECAY_EPOCHS = 3.0
    BETA1_MAX, BETA1_MIN = 0.95, 0.85

    def __init__(self, kind: str, steps_per_epoch: int, epochs: int, warmup_epochs: float = 1.0):
        if kind not in ("one_cycle", "constant"):
            raise ValueError(f"schedule must be 'one_cycle' or 'constant', got {kind!r}")
        self.kind = kind
        self.total = max(int(steps_per_epoch) * int(epochs), 1)
        self.warmup = min(int(round(warmup_epochs * steps_per_epoch)), self.total)
        decay_epochs = min(self.DECAY_EPOCHS, max(epochs - warmup_epochs, 0.0))
        self.decay = min(int(round(decay_epochs * steps_per_epoch)), self.total - self.warmup)
        self.decay_start = self.total - self.decay

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup:
            return _cosine(self.WARMUP_START, 1.0, step / self.warmup)
        if step >= self.decay_start and self.decay > 0:
            return _cosine(1.0, self.FINAL, (step + 1 - self.decay_start) / self.decay)  # the last step: max/1000
        return 1.0

    def beta1(self, step: int) -> Optional[float]:
        if self.kind == "constant":
            return None
        if step < self.warmup:
            return _cosine(self.BETA1_MAX, self.BETA1_MIN, step / self.warmup)
        if step >= self.decay_start and self.decay > 0:
            return _cosine(self.BETA1_MIN, self.BETA1_MAX, (step + 1 - self.decay_start) / self.decay)
        return self.BETA1_MIN

    def apply(self, optimizers: Iterable, step: int) -> Dict[str, float]:
        """Set lr (and beta1) of every group for optimizer step `step` (0-based); returns {group name: lr}."""
        factor = self.factor(step)
        beta1 = self.beta1(step)
        lrs = {}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
                if beta1 is not None and "betas" in group:  # Adam's momentum cycles; AdaGrad has none
                    betas: Tuple[float, float] = group["betas"]
                    group["betas"] = (beta1, betas[1])
                lrs[group.get("name", str(len(lrs)))] = group["lr"]
        return lrs

    def state_dict(self) -> dict:
        return dict(kind=self.kind, total=self.total, warmup=self.warmup, decay=self.decay)
