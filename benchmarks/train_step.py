"""Cost of a distillation step against an SFT step, per loss kind, measured in the same run.

Uses the shipped teacher and student on built-in task batches. Reports the median time of one
optimizer step (forward, loss, backward, AdamW; every configuration timed once per round, round
after round) and its ratio to the SFT step (student forward and cross-entropy only, fused as the
trainer runs it), so the overhead of the teacher forward and of each divergence is visible, for
the trainer's default fused loss (LM head + loss in token chunks) and for full logits.
Writes ``train_step.json`` and ``train_step.md``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.environment import environment
from benchmarks.metrics import metric, synchronize, write_json
from distill.config import ASSETS, DataConfig, LossConfig, ModelConfig, TrainerConfig
from distill.data import TrainData, collate, length_buckets
from distill.losses import KINDS, count_tokens
from distill.models import load_model, load_tokenizer
from distill.objective import batch_loss
from distill.teacher import LocalTeacher


def one_step(student, teacher, batches: list, kind: str, fused: bool, optimizer, vocab: int) -> float:
    """Seconds of the trainer's own loss, backward and AdamW step over a micro-batch (``batches``:
    the whole, or its length buckets)."""
    n = sum(count_tokens(b.labels[:, 1:]) for b in batches)
    synchronize(batches[0].input_ids.device)
    t0 = time.perf_counter()
    for batch in batches:
        loss = batch_loss(LossConfig(kind=kind), student, LocalTeacher(teacher) if kind != "ce" else None, batch,
                          bf16=False, vocab=vocab, fused=fused).loss
        (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(batches[0].input_ids.device)
    return time.perf_counter() - t0


def padding(data: TrainData, batch_size: int, batches: int, max_buckets: int) -> dict[str, float]:
    """The share of padded positions over ``batches`` micro-batches, whole and in length buckets."""
    padded = {"whole": 0, "length buckets": 0}
    real = 0
    for _ in range(batches):
        lengths = [len(p) + len(c) for p, c in data.next_pairs(batch_size)]
        real += sum(lengths)
        padded["whole"] += len(lengths) * max(lengths)
        padded["length buckets"] += sum(len(g) * max(lengths[i] for i in g)
                                        for g in length_buckets(lengths, max_buckets))
    return {k: 1 - real / v for k, v in padded.items()}


def run(out: Path, seed: int = 0, rounds: int = 40, batch_size: int = 32, kinds: list[str] | None = None,
        device: str = "cpu") -> dict:
    kinds = list(KINDS) if kinds is None else kinds
    dev = torch.device(device)
    tok = load_tokenizer(ASSETS / "teacher")
    teacher = load_model(ModelConfig(path=str(ASSETS / "teacher")), "teacher", dev)
    student = load_model(ModelConfig(path=str(ASSETS / "student")), "student", dev)
    data = TrainData(DataConfig(), tok, seed=seed)
    pad = padding(data, batch_size, 50, TrainerConfig.length_buckets)
    pairs = data.next_pairs(batch_size)
    batch = collate(pairs, tok.pad_token_id).to(dev)
    buckets = [collate([pairs[i] for i in g], tok.pad_token_id).to(dev)
               for g in length_buckets([len(p) + len(c) for p, c in pairs], TrainerConfig.length_buckets)]
    # A learning rate of 0 keeps the student identical across kinds while AdamW still does its work.
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)

    configs = {kind + (" (fused)" if fused else " (full logits)"): (kind, fused, [batch])
               for kind in ("ce", *kinds) for fused in (True, False)}
    configs |= {f"{kind} (fused, length buckets)": (kind, True, buckets) for kind in ("ce", *kinds)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    # Round-robin: one step of every configuration per round, so that drift of this shared machine
    # hits all alike; the first two rounds warm up allocator and kernels.
    for i in range(rounds + 2):
        for name, (kind, fused, batches) in configs.items():
            t = one_step(student, teacher, batches, kind, fused, optimizer, len(tok))
            if i >= 2:
                times[name].append(t)
    rows = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: (q[2] - q[0]) / rows[name] for name, t in times.items() for q in [statistics.quantiles(t, n=4)]}
    base = rows["ce (fused)"]
    ratios = {k: v / base for k, v in rows.items()}
    metrics = {f"{kind} step over sft step": metric(ratios[f"{kind} (fused)"], "lower", "ratio") for kind in kinds}
    metrics |= {f"{kind} fused over full logits": metric(rows[f"{kind} (fused)"] / rows[f"{kind} (full logits)"],
                                                        "lower", "ratio") for kind in ("ce", *kinds)}
    metrics |= {f"{kind} length buckets over whole batch": metric(
        rows[f"{kind} (fused, length buckets)"] / rows[f"{kind} (fused)"], "lower", "ratio") for kind in ("ce", *kinds)}
    result = {"environment": environment(), "batch_tokens": batch.num_tokens, "rounds": rounds,
              "buckets": [list(b.input_ids.shape) for b in buckets], "padding_share": pad,
              "median_step_s": rows, "iqr_over_median": spread, "ratio_to_sft": ratios, "metrics": metrics}
    write_json(out / "train_step.json", result)
    shapes = ", ".join(str(tuple(b.input_ids.shape)) for b in buckets)
    lines = [f"Median optimizer-step time of {rounds} rounds (every configuration once per round), one micro-batch "
             f"of {batch_size} sequences of the built-in tasks ({batch.num_tokens} tokens, padded to "
             f"{tuple(batch.input_ids.shape)}; in length buckets {shapes}), {device}, "
             f"{torch.get_num_threads()} CPU threads. Over 50 micro-batches, padding is "
             f"{pad['whole']:.0%} of the positions whole and {pad['length buckets']:.0%} in length buckets "
             f"(trainer.length_buckets={TrainerConfig.length_buckets}).", "",
             "| loss | step (ms) | spread (IQR / median) | ratio to SFT |", "|---|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {spread[k]:.2f} | {v / base:.2f} |" for k, v in rows.items()]
    (out / "train_step.md").write_text("\n".join(lines) + "\n")
    return result
