"""Evaluation: metrics of greedy generations, and losses on the reference completions.

Generations are scored by the built-in tasks' exact metrics, or on the user's data by
``data.metric`` (``distill.metrics``). The losses (student cross-entropy, teacher-student
divergence, the objective) come from the same fused path as training, so no evaluation batch
holds ``[tokens x vocab]`` logits. Both take an ``on_batch`` callback for a progress display.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import LossConfig
from distill.data import Record, collate, encode, stop_ids
from distill.generation import greedy_completions
from distill.losses import count_tokens
from distill.metrics import resolve, text_scores
from distill.objective import batch_loss
from distill.tasks import TASKS
from distill.teacher import Teacher, Teachers

OnBatch = Callable[[], None] | None


def _pairs(records: list[Record], tokenizer: Tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    # The loaders applied data.overlong already (an error raised, a skipped record is gone): what is
    # left is truncated as training truncates it.
    return [encode(r, tokenizer, max_length, "truncate") for r in records]


def batch_count(records: list[Record], batch_size: int) -> int:
    return -(-len(records) // batch_size)


def needs_generation(records: list[Record], metric: str) -> bool:
    """Whether any record is scored from a generation (a built-in task, or a metric other than none)."""
    return resolve(metric) != "none" or any(r.task in TASKS for r in records)


def generate(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    records: list[Record],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    on_batch: OnBatch = None,
    synced: bool = False,
) -> list[str]:
    """Greedy completions of the records' prompts, as text (``distill.generation``: batched,
    KV-cached, the model's own generation defaults set aside). ``synced``: the model is sharded
    and not gathered, so every rank decodes until all are done (each forward gathers layers from
    all ranks)."""
    out: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [p for p, _ in _pairs(records[start: start + batch_size], tokenizer, max_length)]
        got = greedy_completions(model, prompts, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id,
                                 stops=stop_ids(tokenizer), synced=synced)
        out += tokenizer.batch_decode(got, skip_special_tokens=True)
        if on_batch:
            on_batch()
    return out


def task_metrics(records: list[Record], predictions: list[str], metric: str = "auto") -> dict[str, float]:
    """Scores per group of records (``GROUP/name``: a built-in task's exact metrics, or ``metric`` on
    the user's data, group ``data`` or a record's ``task``) and, under each group's first score name
    (``accuracy``, ``chrf``, ...), its mean over the groups. With one group that mean is the group's
    own score, which then appears once (``chrf``, not also ``data/chrf``)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.task or "data"].append(i)
    metrics: dict[str, float] = {}
    headline: dict[str, list[float]] = defaultdict(list)
    for name, idx in sorted(groups.items()):
        preds = [predictions[i] for i in idx]
        refs = [records[i].answer for i in idx]
        scores = TASKS[name]().score(preds, refs) if name in TASKS else text_scores(preds, refs, metric)
        first = next(iter(scores), None)
        metrics.update({f"{name}/{k}": v for k, v in scores.items() if len(groups) > 1 or k != first})
        if first is not None:
            headline[first].append(scores[first])
    metrics.update({k: sum(v) / len(v) for k, v in headline.items()})
    return metrics


@torch.no_grad()
def reference_losses(
    student: PreTrainedModel,
    teacher: Teacher | Teachers | None,
    tokenizer: Tokenizer,
    records: list[Record],
    loss: LossConfig,
    *,
    fused: bool,
    batch_size: int,
    max_length: int,
    on_batch: OnBatch = None,
) -> dict[str, float]:
    """Token-averaged losses on the reference completions: the student's cross-entropy ``ce``
    and, with a teacher, the teacher-student ``divergence`` (``loss.kind``, or forward KL when
    training on cross-entropy) and the ``objective`` when it mixes the two (``loss.ce_weight``).
    ``fused``: through the fused LM-head loss (``distill.objective.batch_loss``), never the
    ``[tokens x vocab]`` logits. Without a teacher this is also a teacher's own ``ce``. With
    several teachers, ``divergence_NAME`` is each one's per token it teaches."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    sums = {"ce": 0.0, "divergence": 0.0, "objective": 0.0}
    each: dict[str, list] = {}
    n = 0
    vocab = len(tokenizer)
    try:
        for start in range(0, len(records), batch_size):
            b = collate(_pairs(records[start: start + batch_size], tokenizer, max_length), tokenizer.pad_token_id)
            terms = batch_loss(loss, student, teacher, b.to(device), bf16=False, vocab=vocab, fused=fused,
                               measure_cross_entropy=True)
            sums["ce"] += float(terms.cross_entropy)
            for name, (div, tokens) in (terms.by_teacher or {}).items():  # several teachers: each one's part
                each.setdefault(name, [0.0, 0])
                each[name][0] += float(div)
                each[name][1] += tokens
            if terms.divergence is not None:
                sums["divergence"] += float(terms.divergence)
                sums["objective"] += float(terms.loss)
            n += count_tokens(b.labels[:, 1:])
            if on_batch:
                on_batch()
    finally:
        student.train(was_training)
    keys = ["ce"] + (["divergence"] if teacher is not None else [])
    if teacher is not None and loss.kind != "ce" and loss.ce_weight > 0:
        keys.append("objective")  # otherwise it is one of the two above
    return {k: sums[k] / max(n, 1) for k in keys} | {f"divergence_{name}": d / max(t, 1)
                                                     for name, (d, t) in each.items()}


def evaluate(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    records: list[Record],
    *,
    metric: str,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    on_batch: OnBatch = None,
    synced: bool = False,
) -> dict[str, float]:
    """Scores of ``model``'s greedy completions on ``records`` (nothing is generated when no record
    needs it: ``data.metric=none`` on the user's data); ``synced`` as for ``generate``."""
    if not needs_generation(records, metric):
        return {}
    preds = generate(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     max_length=max_length, on_batch=on_batch, synced=synced)
    return task_metrics(records, preds, metric)
