"""A teacher served on Ray against the teacher in the trainer's process, on this machine.

The shipped teacher is served by ``workers`` workers (``distill serve-teacher``, a local Ray
cluster); the ``gkd`` recipe (JSD(0.5), half the steps on the student's own samples) and
supervised KD (dataset steps only, whose teacher forwards the loop asks for a step ahead) each run
``steps`` steps with the teacher in process and served, in alternating order, ``repeats`` times.
Every run is its own ``python -m distill`` process, so its peak resident memory is its own.

Per recipe: the loop's time (training and generation, validation aside: the metrics log's
``train_seconds`` plus ``gen_seconds``), its ratio served / in-process (the median over repeats),
and the trainer's peak memory both ways. On this 2-core machine the workers and the trainer share
the cores, so the ratio bounds what a served teacher costs from below what it would on separate
devices only where the teacher's forward is a small part of the step.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json

ROOT = Path(__file__).parents[1]
RUN = ["trainer.eval_every=100000", "final_eval=false", "data.num_validation=0", "trainer.progress=false",
       "sources.teacher_cache=none"]


def serve(name: str, workers: int, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distill", "serve-teacher", f"teacher.remote={name}",
                                 f"teacher.remote_workers={workers}"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    while "ready" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"serve-teacher did not get ready: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def one_run(recipe: str, steps: int, seed: int, run_dir: Path, remote: str | None) -> dict:
    args = [sys.executable, "-m", "distill", f"recipe={recipe}", f"trainer.steps={steps}", f"trainer.seed={seed}",
            *RUN, f"output_dir={run_dir}"] + ([f"teacher.remote={remote}"] if remote else [])
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{recipe} ({'served' if remote else 'in process'}): {proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    report = json.loads((run_dir / "report.json").read_text())
    return {"loop_seconds": sum(r["train_seconds"] + r.get("gen_seconds", 0.0) for r in train),
            "peak_bytes": report["memory"]["measured_peak_bytes"], "final_loss": train[-1]["loss"]}


def run(out: Path, seed: int = 0, steps: int = 60, repeats: int = 2, workers: int = 2,
        recipes: list[str] | tuple[str, ...] = ("supervised_kd", "gkd")) -> dict:
    result: dict = {"environment": environment(), "seed": seed, "steps": steps, "workers": workers, "recipes": {}}
    with tempfile.TemporaryDirectory(prefix="distill-remote-bench-") as scratch:
        root = Path(scratch)
        server = serve("bench", workers, root / "serve.log")
        try:
            for recipe in recipes:
                runs = {"in process": [], "served": []}
                for r in range(repeats):
                    order = ("in process", "served") if r % 2 == 0 else ("served", "in process")
                    for how in order:
                        run_dir = root / f"{recipe}-{how.replace(' ', '_')}-{r}"
                        runs[how].append(one_run(recipe, steps, seed, run_dir, "bench" if how == "served" else None))
                ratios = [s["loop_seconds"] / i["loop_seconds"] for s, i in zip(runs["served"], runs["in process"],
                                                                               strict=True)]
                result["recipes"][recipe] = {
                    "runs": runs, "ratio": statistics.median(ratios),
                    "peak_in_process": max(x["peak_bytes"] for x in runs["in process"]),
                    "peak_served": max(x["peak_bytes"] for x in runs["served"]),
                    "loss_difference": max(abs(s["final_loss"] - i["final_loss"]) for s, i in
                                           zip(runs["served"], runs["in process"], strict=True)),
                }
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    result["metrics"] = {f"{recipe} served / in-process loop time": metric(r["ratio"], "lower", "ratio")
                         for recipe, r in result["recipes"].items()}
    result["metrics"] |= {f"{recipe} served trainer peak / in-process": metric(
        r["peak_served"] / r["peak_in_process"], "lower", "memory") for recipe, r in result["recipes"].items()}
    write_json(out / "remote_teacher.json", result)
    (out / "remote_teacher.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"A teacher served on Ray ({r['workers']} workers on this machine) against the teacher in the "
             f"trainer's process: {r['steps']} steps per run, seed {r['seed']}, {env['cpu']} "
             f"({os.cpu_count()} cores shared by the trainer and the workers), commit {env['git_commit']}.", "",
             "| recipe | loop seconds in process | loop seconds served | served / in process (median) | "
             "trainer peak in process | trainer peak served | final loss difference |", "|---|---|---|---|---|---|---|"]
    for name, x in r["recipes"].items():
        ip = ", ".join(f"{y['loop_seconds']:.1f}" for y in x["runs"]["in process"])
        sv = ", ".join(f"{y['loop_seconds']:.1f}" for y in x["runs"]["served"])
        lines.append(f"| {name} | {ip} | {sv} | {x['ratio']:.2f} | {x['peak_in_process'] / 2**20:,.0f} MiB | "
                     f"{x['peak_served'] / 2**20:,.0f} MiB | {x['loss_difference']:.1e} |")
    lines += ["", "Loop seconds: the metrics log's `train_seconds` plus `gen_seconds` (validation aside). Peak: "
              "the trainer's resident memory (VmHWM), the workers' not counted."]
    return "\n".join(lines) + "\n"
