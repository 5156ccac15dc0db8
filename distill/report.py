"""A run's report: ``report.json`` (the record) and ``report.md`` (to read).

It states what was minimised (``objective``, with any cross-entropy share or reward), how
generations were scored (``evaluation``: greedy, and sampled with ``eval.samples``), the validation and
test metrics of the teacher and of the student before and after training, what
``data.overlong`` did to the data, and (``draft.enabled``) alpha and tau of the student as a
speculative-decoding draft for the teacher, and the staleness of generation run ahead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from distill.checkpoint import atomic_write_text


class Run(Protocol):
    run_dir: Path
    model_dir: Path
    steps: int
    objective: str
    evaluation: str
    test: dict[str, dict[str, float]]
    validation: dict[str, dict[str, float]]
    data: dict[str, dict[str, int]]
    draft: dict
    sharding: dict
    memory: dict
    asynchronous: dict


def columns(rows: dict[str, dict[str, float]]) -> list[str]:
    """The metric names of a table, headline scores first, losses last."""
    keys = {k for row in rows.values() for k in row}
    losses = [k for k in ("ce", "divergence", "objective") if k in keys]
    return sorted(keys - set(losses), key=lambda k: ("/" in k, k != "accuracy", k)) + losses


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    keys = columns(rows)
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4g}" if k in row else "-" for k in keys) + " |")
    return "\n".join(lines)


def write_report(run: Run) -> None:
    report = {
        "run_dir": str(run.run_dir), "model_dir": str(run.model_dir), "steps": run.steps,
        "objective": run.objective, "evaluation": run.evaluation, "validation": run.validation, "test": run.test,
        "data": run.data,
    }
    if run.draft:
        report["draft"] = run.draft
    if run.sharding:
        report["sharding"] = run.sharding
    if run.memory:
        report["memory"] = run.memory
    if run.asynchronous:
        report["asynchronous"] = run.asynchronous
    atomic_write_text(run.run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    parts = [f"Objective: {run.objective}; {run.steps} steps; model: `{run.model_dir}`.",
             f"Evaluation: {run.evaluation}."]
    if run.asynchronous:
        a = run.asynchronous
        parts.append(f"Generation ran ahead of training: staleness s = {a['staleness']} (step t trained on samples "
                     f"of the student after max(t - s, 0) steps), {a['workers']} generation "
                     f"worker{'s' * (a['workers'] > 1)}.")
    for split in ("validation", "test"):
        rows = getattr(run, split)
        if rows:
            parts.append(f"## {split}\n\n" + markdown_table(rows))
    notes = [f"- data.{split}: {c['skipped']} of {c['records']} records skipped, {c['truncated']} prompts truncated, "
             f"{c['cut']} completions cut at data.max_length" for split, c in run.data.items()
             if c.get("skipped") or c.get("truncated") or c.get("cut")]
    if notes:
        parts.append("## data\n\n" + "\n".join(notes))
    if run.draft:
        rows = [f"| {r['gamma']} | {r['acceptance_rate']:.3f} | {r['tau_measured']:.2f} | {r['tau_predicted']:.2f} "
                f"| {r['speedup_predicted']:.2f} | {r['speedup_measured']:.2f} |" for r in run.draft["by_gamma"]]
        parts.append(
            f"## the student as a draft for the teacher\n\nalpha {run.draft['alpha']:.3f}, c {run.draft['c']:.3f} "
            f"on {run.draft['prompts']} (`draft/`, details in `draft_eval/`)\n\n"
            "| gamma | acceptance | tau measured | tau predicted | speedup predicted | speedup measured |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows))
    if run.memory.get("planned_peak_bytes"):
        m = run.memory
        parts.append(f"## memory\n\nPeak per rank: planned {m['planned_peak_bytes'] / 2**20:,.0f} MiB "
                     f"({m['placement']}), measured {m['measured_peak_bytes'] / 2**20:,.0f} MiB ({m['measured']}; "
                     f"{m['error']:+.0%}).")
    if run.sharding:
        sh = run.sharding
        rows = [f"| {i} | {r['student'] / max(sh['student_parameters'], 1):.3f} | "
                + (f"{r['teacher'] / max(sh['teacher_parameters'], 1):.3f}" if "teacher" in r else "-")
                + f" | {r['peak_rss_bytes'] / 2**20:,.0f} |" for i, r in enumerate(sh["ranks"])]
        parts.append(f"## sharding\n\n{sh['world_size']} ranks, ZeRO stage {sh['stage']}, teacher "
                     f"{'sharded' if sh['shard_teacher'] else 'replicated'}\n\n| rank | student share | teacher share "
                     "| peak RSS (MiB) |\n|---|---|---|---|\n" + "\n".join(rows))
    atomic_write_text(run.run_dir / "report.md", "\n\n".join(parts) + "\n")
