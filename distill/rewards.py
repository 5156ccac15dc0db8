"""Rewards of the student's own samples, for the policy-gradient term beside the divergence
(``reward.*``, GKD's on-policy distillation with RL fine-tuning).

A built-in task's checker is its reward: 1 for a right answer, 0 otherwise. On the user's data
``reward.fn=module:function`` is called once per sample as ``function(prompt=..., response=...,
record=...)`` (``record``: the data file's row as read) and returns a float. Its errors name the
record's file and line; a reward that is not a finite number stops the run.

The baseline of a sample is the mean reward of the other samples of its prompt (RLOO), so the
estimate stays unbiased and a prompt whose samples all score alike teaches nothing:

    A_i = r_i - mean_{j != i} r_j        over the G samples of one prompt
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from distill.data import Record
from distill.errors import DistillError
from distill.tasks import TASKS, get_task


def load_function(spec: str) -> Callable[..., object]:
    """The function ``module:function`` names (the module on ``sys.path``, e.g. the working directory)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error it raises on import
        raise DistillError(f"reward.fn={spec}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DistillError(f"reward.fn={spec}: {module_name} has no function {name!r}")
    return fn


class Rewards:
    """The reward of each (record, response): ``fn`` (``module:function``) or the built-in checkers."""

    def __init__(self, fn: str | None = None) -> None:
        self.spec = fn
        self.fn = load_function(fn) if fn else None

    def __call__(self, records: list[Record], responses: list[str]) -> list[float]:
        return [self.one(r, text) for r, text in zip(records, responses, strict=True)]

    def one(self, record: Record, response: str) -> float:
        if self.fn is None:
            if record.task not in TASKS:
                raise DistillError(f"{record.source}: no built-in checker for this record (task {record.task!r}); "
                                   "set reward.fn=module:function")
            return float(get_task(record.task).check(response, record.answer))
        row = record.row if record.row is not None else {"prompt": record.prompt, "completion": record.completion}
        try:
            value = self.fn(prompt=record.prompt, response=response, record=row)
        except Exception as e:  # the user's function: any error, reported with the record
            raise DistillError(f"{record.source}: reward.fn={self.spec} raised {type(e).__name__}: {e}") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DistillError(f"{record.source}: reward.fn={self.spec} returned {value!r}, not a number") from None
        if not math.isfinite(value):
            raise DistillError(f"{record.source}: reward.fn={self.spec} returned {value}; a reward must be finite")
        return value


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """Each reward minus the mean of the other rewards of its group (``group`` consecutive samples
    of one prompt): the leave-one-out baseline."""
    if group < 2 or len(rewards) % group:
        raise ValueError(f"group_advantages: {len(rewards)} rewards in groups of {group}")
    out = []
    for start in range(0, len(rewards), group):
        g = rewards[start: start + group]
        total = sum(g)
        out += [r - (total - r) / (group - 1) for r in g]
    return out


@dataclass
class RewardTerm:
    """The reward term of a run (``reward.*`` with alpha > 0): its rewards, weight and group size,
    and how a response's token ids become the text the rewards read."""

    rewards: Rewards
    alpha: float
    group: int
    decode: Callable[[list[int]], str]

    def weights(self, records: list[Record], responses: list[list[int]]) -> tuple[list[float], list[float]]:
        """Each response's reward, and its policy-gradient weight ``alpha * A`` (``group``
        consecutive responses answer one prompt)."""
        rewards = self.rewards(records, [self.decode(r) for r in responses])
        return rewards, [self.alpha * a for a in group_advantages(rewards, self.group)]
