"""Built-in, procedurally generated tasks with exact metrics.

Each task draws examples from a seeded generator and assigns every distinct
prompt to a split by a hash of its text, so train, validation and test never
overlap and are the same on every machine for a given seed.
"""

from distill.errors import DistillError
from distill.tasks.arithmetic import ArithmeticTask
from distill.tasks.base import Example, Task, split_of
from distill.tasks.spelling import SpellingTask
from distill.tasks.sum_pairs import SumPairsTask

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    SpellingTask.name: SpellingTask,
    SumPairsTask.name: SumPairsTask,
}


DIFFICULTIES = ("easy", "medium", "hard")


def check_builtin(tasks: list[str], difficulty: str, prefix: str = "") -> None:
    """One-line errors for unknown built-in task names or difficulty, naming the fields as
    ``prefix`` + ``tasks`` / ``difficulty``."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise DistillError(f"{prefix}tasks: {unknown or 'none given'}; built-in tasks are {sorted(TASKS)}")
    if difficulty not in DIFFICULTIES:
        raise DistillError(f"{prefix}difficulty {difficulty!r}: one of {', '.join(DIFFICULTIES)}")


def get_task(name: str, difficulty: str = "hard") -> Task:
    """Return the built-in task called ``name``; ``difficulty`` (easy, medium, hard) sets how many
    steps and how large the numbers of arithmetic are, and the largest total of sum_pairs (spelling
    has one level: fewer digits would leave too few distinct examples)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; one of {', '.join(DIFFICULTIES)}")
    return SpellingTask() if name == SpellingTask.name else TASKS[name](difficulty)


__all__ = [
    "DIFFICULTIES", "check_builtin", "Example", "Task", "TASKS", "get_task", "split_of", "ArithmeticTask",
    "SpellingTask", "SumPairsTask",
]
