"""The recipe study: which recipe distils the shipped teacher best into the same student.

    python benchmarks/recipes.py [--steps 200] [--seeds 0 1 2] [--difficulty easy] [--init-steps 300]

1. makes the starting point once: the student trained by SFT on the built-in tasks
   (``recipe=sft_student``, ``--init-steps`` steps, at ``--difficulty``) unless it exists;
2. trains every recipe from it for the same number of optimizer steps with each seed, in-process
   through ``distill.train.train`` with the recipe's own config (Hydra composition), and with
   ``draft.enabled`` so each result is also measured as a draft for the teacher;
3. measures on the test split: accuracy per task; the teacher-student forward KL on the
   student's own samples (temperature 1); alpha as a draft; wall time split into generation and
   training; teacher forwards per generated token;
4. writes ``recipes.json``, ``recipes.md`` and ``recipes.png`` (means and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from distill.config import DataConfig, DistillConfig, LossConfig, ModelConfig, SamplingConfig, register
from distill.data import builtin_records, collate, prompt_ids, stop_ids
from distill.losses import count_tokens
from distill.models import load_model, load_tokenizer
from distill.objective import batch_loss
from distill.sources.sampling import sample
from distill.tracking import MetricsLog
from distill.train import train

RECIPES = ("sft", "supervised_kd", "seqkd", "gkd", "imitkd", "skd", "skd_then_gkd", "distillspec")


def recipe_config(name: str, overrides: list[str]) -> DistillConfig:
    register()
    with initialize_config_module("distill.recipes", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=[f"recipe={name}", *overrides]))


def sft_init(out: Path, difficulty: str, steps: int) -> Path:
    """The competent SFT student every recipe starts from (trained here unless ``out`` has it)."""
    if not (out / "model" / "config.json").is_file():
        cfg = recipe_config("sft_student", [f"data.difficulty={difficulty}", f"trainer.steps={steps}",
                                            "trainer.eval_every=100000", f"output_dir={out}"])
        train(cfg, out)
    return out / "model"


@torch.no_grad()
def divergence_on_own_samples(model_dir: Path, teacher_dir: str, difficulty: str, n: int, seed: int) -> float:
    """Forward KL(teacher || student) per token on the student's own samples (temperature 1) for
    ``n`` test prompts: how well the student matches the teacher where the student goes."""
    cpu = torch.device("cpu")
    tok = load_tokenizer(model_dir)
    student = load_model(ModelConfig(path=str(model_dir)), "student", cpu).eval()
    teacher = load_model(ModelConfig(path=teacher_dir), "teacher", cpu).eval()
    prompts = [prompt_ids(r, tok) for r in builtin_records(DataConfig(difficulty=difficulty), "test", n)]
    responses = sample(student, prompts, SamplingConfig(max_new_tokens=48), pad_id=tok.pad_token_id,
                       stops=stop_ids(tok), seed=seed, vocab=len(tok))
    batch = collate(list(zip(prompts, responses, strict=True)), tok.pad_token_id)
    terms = batch_loss(LossConfig(kind="fkl"), student, teacher, batch, bf16=False, vocab=len(tok), fused=True)
    return float(terms.divergence) / count_tokens(batch.labels[:, 1:])


def run_one(name: str, seed: int, init: Path, args: argparse.Namespace) -> dict:
    out = args.work / f"{name}-seed{seed}"
    cfg = recipe_config(name, [
        "teacher=shipped",  # also for sft: it is evaluated beside the student and measures the draft
        f"student.path={init}", f"data.difficulty={args.difficulty}", f"trainer.steps={args.steps}",
        f"trainer.warmup_steps={max(1, args.steps // 10)}", f"trainer.seed={seed}", "trainer.eval_every=100000",
        f"trainer.save_every={args.steps}", "trainer.progress=false", "draft.enabled=true",
        f"draft.num_prompts={args.draft_prompts}", "draft.gammas=[4]", "draft.repeats=1", f"output_dir={out}",
    ])
    t0 = time.perf_counter()
    result = train(cfg, out)
    wall = time.perf_counter() - t0
    rows = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["split"] == "train"]
    gen_s = sum(r.get("gen_seconds", 0.0) for r in rows)
    forwards = [r["teacher_forwards_per_token"] for r in rows if "teacher_forwards_per_token" in r]
    after = result.test["student after"]
    return {
        "recipe": name, "seed": seed, "objective": result.objective, "wall_seconds": wall,
        "generation_seconds": gen_s, "training_seconds": sum(r.get("train_seconds", 0.0) for r in rows),
        "accuracy": {k.split("/")[0]: v for k, v in after.items() if k.endswith("/accuracy")},
        "test": after, "alpha": result.draft["alpha"], "tau_gamma4": result.draft["by_gamma"][0]["tau_measured"],
        "teacher_forwards_per_token": statistics.mean(forwards) if forwards else None,
        "divergence_on_own_samples": divergence_on_own_samples(result.model_dir, cfg.teacher.path, args.difficulty,
                                                               args.divergence_prompts, seed),
    }


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Mean and spread (sample standard deviation) over seeds, per recipe."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == name]

        def stat(values: list[float]) -> dict[str, float]:
            return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

        tasks = sorted({t for r in rs for t in r["accuracy"]})
        fwd = [r["teacher_forwards_per_token"] for r in rs if r["teacher_forwards_per_token"] is not None]
        out[name] = {
            "objective": rs[0]["objective"], "seeds": len(rs),
            "accuracy": {t: stat([r["accuracy"][t] for r in rs]) for t in tasks},
            "mean_accuracy": stat([r["test"]["accuracy"] for r in rs]),
            "divergence_on_own_samples": stat([r["divergence_on_own_samples"] for r in rs]),
            "alpha": stat([r["alpha"] for r in rs]), "tau_gamma4": stat([r["tau_gamma4"] for r in rs]),
            "generation_seconds": stat([r["generation_seconds"] for r in rs]),
            "training_seconds": stat([r["training_seconds"] for r in rs]),
            "teacher_forwards_per_token": stat(fwd) if fwd else None,
        }
    return out


def markdown(summary: dict[str, dict], meta: dict) -> str:
    tasks = sorted({t for s in summary.values() for t in s["accuracy"]})
    pm = lambda s, f="{:.3f}": f"{f.format(s['mean'])} ± {f.format(s['std'])}"  # noqa: E731
    lines = [
        f"Every recipe from the same SFT student ({meta['init_steps']} SFT steps), {meta['steps']} optimizer steps, "
        f"seeds {meta['seeds']}, built-in tasks at difficulty `{meta['difficulty']}`, {meta['machine']}; the "
        f"{sum(s['seeds'] for s in summary.values())} runs took {meta['runs_minutes']:.0f} minutes in all. "
        "Mean ± standard deviation over seeds. Accuracy on the test split; divergence: forward KL(teacher || "
        "student) per token on the student's own samples; alpha and tau (gamma 4) of the result as a draft for "
        "the teacher; seconds of generation and of training (whole run); teacher forwards per generated token.", "",
        "| recipe | objective | " + " | ".join(f"{t} accuracy" for t in tasks)
        + " | divergence on own samples | alpha | tau (gamma 4) | generation s | training s | teacher fwd / token |",
        "|---|---|" + "---|" * (len(tasks) + 6),
    ]
    for name, s in summary.items():
        fwd = s["teacher_forwards_per_token"]
        lines.append(
            f"| {name} | {s['objective']} | " + " | ".join(pm(s["accuracy"][t]) for t in tasks)
            + f" | {pm(s['divergence_on_own_samples'])} | {pm(s['alpha'])} | {pm(s['tau_gamma4'], '{:.2f}')} "
            f"| {pm(s['generation_seconds'], '{:.0f}')} | {pm(s['training_seconds'], '{:.0f}')} "
            f"| {pm(fwd, '{:.2f}') if fwd else '-'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    tasks = sorted({t for s in summary.values() for t in s["accuracy"]})
    fig, axes = plt.subplots(1, len(tasks) + 2, figsize=(4.5 * (len(tasks) + 2), 4))
    panels = [(f"{t} accuracy", [summary[n]["accuracy"][t] for n in names]) for t in tasks]
    panels += [("divergence on own samples", [summary[n]["divergence_on_own_samples"] for n in names]),
               ("alpha as a draft", [summary[n]["alpha"] for n in names])]
    for ax, (title, stats) in zip(axes, panels, strict=True):
        ax.bar(range(len(names)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3,
               color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--difficulty", default="easy")
    ap.add_argument("--init-steps", type=int, default=300)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--draft-prompts", type=int, default=32)
    ap.add_argument("--divergence-prompts", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "distill-recipes",
                    help="run directories and the finished runs (runs-*.jsonl: an interrupted study goes on)")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    init = sft_init(args.work / f"sft-init-{args.difficulty}-{args.init_steps}", args.difficulty, args.init_steps)
    runs_path = args.work / f"runs-{args.difficulty}-{args.init_steps}-{args.steps}.jsonl"
    done = {(r["recipe"], r["seed"]): r for r in map(json.loads, runs_path.read_text().splitlines())} \
        if runs_path.is_file() else {}
    runs = []
    for name in args.recipes:
        for seed in args.seeds:
            if (name, seed) not in done:  # finished runs are kept: an interrupted study goes on
                done[(name, seed)] = run_one(name, seed, init, args)
                with runs_path.open("a") as f:
                    f.write(json.dumps(done[(name, seed)]) + "\n")
                print(f"{name} seed {seed}: accuracy {done[(name, seed)]['test']['accuracy']:.3f}", flush=True)
            runs.append(done[(name, seed)])
    meta = {"steps": args.steps, "seeds": args.seeds, "difficulty": args.difficulty, "init_steps": args.init_steps,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
            "runs_minutes": sum(r["wall_seconds"] for r in runs) / 60}
    summary = summarise(runs)
    (args.out / "recipes.json").write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    (args.out / "recipes.md").write_text(markdown(summary, meta))
    plot(summary, args.out / "recipes.png")
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
