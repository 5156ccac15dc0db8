"""The learning-rate schedule: transformers' cosine with warm-up and floor, extendable without a jump."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from distill.schedule import CosineSchedule, cosine_scheduler


def _rates(scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates + [scheduler.get_last_lr()[0]]


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=2.0)


@pytest.mark.parametrize("warmup,total,floor", [(0, 10, 0.1), (3, 10, 0.0), (5, 40, 0.25), (10, 10, 0.5)])
def test_matches_transformers_cosine_with_min_lr(warmup, total, floor):
    ours = _rates(cosine_scheduler(_optimizer(), warmup, total, floor), total)
    theirs = _rates(get_cosine_with_min_lr_schedule_with_warmup(_optimizer(), warmup, total, min_lr_rate=floor), total)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_extension_goes_on_from_where_the_rate_stands():
    """Extended mid-decay at step 6 of 10 to 20 steps: the rate at step 6 is unchanged, never rises,
    and reaches the floor at step 20; a finished run stays at its floor. Rebuilding the schedule for the
    new length (what resuming did before) jumps up instead."""
    s = CosineSchedule(warmup=2, total=10, min_ratio=0.1)
    before = [s(i) for i in range(7)]
    s.extend(20, 6)
    after = [s(i) for i in range(6, 21)]
    assert after[0] == before[-1] and all(b <= a + 1e-15 for a, b in zip(after, after[1:], strict=False))
    assert after[-1] == pytest.approx(0.1) and after[1] < before[-1]
    assert CosineSchedule(2, 20, 0.1)(7) > before[-1]  # the jump a rebuilt schedule makes
    done = CosineSchedule(warmup=2, total=10, min_ratio=0.1)
    done.extend(15, 10)
    assert [done(i) for i in range(10, 16)] == pytest.approx([0.1] * 6)
    early = CosineSchedule(warmup=4, total=5, min_ratio=0.0)  # extended during warm-up: warm-up as before
    early.extend(10, 2)
    assert early(2) == 0.5 and early(4) == 1.0 and early(10) == pytest.approx(0.0)


def test_extension_survives_a_checkpoint():
    """The fields travel in LambdaLR's state dict: a scheduler rebuilt and loaded is on the extended curve."""
    a = cosine_scheduler(_optimizer(), 1, 8, 0.2)
    _rates(a, 8)
    a.lr_lambdas[0].extend(16, 8)
    state = a.state_dict()
    b = cosine_scheduler(_optimizer(), 1, 16, 0.2)
    b.load_state_dict(state)
    assert b.lr_lambdas[0] == a.lr_lambdas[0] and b.lr_lambdas[0].start == 8
