"""Built-in, procedurally generated tasks with exact metrics.

Each task draws examples from a seeded generator and assigns every distinct
prompt to a split by a hash of its text, so train, validation and test never
overlap and are the same on every machine for a given seed.
"""

from distill.tasks.arithmetic import ArithmeticTask
from distill.tasks.base import Example, Task, split_of
from distill.tasks.spelling import SpellingTask

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    SpellingTask.name: SpellingTask,
}


def get_task(name: str) -> Task:
    """Return the built-in task called ``name``."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}") from None


__all__ = ["Example", "Task", "TASKS", "get_task", "split_of", "ArithmeticTask", "SpellingTask"]
