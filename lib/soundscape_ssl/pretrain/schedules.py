"""Per-step schedules (learning rate, weight decay, teacher momentum, teacher temperature).

Each schedule is a pure function of the optimizer step, so resuming at step N reproduces the
values exactly without any scheduler state in the checkpoint. They are small frozen
dataclasses rather than precomputed arrays (DINO's numpy arrays hold one value per step, which
is 230k x 50 floats at the study's scale).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then cosine from `base` to `final`.

    The cosine part spans the remaining `total_steps - warmup_steps`; steps past the end stay at
    `final`.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        cosine_steps = self.total_steps - self.warmup_steps
        if cosine_steps == 0:
            return self.final
        progress = min(1.0, (step - self.warmup_steps) / cosine_steps)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear from `start` to `end` over `warmup_steps`, then constant at `end` (DINO's teacher temperature)."""

    start: float
    end: float
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.warmup_steps


def scaled_learning_rate(base_lr: float, effective_batch_size: int) -> float:
    """The linear scaling rule used by DINO and MAE: lr = base_lr x effective batch / 256."""
    return base_lr * effective_batch_size / 256
