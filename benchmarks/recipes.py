"""The recipe study: which recipe distils the shipped teacher best into the same student.

For each task on its own (each task has its own headroom, so each gets its own starting point):
1. makes the starting point once: the student trained by SFT on that task's fixed training set
   (``recipe=sft_student``, the task's ``init_steps``) unless it exists: a competent student that
   sits in the middle of the accuracy range, not at zero nor at the ceiling;
2. trains every variant (by default every recipe as shipped) from it for the same number of
   optimizer steps with each seed, in-process through ``distill.train.train`` with the recipe's own
   config (Hydra composition) plus the variant's overrides (``LABEL=RECIPE,OVERRIDE...``), and
   with ``draft.enabled`` so each result is also measured as a draft for the teacher;
3. measures on the test split: accuracy; with ``samples`` > 0 also mean@n, pass@n and distinct@n
   of n samples per prompt at temperature 1 (``eval.samples``); the teacher-student forward KL on
   the student's own samples (temperature 1); alpha as a draft; wall time split into generation
   and training; teacher forwards per generated token;
4. writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` (means and spread over seeds, one table per task).
Finished runs are kept in ``work`` (``runs-*.jsonl``), so an interrupted study goes on.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json
from distill.config import DataConfig, DistillConfig, LossConfig, ModelConfig, SamplingConfig, register
from distill.data import builtin_records, collate, prompt_ids, stop_ids
from distill.generation import sample
from distill.losses import count_tokens
from distill.models import load_model, load_tokenizer
from distill.objective import batch_loss
from distill.teacher import LocalTeacher
from distill.tracking import MetricsLog
from distill.train import train

# Where each task's SFT student sits in the middle of the accuracy range (benchmarks/README.md says
# how these were found): arithmetic at this difficulty, and spelling, from scratch on the fixed set.
DIFFICULTY = "easy"
INIT_STEPS = {"arithmetic": 475, "spelling": 70, "sum_pairs": 600}
STUDY_TASKS = ("arithmetic", "spelling")  # the recipe study's tasks; sum_pairs has a study of its own
RECIPES = ("sft", "supervised_kd", "seqkd", "gkd", "imitkd", "skd", "skd_then_gkd", "distillspec", "gkd_reward")
SAMPLED = ("mean", "pass", "distinct")  # the sampled-evaluation metrics a study with samples > 0 reports


def recipe_config(name: str, overrides: list[str]) -> DistillConfig:
    register()
    with initialize_config_module("distill.recipes", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=[f"recipe={name}", *overrides]))


def sft_init(out: Path, task: str, difficulty: str, steps: int) -> Path:
    """The competent SFT student every recipe on ``task`` starts from (trained here unless ``out`` has it)."""
    if not (out / "model" / "config.json").is_file():
        cfg = recipe_config("sft_student", [f"data.tasks=[{task}]", f"data.difficulty={difficulty}",
                                            f"trainer.steps={steps}", "trainer.eval_every=100000",
                                            "trainer.progress=false", f"output_dir={out}"])
        train(cfg, out)
    return out / "model"


@torch.no_grad()
def divergence_on_own_samples(model_dir: Path, teacher_dir: str, data: DataConfig, n: int, seed: int) -> float:
    """Forward KL(teacher || student) per token on the student's own samples (temperature 1) for
    ``n`` test prompts: how well the student matches the teacher where the student goes."""
    cpu = torch.device("cpu")
    tok = load_tokenizer(model_dir)
    student = load_model(ModelConfig(path=str(model_dir)), "student", cpu).eval()
    teacher = load_model(ModelConfig(path=teacher_dir), "teacher", cpu).eval()
    prompts = [prompt_ids(r, tok) for r in builtin_records(data, "test", n)]
    responses = sample(student, prompts, SamplingConfig(max_new_tokens=48), pad_id=tok.pad_token_id,
                       stops=stop_ids(tok), seed=seed, vocab=len(tok))
    batch = collate(list(zip(prompts, responses, strict=True)), tok.pad_token_id)
    terms = batch_loss(LossConfig(kind="fkl"), student, LocalTeacher(teacher), batch, bf16=False, vocab=len(tok),
                       fused=True)
    return float(terms.divergence) / count_tokens(batch.labels[:, 1:])


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``LABEL=RECIPE[,OVERRIDE...]`` (or a bare recipe name) -> (label, recipe, overrides)."""
    label, _, spec = text.partition("=") if "=" in text.split(",")[0] else (text, "", text)
    recipe, *overrides = spec.split(",")
    if recipe not in RECIPES:
        raise SystemExit(f"--variant {text!r}: unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    return label, recipe, overrides


def run_dir(work: Path, task: str, label: str, seed: int) -> Path:
    """Where the study keeps one finished run (its model, report and metrics)."""
    return work / f"{task}-{label}-seed{seed}"


def run_one(task: str, variant: tuple[str, str, list[str]], seed: int, init: Path, opts: dict) -> dict:
    label, recipe, extra = variant
    out = run_dir(opts["work"], task, label, seed)
    cfg = recipe_config(recipe, [
        "teacher=shipped",  # also for sft: it is evaluated beside the student and measures the draft
        f"student.path={init}", f"data.tasks=[{task}]", f"data.difficulty={opts['difficulty']}",
        f"trainer.steps={opts['steps']}",
        f"trainer.warmup_steps={max(1, opts['steps'] // 10)}", f"trainer.seed={seed}",
        "trainer.eval_every=100000", f"trainer.save_every={opts['steps']}", "trainer.progress=false",
        "draft.enabled=true", f"draft.num_prompts={opts['draft_prompts']}", "draft.gammas=[4]", "draft.repeats=1",
        f"eval.samples={opts['samples']}", f"output_dir={out}", *extra,
    ])
    shutil.rmtree(out, ignore_errors=True)  # a run cut short by an interrupted study starts again
    t0 = time.perf_counter()
    result = train(cfg, out)
    wall = time.perf_counter() - t0
    rows = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["split"] == "train"]
    forwards = [r["teacher_forwards_per_token"] for r in rows if "teacher_forwards_per_token" in r]
    after, n = result.test["student after"], opts["samples"]
    return {
        "task": task, "recipe": label, "seed": seed, "objective": result.objective, "overrides": extra,
        "commit": environment()["git_commit"],
        "wall_seconds": wall, "generation_seconds": sum(r.get("gen_seconds", 0.0) for r in rows),
        "training_seconds": sum(r.get("train_seconds", 0.0) for r in rows),
        "accuracy": result.test["student after"]["accuracy"],
        "accuracy_before": result.test["student before"]["accuracy"],
        **{f"{k}_at_n": after[f"{k}@{n}"] for k in SAMPLED if n},
        "alpha": result.draft["alpha"], "tau_gamma4": result.draft["by_gamma"][0]["tau_measured"],
        "teacher_forwards_per_token": statistics.mean(forwards) if forwards else None,
        "divergence_on_own_samples": divergence_on_own_samples(result.model_dir, cfg.teacher.path, cfg.data,
                                                               opts["divergence_prompts"], seed),
    }


def summarise(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """task -> variant -> mean and spread (sample standard deviation) over seeds."""
    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out: dict[str, dict[str, dict]] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        for name in dict.fromkeys(r["recipe"] for r in runs if r["task"] == task):
            rs = [r for r in runs if r["task"] == task and r["recipe"] == name]
            fwd = [r["teacher_forwards_per_token"] for r in rs if r["teacher_forwards_per_token"] is not None]
            out.setdefault(task, {})[name] = {
                "objective": rs[0]["objective"], "overrides": rs[0]["overrides"], "seeds": len(rs),
                "accuracy_before": rs[0]["accuracy_before"],
                **{k: stat([r[k] for r in rs]) for k in ("accuracy", "divergence_on_own_samples", "alpha",
                                                          "tau_gamma4", "generation_seconds", "training_seconds",
                                                          *(f"{m}_at_n" for m in SAMPLED)) if k in rs[0]},
                "teacher_forwards_per_token": stat(fwd) if fwd else None,
            }
    return out


def markdown(summary: dict[str, dict[str, dict]], meta: dict) -> str:
    one_seed = len(meta["seeds"]) == 1
    pm = lambda s, f="{:.3f}": f.format(s["mean"]) + ("" if one_seed else f" ± {f.format(s['std'])}")  # noqa: E731
    n_runs = sum(s["seeds"] for t in summary.values() for s in t.values())
    lines = [
        f"Each task on its own, every recipe from the same SFT student, {meta['steps']} optimizer steps, seeds "
        f"{meta['seeds']}, at difficulty `{meta['difficulty']}` (spelling has one level), {meta['machine']}; "
        f"the {n_runs} runs took {meta['runs_minutes']:.0f} minutes in all. "
        + ("One seed: a few points are noise. " if one_seed else "Mean ± standard deviation over seeds. ")
        + "Test accuracy (200 examples); divergence: forward KL(teacher || student) per token on the student's "
        "own samples; "
        "alpha and tau (gamma 4) of the result as a draft for the teacher; seconds of generation and of "
        "training (whole run); teacher forwards per generated token."
        + (f" Sampled: {meta['samples']} samples per test prompt at temperature 1, mean@n (their mean accuracy), "
           "pass@n (a prompt with a right sample) and distinct@n (distinct right answers per prompt)."
           if meta.get("samples") else ""),
    ]
    n = meta.get("samples")
    sampled = (f" mean@{n} | pass@{n} | distinct@{n} |", "---|---|---|") if n else ("", "")
    for task, variants in summary.items():
        before = next(iter(variants.values()))["accuracy_before"]
        lines += [
            "", f"**{task}**: the SFT student ({meta['init_steps'][task]} SFT steps) starts at {before:.3f}.", "",
            "| recipe | objective | accuracy |" + sampled[0] + " divergence on own samples | alpha | tau (gamma 4) "
            "| generation s | training s | teacher fwd / token |",
            "|---|---|---|" + sampled[1] + "---|---|---|---|---|---|",
        ]
        for name, s in variants.items():
            fwd = s["teacher_forwards_per_token"]
            objective = s["objective"] + (f" ({', '.join(s['overrides'])})" if s["overrides"] else "")
            lines.append(
                f"| {name} | {objective} | {pm(s['accuracy'])} | "
                + "".join(f"{pm(s[f'{k}_at_n'], '{:.3f}' if k != 'distinct' else '{:.2f}')} | " for k in SAMPLED if n)
                + f"{pm(s['divergence_on_own_samples'])} "
                f"| {pm(s['alpha'])} | {pm(s['tau_gamma4'], '{:.2f}')} | {pm(s['generation_seconds'], '{:.0f}')} "
                f"| {pm(s['training_seconds'], '{:.0f}')} | {pm(fwd, '{:.2f}') if fwd else '-'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict]], path: Path, samples: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("accuracy", "test accuracy"), ("divergence_on_own_samples", "divergence on own samples"),
            ("alpha", "alpha as a draft")]
    if samples:  # the study sampled: its sampled quality too
        keys.insert(1, ("mean_at_n", f"mean@{samples} at temperature 1"))
    fig, axes = plt.subplots(len(summary), len(keys), figsize=(4.8 * len(keys), 4 * len(summary)), squeeze=False)
    for row, (task, variants) in zip(axes, summary.items(), strict=True):
        names = list(variants)
        for ax, (key, title) in zip(row, keys, strict=True):
            stats = [variants[n][key] for n in names]
            ax.bar(range(len(names)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3,
                   color=[f"C{i}" for i in range(len(names))])
            if key == "accuracy":
                ax.axhline(variants[names[0]]["accuracy_before"], color="k", ls="--", lw=1, label="SFT start")
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{task}: {title}")
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, seed: int = 0, tasks: list[str] | None = None, init_steps: dict[str, int] | None = None,
        steps: int = 200, seeds: list[int] | None = None, difficulty: str = DIFFICULTY,
        variants: list[str] | None = None, draft_prompts: int = 32, divergence_prompts: int = 64,
        name: str = "recipes", work: str | None = None, samples: int = 0) -> dict:
    """The study; ``seeds`` defaults to ``[seed]``, ``variants`` to every recipe as shipped. ``work``:
    where the starting points and finished runs are kept, so that an interrupted study goes on
    (None: a temporary directory). ``samples``: sampled evaluation, n per test prompt at temperature 1."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tasks, seeds = tasks or list(STUDY_TASKS), seeds or [seed]
    init_steps = {**INIT_STEPS, **(init_steps or {})}
    parsed = [parse_variant(v) for v in (variants or RECIPES)]
    if work is None:  # a fresh directory, removed after: nothing measured before is reused
        with tempfile.TemporaryDirectory(prefix="distill-recipes-") as scratch:
            return run(out, seed, tasks, init_steps, steps, seeds, difficulty, variants, draft_prompts,
                       divergence_prompts, name, scratch, samples)
    work_dir = Path(work)
    opts = {"work": work_dir, "difficulty": difficulty, "steps": steps, "draft_prompts": draft_prompts,
            "divergence_prompts": divergence_prompts, "samples": samples}
    work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for task in tasks:
        init = sft_init(work_dir / f"sft-init-{task}-{difficulty}-{init_steps[task]}", task, difficulty,
                        init_steps[task])
        runs_path = work_dir / (f"runs-{task}-{difficulty}-{init_steps[task]}-{steps}"
                                + (f"-samples{samples}" if samples else "") + ".jsonl")
        done = {(r["recipe"], r["seed"], tuple(r["overrides"])): r
                for r in map(json.loads, runs_path.read_text().splitlines())} if runs_path.is_file() else {}
        commit = environment()["git_commit"]
        for variant in parsed:
            for s in seeds:
                key = (variant[0], s, tuple(variant[2]))
                if key in done and done[key].get("commit") != commit:
                    print(f"warning: {task} {variant[0]} seed {s} is reused from {runs_path}, measured at commit "
                          f"{done[key].get('commit')} (now {commit}); delete the file to measure it again", flush=True)
                if key not in done:  # finished runs are kept: an interrupted study goes on
                    done[key] = run_one(task, variant, s, init, opts)
                    with runs_path.open("a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                    print(f"{task} {variant[0]} seed {s}: accuracy {done[key]['accuracy']:.3f}", flush=True)
                runs.append(done[key])
    meta = {"environment": environment(), "steps": steps, "seeds": seeds, "difficulty": difficulty, "samples": samples,
            "init_steps": {t: init_steps[t] for t in tasks},
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
            "runs_minutes": sum(r["wall_seconds"] for r in runs) / 60}
    summary = summarise(runs)
    metrics = {}
    for task, by_variant in summary.items():
        for label, v in by_variant.items():
            at = f"{task} {label}"
            # Floors: what another machine's rounding moves a training run by (one seed's run spreads
            # by about 0.03 in accuracy over seeds: results/full/recipes.md).
            metrics[f"{at} accuracy"] = metric(v["accuracy"]["mean"], "higher", "quality", floor=0.03)
            metrics[f"{at} divergence on own samples"] = metric(v["divergence_on_own_samples"]["mean"], "lower",
                                                                "quality", floor=0.02)
            metrics[f"{at} alpha"] = metric(v["alpha"]["mean"], "higher", "quality", floor=0.01)
            metrics[f"{at} tau at gamma 4"] = metric(v["tau_gamma4"]["mean"], "higher", "quality", floor=0.1)
            if samples:
                metrics[f"{at} mean@{samples}"] = metric(v["mean_at_n"]["mean"], "higher", "quality", floor=0.03)
    result = {**meta, "summary": summary, "runs": runs, "metrics": metrics}
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(summary, meta))
    plot(summary, out / f"{name}.png", samples)
    return result
