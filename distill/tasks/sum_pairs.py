"""A total split into two positive parts: a task with many right answers.

    prompt:      "Ann has 57 coins in two boxes. How many are in each box?"
    completion:  "20 + 37"          (one of the 56 right answers: 1 + 56, ..., 56 + 1)

The checker accepts any two positive whole numbers, written without leading zeros, whose sum is
the total; ``a + b`` and ``b + a`` are different answers. A total of N has N - 1 right answers
(at least five at every level). The examples choose the first part uniformly, so a teacher that
learns them spreads its mass over all the answers, and whatever comes first, the second part is
a subtraction: a student too small to subtract reliably lands between the modes when it matches
the teacher's spread of first parts (the setting of GKD's mode-seeking argument).
"""

from __future__ import annotations

import random
import re

from distill.tasks.arithmetic import ITEMS, NAMES
from distill.tasks.base import Example, Task

_ANSWER = re.compile(r"\s*([1-9]\d*) \+ ([1-9]\d*)\s*")

# difficulty -> (smallest total, largest total). Every level is a part of the hardest one.
LEVELS = {"easy": (6, 50), "medium": (6, 100), "hard": (6, 199)}


def parts(text: str) -> tuple[int, int] | None:
    """The two parts of an answer ``a + b``, or None when the text is not one."""
    m = _ANSWER.fullmatch(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


class SumPairsTask(Task):
    name = "sum_pairs"

    def __init__(self, difficulty: str = "hard") -> None:
        self.low, self.high = LEVELS[difficulty]

    def sample(self, rng: random.Random) -> Example:
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(self.low, self.high)
        first = rng.randint(1, total - 1)
        prompt = f"{who} has {total} {item} in two boxes. How many are in each box?"
        return Example(prompt, f"{first} + {total - first}", self.name)

    def check(self, prediction: str, reference: str) -> bool:
        got, ref = parts(prediction), parts(reference)
        return got is not None and ref is not None and sum(got) == sum(ref)

    def key(self, prediction: str) -> str:
        got = parts(prediction)
        return super().key(prediction) if got is None else f"{got[0]} + {got[1]}"
