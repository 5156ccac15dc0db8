"""The training loop: supervised KD (teacher logits on dataset responses) and SFT, in one place.

One optimizer step draws ``grad_accum`` micro-batches, counts their response tokens first, and
scales each micro-batch's summed loss by that global count, so the step's loss is the mean over
every counted token however the batch is split.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.progress import Progress
from transformers import PreTrainedModel, set_seed
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.chat_template import use_one_chat_template
from distill.checkpoint import atomic_write_text, export_model
from distill.config import SOURCES, DistillConfig, validate
from distill.data import (
    TrainData,
    builtin_records,
    collate,
    encode_all,
    length_buckets,
    load_split,
    split_groups,
    stop_ids,
)
from distill.distributed import Engine
from distill.errors import DistillError
from distill.evaluation import batch_count, evaluate, needs_generation, reference_losses
from distill.losses import count_tokens
from distill.memory import fmt, peak_rss_bytes
from distill.models import (
    AdaptersDisabled,
    check_same_tokenizer,
    check_vocab_rows,
    count_parameters,
    enable_activation_checkpointing,
    export_state_dict,
    load_model,
    load_tokenizer,
    resolve_device,
    save_model,
)
from distill.objective import batch_loss, fused_loss_problem, objective_name
from distill.plan import check as check_plan
from distill.progress import console, progress_display, showing
from distill.report import write_report
from distill.schedule import cosine_scheduler, value_at
from distill.sources.mixture import draw_source, step_seed, weights_at
from distill.sources.sequences import SourceStats, aligned_hidden, source_pairs
from distill.sources.teacher_cache import TeacherCache, default_root
from distill.tokenizer import train_tokenizer
from distill.tracking import MetricsLog, plot_curves

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    steps: int
    # What was minimised, in words (e.g. "fkl", or "0.7 * fkl + 0.3 * ce").
    objective: str = ""
    # Rows "teacher", "student before", "student after" of metrics on each split.
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    # Records data.overlong skipped or truncated, by split.
    data: dict[str, dict[str, int]] = field(default_factory=dict)
    # draft.enabled: the student as a draft for the teacher (alpha, c, and tau and speedups by gamma).
    draft: dict = field(default_factory=dict)
    # Several ranks: world size, ZeRO stage, and each rank's share of each model and peak memory.
    sharding: dict = field(default_factory=dict)
    # The plan's estimate of the peak per rank and the measured peak (the largest over the ranks).
    memory: dict = field(default_factory=dict)


def _tokenizer_for(cfg: DistillConfig, run_dir: Path, engine: Engine) -> tuple[Tokenizer, str]:
    """The student's tokenizer; a scratch model without one gets a tokenizer trained on the task
    corpus (by rank 0, which the others wait for)."""
    s = cfg.student
    if s.tokenizer or s.path:
        path = s.tokenizer or s.path
        return load_tokenizer(path, "student"), str(path)
    out = run_dir / "tokenizer"
    if engine.is_main and not (out / "tokenizer_config.json").exists():
        # Train and validation prompts of the built-in tasks; the test split stays unseen.
        corpus = builtin_records(cfg.data, "train", 8000) + builtin_records(cfg.data, "validation", 400)
        train_tokenizer([t for r in corpus for t in (r.prompt, r.completion)], out, s.arch.tokenizer_vocab_size)
    engine.barrier()
    return load_tokenizer(out, "student"), str(out)


def _saved_config(run_dir: Path, current: DistillConfig, steps: int | None) -> DistillConfig:
    """The config a run was started with: a resumed run continues exactly that recipe, on the
    device and with the progress display asked for now, and up to ``steps`` when given."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DistillError(f"resume: {run_dir} is not a distill run directory (no config.yaml)")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistillConfig), OmegaConf.load(path)))
    except Exception as e:  # a hand-edited or foreign file
        raise DistillError(f"resume: cannot read {path}: {e}") from None
    cfg.resume = str(run_dir)
    cfg.trainer.device, cfg.trainer.progress = current.trainer.device, current.trainer.progress
    if steps is not None:
        if steps < cfg.trainer.steps:
            raise DistillError(f"resume: trainer.steps={steps} is below the run's {cfg.trainer.steps}; "
                               "a run can be extended, not shortened")
        cfg.trainer.steps = steps
    return cfg


def _draft_report(cfg: DistillConfig, result: RunResult, device: torch.device) -> dict:
    """Export the distilled student as a draft for the teacher (``RUN/draft``) and measure it with
    eval-draft (``RUN/draft_eval``): alpha, c, and tau and speedups by gamma, on the run's own
    held-out prompts (data.test, else data.validation, else the test split of its built-in tasks),
    named in the report. ``draft.full`` takes eval-draft's full measurement."""
    from distill.draft_eval import DraftEvalConfig, evaluate_draft
    from distill.export import export_draft

    d, data = cfg.draft, cfg.data
    split = next((s for s in ("test", "validation") if getattr(data, s) is not None), None)
    size = {} if d.full else dict(num_prompts=d.num_prompts, max_new_tokens=d.max_new_tokens, gammas=list(d.gammas),
                                  repeats=d.repeats)
    export_draft(result.model_dir, cfg.teacher.path, result.run_dir / "draft")
    out = evaluate_draft(DraftEvalConfig(
        target=cfg.teacher.path, draft=str(result.run_dir / "draft"), name="distilled student",
        prompts=getattr(data, split) if split else None, prompt_field=data.prompt_field,
        messages_field=data.messages_field, tasks=list(data.tasks), difficulty=data.difficulty, **size,
        seed=cfg.trainer.seed, device=str(device), out=str(result.run_dir / "draft_eval"),
        progress=cfg.trainer.progress,
    ))
    prompts = f"data.{split} ({out['prompts_from']})" if split else out["prompts_from"]
    return {"alpha": out["alpha"], "c": out["c"], "prompts": f"{out['prompts']} prompts of {prompts}",
            "by_gamma": [{k: r[k] for k in ("gamma", "acceptance_rate", "tau_measured", "tau_predicted",
                                            "speedup_predicted", "speedup_measured")} for r in out["by_gamma"]]}


def _save_config(run_dir: Path, cfg: DistillConfig) -> None:
    """The run's ``config.yaml``: what ``resume`` continues (written atomically)."""
    saved = OmegaConf.structured(cfg)
    saved.resume = None
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(saved))


def _warnings(cfg: DistillConfig, student: PreTrainedModel, device: torch.device, deepspeed: bool = False) -> list[str]:
    """Settings that run but are probably not what was meant (``deepspeed``: its optimizer keeps an
    fp32 master copy of bf16 weights)."""
    tc, out = cfg.trainer, []
    if tc.warmup_steps >= tc.steps:
        out.append(f"trainer.warmup_steps={tc.warmup_steps} is not below trainer.steps={tc.steps}: the learning "
                   "rate never reaches trainer.lr")
    trained = [p for p in student.parameters() if p.requires_grad]
    if not deepspeed and any(p.dtype in (torch.bfloat16, torch.float16) for p in trained):
        out.append(f"student.dtype={cfg.student.dtype}: AdamW updates the {cfg.student.dtype} weights themselves "
                   "(no fp32 master copy), and steps below their precision are lost; use student.dtype=float32 "
                   "with trainer.precision=bf16")
    if tc.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        out.append("trainer.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) is emulated "
                   "and several times slower than fp32")
    return out


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux's /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell: no warning
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


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


def train(cfg: DistillConfig, run_dir: Path, *, steps: int | None = None) -> RunResult:
    """Run the recipe described by ``cfg``, writing everything under ``run_dir``.

    With ``cfg.resume`` the run's saved config continues from its latest checkpoint (on the device
    and with the progress display asked for now); ``steps`` then raises its ``trainer.steps``, so a
    finished run can be trained further (the learning rate goes on from where it stands, decaying
    to its floor at the new end: ``CosineSchedule.extend``)."""
    if cfg.resume is not None:
        cfg, run_dir = _saved_config(Path(cfg.resume), cfg, steps), Path(cfg.resume)
    validate(cfg)
    tc = cfg.trainer
    engine = Engine(cfg, resolve_device(tc.device))
    device = engine.device
    # Every rank writes into rank 0's run directory (Hydra's time-stamped one may differ by a second).
    run_dir = Path(engine.broadcast(str(run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    console.quiet = not engine.is_main  # one rank reports
    # The memory plan, from the configs alone: a run that cannot fit stops before loading anything.
    # Rank 0 plans for all (ranks must agree on what they gather for generation).
    plan = None
    if engine.is_main:
        try:
            plan = check_plan(cfg, engine.world)
        except DistillError as e:
            plan = e
    plan = engine.broadcast(plan)
    if isinstance(plan, DistillError):
        raise plan
    if plan is not None:
        engine.gathers = plan.chosen.gathers
        console.print(f"plan: about {fmt(plan.chosen.peak)} per rank at the peak"
                      + (f" of {fmt(plan.available)}" if plan.available else "") + " (distill plan shows the parts)")

    # Models and tokenizers, checked before any compute.
    tokenizer, tok_path = _tokenizer_for(cfg, run_dir, engine)
    teacher, teacher_tok, teacher_tok_path = None, None, cfg.teacher.tokenizer or cfg.teacher.path
    if cfg.teacher.path:
        teacher_tok = load_tokenizer(teacher_tok_path, "teacher")
        check_same_tokenizer(teacher_tok, tokenizer, teacher_tok_path, tok_path)
    # The chat template the data is rendered with is the teacher's too (the student's tokenizer
    # renders the data and is saved with the distilled model).
    use_one_chat_template(teacher_tok, tokenizer, str(teacher_tok_path), tok_path, cfg.data.chat_template)
    if cfg.teacher.path and not cfg.teacher.student_base:  # (student_base: the student's own weights, below)
        with engine.loading("teacher"):
            teacher = load_model(cfg.teacher, "teacher", device)
        check_vocab_rows(teacher, tokenizer, f"teacher {cfg.teacher.path}")
        teacher = engine.wrap_teacher(teacher)
    # Seed right before the student: loading a teacher may consume random numbers, and a student
    # built from scratch must get the same initial weights with or without one.
    set_seed(tc.seed)
    with engine.loading("student"):
        student = load_model(cfg.student, "student", device, tokenizer, seed=tc.seed)
    if tc.activation_checkpointing:
        enable_activation_checkpointing(student)
    check_vocab_rows(student, tokenizer, f"student {cfg.student.path or 'from arch'}")
    for warning in _warnings(cfg, student, device, engine.uses_deepspeed):
        console.print(f"[yellow]warning: {warning}[/yellow]")

    result = RunResult(run_dir, run_dir / "model", tc.steps, objective=objective_name(cfg.loss))
    data = TrainData(cfg.data, tokenizer, tc.seed)
    result.data["train"] = data.counts
    splits: dict[str, list] = {}
    for split in ("validation", "test") if cfg.final_eval else ("validation",):
        records = load_split(cfg.data, split, tokenizer)
        splits[split], _, result.data[split] = encode_all(records, tokenizer, cfg.data.max_length, cfg.data.overlong)
    for split, counts in result.data.items():
        said = []
        if counts.get("skipped") or counts.get("truncated"):
            said.append(f"{counts['skipped']} skipped and {counts['truncated']} truncated: prompts of at least "
                        f"data.max_length={cfg.data.max_length} tokens (data.overlong={cfg.data.overlong})")
        if counts.get("cut"):
            said.append(f"{counts['cut']} completions cut to fit data.max_length={cfg.data.max_length}")
        if said:
            console.print(f"[yellow]data.{split}: of {counts['records']} records, {'; '.join(said)}[/yellow]")
    val_records, test_records = splits["validation"], splits.get("test", [])
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    student = engine.wrap_student(student, optimizer)
    if cfg.teacher.student_base:
        teacher = AdaptersDisabled(student)
    scheduler = cosine_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    bf16, vocab = tc.precision == "bf16", len(tokenizer)
    for s in range(tc.steps):  # each step must have a source to draw from
        if not any(weights_at(cfg.sources.weights, s, tc.steps).values()):
            raise DistillError(f"sources.weights: every weight is 0 at step {s} of trainer.steps={tc.steps}")
    k = cfg.sources.skd.k
    if cfg.sources.skd.top_p is None and max(k.start, k.end or 0) > vocab:
        raise DistillError(f"sources.skd.k must lie in [1, {vocab}] (the vocabulary); got {max(k.start, k.end or 0):g}")
    fused = cfg.loss.fused
    not_fused = fused_loss_problem(student, teacher, vocab, device) if fused else None
    if not_fused:
        console.print(f"[yellow]full logits instead of the fused loss: {not_fused}[/yellow]")
        fused = False
    eval_args = dict(batch_size=tc.eval_batch_size, max_length=cfg.data.max_length)
    gen_args = dict(metric=cfg.data.metric, max_new_tokens=tc.max_new_tokens, **eval_args)

    def measure(progress: Progress, what: str, model: PreTrainedModel, records: list, with_teacher: bool,
                generate: bool = True) -> dict[str, float]:
        """Losses (and, with ``generate``, generation metrics) of ``model`` on ``records``, with a
        progress row. Every rank measures all the records (in step: sharded forwards are collective)."""
        passes = 1 + (generate and needs_generation(records, cfg.data.metric))
        with showing(progress, what, passes * batch_count(records, tc.eval_batch_size)) as advance:
            row = reference_losses(model, teacher if with_teacher else None, tokenizer, records, cfg.loss,
                                   fused=fused, on_batch=advance, **eval_args)
            if generate:
                with engine.generation(model) as synced:
                    row.update(evaluate(model, tokenizer, records, on_batch=advance, synced=synced, **gen_args))
        return row

    stops = stop_ids(tokenizer)  # where a response ends: sampling, the export's generation config
    step, tokens_seen = 0, 0
    metrics = None
    try:
        with progress_display(tc.progress and engine.is_main) as progress:
            state = engine.load_checkpoint(run_dir, student) if cfg.resume is not None else None
            if state is not None:
                step = state["step"]
                if step >= tc.steps and (run_dir / "report.json").exists():
                    raise DistillError(f"resume: {run_dir} finished at step {step} (trainer.steps={tc.steps}); "
                                       f"to train further, raise it: distill resume={run_dir} trainer.steps=N")
                scheduler.load_state_dict(state["scheduler"])
                if tc.steps > scheduler.lr_lambdas[0].total:  # extended: the rate goes on from where it stands
                    scheduler.lr_lambdas[0].extend(tc.steps, step)
                    if engine.is_main:
                        _save_config(run_dir, cfg)  # a later resume continues the extended run
                data.load_state_dict(state["data"])
                tokens_seen, result.test = state["tokens_seen"], state["test"]
                result.validation = state.get("validation", {})
                console.print(f"resuming {run_dir} from step {step} of {tc.steps}")
            else:
                if cfg.resume is not None:
                    console.print(f"no checkpoint in {run_dir}: starting from step 0")
                if engine.is_main:
                    _save_config(run_dir, cfg)
                # The "before" point: the teacher's own cross-entropy and the student before training.
                if val_records:
                    if teacher is not None:
                        result.validation["teacher"] = measure(progress, "validation: teacher", teacher, val_records,
                                                               with_teacher=False, generate=False)
                    result.validation["student before"] = measure(progress, "validation: student", student,
                                                                  val_records, with_teacher=True)
                if test_records:
                    if teacher is not None:
                        result.test["teacher"] = measure(progress, "test: teacher", teacher, test_records,
                                                         with_teacher=False)
                    result.test["student before"] = measure(progress, "test: student", student, test_records,
                                                            with_teacher=True)
            console.print(
                f"student: {count_parameters(params):,} trainable of {count_parameters(student.parameters()):,} "
                "parameters" + (f"; teacher: {count_parameters(teacher.parameters()):,}" if teacher is not None else "")
                + f"; {len(data.examples) or 'streamed'} training examples; objective {result.objective}; "
                f"device {device}" + (f"; {engine.world} ranks, ZeRO stage {engine.stage}" if engine.uses_deepspeed
                                      else "")
            )
            if engine.is_main:
                metrics = MetricsLog(run_dir, resume_step=step if cfg.resume is not None else None)
                if state is None and result.validation:
                    before = dict(result.validation["student before"])
                    if "teacher" in result.validation:
                        before["teacher_ce"] = result.validation["teacher"]["ce"]
                    metrics.log("validation", 0, before)
            _loop(cfg, run_dir, progress, engine, student, teacher, data, scheduler,
                  metrics, result, params, step, tokens_seen, bf16=bf16, vocab=vocab, fused=fused, device=device,
                  stops=stops,
                  validate_now=lambda: measure(progress, "validation", student, val_records, with_teacher=True)
                  if val_records else None)
            if metrics is not None:
                metrics.close()  # flushed for the plot
            _export(engine, student, result.model_dir, tokenizer, stops)
            if engine.is_main:
                plot_curves(metrics.path, run_dir / "curves.png")
            if test_records:
                result.test["student after"] = measure(progress, "test: student", student, test_records,
                                                       with_teacher=True)
            if engine.uses_deepspeed:
                result.sharding = _sharding_report(engine, student, teacher)
        # After the training display: the draft report shows its own progress rows, and times code.
        if cfg.draft.enabled and engine.is_main:  # one process measures the exported draft
            result.draft = _draft_report(cfg, result, device)
        result.memory = _memory_report(engine, plan)  # the draft report's peak included
    finally:
        if metrics is not None:
            metrics.close()
    if engine.is_main:
        write_report(result)
    engine.barrier()
    return result


def _export(engine: Engine, student: PreTrainedModel, out: Path, tokenizer: Tokenizer, stops: list[int]) -> None:
    """The student in Hugging Face format at ``out`` (written atomically by rank 0): LoRA merged,
    gathered one module at a time from every rank where it is sharded."""
    state = export_state_dict(student, keep=engine.is_main)  # collective under ZeRO-3
    if engine.is_main:
        export_model(out, lambda d: (save_model(student, d, stops if len(stops) > 1 else None, state_dict=state),
                                     tokenizer.save_pretrained(d)))
    engine.barrier()


def _memory_report(engine: Engine, plan) -> dict:
    """Planned and measured peak memory per rank (the most of any rank): on a GPU torch's allocator
    peak (plus the plan's CUDA-context allowance), on the CPU the process's peak resident memory."""
    if engine.device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(engine.device) + (plan.chosen.runtime if plan else 0)
        what = "max_memory_allocated + CUDA context allowance"
    else:
        measured, what = peak_rss_bytes(), "peak resident memory (VmHWM)"
    out = {"measured_peak_bytes": max(engine.all_gather(measured)), "measured": what}
    if plan is not None:
        out |= {"planned_peak_bytes": plan.chosen.peak, "placement": plan.chosen.name,
                "error": out["measured_peak_bytes"] / plan.chosen.peak - 1}
    return out


def _sharding_report(engine: Engine, student: PreTrainedModel, teacher: PreTrainedModel | None) -> dict:
    """Ranks, stage, and the parameter elements each rank holds of each model and its peak memory."""
    mine = {"student": engine.held_parameters(student), "peak_rss_bytes": peak_rss_bytes()}
    if teacher is not None:
        mine["teacher"] = engine.held_parameters(teacher)
    if device_peak := (torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None):
        mine["peak_device_bytes"] = device_peak
    return {"world_size": engine.world, "stage": engine.stage,
            "shard_teacher": engine.placement.sharded("teacher"),
            "student_parameters": count_parameters(student.parameters()),
            "teacher_parameters": count_parameters(teacher.parameters()) if teacher is not None else 0,
            "ranks": engine.all_gather(mine)}


def _loop(cfg: DistillConfig, run_dir: Path, progress: Progress, engine: Engine, student: PreTrainedModel,
          teacher: PreTrainedModel | None, data: TrainData, scheduler, metrics: MetricsLog | None,
          result: RunResult, params: list, step: int, tokens_seen: int, *, bf16: bool, vocab: int, fused: bool,
          device: torch.device, stops: list[int], validate_now: Callable[[], dict[str, float] | None]) -> None:
    """The optimizer steps from ``step`` to ``trainer.steps``, with logging, validation and checkpoints.
    Each step draws its source (``sources.weights``); ``teacher`` generates for the teacher and SKD
    sources and is the loss's teacher unless the loss is SFT's cross-entropy. On several ranks each
    computes its share of every micro-batch (``engine``); all of them log and save through rank 0."""
    tc = cfg.trainer
    loss_teacher = teacher if cfg.loss.kind != "ce" else None
    pad_id = data.tokenizer.pad_token_id
    teacher_cache = None
    weight = cfg.sources.weights.teacher
    if max(weight.start, weight.end or 0.0) > 0 and cfg.sources.teacher_cache != "none":
        teacher_cache = TeacherCache(cfg.sources.teacher_cache or default_root(), cfg.teacher.path,
                                     cfg.sources.teacher, stops=stops, vocab=vocab, dtype=cfg.teacher.dtype)
    last_saved = step if step > 0 else None  # a resumed run starts at its checkpoint

    def checkpoint() -> None:
        nonlocal last_saved
        state = {
            "step": step, "tokens_seen": tokens_seen, "scheduler": scheduler.state_dict(), "data": data.state_dict(),
            "test": result.test, "validation": result.validation,
        }
        engine.save_checkpoint(run_dir, step, student, state, tc.keep_checkpoints)
        last_saved = step
        if teacher_cache is not None:
            for entries in engine.all_gather(teacher_cache.entries)[1:]:  # every rank's responses, one file
                teacher_cache.merge(entries)
            if engine.is_main:
                teacher_cache.save()

    student.train()
    t_start, tokens_window, loss_window = time.perf_counter(), 0, []
    drawn: dict[str, int] = {}
    generation = SourceStats()
    warned: set[str] = set()  # kinds of generation problems already reported
    task = progress.add_task("train", total=tc.steps, completed=step, loss=math.nan, tps=0.0)
    try:
        with _StopAtStepBoundary() as stop:
            while step < tc.steps:
                source = draw_source(cfg.sources.weights, tc.seed, step, tc.steps)
                drawn[source] = drawn.get(source, 0) + 1
                skd_k = round(value_at(cfg.sources.skd.k, step, tc.steps))
                micro, micro_hidden = [], []
                generating = {"student": (student,), "teacher": (teacher,), "skd": (student, teacher)}.get(source, ())
                for m in range(tc.grad_accum):
                    # Each rank generates for its share of the prompts, with its own seed.
                    with engine.generation(*generating) as synced:
                        pairs, stats, hidden = source_pairs(
                            source, engine.shard(data.next_pairs(tc.batch_size)), cfg.sources, student=student,
                            teacher=teacher, skd_k=skd_k, pad_id=pad_id, stops=stops, max_length=cfg.data.max_length,
                            vocab=vocab, seed=step_seed(tc.seed, step, m * engine.world + engine.rank),
                            teacher_cache=teacher_cache,
                            keep_teacher_hidden=loss_teacher is not None and fused,  # plain LM heads only
                            synced=synced,
                        )
                    generation.add(stats)
                    t_start += stats.seconds  # tokens/s counts training time only
                    lengths = [len(p) + len(r) for p, r in pairs]
                    groups = length_buckets(lengths, tc.length_buckets)
                    # Sharded forwards and backwards are collective: every rank runs as many.
                    groups = split_groups(groups, lengths, engine.all_max(len(groups)))
                    for group in groups:
                        part = [pairs[i] for i in group]
                        micro.append(collate(part, pad_id))
                        micro_hidden.append(None if hidden is None else
                                            aligned_hidden(part, [hidden[i] for i in group], micro[-1]))
                # The step's denominator: counted tokens of all its micro-batches on every rank (after
                # generation), known before any backward. DeepSpeed averages gradients over the ranks,
                # so each rank's sum is scaled by world / count.
                n_counted = engine.all_sum(sum(count_tokens(b.labels[:, 1:]) for b in micro))
                scale = engine.world / max(n_counted, 1)
                loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per micro-batch
                for i, (b, h_t) in enumerate(zip(micro, micro_hidden, strict=True)):
                    engine.start_forward()
                    loss = batch_loss(cfg.loss, student, loss_teacher, b.to(device), bf16=bf16, vocab=vocab,
                                      fused=fused, teacher_hidden=h_t).loss
                    engine.backward(loss * scale, last=i == len(micro) - 1)
                    loss_sum += loss.detach()
                    tokens_window += b.num_tokens
                lr = scheduler.get_last_lr()[0]  # the rate of this step's update (logged with it)
                grad_norm = engine.step(params, tc.max_grad_norm)
                scheduler.step()
                step += 1
                tokens_seen += n_counted
                loss_window.append(engine.all_sum(loss_sum) / max(n_counted, 1))

                if step % tc.log_every == 0 or step == tc.steps:
                    elapsed = time.perf_counter() - t_start
                    tps = engine.all_sum(tokens_window) / max(elapsed, 1e-9)
                    mean_loss = float(torch.stack(loss_window).mean())
                    window_steps, gen = sum(drawn.values()), generation.metrics()
                    if metrics is not None:
                        metrics.log("train", step, {
                            "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                            "response_tokens": tokens_seen, "tokens_per_s": tps, "train_seconds": elapsed,
                            **{f"source_{n}": drawn.get(n, 0) / window_steps for n in SOURCES}, **gen,
                        })
                    # The sources of the interval, what their generation cost and gave.
                    note = f"{'+'.join(sorted(drawn))}: {generation.note()}" if gen else ""
                    progress.update(task, loss=mean_loss, tps=tps, note=note)
                    for kind, problem in generation.problems(cfg.data.max_length, stops).items():
                        if kind not in warned:
                            warned.add(kind)
                            progress.console.print(f"[yellow]warning: step {step}: {problem}[/yellow]")
                    t_start, tokens_window, loss_window = time.perf_counter(), 0, []
                    drawn, generation = {}, SourceStats()
                progress.update(task, completed=step)

                if step % tc.eval_every == 0 or step == tc.steps:
                    paused = time.perf_counter()
                    val = validate_now()
                    if val is not None:
                        if metrics is not None:
                            metrics.log("validation", step, val)
                        result.validation["student after"] = val
                        progress.console.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
                    t_start += time.perf_counter() - paused  # tokens/s counts training time only
                # Ctrl-C reaches the ranks at different moments: they stop at the same step boundary.
                stopping = bool(engine.all_max(int(stop.requested)))
                if step % tc.save_every == 0 or step == tc.steps or stopping:
                    checkpoint()
                if stopping and step < tc.steps:
                    raise DistillError(
                        f"interrupted at step {step}; checkpoint saved. Continue with: distill resume={run_dir}"
                    )
    except KeyboardInterrupt:
        if last_saved is None:
            raise DistillError(f"stopped at once during step {step + 1}, before the first checkpoint") from None
        raise DistillError(
            f"stopped at once during step {step + 1}; the last checkpoint is step {last_saved}. "
            f"Continue from it with: distill resume={run_dir}"
        ) from None
