"""Numbers spelled out in English words: the translation analogue.

    prompt:      "Write 4071 in words."
    completion:  "four thousand seventy-one"

Metrics: exact match (``accuracy``) and corpus BLEU from sacrebleu, as for
machine translation.
"""

from __future__ import annotations

import random

from sacrebleu.metrics import BLEU

from distill.tasks.base import Example, Task

ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MAX_NUMBER = 9999


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 9999, American style (no "and")."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{ONES[thousands]} thousand" + (f" {number_to_words(rest)}" if rest else "")


class SpellingTask(Task):
    name = "spelling"

    def sample(self, rng: random.Random) -> Example:
        # Draw the number of digits first so short numbers are not vanishingly rare.
        digits = rng.randint(1, 4)
        n = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
        return Example(f"Write {n} in words.", number_to_words(n), self.name)

    def check(self, prediction: str, reference: str) -> bool:
        return self.key(prediction) == self.key(reference)

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        preds, refs = [self.key(p) for p in predictions], [self.key(r) for r in references]
        # Effective order: most outputs are shorter than four words.
        bleu = BLEU(effective_order=True).corpus_score(preds, [refs]).score if refs else 0.0
        return super().score(predictions, references) | {"bleu": bleu}
