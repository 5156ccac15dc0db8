"""Values over optimizer steps: the learning rate (linear warm-up, cosine decay to a floor,
extendable in place) and the schedules of source weights and SKD's K."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distill.config import Schedule


@dataclass
class CosineSchedule:
    """The factor on the peak learning rate at an optimizer step: ``step / warmup`` during warm-up,
    then a cosine from ``start_factor`` at ``start`` down to ``min_ratio`` at ``total`` (transformers'
    cosine-with-min-lr schedule until ``extend`` is called).

    It is a plain object, so ``LambdaLR.state_dict`` saves its fields with the checkpoint and an
    extended run resumes on its extended curve."""

    warmup: int
    total: int
    min_ratio: float
    start: int = 0  # where the current cosine segment begins (after warm-up)
    start_factor: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        begin = max(self.warmup, self.start)
        progress = min(1.0, (step - begin) / max(1, self.total - begin))
        return self.min_ratio + (self.start_factor - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def extend(self, total: int, step: int) -> None:
        """Train to ``total`` steps from ``step``: the rate goes on from where it stands and decays to
        the floor at the new end (a finished run, already at the floor, stays there). No jump."""
        if step >= self.warmup:
            self.start_factor, self.start = self(step), step
        self.total = total


def cosine_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineSchedule(warmup, total, min_ratio))


def value_at(schedule: Schedule, step: int, total: int) -> float:
    """A ``Schedule``'s value at optimizer step ``step`` of a run of ``total`` steps (source weights,
    SKD's K)."""
    if schedule.end is None or schedule.kind == "constant":
        return schedule.start
    span = max(schedule.steps or total - 1, 1)  # steps run 0 .. total - 1: the last one is at `end`
    if schedule.kind == "step":
        return schedule.end if step >= span else schedule.start
    frac = min(step / span, 1.0)
    if schedule.kind == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return schedule.start + (schedule.end - schedule.start) * frac
