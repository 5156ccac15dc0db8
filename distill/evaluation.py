"""Evaluation: metrics of greedy and sampled generations, and losses on the reference completions.

Generations are scored by the built-in tasks' exact metrics, or on the user's data by
``data.metric`` (``distill.metrics``). Sampled evaluation (``eval.samples=n``) draws n responses
per prompt and reports mean@n (the samples' mean score), pass@n (a prompt counts when one of its
samples is right; for a graded metric, its best sample's score) and distinct@n (the distinct right
answers per prompt). The losses (student cross-entropy, teacher-student divergence, the
objective) come from the same fused path as training, so no evaluation batch holds ``[tokens x
vocab]`` logits. Under several ranks each rank takes every world-th batch and the results are
gathered, so every rank returns the same metrics, equal to one process's. All take an
``on_batch`` callback for a progress display.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from statistics import mean

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import EvalConfig, LossConfig, SamplingConfig
from distill.data import Record, collate, encode, stop_ids
from distill.distributed import Engine
from distill.generation import sample
from distill.losses import count_tokens
from distill.metrics import resolve, sample_scores, text_scores
from distill.objective import batch_loss
from distill.tasks import TASKS, get_task
from distill.teacher import Teacher, Teachers

OnBatch = Callable[[], None] | None


def _pairs(records: list[Record], tokenizer: Tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    # The loaders applied data.overlong already (an error raised, a skipped record is gone): what is
    # left is truncated as training truncates it.
    return [encode(r, tokenizer, max_length, "truncate") for r in records]


def batch_count(records: list[Record], batch_size: int, world: int = 1) -> int:
    """Batches one rank runs (the most any rank does) when ``world`` ranks split ``records``."""
    batches = -(-len(records) // batch_size)
    return -(-batches // world)


def sampled_batch_size(batch_size: int, samples: int) -> int:
    """Prompts per batch of sampled evaluation: their samples fill about ``batch_size`` rows."""
    return max(1, batch_size // samples)


def _share(n: int, size: int, engine: Engine | None, lockstep: bool) -> list[tuple[int, int, bool]]:
    """This rank's batches of ``n`` records as (start, end, kept): every world-th batch from its
    rank. ``lockstep`` (sharded forwards are collective): every rank makes as many calls, and a
    rank with fewer batches repeats its first one, its result dropped (``kept`` False)."""
    rank, world = (0, 1) if engine is None else (engine.rank, engine.world)
    starts = list(range(0, n, size))
    mine = [(s, min(s + size, n), True) for s in starts[rank::world]]
    if lockstep and starts:
        mine += [(0, min(size, n), False)] * (-(-len(starts) // world) - len(mine))
    return mine


def _gathered(engine: Engine | None, items: list) -> list:
    """Every rank's ``items`` (lists of (index, value)) on every rank, by index."""
    parts = [items] if engine is None else engine.all_gather(items)
    return [v for _, v in sorted((iv for part in parts for iv in part), key=lambda iv: iv[0])]


def needs_generation(records: list[Record], metric: str) -> bool:
    """Whether any record is scored from a generation (a built-in task, or a metric other than none)."""
    return resolve(metric) != "none" or any(r.task in TASKS for r in records)


def _completions(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    records: list[Record],
    sampling: SamplingConfig,
    n: int,
    *,
    seed: Callable[[int], int],
    vocab: int | None,
    batch_size: int,
    max_length: int,
    on_batch: OnBatch,
    synced: bool,
    engine: Engine | None,
) -> list[list[str]]:
    """``n`` completions per record by ``sampling`` (``distill.generation.sample``), as text, in
    batches of ``batch_size`` records, the batch starting at record ``start`` seeded by
    ``seed(start)``; the ranks split the batches and every rank returns them all."""
    out: list[tuple[int, list[str]]] = []
    for start, end, kept in _share(len(records), batch_size, engine, lockstep=synced):
        prompts = [p for p, _ in _pairs(records[start:end], tokenizer, max_length) for _ in range(n)]
        got = sample(model, prompts, sampling, pad_id=tokenizer.pad_token_id, stops=stop_ids(tokenizer),
                     seed=seed(start), vocab=vocab, synced=synced)
        text = tokenizer.batch_decode(got, skip_special_tokens=True)
        if kept:
            out += enumerate((text[i * n: (i + 1) * n] for i in range(end - start)), start)
        if on_batch:
            on_batch()
    return _gathered(engine, out)


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
    engine: Engine | None = None,
) -> list[str]:
    """Greedy completions of the records' prompts, as text (``distill.generation``: batched,
    KV-cached, the model's own generation defaults set aside). ``synced``: the model is sharded
    and not gathered, so every rank decodes until all are done (each forward gathers layers from
    all ranks). ``engine``: the ranks split the batches; every rank returns all completions."""
    greedy = SamplingConfig(greedy=True, max_new_tokens=max_new_tokens)
    got = _completions(model, tokenizer, records, greedy, 1, seed=lambda start: 0, vocab=None, batch_size=batch_size,
                       max_length=max_length, on_batch=on_batch, synced=synced, engine=engine)
    return [c for (c,) in got]


def sample_seed(seed: int, what: str, start: int) -> int:
    """The seed of the sampled-evaluation batch starting at record ``start`` of split ``what``: the
    same samples on any number of ranks, and at every validation of a run."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{what}/{start}".encode(), digest_size=4).digest(), "little")


def generate_samples(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    records: list[Record],
    cfg: EvalConfig,
    *,
    seed: int,
    what: str,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    on_batch: OnBatch = None,
    synced: bool = False,
    engine: Engine | None = None,
) -> list[list[str]]:
    """``cfg.samples`` sampled completions per record (at ``cfg.temperature`` and ``cfg.top_p``, never a
    padding row of the vocabulary), as text; seeded by (``seed``, ``what``, batch), so the samples do
    not depend on the number of ranks. ``synced`` and ``engine`` as for ``generate``."""
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new_tokens)
    return _completions(model, tokenizer, records, sampling, cfg.samples,
                        seed=lambda start: sample_seed(seed, what, start), vocab=len(tokenizer),
                        batch_size=sampled_batch_size(batch_size, cfg.samples), max_length=max_length,
                        on_batch=on_batch, synced=synced, engine=engine)


def _groups(records: list[Record]) -> list[tuple[str, list[int]]]:
    """The records' indices by group, in name order: a built-in task, or ``data`` for the user's."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.task or "data"].append(i)
    return sorted(groups.items())


def sampled_metrics(records: list[Record], samples: list[list[str]], metric: str = "auto") -> dict[str, float]:
    """mean@n, pass@n and distinct@n of each record's ``samples`` per group of records (as
    ``task_metrics`` groups them), and their means over the groups. A built-in task's checker (or
    ``data.metric=exact``) decides what is right; a graded metric (chrF, ...) gives
    ``METRIC_mean@n`` and ``METRIC_pass@n`` (each prompt's best sample) and no distinct count."""
    n = len(samples[0]) if samples else 0
    groups = _groups(records)
    metrics: dict[str, float] = {}
    headline: dict[str, list[float]] = defaultdict(list)
    for name, idx in groups:
        scores: list[list[float]] = []
        distinct: list[int] = []
        if name in TASKS:
            task = get_task(name)
            for i in idx:
                scores.append([float(task.check(s, records[i].answer)) for s in samples[i]])
                distinct.append(len({task.key(s) for s, ok in zip(samples[i], scores[-1], strict=True) if ok}))
            prefix = ""
        else:
            kind = resolve(metric)
            if kind == "none":
                continue
            for i in idx:
                scores.append(sample_scores(samples[i], [records[i].answer] * len(samples[i]), kind))
                if kind == "exact":
                    distinct.append(len({" ".join(s.split()) for s, ok in zip(samples[i], scores[-1], strict=True)
                                         if ok}))
            prefix = "" if kind == "exact" else f"{kind}_"
        row = {f"{prefix}mean@{n}": mean(mean(s) for s in scores), f"{prefix}pass@{n}": mean(max(s) for s in scores)}
        if distinct:
            row[f"distinct@{n}"] = mean(distinct)
        metrics.update({f"{name}/{k}": v for k, v in row.items()} if len(groups) > 1 else row)
        for k, v in row.items():
            headline[k].append(v)
    if len(groups) > 1:
        metrics.update({k: mean(v) for k, v in headline.items()})
    return metrics


def task_metrics(records: list[Record], predictions: list[str], metric: str = "auto") -> dict[str, float]:
    """Scores per group of records (``GROUP/name``: a built-in task's exact metrics, or ``metric`` on
    the user's data, group ``data`` or a record's ``task``) and, under each group's first score name
    (``accuracy``, ``chrf``, ...), its mean over the groups. With one group that mean is the group's
    own score, which then appears once (``chrf``, not also ``data/chrf``)."""
    groups = _groups(records)
    metrics: dict[str, float] = {}
    headline: dict[str, list[float]] = defaultdict(list)
    for name, idx in groups:
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
    engine: Engine | None = None,
) -> dict[str, float]:
    """Token-averaged losses on the reference completions: the student's cross-entropy ``ce``
    and, with a teacher, the teacher-student ``divergence`` (``loss.kind``, or forward KL when
    training on cross-entropy) and the ``objective`` when it mixes the two (``loss.ce_weight``).
    ``fused``: through the fused LM-head loss (``distill.objective.batch_loss``), never the
    ``[tokens x vocab]`` logits. Without a teacher this is also a teacher's own ``ce``. With
    several teachers, ``divergence_NAME`` is each one's per token it teaches. ``engine``: the ranks
    split the batches (in step under ZeRO-3, whose forwards are collective) and sum the results."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    vocab = len(tokenizer)
    # Sharded forwards are collective: every rank makes as many calls.
    lockstep = engine is not None and engine.world > 1 and (
        engine.placement.sharded("student") or engine.placement.sharded("teacher"))
    batches: list[tuple[int, tuple]] = []  # (start, (ce, divergence, objective, tokens, {teacher: (div, tokens)}))
    try:
        for start, end, kept in _share(len(records), batch_size, engine, lockstep):
            b = collate(_pairs(records[start:end], tokenizer, max_length), tokenizer.pad_token_id)
            terms = batch_loss(loss, student, teacher, b.to(device), bf16=False, vocab=vocab, fused=fused,
                               measure_cross_entropy=True)
            if on_batch:
                on_batch()
            if kept:
                div = terms.divergence is not None
                batches.append((start, (float(terms.cross_entropy), float(terms.divergence) if div else 0.0,
                                        float(terms.loss) if div else 0.0, count_tokens(b.labels[:, 1:]),
                                        {k: (float(d), t) for k, (d, t) in (terms.by_teacher or {}).items()})))
    finally:
        student.train(was_training)
    summed = _gathered(engine, batches)  # every rank's batches, summed in one process's order
    n = sum(r[3] for r in summed)
    sums = {k: sum(r[i] for r in summed) for i, k in enumerate(("ce", "divergence", "objective"))}
    each: dict[str, list] = {}
    for r in summed:  # several teachers: each one's part
        for name, (d, t) in r[4].items():
            got = each.setdefault(name, [0.0, 0])
            got[0] += d
            got[1] += t
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
    engine: Engine | None = None,
    sampled: EvalConfig | None = None,
    seed: int = 0,
    what: str = "test",
) -> dict[str, float]:
    """Scores of ``model``'s greedy completions on ``records`` (nothing is generated when no record
    needs it: ``data.metric=none`` on the user's data) and, with ``sampled`` (``eval.samples`` > 0),
    of its sampled ones (``sampled_metrics``; seeded by ``seed`` and the split ``what``).
    ``synced`` and ``engine`` as for ``generate``."""
    if not needs_generation(records, metric):
        return {}
    size = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length, on_batch=on_batch,
                synced=synced, engine=engine)
    row = task_metrics(records, generate(model, tokenizer, records, **size), metric)
    if sampled is not None and sampled.samples > 0:
        samples = generate_samples(model, tokenizer, records, sampled, seed=seed, what=what, **size)
        row.update(sampled_metrics(records, samples, metric))
    return row
