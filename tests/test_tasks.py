"""The built-in tasks: deterministic splits, disjointness, correct references and metrics."""

from __future__ import annotations

import re

import pytest

from distill.tasks import TASKS, get_task, split_of
from distill.tasks.arithmetic import MAX_VALUE, final_answer
from distill.tasks.spelling import number_to_words


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_fixed_by_seed_and_disjoint(name):
    task = get_task(name)
    a = task.take("test", 50, seed=3)
    assert a == task.take("test", 50, seed=3)
    assert a != task.take("test", 50, seed=4)
    prompts = {split: {e.prompt for e in task.take(split, 100)} for split in ("train", "validation", "test")}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert all(split_of(p) == "test" for p in prompts["test"])


def test_arithmetic_worked_steps_are_correct():
    for ex in get_task("arithmetic").take("train", 300):
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", ex.completion)
        assert 2 <= len(steps) <= 3
        for a, op, b, c in steps:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
            assert 0 <= int(c) <= MAX_VALUE
        assert final_answer(ex.completion) == steps[-1][3]
        # The chain starts from the number in the prompt.
        assert steps[0][0] == re.search(r"has (\d+)", ex.prompt).group(1)


@pytest.mark.parametrize("difficulty,steps,operand", [("easy", (2, 2), 9), ("medium", (2, 2), 30),
                                                       ("hard", (2, 3), 99)])
def test_difficulty_levels(difficulty, steps, operand):
    """Arithmetic with fewer steps and smaller operands (each level a part of "hard", which the shipped
    teacher learnt); every level correct, each reaching its bounds."""
    arith = get_task("arithmetic", difficulty).take("train", 400)
    counts, operands = set(), []
    for ex in arith:
        found = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", ex.completion)
        counts.add(len(found))
        operands += [int(b) for _, _, b, _ in found]
        assert all((int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) for a, op, b, c in found)
    assert counts == set(range(steps[0], steps[1] + 1)) and max(operands) <= operand < max(operands) + 10
    with pytest.raises(ValueError, match="unknown difficulty"):
        get_task("spelling", "brutal")


def test_arithmetic_metric():
    task = get_task("arithmetic")
    refs = ["1 + 2 = 3. #### 3", "5 - 1 = 4. #### 4"]
    assert task.score(["x #### 3", "#### 5"], refs)["accuracy"] == 0.5
    assert task.score(["no answer", "#### 4"], refs)["accuracy"] == 0.5


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty-two"), (100, "one hundred"),
    (305, "three hundred five"), (1000, "one thousand"), (4071, "four thousand seventy-one"),
    (9999, "nine thousand nine hundred ninety-nine"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_spelling_metric():
    task = get_task("spelling")
    refs = ["four thousand seventy-one", "twelve"]
    perfect = task.score(refs, refs)
    assert perfect["accuracy"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
    half = task.score(["four thousand seventy-two", "twelve"], refs)
    assert half["accuracy"] == 0.5 and 0 < half["bleu"] < 100


def test_task_metrics_name_each_score_once():
    """One group: its scores once (``chrf``, not also ``data/chrf``); several: per group and the mean."""
    from distill.data import Record
    from distill.evaluation import task_metrics

    chat = [Record("p", "", "f:1", task=None, reference="five"), Record("p", "", "f:2", task=None, reference="six")]
    assert set(task_metrics(chat, ["five", "seven"], "chrf")) == {"chrf"}
    spelling = [Record("Write 5 in words.", "five", "b", task="spelling")]
    assert set(task_metrics(spelling, ["five"])) == {"accuracy", "spelling/bleu"}
    both = spelling + [Record("q", "1 + 1 = 2\n#### 2", "b", task="arithmetic")]
    got = task_metrics(both, ["five", "#### 3"])
    assert {"accuracy", "spelling/accuracy", "arithmetic/accuracy", "spelling/bleu"} <= set(got)
    assert got["accuracy"] == 0.5
