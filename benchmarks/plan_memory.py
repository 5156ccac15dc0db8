"""The memory plan against measured peaks, and the 70B -> 8B plan docs/scaling.md quotes.

Each configuration is a real run (``python -m distill``, or two CPU ranks under ``deepspeed``)
on the built-in tasks, with the shipped teacher and a student built from scratch large enough
that its state, not the libraries, is most of the memory. Every run checks its plan before
loading anything and reports the plan's peak beside the measured one (on the CPU the peak
resident memory of each rank; the largest rank counts). The plan assumes every sequence at
``data.max_length``: an upper bound, so the runs use a max_length near the tasks' longest.

``llama-3.1-70b-to-8b.txt`` is ``distill plan`` for Llama 3.1 70B -> 8B on 8 x 80 GB GPUs from
the published configs (``benchmarks/configs/``): docs/scaling.md quotes it, and a test re-renders it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json
from distill.distributed import free_port

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
MODEL = ["student=tiny", "student.arch.hidden_size=512", "student.arch.num_layers=8",
         "student.arch.intermediate_size=1536", "trainer.batch_size=32", "data.max_length=48", "trainer.steps=3",
         "trainer.eval_every=100", "final_eval=false", "data.num_validation=20", "trainer.progress=false"]
# name: (ranks, overrides)
CONFIGS = {
    "one process": (1, []),
    "one process, GKD": (1, ["recipe=gkd"]),
    "2 ranks, ZeRO-2": (2, ["deepspeed=zero2"]),
    "2 ranks, ZeRO-3": (2, ["deepspeed=zero3"]),
    "2 ranks, ZeRO-3, GKD": (2, ["deepspeed=zero3", "recipe=gkd"]),
    # The teacher read from an offline cache, or served by a worker: the trainer holds its head.
    "one process, cached teacher": (1, ["teacher.cache={cache}"]),
    "one process, served teacher": (1, ["teacher.remote=plan-memory"]),
}
LLAMA_70B_8B = ["teacher.path=benchmarks/configs/llama-3.1-70b", "student.path=benchmarks/configs/llama-3.1-8b",
                "teacher.dtype=bfloat16", "student.dtype=bfloat16", "trainer.precision=bf16", "trainer.device=cuda",
                "plan.world_size=8", "plan.device_memory_gb=80", "deepspeed=zero3", "recipe=gkd",
                "trainer.batch_size=16", "data.max_length=2048", "trainer.activation_checkpointing=true",
                "trainer.eval_batch_size=16"]


def measure(ranks: int, overrides: list[str], run_dir: Path) -> dict:
    """One run's report memory (planned, measured, error) and sharding."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "distill"]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
               "distill"]
    proc = subprocess.run([*cmd, *MODEL, *overrides, f"output_dir={run_dir}"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{overrides}: {proc.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    return {"memory": report["memory"], "sharding": report.get("sharding", {})}


def plan_text(overrides: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "distill", "plan", *overrides], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout


def _cache(scratch: Path) -> Path:
    """The offline teacher cache of the runs' data (``distill cache-teacher``)."""
    out = scratch / "cache"
    proc = subprocess.run([sys.executable, "-m", "distill", "cache-teacher", *MODEL, f"teacher.cache={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"cache-teacher: {proc.stderr[-3000:]}")
    return out


def _served(name: str, overrides: list[str], run_dir: Path) -> tuple[dict, dict]:
    """A run against a teacher served by one worker: the trainer's memory, and the worker's planned
    (as serve-teacher printed it) and measured peak."""
    from benchmarks.remote_teacher import serve
    from distill.memory import GIB
    from distill.remote.cluster import find_workers, init

    proc = serve("plan-memory", 1, run_dir.parent / "serve.log")
    try:
        got = measure(1, overrides, run_dir)
        ray = init("auto")
        worker_peak = ray.get(find_workers("plan-memory")[0].counts.remote())["peak_bytes"]
        ray.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    said = (run_dir.parent / "serve.log").read_text()
    number, unit = re.search(r"estimated peak: ([\d.,]+) (GiB|MiB)", said).groups()
    planned = float(number.replace(",", "")) * (GIB if unit == "GiB" else 2**20)
    return got, {"planned_peak_bytes": planned, "measured_peak_bytes": worker_peak,
                 "error": worker_peak / planned - 1}


def run(out: Path, seed: int = 0, configs: list[str] | None = None) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        cache = None
        for name in configs or list(CONFIGS):
            ranks, overrides = CONFIGS[name]
            if any("{cache}" in o for o in overrides):
                cache = cache or _cache(Path(scratch))
                overrides = [o.format(cache=cache) for o in overrides]
            run_dir = Path(scratch) / re.sub(r"\W+", "_", name)
            args = [*overrides, f"trainer.seed={seed}"]
            if any(o.startswith("teacher.remote=") for o in overrides):
                got, worker = _served(name, args, run_dir)
                results["serve-teacher worker (forwards of that run)"] = {"ranks": 1, "overrides": [], **worker}
            else:
                got = measure(ranks, args, run_dir)
            m = got["memory"]
            results[name] = {"ranks": ranks, "overrides": CONFIGS[name][1], **m}
        for name, m in results.items():
            print(f"{name}: planned {m['planned_peak_bytes'] / 2**20:,.0f} MiB, measured "
                  f"{m['measured_peak_bytes'] / 2**20:,.0f} MiB ({m['error']:+.1%})", flush=True)
    text = plan_text(LLAMA_70B_8B)
    (out / "llama-3.1-70b-to-8b.txt").write_text(text)
    write_json(out / "plan_memory.json", {"environment": environment(), "model": MODEL, "results": results,
                                          "llama_70b_8b": {"command": "distill plan " + " ".join(LLAMA_70B_8B)}})
    lines = ["Planned against measured peak memory per rank (CPU, peak resident memory of the largest rank; "
             f"student arch {' '.join(MODEL[1:4])}). Goal: planned >= measured >= planned / 1.25 (error in "
             "[-20%, 0%]).", "",
             "| run | planned (MiB) | measured (MiB) | error |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['planned_peak_bytes'] / 2**20:,.0f} | {r['measured_peak_bytes'] / 2**20:,.0f} | "
              f"{r['error']:+.1%} |" for n, r in results.items()]
    (out / "plan_memory.md").write_text("\n".join(lines) + "\n")
    return {"results": results, "metrics": {
        f"plan error, {n}": metric(abs(r["error"]), "lower", "quality", floor=0.05) for n, r in results.items()}}
