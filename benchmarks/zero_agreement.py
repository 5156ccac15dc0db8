"""Two ZeRO-3 ranks against one process, step by step: what agrees, and how far it drifts.

Both train the same recipe from the same seed on the built-in tasks, with the shipped teacher and
a student built from scratch (27M parameters, as in ``plan_memory``): every step draws the
dataset, on-policy or SKD sequences (the draw is seeded by step, so both draw alike). Two
settings:

- ``greedy``: on-policy and SKD sequences decoded greedily (SKD with K = 1 and a greedy teacher),
  so both see the same sequences; what differs is the order of float32 sums (partitioned
  gradients, all-reduced token counts);
- ``sampled``: the recipes' sampling at temperature 1; each rank samples its own share of the
  prompts with its own seed, so from the first generating step the two runs train on other
  samples of the same distributions.

Per step: the relative difference of the loss and of the gradient norm; at the end, the largest
difference of any weight and the relative norm of the weight difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json
from distill.distributed import free_port

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
STUDENT = ["student=tiny", "student.arch.hidden_size=512", "student.arch.num_layers=8",
           "student.arch.intermediate_size=1536"]
RUN = ["trainer.batch_size=8", "trainer.grad_accum=2", "trainer.log_every=1", "trainer.eval_every=100",
       "trainer.save_every=100", "trainer.warmup_steps=0", "final_eval=false", "data.num_validation=0",
       "data.max_length=64", "trainer.progress=false", "sources.teacher_cache=none",
       "sources.weights.student.start=1", "sources.weights.skd.start=1", "sources.student.max_new_tokens=24",
       "sources.skd.max_new_tokens=24"]
SETTINGS = {
    "greedy": ["sources.student.greedy=true", "sources.skd.k.start=1", "sources.skd.teacher_greedy=true"],
    "sampled": [],
}


def train(ranks: int, overrides: list[str], run_dir: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "distill"] if ranks == 1 else [
        str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "distill",
        "deepspeed=zero3"]
    proc = subprocess.run([*cmd, *STUDENT, *RUN, *overrides, f"output_dir={run_dir}"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{ranks} ranks {overrides}: {proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def weight_difference(a: Path, b: Path) -> tuple[float, float]:
    """The largest absolute difference of any weight, and |a - b| / |a| over all weights."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    rel = float(torch.sqrt(sum(((wa[k] - wb[k]) ** 2).sum() for k in wa) / sum((wa[k] ** 2).sum() for k in wa)))
    return diff, rel


def run(out: Path, seed: int = 0, steps: int = 8) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in SETTINGS.items():
            args = [*overrides, f"trainer.steps={steps}", f"trainer.seed={seed}"]
            one = train(1, args, Path(scratch) / f"{name}-one")
            two = train(2, args, Path(scratch) / f"{name}-two")
            per_step = [{
                "step": a["step"],
                "source": next(k.removeprefix("source_") for k, v in a.items() if k.startswith("source_") and v == 1),
                "loss_rel": abs(b["loss"] - a["loss"]) / abs(a["loss"]),
                "grad_norm_rel": abs(b["grad_norm"] - a["grad_norm"]) / abs(a["grad_norm"]),
            } for a, b in zip(one, two, strict=True)]
            max_abs, rel = weight_difference(Path(scratch) / f"{name}-one", Path(scratch) / f"{name}-two")
            results[name] = {"steps": per_step, "weights_max_abs": max_abs, "weights_rel": rel}
            by_step = ", ".join(f"{s['loss_rel']:.1e}" for s in per_step)
            print(f"{name}: loss relative difference by step {by_step}; weights {rel:.1e} relative", flush=True)
    record = {"environment": environment(), "student": STUDENT, "run": RUN, "settings": SETTINGS, "steps": steps,
              "results": results}
    write_json(out / "zero_agreement.json", record)
    (out / "zero_agreement.md").write_text(markdown(record))
    return {"results": results, "metrics": {
        "greedy: loss, largest relative difference": metric(max(s["loss_rel"] for s in results["greedy"]["steps"]),
                                                             "lower", "quality", floor=1e-4)}}


def markdown(record: dict) -> str:
    results = record["results"]
    lines = ["Two ZeRO-3 ranks (deepspeed launcher, gloo) against one process, same recipe and seed: the built-in "
             "tasks, the shipped teacher, a student built from scratch (hidden 512, 8 layers, intermediate 1536: 27M "
             f"parameters), {record['steps']} steps of 8 x 2 sequences, each drawing dataset, on-policy or SKD "
             "sequences. Relative difference of the two runs, per step.", "",
             "| step | source | greedy: loss | greedy: grad norm | sampled: loss | sampled: grad norm |",
             "|---|---|---|---|---|---|"]
    for g, s in zip(results["greedy"]["steps"], results["sampled"]["steps"], strict=True):
        lines.append(f"| {g['step']} | {g['source']} | {g['loss_rel']:.1e} | {g['grad_norm_rel']:.1e} "
                     f"| {s['loss_rel']:.1e} | {s['grad_norm_rel']:.1e} |")
    lines += ["", "| setting | largest weight difference | weight difference, relative |", "|---|---|---|"]
    lines += [f"| {n} | {r['weights_max_abs']:.1e} | {r['weights_rel']:.1e} |" for n, r in results.items()]
    return "\n".join(lines) + "\n"
