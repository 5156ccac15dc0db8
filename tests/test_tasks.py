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


@pytest.mark.parametrize("difficulty,low,high", [("easy", 6, 50), ("medium", 6, 100), ("hard", 6, 199)])
def test_sum_pairs_has_many_right_answers_and_checks_each(difficulty, low, high):
    """Every prompt has at least five right answers; the references (a worked subtraction, then
    ``#### a + b``) are right, spread over the first part, and within the level; the checker takes
    any split of the total as the final answer and nothing else."""
    from distill.tasks.sum_pairs import parts

    task = get_task("sum_pairs", difficulty)
    examples = task.take("train", 400)
    totals = [sum(parts(e.completion)) for e in examples]
    assert low <= min(totals) and max(totals) <= high and max(totals) > (low + high) / 2
    assert all(t - 1 >= 5 and f"has {t} " in e.prompt for t, e in zip(totals, examples, strict=True))
    for e, t in zip(examples, totals, strict=True):
        a, b = parts(e.completion)
        assert task.check(e.completion, e.completion) and e.completion == f"{t} - {a} = {b}. #### {a} + {b}"
    firsts = {parts(e.completion)[0] for e in examples}
    assert len(firsts) > low  # the first part is spread, not one mode
    ref = "57 - 20 = 37. #### 20 + 37"
    right = [f"#### {a} + {57 - a}" for a in range(1, 57)]
    assert all(task.check(r, ref) for r in right) and len({task.key(r) for r in right}) == 56
    for wrong in ("#### 20 + 36", "#### 0 + 57", "#### 57 + 0", "#### 020 + 37", "#### 20+37", "#### 20 + 37 + 0",
                  "#### twenty + 37", "", "20 + 37", "#### 57", "57 - 20 = 37."):
        assert not task.check(wrong, ref), wrong
    # The final answer counts, not the worked step; two workings of one answer are one answer.
    assert task.check("57 - 20 = 36. #### 20 + 37 ", ref)
    assert task.key("57 - 20 = 37. #### 20 + 37") == task.key("#### 20  +  37".replace("  +  ", " + ")) == "20 + 37"
    assert task.key("#### 37 + 20") != task.key("#### 20 + 37")
    assert task.score(["#### 1 + 56", "#### 56 + 2"], [ref, ref]) == {"accuracy": 0.5}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_reads_back_through_the_shipped_tokenizer(name):
    """Prompts and completions decode to themselves: no character the shipped tokenizer lacks (it
    drops them silently: "Split" would read "plit")."""
    from distill.config import ASSETS
    from distill.models import load_tokenizer

    tok = load_tokenizer(ASSETS / "teacher")
    for e in get_task(name).take("train", 200):
        for text in (e.prompt, e.completion):
            assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text, text
