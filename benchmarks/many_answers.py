"""The study of a task with many right answers: does on-policy distillation with a mode-seeking
divergence give a small student samples that are each right, where forward KL leaves it between
the teacher's modes (GKD's central argument)?

1. The teacher on ``sum_pairs`` at temperature 1: validity (mean@n), distinct right answers per
   prompt, and the entropy of its answers (nats per response, a Monte Carlo estimate: the mean
   negative log-likelihood of its own samples) against log(total - 1), the entropy of a uniform
   choice among the right answers.
2. The recipe study (``benchmarks.recipes``) on ``sum_pairs`` from one SFT starting point:
   supervised KD (forward KL), GKD with forward KL, reverse KL and JSD(0.9), and ``gkd_reward``;
   greedy accuracy and sampled mean@n / pass@n / distinct@n at temperature 1; 3 seeds. And
   arithmetic with supervised KD and ``gkd_reward``, sampled alike.
3. Where the samples go wrong: each finished sum_pairs student's test samples (the ones its run
   scored, drawn again with the same seeds) sorted into right, no final answer, a first part
   outside 1..N-1, a wrong subtraction (``N - a = c`` with c != N - a) and other errors, beside
   the distinct first parts it chooses per prompt; the teacher's samples alike.
Writes ``many_answers.{json,md}`` (the teacher's spread, both studies' tables, the error kinds) and
each study's own ``many_answers_{sum_pairs,arithmetic}.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks import recipes
from benchmarks.environment import environment
from benchmarks.metrics import write_json
from distill.config import ASSETS, DataConfig, EvalConfig, ModelConfig, SamplingConfig
from distill.data import Record, builtin_records, collate, prompt_ids, stop_ids
from distill.evaluation import generate_samples, sampled_metrics
from distill.generation import sample
from distill.losses import cross_entropy
from distill.models import load_model, load_tokenizer
from distill.tasks.sum_pairs import parts

VARIANTS = ["supervised_kd", "gkd_fkl=gkd,loss.kind=fkl", "gkd_rkl=gkd,loss.kind=rkl", "gkd_jsd0.9=gkd,loss.beta=0.9",
            "gkd_reward"]
ARITHMETIC_VARIANTS = ["supervised_kd", "gkd_reward"]
KINDS = ("right", "no answer", "first part out of range", "subtraction wrong", "other")
_WORKED = re.compile(r"\s*(\d+) - (\d+) = (\d+)\.")


def error_kind(text: str, total: int) -> str:
    """What a sum_pairs response got wrong (one of ``KINDS``)."""
    got = parts(text)
    if got is None:
        return "no answer"
    if sum(got) == total:
        return "right"
    if not 0 < got[0] < total:
        return "first part out of range"
    worked = _WORKED.match(text)
    if worked and (int(worked[1]), int(worked[2])) == (total, got[0]) and int(worked[3]) != total - got[0]:
        return "subtraction wrong"
    return "other"


def error_kinds(records: list[Record], samples: list[list[str]]) -> dict[str, float]:
    """The share of samples of each kind, and the distinct first parts chosen per prompt (right
    or not: how widely the model spreads)."""
    kinds = [error_kind(t, sum(parts(r.answer))) for r, texts in zip(records, samples, strict=True) for t in texts]
    firsts = [len({got[0] for got in map(parts, texts) if got}) for texts in samples]
    return {**{k: kinds.count(k) / len(kinds) for k in KINDS}, "distinct first parts": statistics.mean(firsts)}


def starting_point(work: Path, task: str, labels: list[str], seeds: list[int], samples: int) -> dict[str, float]:
    """The SFT start's greedy accuracy and sampled metrics on the test split, as each run's report
    measured it before training (means over the runs: one start, each run's own sampling seed)."""
    rows = [json.loads((recipes.run_dir(work, task, label, s) / "report.json").read_text())["test"]["student before"]
            for label in labels for s in seeds]
    keys = ["accuracy", *(f"{k}@{samples}" for k in ("mean", "pass", "distinct"))]
    return {k: statistics.mean(r[k] for r in rows) for k in keys}


def training_traces(work: Path, task: str, labels: list[str], seeds: list[int]) -> dict[str, dict]:
    """label -> the median gradient norm of its logged steps, and (with a reward) the reward's mean
    by logged step, each a mean over seeds (from the runs' ``metrics.jsonl``)."""
    out = {}
    for label in labels:
        rows = [r for s in seeds for r in map(json.loads, (recipes.run_dir(work, task, label, s) / "metrics.jsonl")
                                                 .read_text().splitlines()) if r["split"] == "train"]
        by_step: dict[int, list[float]] = {}
        for r in rows:
            if "reward_mean" in r:
                by_step.setdefault(r["step"], []).append(r["reward_mean"])
        out[label] = {"median_grad_norm": statistics.median(r["grad_norm"] for r in rows),
                      "reward_by_step": {step: statistics.mean(v) for step, v in sorted(by_step.items())}}
    return out


@torch.no_grad()
def student_errors(work: Path, difficulty: str, labels: list[str], seeds: list[int], samples: int) -> dict:
    """label -> error kinds (means over seeds) of each finished sum_pairs student's test samples,
    drawn as its run's report drew them (same records, seeds, batch size and lengths)."""
    cpu = torch.device("cpu")
    out = {}
    for label in labels:
        per_seed = []
        for s in seeds:
            run = recipes.run_dir(work, "sum_pairs", label, s)
            cfg = OmegaConf.load(run / "config.yaml")
            tok = load_tokenizer(run / "model")
            model = load_model(ModelConfig(path=str(run / "model")), "student", cpu).eval()
            records = builtin_records(DataConfig(tasks=["sum_pairs"], difficulty=difficulty), "test",
                                      cfg.data.num_test)
            texts = generate_samples(model, tok, records, EvalConfig(samples=samples), seed=s, what="test",
                                     max_new_tokens=cfg.trainer.max_new_tokens,
                                     batch_size=cfg.trainer.eval_batch_size, max_length=cfg.data.max_length)
            per_seed.append(error_kinds(records, texts))
        out[label] = {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}
    return out


@torch.no_grad()
def teacher_spread(teacher_dir: Path, difficulty: str, prompts: int, samples: int, seed: int = 0) -> dict:
    """The teacher's samples on ``prompts`` test prompts of sum_pairs, ``samples`` each at
    temperature 1: validity, distinct right answers, and entropy (nats per response)."""
    cpu = torch.device("cpu")
    tok = load_tokenizer(teacher_dir)
    model = load_model(ModelConfig(path=str(teacher_dir)), "teacher", cpu).eval()
    records = builtin_records(DataConfig(tasks=["sum_pairs"], difficulty=difficulty), "test", prompts)
    texts, nll = [], []
    for r in records:
        p = prompt_ids(r, tok)
        got = sample(model, [p] * samples, SamplingConfig(max_new_tokens=48), pad_id=tok.pad_token_id,
                     stops=stop_ids(tok), seed=seed, vocab=len(tok))
        texts.append(tok.batch_decode(got, skip_special_tokens=True))
        batch = collate([(p, g) for g in got], tok.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        nll.append(float(cross_entropy(logits, batch.labels[:, 1:], reduction="sum")) / samples)
    scored = sampled_metrics(records, texts)  # the checker decides; distinct right answers by the task's key
    uniform = [math.log(sum(parts(r.answer)) - 1) for r in records]
    return {"prompts": prompts, "samples": samples, "difficulty": difficulty,
            "validity": scored[f"mean@{samples}"], "distinct_right": scored[f"distinct@{samples}"],
            "entropy_nats": statistics.mean(nll), "uniform_entropy_nats": statistics.mean(uniform),
            "error_kinds": error_kinds(records, texts)}


def run(out: Path, seed: int = 0, seeds: list[int] | None = None, difficulty: str = "easy", steps: int = 200,
        samples: int = 8, work: str | None = None, init_steps: dict[str, int] | None = None) -> dict:
    if work is None:  # the error analysis reads the finished students: keep them until it is done
        with tempfile.TemporaryDirectory(prefix="distill-many-answers-") as scratch:
            return run(out, seed, seeds, difficulty, steps, samples, scratch, init_steps)
    teacher = teacher_spread(ASSETS / "teacher", difficulty, prompts=100, samples=32, seed=seed)
    print(f"teacher on sum_pairs: validity {teacher['validity']:.3f}, {teacher['distinct_right']:.1f} distinct right "
          f"answers of 32 samples, entropy {teacher['entropy_nats']:.2f} nats (uniform over the right answers: "
          f"{teacher['uniform_entropy_nats']:.2f})", flush=True)
    common = dict(seeds=seeds or [seed], steps=steps, samples=samples, work=work, init_steps=init_steps)
    study = recipes.run(out, seed, tasks=["sum_pairs"], difficulty=difficulty, variants=VARIANTS,
                        name="many_answers_sum_pairs", **common)
    arithmetic = recipes.run(out, seed, tasks=["arithmetic"], variants=ARITHMETIC_VARIANTS,
                             name="many_answers_arithmetic", **common)
    metrics = {**study["metrics"], **arithmetic["metrics"]}
    labels = [recipes.parse_variant(v)[0] for v in VARIANTS]
    errors = {"teacher": teacher["error_kinds"],
              **student_errors(Path(work), difficulty, labels, common["seeds"], samples)}
    arithmetic_labels = [recipes.parse_variant(v)[0] for v in ARITHMETIC_VARIANTS]
    starts = {"sum_pairs": starting_point(Path(work), "sum_pairs", labels, common["seeds"], samples),
              "arithmetic": starting_point(Path(work), "arithmetic", arithmetic_labels, common["seeds"], samples)}
    traces = {"sum_pairs": training_traces(Path(work), "sum_pairs", labels, common["seeds"]),
              "arithmetic": training_traces(Path(work), "arithmetic", arithmetic_labels, common["seeds"])}
    result = {"environment": environment(), "teacher": teacher, "starting_points": starts,
              "sum_pairs": study["summary"], "arithmetic": arithmetic["summary"], "error_kinds": errors,
              "training": traces, "metrics": metrics}
    write_json(out / "many_answers.json", result)
    (out / "many_answers.md").write_text(markdown(result, out, difficulty, samples))
    return result


def markdown(result: dict, out: Path, difficulty: str, samples: int) -> str:
    teacher = result["teacher"]
    starts = "\n".join(
        f"- {task}: greedy {s['accuracy']:.3f}, mean@{samples} {s[f'mean@{samples}']:.3f}, "
        f"pass@{samples} {s[f'pass@{samples}']:.3f}, distinct@{samples} {s[f'distinct@{samples}']:.2f}"
        for task, s in result["starting_points"].items())
    return (
        f"The shipped teacher on sum_pairs ({difficulty}), {teacher['samples']} samples at temperature 1 on "
        f"{teacher['prompts']} test prompts: validity {teacher['validity']:.3f}, "
        f"{teacher['distinct_right']:.1f} distinct right answers per prompt, entropy {teacher['entropy_nats']:.2f} "
        f"nats per response (a uniform choice among the right answers: {teacher['uniform_entropy_nats']:.2f}).\n\n"
        f"The SFT starting points on the test split, as each run's report measured them before training (means "
        f"over the runs, each sampling with its own seed):\n\n{starts}\n\n"
        + (out / "many_answers_sum_pairs.md").read_text() + "\n" + (out / "many_answers_arithmetic.md").read_text()
        + "\n" + errors_markdown(result["error_kinds"], teacher["samples"], samples)
        + "\n" + training_markdown(result["training"]))


def training_markdown(traces: dict[str, dict[str, dict]]) -> str:
    lines = ["Training: the median gradient norm of each recipe's logged steps (before clipping) and, with the "
             "reward, its mean over the step's samples by logged step (means over seeds).", "",
             "| task | recipe | median gradient norm | reward by step |", "|---|---|---|---|"]
    for task, by_label in traces.items():
        for label, t in by_label.items():
            reward = ", ".join(f"{step}: {r:.2f}" for step, r in t["reward_by_step"].items()) or "-"
            lines.append(f"| {task} | {label} | {t['median_grad_norm']:.3f} | {reward} |")
    return "\n".join(lines) + "\n"


def errors_markdown(errors: dict[str, dict[str, float]], teacher_samples: int, samples: int) -> str:
    lines = [f"Where the sum_pairs samples go wrong: the share of each kind among the test samples at temperature "
             f"1 ({samples} per prompt, the students' means over seeds; the teacher's {teacher_samples} per prompt), "
             "and the distinct first parts chosen per prompt, right or not.", "",
             "| model | " + " | ".join(KINDS) + " | distinct first parts |", "|---" * (len(KINDS) + 2) + "|"]
    lines += [f"| {who} | " + " | ".join(f"{e[k]:.3f}" for k in KINDS) + f" | {e['distinct first parts']:.2f} |"
              for who, e in errors.items()]
    return "\n".join(lines) + "\n"
