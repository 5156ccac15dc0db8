"""The staleness study: generation run ahead of training (``sources.asynchronous``), what it costs
in quality and what it saves in wall clock.

From the recipe study's SFT starting point of each task (``benchmarks.recipes``), for each seed:
``gkd`` with forward KL, reverse KL and JSD(0.5) at staleness s in {0, 1, 2, 4}, and ``skd`` at
s in {0, 1}. s = 0 is the synchronous engine on both cores (2 torch threads); s > 0 runs the
trainer on one core and one generation worker on the other (1 thread each). Measured on the test
split: accuracy, and forward KL(teacher || student) per token on the student's own samples; the
training loop's wall clock (the sum of the metrics' ``wall_seconds``), split into training,
generation and the waits.

Two speedups of s against s = 0 (same divergence and seed):
- measured here, on this 2-core machine;
- predicted for generation and training each on a device of its own, from the s = 0 run's
  per-step phase times (T_t training, G_t generation; G_t = 0 on a dataset step) by the
  pipeline's recurrence (``pipelined``): step t + s is sent when step t starts, the worker takes
  requests in order, the trainer starts step t when step t - 1 is done and its samples are ready.

Writes ``asynchronous.{json,md,png}``. Finished runs are kept in ``work`` (``runs-*.jsonl``), so
an interrupted study goes on.
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

from benchmarks import recipes
from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json
from distill.tracking import MetricsLog
from distill.train import train

DIVERGENCES = {"fkl": ["loss.kind=fkl"], "rkl": ["loss.kind=rkl"], "jsd0.5": ["loss.kind=gjsd", "loss.beta=0.5"]}
STALENESS = (0, 1, 2, 4)
SKD_STALENESS = (0, 1)


def variants(staleness=STALENESS, skd_staleness=SKD_STALENESS) -> list[tuple[str, str, list[str], int]]:
    """(label, recipe, overrides, s) of every run of a seed."""
    out = [(f"gkd {name} s={s}", "gkd", overrides, s) for name, overrides in DIVERGENCES.items() for s in staleness]
    return out + [(f"skd s={s}", "skd", [], s) for s in skd_staleness]


def pipelined(train_s: list[float], gen_s: list[float], s: int) -> float:
    """The wall clock of steps with training times ``train_s`` and generation times ``gen_s`` (0:
    nothing generated) when generation runs ``s`` steps ahead on a device of its own:

        sent_t   = 0 for t <= s, else done_{t-s-1}       (step t is sent when step t - s starts)
        ready_t  = max(free, sent_t) + G_t;  free = ready_t   (one worker, requests in order)
        done_t   = max(done_{t-1}, ready_t) + T_t          (ready_t = 0 for a dataset step)

    With s = 0 it is the sum of T_t + G_t, the synchronous loop."""
    done: list[float] = []
    free = 0.0
    for t, (T, G) in enumerate(zip(train_s, gen_s, strict=True)):
        ready = 0.0
        if G > 0:
            sent = 0.0 if t <= s else done[t - s - 1]
            free = ready = max(free, sent) + G
        done.append(max(done[-1] if done else 0.0, ready) + T)
    return done[-1] if done else 0.0


def run_one(task: str, variant: tuple[str, str, list[str], int], seed: int, init: Path, opts: dict) -> dict:
    label, recipe, overrides, s = variant
    out = opts["work"] / f"{task}-{label.replace(' ', '-').replace('=', '')}-seed{seed}"
    cfg = recipes.recipe_config(recipe, [
        "teacher=shipped", f"student.path={init}", f"data.tasks=[{task}]", f"data.difficulty={opts['difficulty']}",
        f"trainer.steps={opts['steps']}", f"trainer.warmup_steps={max(1, opts['steps'] // 10)}",
        f"trainer.seed={seed}", "trainer.eval_every=100000", f"trainer.save_every={opts['steps']}",
        "trainer.log_every=1", "trainer.progress=false", f"sources.asynchronous.staleness={s}",
        f"output_dir={out}", *overrides,
    ])
    shutil.rmtree(out, ignore_errors=True)  # a run cut short by an interrupted study starts again
    # s = 0: the synchronous engine on both cores; s > 0: the trainer on one, the worker on the other.
    torch.set_num_threads(2 if s == 0 else 1)
    t0 = time.perf_counter()
    try:
        result = train(cfg, out)
    finally:
        torch.set_num_threads(2)
    wall = time.perf_counter() - t0
    rows = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["split"] == "train"]
    return {
        "task": task, "variant": label, "recipe": recipe, "staleness": s, "seed": seed, "overrides": overrides,
        "objective": result.objective, "commit": environment()["git_commit"], "run_seconds": wall,
        "loop_seconds": sum(r["wall_seconds"] for r in rows),
        "training_seconds": sum(r["train_seconds"] for r in rows),
        "generation_seconds": sum(r.get("gen_seconds", 0.0) for r in rows),
        "wait_samples_seconds": sum(r.get("wait_samples_s", 0.0) for r in rows),
        "wait_weights_seconds": sum(r.get("wait_weights_s", 0.0) for r in rows),
        # Per step (log_every=1): what the pipeline's prediction is made of.
        "step_training_seconds": [r["train_seconds"] for r in rows],
        "step_generation_seconds": [r.get("gen_seconds", 0.0) for r in rows],
        "accuracy": result.test["student after"]["accuracy"],
        "accuracy_before": result.test["student before"]["accuracy"],
        "divergence_on_own_samples": recipes.divergence_on_own_samples(
            result.model_dir, cfg.teacher.path, cfg.data, opts["divergence_prompts"], seed),
    }


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """task -> variant -> means and spreads over seeds, with the measured and predicted speedups
    against the same divergence's s = 0 run of each seed."""
    out: dict[str, dict[str, dict]] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        sync = {(r["recipe"], tuple(r["overrides"]), r["seed"]): r for r in mine if r["staleness"] == 0}
        for label in dict.fromkeys(r["variant"] for r in mine):
            rs = [r for r in mine if r["variant"] == label]
            base = [sync[(r["recipe"], tuple(r["overrides"]), r["seed"])] for r in rs]
            row = {"recipe": rs[0]["recipe"], "staleness": rs[0]["staleness"], "objective": rs[0]["objective"],
                   "seeds": len(rs), "accuracy_before": rs[0]["accuracy_before"],
                   **{k: _stat([r[k] for r in rs]) for k in (
                       "accuracy", "divergence_on_own_samples", "loop_seconds", "training_seconds",
                       "generation_seconds", "wait_samples_seconds", "wait_weights_seconds")},
                   "speedup_measured": _stat([b["loop_seconds"] / r["loop_seconds"]
                                              for r, b in zip(rs, base, strict=True)]),
                   "speedup_predicted": _stat([
                       pipelined(b["step_training_seconds"], b["step_generation_seconds"], 0)
                       / pipelined(b["step_training_seconds"], b["step_generation_seconds"], rs[0]["staleness"])
                       for b in base])}
            out.setdefault(task, {})[label] = row
    return out


def thread_split(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per task, what one core instead of two costs each phase: training seconds of the
    synchronous gkd runs (2 threads) against the s = 1 runs' trainer (1 thread), generation alike
    (the worker has 1 thread), and the bound it sets on any split of two cores into one for each:
    max(T1, G1) / (T2 + G2), the best wall-clock ratio to the synchronous loop."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        two, one = ([r for r in runs if r["task"] == task and r["recipe"] == "gkd" and r["staleness"] == s]
                    for s in (0, 1))
        if not two or not one:
            continue
        t2, g2 = (statistics.mean(r[k] for r in two) for k in ("training_seconds", "generation_seconds"))
        t1, g1 = (statistics.mean(r[k] for r in one) for k in ("training_seconds", "generation_seconds"))
        out[task] = {"training_2_threads": t2, "training_1_thread": t1, "generation_2_threads": g2,
                     "generation_1_thread": g1, "training_slowdown": t1 / t2, "generation_slowdown": g1 / g2,
                     "generation_share": g2 / (t2 + g2), "best_ratio_one_core_each": max(t1, g1) / (t2 + g2)}
    return out


def markdown(summary: dict, split: dict, meta: dict) -> str:
    pm = lambda s, f="{:.3f}": f"{f.format(s['mean'])} ± {f.format(s['std'])}"  # noqa: E731
    lines = [
        f"Each task from the recipe study's SFT student, {meta['steps']} optimizer steps, seeds {meta['seeds']}, "
        f"difficulty `{meta['difficulty']}`, {meta['machine']}; the {meta['runs']} runs took "
        f"{meta['runs_minutes']:.0f} minutes. Mean ± standard deviation over seeds. s = 0: the synchronous "
        "engine on 2 threads; s > 0: the trainer on 1 thread and one generation worker on 1 thread. Accuracy on "
        "the test split (200 examples); divergence: forward KL(teacher || student) per token on the student's own "
        "samples; loop: the training loop's wall clock; speedup measured: the s = 0 run's loop over this one's "
        "(same divergence and seed); speedup predicted: with generation and training each on a device of its "
        "own, from the s = 0 run's per-step phase times (`pipelined` in `benchmarks/asynchronous.py`).",
    ]
    for task, rows in summary.items():
        before = next(iter(rows.values()))["accuracy_before"]
        lines += ["", f"**{task}**: the SFT student starts at {before:.3f}.", "",
                  "| recipe | s | accuracy | divergence on own samples | loop s | training s | generation s "
                  "| trainer waited s | speedup measured | speedup predicted |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            name = label.rsplit(" s=", 1)[0]
            lines.append(
                f"| {name} | {r['staleness']} | {pm(r['accuracy'])} | {pm(r['divergence_on_own_samples'])} "
                f"| {pm(r['loop_seconds'], '{:.0f}')} | {pm(r['training_seconds'], '{:.0f}')} "
                f"| {pm(r['generation_seconds'], '{:.0f}')} | {pm(r['wait_samples_seconds'], '{:.1f}')} "
                f"| {pm(r['speedup_measured'], '{:.2f}')} | {pm(r['speedup_predicted'], '{:.2f}')} |")
        if task in split:
            t = split[task]
            lines += ["", f"Threads ({task}, gkd): training {t['training_2_threads']:.0f} s on 2 threads, "
                      f"{t['training_1_thread']:.0f} s on 1 ({t['training_slowdown']:.2f}x); generation "
                      f"{t['generation_2_threads']:.0f} s on 2, {t['generation_1_thread']:.0f} s on 1 "
                      f"({t['generation_slowdown']:.2f}x); generation is {t['generation_share']:.0%} of the "
                      f"synchronous loop. One core each can at best take max(T1, G1) / (T2 + G2) = "
                      f"{t['best_ratio_one_core_each']:.2f} of the synchronous wall clock."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("accuracy", "test accuracy"), ("divergence_on_own_samples", "divergence on own samples"),
            ("speedup_measured", "speedup measured (2 cores)"),
            ("speedup_predicted", "speedup predicted (a device each)")]
    fig, axes = plt.subplots(len(summary), len(keys), figsize=(4.6 * len(keys), 3.8 * len(summary)), squeeze=False)
    for row, (task, rows) in zip(axes, summary.items(), strict=True):
        groups = dict.fromkeys(label.rsplit(" s=", 1)[0] for label in rows)
        for ax, (key, title) in zip(row, keys, strict=True):
            for i, g in enumerate(groups):
                mine = [r for label, r in rows.items() if label.rsplit(" s=", 1)[0] == g]
                ax.errorbar([r["staleness"] + 0.06 * (i - 1.5) for r in mine], [r[key]["mean"] for r in mine],
                            yerr=[r[key]["std"] for r in mine], marker="o", capsize=3, label=g)
            if key.startswith("speedup"):
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xlabel("staleness s")
            ax.set_xticks(STALENESS)
            ax.set_title(f"{task}: {title}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, seed: int = 0, tasks: list[str] | None = None, steps: int = 200, seeds: list[int] | None = None,
        difficulty: str = recipes.DIFFICULTY, staleness: list[int] | None = None,
        skd_staleness: list[int] | None = None, divergence_prompts: int = 64, name: str = "asynchronous",
        work: str | None = None) -> dict:
    """The study into ``out``; ``work`` keeps the starting points and finished runs (None: a
    temporary directory)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tasks, seeds = tasks or list(recipes.STUDY_TASKS), seeds or [seed]
    if work is None:
        with tempfile.TemporaryDirectory(prefix="distill-asynchronous-") as scratch:
            return run(out, seed, tasks, steps, seeds, difficulty, staleness, skd_staleness, divergence_prompts,
                       name, scratch)
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    opts = {"work": work_dir, "difficulty": difficulty, "steps": steps, "divergence_prompts": divergence_prompts}
    todo = variants(tuple(staleness or STALENESS), tuple(skd_staleness or SKD_STALENESS))
    runs, commit = [], environment()["git_commit"]
    for task in tasks:
        n_init = recipes.INIT_STEPS[task]
        init = recipes.sft_init(work_dir / f"sft-init-{task}-{difficulty}-{n_init}", task, difficulty, n_init)
        path = work_dir / f"runs-{task}-{difficulty}-{n_init}-{steps}.jsonl"
        done = {(r["variant"], r["seed"]): r for r in map(json.loads, path.read_text().splitlines())} \
            if path.is_file() else {}
        for s in seeds:  # seed by seed: a study cut short has whole seeds to compare
            for variant in todo:
                key = (variant[0], s)
                if key in done and done[key].get("commit") != commit:
                    print(f"warning: {task} {key[0]} seed {s} is reused from {path}, measured at commit "
                          f"{done[key].get('commit')} (now {commit})", flush=True)
                if key not in done:
                    done[key] = run_one(task, variant, s, init, opts)
                    with path.open("a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                    r = done[key]
                    print(f"{task} {key[0]} seed {s}: accuracy {r['accuracy']:.3f}, loop {r['loop_seconds']:.0f} s",
                          flush=True)
                runs.append(done[key])
    summary, split = summarise(runs), thread_split(runs)
    meta = {"environment": environment(), "steps": steps, "seeds": seeds, "difficulty": difficulty,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
            "runs": len(runs), "runs_minutes": sum(r["run_seconds"] for r in runs) / 60}
    metrics = {}
    for task, rows in summary.items():
        for label, r in rows.items():
            metrics[f"{task} {label} accuracy"] = metric(r["accuracy"]["mean"], "higher", "quality", floor=0.03)
            metrics[f"{task} {label} divergence on own samples"] = metric(
                r["divergence_on_own_samples"]["mean"], "lower", "quality", floor=0.02)
    result = {**meta, "summary": summary, "thread_split": split, "runs": runs, "metrics": metrics}
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(summary, split, meta))
    plot(summary, out / f"{name}.png")
    return result
