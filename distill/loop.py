"""The training loop: ``run`` below, one optimizer step per iteration, every part a named call.

One optimizer step draws its source, makes ``grad_accum`` micro-batches from it, counts their
response tokens first, and scales each micro-batch's summed loss by that global count, so the
step's loss is the mean over every counted token however the batch is split and however many
ranks share it. ``RunState`` holds everything the steps read and change; ``distill.train`` builds
it, evaluates before and after, and exports.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.asynchronous.pipeline import Pipeline
from distill.config import DistillConfig
from distill.data import IGNORE_INDEX, Batch, Record, TrainData, collate, length_buckets, split_groups
from distill.distributed import Engine
from distill.errors import DistillError
from distill.evaluation import batch_count, evaluate, needs_generation, reference_losses, sampled_batch_size
from distill.losses import count_tokens
from distill.memory import release_freed
from distill.objective import batch_loss
from distill.progress import console, showing
from distill.sources import REGISTRY
from distill.sources.base import Sequences, SourceContext, SourceStats, aligned_hidden
from distill.sources.mixture import draw_source, step_seed
from distill.teacher import Teacher, Teachers
from distill.tracking import MetricsLog


@dataclass
class RunState:
    """A run in progress: its models, optimizer, data and sources, and where it stands."""

    cfg: DistillConfig
    run_dir: Path
    engine: Engine
    tokenizer: Tokenizer
    student: PreTrainedModel
    teacher: Teacher | Teachers | None
    params: list[torch.nn.Parameter]  # the student's trained parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TrainData
    sources: SourceContext
    fused: bool  # the fused LM-head loss (else full logits)
    validation_records: list[Record] = field(default_factory=list)
    test_records: list[Record] = field(default_factory=list)
    step: int = 0
    tokens_seen: int = 0
    last_saved: int | None = None  # the step of the newest checkpoint
    metrics: MetricsLog | None = None  # rank 0's metrics log
    progress: Progress | None = None
    # Rows "teacher", "student before", "student after" of metrics per split (saved with checkpoints).
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)  # kinds of generation problems already reported
    ahead: Pipeline | None = None  # generation workers running ahead (sources.asynchronous)

    @property
    def loss_teacher(self) -> Teacher | Teachers | None:
        """The loss's teacher: none for SFT's cross-entropy."""
        return self.teacher if self.cfg.loss.kind != "ce" else None


@dataclass
class Window:
    """What the steps since the last log line did: the log's averages and rates."""

    t_start: float = field(default_factory=time.perf_counter)  # moved on past generation: training time only
    t_wall: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    drawn: dict[str, int] = field(default_factory=dict)
    generation: SourceStats = field(default_factory=SourceStats)
    lr: float = 0.0
    grad_norm: float = 0.0
    by_teacher: dict[str, list] = field(default_factory=dict)  # several teachers: [divergence sum, tokens]
    policy: list[dict[str, float]] = field(default_factory=list)  # generated ahead: each step's "policy" row


def run(state: RunState) -> None:
    """The optimizer steps from ``state.step`` to ``trainer.steps``, with logging, validation and
    checkpoints. Ctrl-C stops at the next step boundary with a checkpoint (twice: at once)."""
    tc = state.cfg.trainer
    state.student.train()
    window = Window()
    task = state.progress.add_task("train", total=tc.steps, completed=state.step, loss=math.nan, tps=0.0)
    with _StopAtStepBoundary() as stop, _stopped_at_once(state):
        for _ in range(state.step, tc.steps):  # optimizer_step counts state.step on
            source = draw(state, window)
            micro = micro_batches(state, source, window)
            # A teacher elsewhere starts on what it was not asked for a step ahead (generated now,
            # or the first step): a batch asked twice is sent once.
            ask_ahead(state, [m.batch for m in micro if m.teacher_hidden is None])
            prefetch(state)
            n_counted = accumulate(state, micro, window)
            optimizer_step(state, n_counted, window)
            if state.ahead is not None:  # generation workers start on what the new weights make ready
                state.ahead.advance(state.step)
            if state.step % tc.log_every == 0 or state.step == tc.steps:
                log(state, window, task)
                window = Window()
            state.progress.update(task, completed=state.step)
            if state.step % tc.eval_every == 0 or state.step == tc.steps:
                validate(state, window)
            # Ctrl-C reaches the ranks at different moments: they stop at the same step boundary.
            stopping = bool(state.engine.all_max(int(stop.requested)))
            if state.step % tc.save_every == 0 or state.step == tc.steps or stopping:
                save(state)
            if stopping and state.step < tc.steps:
                raise DistillError(f"interrupted at step {state.step}; checkpoint saved. "
                                   f"Continue with: distill resume={state.run_dir}")


def draw(state: RunState, window: Window) -> str:
    """The step's source, drawn by the weights at this step (the same on every rank)."""
    tc = state.cfg.trainer
    source = draw_source(state.cfg.sources.weights, tc.seed, state.step, tc.steps)
    window.drawn[source] = window.drawn.get(source, 0) + 1
    return source


@dataclass
class Micro:
    """One micro-batch of a step, with the teacher's hidden states where its source kept them and
    each row's policy-gradient weight where a reward term scored it."""

    batch: Batch
    teacher_hidden: torch.Tensor | None = None
    pg_weights: torch.Tensor | None = None


def micro_batches(state: RunState, name: str, window: Window) -> list[Micro]:
    """The step's micro-batches from source ``name``: ``grad_accum`` draws of the dataset's
    prompts, each rank generating for its share with its own seed (or a generation worker, ahead),
    split into length groups."""
    if state.ahead is not None:
        made = state.ahead.take(state.step)
        window.t_start += made.waited_samples  # tokens/s counts training time only
        if made.version is not None:
            row = made.row(state.step)
            window.policy.append(row)
            if state.metrics is not None:
                state.metrics.log("policy", state.step + 1, row)
        sequences = made.sequences
    else:
        sequences = [generated(state, name, m, window) for m in range(state.cfg.trainer.grad_accum)]
    micro = []
    for got in sequences:
        window.generation.add(got.stats)
        for group, batch in collated(state, got.pairs):
            hidden = None if got.hidden is None else aligned_hidden(
                [got.pairs[i] for i in group], [got.hidden[i] for i in group], batch)
            pg = None if got.pg_weights is None else torch.tensor([got.pg_weights[i] for i in group])
            micro.append(Micro(batch, hidden, pg))
    return micro


def generated(state: RunState, name: str, m: int, window: Window) -> Sequences:
    """Micro-batch ``m`` of the step from source ``name``, made here: this rank's share of the
    dataset's next prompts, with its own seed."""
    tc, engine, source, ctx = state.cfg.trainer, state.engine, REGISTRY[name], state.sources
    pairs, records = state.data.next_examples(source.prompts(ctx, tc.batch_size))
    with engine.generation(*source.models(ctx)) as synced:
        got = source.sequences(engine.shard(pairs), ctx, step=state.step,
                               seed=step_seed(tc.seed, state.step, m * engine.world + engine.rank),
                               synced=synced, records=engine.shard(records))
    window.t_start += got.stats.seconds  # tokens/s counts training time only
    return got


def collated(state: RunState, pairs: list) -> list[tuple[list[int], Batch]]:
    """A micro-batch's pairs in length groups, each collated (the group's indices and its batch).
    Sharded forwards and backwards are collective: every rank makes as many groups."""
    lengths = [len(p) + len(r) for p, r in pairs]
    groups = length_buckets(lengths, state.cfg.trainer.length_buckets)
    pad = state.data.tokenizer.pad_token_id
    return [(group, collate([pairs[i] for i in group], pad))
            for group in split_groups(groups, lengths, state.engine.all_max(len(groups)))]


def prefetch(state: RunState) -> None:
    """Ask a teacher that runs elsewhere for the next step's hidden states now, so that it computes
    them while this step trains: where the next step draws the dataset (known before the run), its
    micro-batches are made as ``micro_batches`` will make them, from the data ahead (not taken)."""
    tc, teacher = state.cfg.trainer, state.loss_teacher
    nxt = state.step + 1
    # Generated ahead, the data's next pairs are a later step's: the teacher is asked at the step.
    if teacher is None or not teacher.prefetches or nxt >= tc.steps or state.ahead is not None:
        return
    if not REGISTRY[draw_source(state.cfg.sources.weights, tc.seed, nxt, tc.steps)].fixed:
        return
    ahead = state.data.peek_pairs(tc.batch_size * tc.grad_accum)
    if ahead is None:
        return
    batches = []
    for m in range(tc.grad_accum):
        mine = state.engine.shard(ahead[m * tc.batch_size: (m + 1) * tc.batch_size])
        batches += [b for _, b in collated(state, mine)]
    ask_ahead(state, batches)


def ask_ahead(state: RunState, batches: list[Batch]) -> None:
    """Ask a teacher that runs elsewhere for the hidden states of ``batches`` (micro-batches whose
    teacher side no source kept), as ``accumulate`` will ask for them."""
    teacher = state.loss_teacher
    if teacher is None or not teacher.prefetches or not batches:
        return
    teacher.prefetch([(b.input_ids, b.attention_mask, b.labels[:, 1:] != IGNORE_INDEX) for b in batches],
                     bf16=state.cfg.trainer.precision == "bf16")


def accumulate(state: RunState, micro: list[Micro], window: Window) -> int:
    """Forward and backward over the step's micro-batches; the step's counted tokens. The
    denominator (counted tokens of every micro-batch on every rank) is known before any backward;
    DeepSpeed averages gradients over the ranks, so each rank's sum is scaled by world / count."""
    cfg, engine = state.cfg, state.engine
    n_counted = engine.all_sum(sum(count_tokens(m.batch.labels[:, 1:]) for m in micro))
    scale = engine.world / max(n_counted, 1)
    loss_sum = torch.zeros((), device=engine.device)  # summed on the device: no sync per micro-batch
    for i, m in enumerate(micro):
        b = m.batch
        engine.start_forward()
        terms = batch_loss(cfg.loss, state.student, state.loss_teacher, b.to(engine.device),
                           bf16=cfg.trainer.precision == "bf16", vocab=state.sources.vocab, fused=state.fused,
                           teacher_hidden=m.teacher_hidden,
                           pg_weights=None if m.pg_weights is None else m.pg_weights.to(engine.device))
        loss = terms.loss
        for name, (div, tokens) in (terms.by_teacher or {}).items():
            got = window.by_teacher.setdefault(name, [torch.zeros((), device=engine.device), 0])
            got[0] += div
            got[1] += tokens
        engine.backward(loss * scale, last=i == len(micro) - 1)
        loss_sum += loss.detach()
        window.tokens += b.num_tokens
    window.losses.append(engine.all_sum(loss_sum) / max(n_counted, 1))
    return n_counted


def optimizer_step(state: RunState, n_counted: int, window: Window) -> None:
    """Clip, step the optimizer and the learning rate, count the step."""
    window.lr = state.scheduler.get_last_lr()[0]  # the rate of this step's update (logged with it)
    window.grad_norm = state.engine.step(state.params, state.cfg.trainer.max_grad_norm)
    state.scheduler.step()
    state.step += 1
    state.tokens_seen += n_counted


def log(state: RunState, window: Window, task: Any) -> None:
    """The interval's loss, rates and sources: to the metrics log and the progress bar; each kind of
    generation problem is warned about once."""
    elapsed = time.perf_counter() - window.t_start
    tps = state.engine.all_sum(window.tokens) / max(elapsed, 1e-9)
    mean_loss = float(torch.stack(window.losses).mean())
    steps, gen = sum(window.drawn.values()), window.generation.metrics()
    per_teacher = {}  # several teachers: each one's divergence per token it taught (every rank sums)
    for name in getattr(state.loss_teacher, "members", ()):
        div, tokens = window.by_teacher.get(name, (0.0, 0))
        per_teacher[f"divergence_{name}"] = float(state.engine.all_sum(float(div))) / max(
            state.engine.all_sum(tokens), 1)
    ahead = {}  # generated ahead: the interval's staleness and waits
    if window.policy:
        ahead = {"staleness": sum(r["staleness"] for r in window.policy) / len(window.policy),
                 "wait_samples_s": sum(r["wait_samples_s"] for r in window.policy),
                 "wait_weights_s": sum(r["wait_weights_s"] for r in window.policy)}
    if state.metrics is not None:
        state.metrics.log("train", state.step, {
            "loss": mean_loss, "lr": window.lr, "grad_norm": window.grad_norm,
            "response_tokens": state.tokens_seen, "tokens_per_s": tps, "train_seconds": elapsed,
            "wall_seconds": time.perf_counter() - window.t_wall,
            **per_teacher,
            **{f"source_{n}": window.drawn.get(n, 0) / steps for n in state.cfg.sources.weights}, **gen, **ahead,
        })
    # The sources of the interval, what their generation cost and gave.
    note = f"{'+'.join(sorted(window.drawn))}: {window.generation.note()}" if gen else ""
    if window.policy:
        last = window.policy[-1]
        note += (f"; policy v{last['policy_version']:.0f} (stale {last['staleness']:.0f}), waited "
                 f"{ahead['wait_samples_s']:.2f} s for samples, workers {ahead['wait_weights_s']:.2f} s for weights")
    state.progress.update(task, loss=mean_loss, tps=tps, note=note)
    for kind, problem in window.generation.problems(state.cfg.data.max_length, state.sources.stops).items():
        if kind not in state.warned:
            state.warned.add(kind)
            state.progress.console.print(f"[yellow]warning: step {state.step}: {problem}[/yellow]")


def validate(state: RunState, window: Window) -> None:
    """The student on the validation split (not counted in tokens/s)."""
    paused = time.perf_counter()
    if state.validation_records:
        val = measure(state, "validation", None, state.student, state.validation_records, with_teacher=True)
        if state.metrics is not None:
            state.metrics.log("validation", state.step, val)
        state.validation["student after"] = val
        state.progress.console.print(f"step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
    window.t_start += time.perf_counter() - paused


def save(state: RunState) -> None:
    """A checkpoint of this step (every rank's part), and the teacher cache's new responses."""
    tc, engine, cache = state.cfg.trainer, state.engine, state.sources.teacher_cache
    trainer_state = {"step": state.step, "tokens_seen": state.tokens_seen, "scheduler": state.scheduler.state_dict(),
                     "data": state.data.state_dict(), "test": state.test, "validation": state.validation}
    if state.ahead is not None:  # the steps generated ahead, from versions older than these weights
        trainer_state["ahead"] = state.ahead.state_dict()
    engine.save_checkpoint(state.run_dir, state.step, state.student, trainer_state, tc.keep_checkpoints)
    state.last_saved = state.step
    if cache is not None:  # the responses new on every rank since the last save, into rank 0's one file
        gathered = engine.gather(cache.take_new())
        if engine.is_main:
            for entries in gathered[1:]:
                cache.merge(entries)
            cache.save()


def measure(state: RunState, split: str, who: str | None, model: PreTrainedModel, records: list[Record],
            with_teacher: bool, generate: bool = True) -> dict[str, float]:
    """Losses (and, with ``generate``, greedy and sampled generation metrics) of ``model`` on
    ``records`` of ``split``, with a progress row ``split: who``. The ranks split the records (in
    step where sharded forwards are collective) and every rank gets the whole row."""
    cfg, tc, engine = state.cfg, state.cfg.trainer, state.engine
    size = dict(batch_size=tc.eval_batch_size, max_length=cfg.data.max_length)
    calls = batch_count(records, tc.eval_batch_size, engine.world)
    if generate and needs_generation(records, cfg.data.metric):
        calls *= 2
        if cfg.eval.samples:
            calls += batch_count(records, sampled_batch_size(tc.eval_batch_size, cfg.eval.samples), engine.world)
    with showing(state.progress, split if who is None else f"{split}: {who}", calls) as advance:
        row = reference_losses(model, state.teacher if with_teacher else None, state.tokenizer, records, cfg.loss,
                               fused=state.fused, on_batch=advance, engine=engine, **size)
        if generate:
            with engine.generation(model) as synced:
                row.update(evaluate(model, state.tokenizer, records, metric=cfg.data.metric, on_batch=advance,
                                    max_new_tokens=tc.max_new_tokens, synced=synced, engine=engine,
                                    sampled=cfg.eval, seed=tc.seed, what=split, **size))
    if engine.device.type == "cpu":
        # Evaluation's caches would otherwise stay resident under the training steps that follow. Not
        # done after each step's own generation round: re-faulting the pages costs ~9% of a GKD loop.
        release_freed()
    return row


class _StopAtStepBoundary:
    """The first Ctrl-C asks the loop to stop after the current step (so the checkpoint is
    consistent); a second one stops at once, losing the work since the last checkpoint."""

    def __enter__(self) -> _StopAtStepBoundary:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop now)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextmanager
def _stopped_at_once(state: RunState) -> Iterator[None]:
    """A second Ctrl-C, as an error that says where to resume from."""
    try:
        yield
    except KeyboardInterrupt:
        if state.last_saved is None:
            raise DistillError(f"stopped at once during step {state.step + 1}, before the first checkpoint") from None
        raise DistillError(f"stopped at once during step {state.step + 1}; the last checkpoint is step "
                           f"{state.last_saved}. Continue from it with: distill resume={state.run_dir}") from None
