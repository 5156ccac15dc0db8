"""The offline teacher cache: the compact top-k format against the exact hidden-state cache.

On the embedded default (supervised KD of the shipped student from the shipped teacher on the
built-in tasks), for k in ``ks``:

- bytes per response token on disk, each format written by ``distill cache-teacher``; and per token
  on the wire (hidden states, full logits, top-k) for the shipped pair and, computed from their
  shapes, for Llama-3-8B and Qwen2.5-32B;
- the loss error per divergence: each cache's loss (bf16 hidden states with the teacher's head
  applied on the trainer side; top-k) against the exact one, summed over the first
  ``loss_sequences`` training sequences, with the shipped student;
- the student's test accuracy after supervised KD from each cache (the default recipe, seed
  ``seed``), beside the run from the in-process teacher, and each run's training-loop time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.environment import environment
from benchmarks.metrics import metric, write_json
from benchmarks.recipes import recipe_config
from distill.config import LossConfig
from distill.data import collate
from distill.models import load_model
from distill.objective import batch_loss
from distill.offline.build import cache_teacher, encoded_splits, run_tokenizer
from distill.offline.teacher import cached_teacher
from distill.teacher import LocalTeacher
from distill.tracking import MetricsLog
from distill.train import train

KINDS = {"fkl": {}, "rkl": {}, "gjsd": {"beta": 0.5}, "tvd": {}}
# (hidden size, vocabulary) of public models, for bytes per token at their shapes.
SHAPES = {"Llama-3-8B": (4096, 128256), "Qwen2.5-32B": (5120, 152064)}


def wire_bytes(hidden: int, vocab: int, ks: list[int]) -> dict[str, int]:
    """Bytes per token of each payload: bf16 hidden states, bf16 and fp32 logits, top-k (int32
    ids, bf16 log-probabilities, an fp32 tail)."""
    out = {"hidden states (bf16)": 2 * hidden, "hidden states (fp32)": 4 * hidden, "logits (bf16)": 2 * vocab,
           "logits (fp32)": 4 * vocab}
    out |= {f"top-{k}": 6 * k + 4 for k in ks}
    return out


def loss_errors(caches: dict[str, Path], cfg_of, sequences: int) -> dict[str, dict[str, float]]:
    """Per cache and divergence: the summed loss over the first ``sequences`` training sequences,
    relative to the exact loss (the teacher in this process, in fp32; a float32 hidden-state cache
    gives it to 1e-6, tests/test_offline.py)."""
    cfg = cfg_of(None)
    tokenizer = run_tokenizer(cfg)
    pairs = encoded_splits(cfg, tokenizer)["train"][:sequences]
    cpu = torch.device("cpu")
    student = load_model(cfg.student, "student", cpu).eval()
    teachers = {"exact": LocalTeacher(load_model(cfg.teacher, "teacher", cpu).eval())}
    teachers |= {name: cached_teacher(cfg_of(path), tokenizer, cpu) for name, path in caches.items()}
    sums = {name: dict.fromkeys(KINDS, 0.0) for name in teachers}
    with torch.no_grad():
        for start in range(0, len(pairs), 32):
            batch = collate(pairs[start: start + 32], tokenizer.pad_token_id)
            for kind, extra in KINDS.items():
                loss = LossConfig(kind=kind, **extra)
                for name, teacher in teachers.items():
                    sums[name][kind] += float(batch_loss(loss, student, teacher, batch, bf16=False,
                                                         vocab=len(tokenizer), fused=True).loss)
    exact = sums.pop("exact")
    return {name: {kind: s[kind] / exact[kind] - 1 for kind in KINDS} for name, s in sums.items()}


def run(out: Path, seed: int = 0, ks: list[int] | tuple[int, ...] = (8, 32, 128), loss_sequences: int = 512,
        train_runs: bool = True) -> dict:
    ks = list(ks)
    result: dict = {"environment": environment(), "seed": seed, "ks": ks}
    with tempfile.TemporaryDirectory(prefix="distill-cache-bench-") as scratch:
        root = Path(scratch)

        def cfg_of(cache: Path | None, *extra: str):
            overrides = [f"trainer.seed={seed}", "trainer.progress=false", *extra]
            if cache is not None:
                overrides.append(f"teacher.cache={cache}")
            return recipe_config("supervised_kd", overrides)

        caches = {"hidden": root / "hidden", **{f"top-{k}": root / f"top{k}" for k in ks}}
        disk, build_seconds = {}, {}
        for name, path in caches.items():
            k = 0 if name == "hidden" else int(name.removeprefix("top-"))
            t0 = time.perf_counter()
            summary = cache_teacher(cfg_of(path, f"teacher.cache_top_k={k}"), progress=False)
            build_seconds[name] = time.perf_counter() - t0
            disk[name] = summary.bytes_per_token
        result["disk_bytes_per_token"] = disk
        result["build_seconds"] = build_seconds
        result["tokens"] = summary.entries
        config = load_model(cfg_of(None).teacher, "teacher", torch.device("cpu")).config
        shipped = (config.hidden_size, config.vocab_size)
        result["wire_bytes_per_token"] = {name: wire_bytes(h, v, ks)
                                          for name, (h, v) in {"shipped teacher": shipped, **SHAPES}.items()}
        result["shapes"] = {"shipped teacher": shipped, **SHAPES}
        result["loss_error"] = loss_errors(caches, cfg_of, loss_sequences)
        if train_runs:
            runs = {"in-process teacher": None, **caches}
            result["runs"] = {}
            for name, path in runs.items():
                run_dir = root / "runs" / name.replace(" ", "_")
                t0 = time.perf_counter()
                r = train(cfg_of(path, f"output_dir={run_dir}"), run_dir)
                rows = MetricsLog.read(run_dir / "metrics.jsonl")
                result["runs"][name] = {"accuracy": r.test["student after"]["accuracy"],
                                        "loop_seconds": sum(x["train_seconds"] for x in rows if x["split"] == "train"),
                                        "seconds": time.perf_counter() - t0}
    metrics = {f"{name} {kind} relative error": metric(abs(err[kind]), "lower", "quality", floor=1e-4)
               for name, err in result["loss_error"].items() for kind in KINDS}
    if train_runs:
        metrics |= {f"accuracy from {name}": metric(r["accuracy"], "higher", "quality", floor=0.01)
                    for name, r in result["runs"].items()}
    result["metrics"] = metrics
    write_json(out / "teacher_cache.json", result)
    (out / "teacher_cache.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"Offline teacher cache on the built-in tasks ({r['tokens']:,} response tokens; shipped teacher and "
             f"student; seed {r['seed']}), {env['cpu']}, commit {env['git_commit']}.", "",
             "Bytes per response token on disk (`distill cache-teacher`; shard index included):", "",
             "| format | bytes/token | build seconds |", "|---|---|---|"]
    lines += [f"| {name} | {b:,.1f} | {r['build_seconds'][name]:.0f} |"
              for name, b in r["disk_bytes_per_token"].items()]
    lines += ["", "Bytes per token of each payload, from the shapes (hidden size H, vocabulary V):", "",
              "| model (H, V) | " + " | ".join(next(iter(r["wire_bytes_per_token"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(r["wire_bytes_per_token"].values())))]
    for name, row in r["wire_bytes_per_token"].items():
        h, v = r["shapes"][name]
        lines.append(f"| {name} ({h}, {v:,}) | " + " | ".join(f"{b:,}" for b in row.values()) + " |")
    lines += ["", "Loss error of each cache against the exact loss (the teacher in fp32, which a float32 "
              "hidden-state cache reproduces to 1e-6): summed over the first training sequences, relative; "
              "negative: below the exact loss:", "",
              "| format | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    lines += [f"| {name} | " + " | ".join(f"{err[kind]:+.2e}" for kind in KINDS) + " |"
              for name, err in r["loss_error"].items()]
    if "runs" in r:
        lines += ["", "Supervised KD (the default recipe) from each teacher:", "",
                  "| teacher | test accuracy | training loop seconds | run seconds |", "|---|---|---|---|"]
        lines += [f"| {name} | {x['accuracy']:.3f} | {x['loop_seconds']:.1f} | {x['seconds']:.0f} |"
                  for name, x in r["runs"].items()]
        lines += ["", "The training loop's time is the sum of the metrics log's `train_seconds` (its steps, "
                  "validation aside); a run's time also holds loading, and for the in-process teacher its own "
                  "evaluation rows (greedy generations on the test split), which a run from a cache cannot have."]
    return "\n".join(lines) + "\n"
