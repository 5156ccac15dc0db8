"""Which source a step's sequences come from: one draw per optimizer step from the weights at that
step, by a generator seeded with (seed, step), so the draw is the same on every rank and after a
resume, with no state to save."""

from __future__ import annotations

import torch

from distill.config import Schedule, weights_at
from distill.errors import DistillError
from distill.sources import REGISTRY


def draw_source(weights: dict[str, Schedule], seed: int, step: int, total: int) -> str:
    """The source of step ``step``: ``name`` with probability weight / sum of weights (candidates
    in registry order, so that a draw depends on the weights alone)."""
    w = weights_at(weights, step, total)
    names = [n for n in REGISTRY if w.get(n, 0.0) > 0]
    if not names:
        raise DistillError(f"sources.weights: every weight is 0 at step {step}")
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    probs = torch.tensor([w[n] for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(probs, 1, generator=gen))]


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed for (run seed, step, salt) that differs between any two of them (64-bit)."""
    return ((seed * 1_000_003 + step) * 7_919 + salt) % (1 << 63)
