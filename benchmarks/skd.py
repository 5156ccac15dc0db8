"""Block-wise SKD against token-by-token SKD: teacher forwards and wall time for the same samples.

Token-by-token SKD (the paper's loop) runs one teacher forward per generated token: the student
proposes a token, the teacher keeps it if it is in its top K, else replaces it. Block-wise SKD
(``distill.sources.skd``, the propose-and-verify loop of speculative decoding) lets the student
draft gamma tokens and the teacher judge them in one forward; gamma = 1 is token-by-token SKD
exactly, and every gamma gives the same distribution (tests/test_skd.py). On built-in test
prompts with the shipped teacher and student: teacher forwards per generated token and wall
time (medians of interleaved repeats) per gamma, and each against gamma = 1.
Writes ``skd.json`` and ``skd.md``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.environment import environment
from benchmarks.metrics import metric, synchronize, write_json
from distill.config import ASSETS, DataConfig, ModelConfig
from distill.data import builtin_records, left_pad, prompt_ids
from distill.models import load_model, load_tokenizer
from distill.sources.skd import skd_generate


def run(out: Path, seed: int = 0, prompts: int = 32, new: int = 48, k: int = 25, gammas: list[int] | None = None,
        repeats: int = 5, device: str = "cpu") -> dict:
    gammas = gammas or [1, 2, 4, 8]
    if gammas[0] != 1:
        raise ValueError("skd: the first gamma must be 1 (token-by-token SKD, the baseline)")
    dev = torch.device(device)
    tok = load_tokenizer(ASSETS / "teacher")
    ids, mask = (x.to(dev) for x in left_pad(
        [prompt_ids(r, tok) for r in builtin_records(DataConfig(), "test", prompts)], tok.pad_token_id))
    student = load_model(ModelConfig(path=str(ASSETS / "student")), "student", dev).eval()
    teacher = load_model(ModelConfig(path=str(ASSETS / "teacher")), "teacher", dev).eval()

    def generate(gamma: int, rep: int):
        g = torch.Generator(device=dev).manual_seed(seed * 1000 + rep)
        return skd_generate(student, teacher, ids, attention_mask=mask, k=k, gamma=gamma, max_new_tokens=new,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=g,
                            vocab=len(tok)).stats

    times: dict[int, list[float]] = {g: [] for g in gammas}
    stats: dict[int, list] = {g: [] for g in gammas}
    for rep in range(repeats + 1):  # interleaved; the first round warms up
        for gamma in gammas:
            synchronize(dev)
            t0 = time.perf_counter()
            s = generate(gamma, rep)
            synchronize(dev)
            if rep:
                times[gamma].append(time.perf_counter() - t0)
                stats[gamma].append(s)
    rows = {}
    for gamma in gammas:
        rounds = sum(s.sequence_rounds for s in stats[gamma])
        produced = sum(s.produced for s in stats[gamma])
        rows[gamma] = {"teacher_forwards_per_token": rounds / produced, "median_s": statistics.median(times[gamma]),
                       "acceptance": statistics.mean(s.acceptance_rate for s in stats[gamma])}
    base = rows[1]
    for r in rows.values():
        r["forwards_vs_token_by_token"] = r["teacher_forwards_per_token"] / base["teacher_forwards_per_token"]
        r["time_vs_token_by_token"] = r["median_s"] / base["median_s"]
    metrics = {}
    for gamma in gammas[1:]:
        metrics[f"gamma {gamma} teacher forwards per token"] = metric(rows[gamma]["teacher_forwards_per_token"],
                                                                      "lower", "quality", floor=0.01)
        metrics[f"gamma {gamma} time over token-by-token"] = metric(rows[gamma]["time_vs_token_by_token"], "lower",
                                                                   "ratio")
    result = {"environment": environment(), "prompts": prompts, "new_tokens": new, "k": k, "repeats": repeats,
              "by_gamma": rows, "metrics": metrics}
    write_json(out / "skd.json", result)
    lines = [f"SKD (K = {k}) samples for {prompts} built-in test prompts (one batch), up to {new} new tokens, shipped "
             f"student and teacher, {device}, {torch.get_num_threads()} CPU threads; medians of {repeats} "
             "interleaved runs. gamma = 1 is token-by-token SKD.", "",
             "| gamma | teacher forwards / token | vs token-by-token | time (s) | vs token-by-token | acceptance |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {g} | {r['teacher_forwards_per_token']:.3f} | {r['forwards_vs_token_by_token']:.2f} "
              f"| {r['median_s']:.3f} | {r['time_vs_token_by_token']:.2f} | {r['acceptance']:.3f} |"
              for g, r in rows.items()]
    (out / "skd.md").write_text("\n".join(lines) + "\n")
    return result
