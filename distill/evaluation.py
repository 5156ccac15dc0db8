"""Evaluation: task metrics from greedy generation, and teacher-student divergence on references."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import LossConfig
from distill.data import Record, collate, encode, left_pad
from distill.losses import count_tokens, cross_entropy, divergence
from distill.models import lm_logits
from distill.tasks import TASKS


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    records: list[Record],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
) -> list[str]:
    """Greedy completions of the records' prompts (batched, KV-cached, left-padded)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start: start + batch_size]
            prompts = [encode(r, tokenizer, max_length)[0] for r in chunk]
            ids, mask = left_pad(prompts, tokenizer.pad_token_id)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def task_metrics(records: list[Record], predictions: list[str]) -> dict[str, float]:
    """Per-task metrics (``TASK/metric``) and their mean ``accuracy`` over tasks."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.task or "data"].append(i)
    metrics: dict[str, float] = {}
    for name, idx in sorted(groups.items()):
        preds = [predictions[i] for i in idx]
        refs = [records[i].answer for i in idx]
        if name in TASKS:
            scores = TASKS[name]().score(preds, refs)
        else:
            scores = {"accuracy": sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / len(refs)}
        metrics.update({f"{name}/{k}": v for k, v in scores.items()})
    accs = [v for k, v in metrics.items() if k.endswith("/accuracy")]
    metrics["accuracy"] = sum(accs) / len(accs)
    return metrics


@torch.no_grad()
def reference_losses(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    tokenizer: Tokenizer,
    records: list[Record],
    loss: LossConfig,
    *,
    batch_size: int,
    max_length: int,
) -> dict[str, float]:
    """Token-averaged student cross-entropy and (with a teacher) divergence on reference completions."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    ce_sum = div_sum = 0.0
    n = 0
    try:
        for start in range(0, len(records), batch_size):
            pairs = [encode(r, tokenizer, max_length) for r in records[start: start + batch_size]]
            b = collate(pairs, tokenizer.pad_token_id).to(device)
            labels = b.labels[:, 1:]
            s = lm_logits(student, b.input_ids, b.attention_mask, vocab=len(tokenizer))
            ce_sum += float(cross_entropy(s, labels, reduction="sum"))
            if teacher is not None and loss.kind != "ce":
                t = lm_logits(teacher, b.input_ids, b.attention_mask, vocab=len(tokenizer))
                div_sum += float(divergence(s, t, labels, reduction="sum", **loss.divergence_kwargs()))
            n += count_tokens(labels)
    finally:
        student.train(was_training)
    out = {"ce": ce_sum / max(n, 1)}
    if teacher is not None and loss.kind != "ce":
        out["divergence"] = div_sum / max(n, 1)
    return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    records: list[Record],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
) -> dict[str, float]:
    """Task metrics of ``model``'s greedy completions on ``records``."""
    preds = generate(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length
    )
    return task_metrics(records, preds)
