"""What every built-in task provides: a seeded example generator, a checker and a scorer."""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
# Share of the prompt space (per mille) held out for each evaluation split.
_HELD_OUT = {"test": (0, 50), "validation": (50, 100)}


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    task: str


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a fixed function of its text, so splits never overlap."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little") % 1000
    for split, (lo, hi) in _HELD_OUT.items():
        if lo <= bucket < hi:
            return split
    return "train"


class Task(ABC):
    """A procedurally generated task with an exact automatic metric."""

    name: str

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example (of any split)."""

    @abstractmethod
    def check(self, prediction: str, reference: str) -> bool:
        """Whether one completion is right (the checker: per sample, and the task's reward)."""

    def key(self, prediction: str) -> str:
        """What tells right answers apart when counting distinct ones: the text, spaces normalised."""
        return " ".join(prediction.split())

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Task metrics of completions against references; ``accuracy`` (the checker's mean) first."""
        right = sum(self.check(p, r) for p, r in zip(predictions, references, strict=True))
        return {"accuracy": right / max(len(references), 1)}

    def examples(self, split: str, seed: int = 0, distinct: bool = True) -> Iterator[Example]:
        """An endless, seeded stream of examples of ``split``; with ``distinct`` no prompt repeats."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        # The seed is mixed with the task and split names so each stream is independent.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        seen: set[str] = set()
        misses = 0
        while True:
            ex = self.sample(rng)
            if split_of(ex.prompt) != split or (distinct and ex.prompt in seen):
                misses += 1
                if misses > 100_000:
                    raise RuntimeError(f"task {self.name!r} ran out of distinct {split} examples")
                continue
            misses = 0
            if distinct:
                seen.add(ex.prompt)
            yield ex

    def take(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """The first ``n`` examples of the seeded stream of ``split``."""
        stream = self.examples(split, seed)
        return [next(stream) for _ in range(n)]
