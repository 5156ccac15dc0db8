"""A teacher served on Ray against the teacher in the trainer's process, on this machine.

The shipped teacher is served by ``workers`` workers (``distill serve-teacher``, a local Ray
cluster); the ``gkd`` recipe (JSD(0.5), half the steps on the student's own samples) and
supervised KD (dataset steps only) each run ``steps`` steps three ways, in rotating order,
``repeats`` times: the teacher in process; served as a trainer gets it by default here, taking
turns with the worker (``teacher.remote_overlap`` null: the worker computes on this machine's CPU);
and served with the overlap forced on (asked a step ahead, the student's decoder running while the
worker computes). Every run is its own ``python -m distill`` process, so its peak resident memory
is its own.

Per recipe: the loop's time (training and generation, validation aside: the metrics log's
``train_seconds`` plus ``gen_seconds``), each served way's ratio to in-process (the median over
repeats), the workers' own forward seconds during each served run, and the trainer's peak memory.
On this 2-core machine the workers and the trainer share the cores: what a served teacher costs
here is its transport and the two processes' sharing, not a device of its own.
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


# The three ways, and the command-line arguments of each.
WAYS = {"in process": [], "served": ["teacher.remote=bench"],
        "served, overlapped": ["teacher.remote=bench", "teacher.remote_overlap=true"]}


def worker_forward_seconds() -> float:
    """The seconds the ``bench`` workers have spent in forwards so far (all of them)."""
    from distill.remote.cluster import find_workers, init

    ray = init("auto")
    return sum(c["forward_seconds"] for c in ray.get([w.counts.remote() for w in find_workers("bench")]))


def one_run(recipe: str, steps: int, seed: int, run_dir: Path, how: str) -> dict:
    args = [sys.executable, "-m", "distill", f"recipe={recipe}", f"trainer.steps={steps}", f"trainer.seed={seed}",
            *RUN, f"output_dir={run_dir}", *WAYS[how]]
    before = worker_forward_seconds() if WAYS[how] else 0.0
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{recipe} ({how}): {proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    report = json.loads((run_dir / "report.json").read_text())
    return {"loop_seconds": sum(r["train_seconds"] + r.get("gen_seconds", 0.0) for r in train),
            "peak_bytes": report["memory"]["measured_peak_bytes"], "final_loss": train[-1]["loss"],
            "worker_forward_seconds": worker_forward_seconds() - before if WAYS[how] else None}


def run(out: Path, seed: int = 0, steps: int = 60, repeats: int = 3, workers: int = 2,
        recipes: list[str] | tuple[str, ...] = ("supervised_kd", "gkd")) -> dict:
    result: dict = {"environment": environment(), "seed": seed, "steps": steps, "workers": workers, "recipes": {}}
    ways = list(WAYS)
    with tempfile.TemporaryDirectory(prefix="distill-remote-bench-") as scratch:
        root = Path(scratch)
        server = serve("bench", workers, root / "serve.log")
        try:
            for recipe in recipes:
                runs: dict[str, list] = {how: [] for how in ways}
                for r in range(repeats):
                    for how in ways[r % len(ways):] + ways[:r % len(ways)]:  # each way first in turn
                        run_dir = root / f"{recipe}-{how.replace(' ', '_').replace(',', '')}-{r}"
                        runs[how].append(one_run(recipe, steps, seed, run_dir, how))
                local = runs["in process"]
                result["recipes"][recipe] = {"runs": runs, "peak_in_process": max(x["peak_bytes"] for x in local)}
                for how in ways[1:]:
                    result["recipes"][recipe][how] = {
                        "ratio": statistics.median(s["loop_seconds"] / i["loop_seconds"]
                                                   for s, i in zip(runs[how], local, strict=True)),
                        "peak": max(x["peak_bytes"] for x in runs[how]),
                        "loss_difference": max(abs(s["final_loss"] - i["final_loss"])
                                               for s, i in zip(runs[how], local, strict=True)),
                    }
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    result["metrics"] = {}
    for recipe, r in result["recipes"].items():
        for how, name in (("served", "served"), ("served, overlapped", "served overlapped")):
            result["metrics"][f"{recipe} {name} / in-process loop time"] = metric(r[how]["ratio"], "lower", "ratio")
        result["metrics"][f"{recipe} served trainer peak / in-process"] = metric(
            r["served"]["peak"] / r["peak_in_process"], "lower", "memory")
    write_json(out / "remote_teacher.json", result)
    (out / "remote_teacher.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"A teacher served on Ray ({r['workers']} workers on this machine) against the teacher in the "
             f"trainer's process: {r['steps']} steps per run, seed {r['seed']}, {env['cpu']} "
             f"({os.cpu_count()} cores shared by the trainer and the workers), commit {env['git_commit']}. "
             "Served: as by default here, the trainer and the worker taking turns (`teacher.remote_overlap` "
             "null); overlapped: `teacher.remote_overlap=true`.", "",
             "| recipe | way | loop seconds | / in process (median) | worker forward seconds | trainer peak | "
             "final loss difference |", "|---|---|---|---|---|---|---|"]
    for name, x in r["recipes"].items():
        for how, runs in x["runs"].items():
            seconds = ", ".join(f"{y['loop_seconds']:.1f}" for y in runs)
            if how == "in process":
                lines.append(f"| {name} | {how} | {seconds} | 1 | | {x['peak_in_process'] / 2**20:,.0f} MiB | |")
                continue
            worker = ", ".join(f"{y['worker_forward_seconds']:.1f}" for y in runs)
            w = x[how]
            lines.append(f"| {name} | {how} | {seconds} | {w['ratio']:.2f} | {worker} | {w['peak'] / 2**20:,.0f} MiB "
                         f"| {w['loss_difference']:.1e} |")
    lines += ["", "Loop seconds: the metrics log's `train_seconds` plus `gen_seconds` (validation aside), one per "
              "repeat. Worker forward seconds: what the workers spent in forwards during that run. Peak: the "
              "trainer's resident memory (VmHWM), the workers' not counted."]
    return "\n".join(lines) + "\n"
