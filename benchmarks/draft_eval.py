"""The default recipe's student as a speculative-decoding draft for the shipped teacher, before and
after distillation (DistillSpec metrics).

1. trains the embedded default recipe (what ``make demo`` runs) into ``DIR`` unless ``DIR`` already
   holds a finished run;
2. exports the shipped student and the distilled one as drafts for the teacher (``export-draft``);
3. evaluates both (``eval-draft``: alpha, acceptance, tau and speedups for gamma = 1..8) into
   ``draft_eval_before/`` and ``draft_eval_distilled/``;
4. writes the side-by-side ``draft_eval.md`` and ``draft_eval.png``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import transformers

from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json
from distill.config import ASSETS
from distill.draft_eval import DraftEvalConfig, evaluate_draft, plot
from distill.export import export_draft


def train_default(run: Path, seed: int = 0) -> Path:
    """The distilled student of the default recipe (trained here unless ``run`` has it)."""
    model = run / "model"
    if not (model / "config.json").is_file():
        cmd = [sys.executable, "-m", "distill.cli", f"output_dir={run}", f"trainer.seed={seed}"]
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return model


def compare(before: dict, after: dict) -> str:
    """Side-by-side Markdown of the two evaluations."""
    gammas = [r["gamma"] for r in after["by_gamma"]]
    rows = [
        "Shipped student as a draft for the shipped teacher, before and after `distill` (the default recipe, "
        f"as `make demo` runs it). {after['prompts']} held-out prompts of the built-in tasks, "
        f"{after['config']['max_new_tokens']} new tokens, temperature {after['config']['temperature']}, "
        f"{after['device']}; wall-clock times are medians of {after['config']['repeats']} runs.", "",
        "| | alpha | c | " + " | ".join(f"tau at gamma = {g}" for g in gammas) + " |",
        "|---|---|---|" + "---|" * len(after["by_gamma"]),
    ]
    for name, r in (("before", before), ("distilled", after)):
        taus = " | ".join(f"{g['tau_measured']:.2f} ({g['tau_predicted']:.2f})" for g in r["by_gamma"])
        rows.append(f"| {name} | {r['alpha']:.3f} | {r['c']:.2f} | {taus} |")
    rows += ["", "tau: measured (predicted from alpha). Speedup over the target alone:", "",
             "| | " + " | ".join(f"gamma = {g}" for g in gammas) + " |",
             "|---|" + "---|" * len(after["by_gamma"])]
    for name, r in (("before", before), ("distilled", after)):
        for kind, label in (("predicted", "predicted"), ("predicted_with_verify_cost", "predicted with v"),
                            ("measured", "measured")):
            cells = " | ".join(f"{g[f'speedup_{kind}']:.2f}" for g in r["by_gamma"])
            rows.append(f"| {name}, {label} | {cells} |")
    rows += ["", "Predicted: tau / (c gamma + 1). With v: tau (measured) / (c gamma + v), v the measured cost of the "
             "target's forward over gamma + 1 tokens in target steps: "
             + ", ".join(f"{g['verify_cost']:.2f}" for g in after["by_gamma"])
             + f" at gamma = {', '.join(map(str, gammas))}."]
    return "\n".join(rows) + "\n"


def run(out: Path, seed: int = 0, run_dir: str | None = None, repeats: int = 5) -> dict:
    """``run_dir``: a finished default-recipe run to evaluate (trained here when absent)."""
    transformers.utils.logging.disable_progress_bar()
    teacher = ASSETS / "teacher"
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(run_dir) if run_dir else Path(scratch) / "run"
        students = {"before": (ASSETS / "student", "the shipped student (before distillation)"),
                    "distilled": (train_default(run, seed), "the shipped student distilled by the default recipe")}
        results = {}
        for key, (student, name) in students.items():
            draft = export_draft(student, teacher, Path(scratch) / f"draft_{key}").out_dir
            cfg = DraftEvalConfig(target=str(teacher), draft=str(draft), name=name, repeats=repeats, seed=seed,
                                  out=str(out / f"draft_eval_{key}"))
            results[key] = evaluate_draft(cfg)
            # The scratch path means nothing once it is gone; the name says what the draft was.
            results[key]["config"].update(draft=f"export-draft of {name}", target="distill/assets/teacher")
            write_json(out / f"draft_eval_{key}" / "draft_eval.json", {"environment": environment(), **results[key]})
            print(f"{key}: alpha {results[key]['alpha']:.3f}, c {results[key]['c']:.3f}", flush=True)
    (out / "draft_eval.md").write_text(compare(results["before"], results["distilled"]))
    plot(results, out / "draft_eval.png")
    after = results["distilled"]
    metrics = {"distilled alpha": metric(after["alpha"], "higher", "quality", floor=0.005),
               **{f"distilled tau at gamma {g['gamma']}": metric(g["tau_measured"], "higher", "quality", floor=0.02)
                  for g in after["by_gamma"]}}
    return {"before": results["before"], "distilled": after, "metrics": metrics}
