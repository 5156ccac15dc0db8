"""Multi-step word problems with worked steps: the GSM8K analogue.

    prompt:      "Ann has 37 coins. Ann finds 45 more. Ann loses 18. How many coins does Ann have?"
    completion:  "37 + 45 = 82. 82 - 18 = 64. #### 64"

The metric is exact match of the final answer after ``####``, as for GSM8K.
"""

from __future__ import annotations

import random
import re

from distill.tasks.base import Example, Task

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jess")
ITEMS = ("apples", "coins", "books", "stamps", "cards", "shells", "pens", "cookies")
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}", "eats {n}")
MAX_VALUE = 199
_ANSWER = re.compile(r"####\s*(-?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last ``####`` marker, or None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


# difficulty -> (min steps, max steps, largest start value, largest operand). Every level is a part
# of the hardest one, so a teacher trained on "hard" (the shipped one) knows them all.
LEVELS = {"easy": (2, 2, 99, 9), "medium": (2, 2, 99, 30), "hard": (2, 3, 99, 99)}


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, difficulty: str = "hard") -> None:
        self.min_steps, self.max_steps, self.max_start, self.max_operand = LEVELS[difficulty]

    def sample(self, rng: random.Random) -> Example:
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        value = rng.randint(10, self.max_start)
        sentences = [f"{who} has {value} {item}."]
        steps = []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            # Keep every intermediate result in [0, MAX_VALUE]: at most three-digit numbers.
            if value >= 20 and (value + 1 > MAX_VALUE or rng.random() < 0.5):
                n = rng.randint(1, min(self.max_operand, value))
                sentences.append(f"{who} {rng.choice(LOSSES).format(n=n)}.")
                steps.append(f"{value} - {n} = {value - n}.")
                value -= n
            else:
                n = rng.randint(1, min(self.max_operand, MAX_VALUE - value))
                sentences.append(f"{who} {rng.choice(GAINS).format(n=n)}.")
                steps.append(f"{value} + {n} = {value + n}.")
                value += n
        sentences.append(f"How many {item} does {who} have?")
        return Example(" ".join(sentences), " ".join(steps) + f" #### {value}", self.name)

    def check(self, prediction: str, reference: str) -> bool:
        return final_answer(prediction) is not None and final_answer(prediction) == final_answer(reference)
