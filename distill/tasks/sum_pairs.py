"""A total split into two positive parts: a task with many right answers.

    prompt:      "Ann has 57 coins in two boxes. How many are in each box?"
    completion:  "57 - 20 = 37. #### 20 + 37"     (one of 56 right answers: 1 + 56, ..., 56 + 1)

The final answer after ``####`` is what counts, as for GSM8K: any two positive whole numbers,
written without leading zeros, whose sum is the total; ``a + b`` and ``b + a`` are different
answers. A total of N has N - 1 right answers (at least five at every level). The examples choose
the first part uniformly, so a teacher that learns them spreads its mass over all the answers,
and whatever comes first, the second part is a subtraction, written out first (without the
worked step the teacher's architecture did not learn it from a short training). The many-answers
study (``docs/recipes.md``) asks whether a mode-seeking divergence gives a small student samples
that are each right here.
"""

from __future__ import annotations

import random
import re

from distill.tasks.arithmetic import ITEMS, NAMES
from distill.tasks.base import Example, Task

_ANSWER = re.compile(r"([1-9]\d*) \+ ([1-9]\d*)")
_FINAL = re.compile(r"####\s*(.*?)\s*$")

# What the things go into (plural, singular): the prompt space at the easy level is 10 names x 8
# items x 5 containers x 45 totals, enough for a fixed training set of 4000 distinct prompts.
CONTAINERS = (("boxes", "box"), ("bags", "bag"), ("piles", "pile"), ("cups", "cup"), ("baskets", "basket"))
# difficulty -> (smallest total, largest total). Every level is a part of the hardest one.
LEVELS = {"easy": (6, 50), "medium": (6, 100), "hard": (6, 199)}


def parts(text: str) -> tuple[int, int] | None:
    """The two parts of the final answer ``#### a + b``, or None when the text has none."""
    final = _FINAL.search(text)
    m = _ANSWER.fullmatch(final.group(1)) if final else None
    return (int(m.group(1)), int(m.group(2))) if m else None


class SumPairsTask(Task):
    name = "sum_pairs"

    def __init__(self, difficulty: str = "hard") -> None:
        self.low, self.high = LEVELS[difficulty]

    def sample(self, rng: random.Random) -> Example:
        who, item, (many, one) = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
        total = rng.randint(self.low, self.high)
        first = rng.randint(1, total - 1)
        prompt = f"{who} has {total} {item} in two {many}. How many are in each {one}?"
        second = total - first
        return Example(prompt, f"{total} - {first} = {second}. #### {first} + {second}", self.name)

    def check(self, prediction: str, reference: str) -> bool:
        got, ref = parts(prediction), parts(reference)
        return got is not None and ref is not None and sum(got) == sum(ref)

    def key(self, prediction: str) -> str:
        got = parts(prediction)
        return super().key(prediction) if got is None else f"{got[0]} + {got[1]}"
