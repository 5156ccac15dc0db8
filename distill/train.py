"""A run from start to end: ``train`` builds the run's state (plan, models, data, optimizer,
sources), measures the "before" rows, runs ``distill.loop.run``, exports the student and writes
the report (test rows, the draft report, memory and sharding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel, set_seed
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.asynchronous.pipeline import Pipeline
from distill.checkpoint import atomic_write_text, export_model
from distill.config import DistillConfig, check_vocabulary, member_configs, sources_in_use, validate
from distill.data import TrainData, builtin_records, encode_split, stop_ids
from distill.distributed import Engine
from distill.errors import DistillError
from distill.fingerprint import default_root
from distill.loop import RunState, measure, run
from distill.memory import fmt, peak_rss_bytes
from distill.models import (
    AdaptersDisabled,
    check_vocab_rows,
    count_parameters,
    enable_activation_checkpointing,
    export_state_dict,
    load_model,
    load_tokenizer,
    match_teacher_tokenizer,
    resolve_device,
    save_model,
)
from distill.objective import fused_loss_problem, objective_name
from distill.offline.teacher import CachedTeacher, cached_teacher
from distill.plan import RunPlan
from distill.plan import check as check_plan
from distill.progress import console, progress_display
from distill.remote.teacher import remote_teacher
from distill.report import write_report
from distill.rewards import Rewards, RewardTerm
from distill.schedule import cosine_scheduler
from distill.sources import check as check_sources
from distill.sources.base import SourceContext
from distill.sources.teacher_cache import TeacherCache
from distill.teacher import LocalTeacher, Teacher, Teachers
from distill.tokenizer import train_tokenizer
from distill.tracking import MetricsLog, plot_curves


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    steps: int
    # What was minimised, in words (e.g. "fkl", or "0.7 * fkl + 0.3 * ce").
    objective: str = ""
    # How generations were scored, in words (greedy, and eval.samples).
    evaluation: str = ""
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
    # Generation ahead of the trainer (sources.asynchronous): staleness and workers.
    asynchronous: dict = field(default_factory=dict)


def train(cfg: DistillConfig, run_dir: Path, *, steps: int | None = None) -> RunResult:
    """Run the recipe described by ``cfg``, writing everything under ``run_dir``.

    With ``cfg.resume`` the run's saved config continues from its latest checkpoint (on the device
    and with the progress display asked for now); ``steps`` then raises its ``trainer.steps``, so a
    finished run can be trained further (the learning rate goes on from where it stands, decaying
    to its floor at the new end: ``CosineSchedule.extend``)."""
    if cfg.resume is not None:
        cfg, run_dir = _saved_config(Path(cfg.resume), cfg, steps), Path(cfg.resume)
    validate(cfg)
    check_sources(cfg)
    engine = Engine(cfg, resolve_device(cfg.trainer.device))
    # Every rank writes into rank 0's run directory (Hydra's time-stamped one may differ by a second).
    run_dir = Path(engine.broadcast(str(run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    console.quiet = not engine.is_main  # one rank reports
    plan = _plan(cfg, engine)
    state, result = _build(cfg, run_dir, engine)
    try:
        with progress_display(cfg.trainer.progress and engine.is_main) as progress:
            state.progress = progress
            _start(state, result)
            run(state)
            _finish(state, result)
        # After the training display: the draft report shows its own progress rows, and times code.
        if cfg.draft.enabled and engine.is_main:  # one process measures the exported draft
            result.draft = _draft_report(cfg, result, engine.device)
        result.memory = _memory_report(engine, plan)  # the draft report's peak included
    finally:
        if state.metrics is not None:
            state.metrics.close()
        if state.ahead is not None:
            state.ahead.close()
    if engine.is_main:
        write_report(result)
    engine.barrier()
    return result


def _plan(cfg: DistillConfig, engine: Engine) -> RunPlan | None:
    """The memory plan, from the configs alone: a run that cannot fit stops before loading anything.
    Rank 0 plans for all (ranks must agree on what they gather for generation)."""
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
    return plan


def _build(cfg: DistillConfig, run_dir: Path, engine: Engine) -> tuple[RunState, RunResult]:
    """The run's state: models and tokenizers (checked before any compute), data, optimizer,
    schedule and sources; and its result, to be filled in."""
    tc = cfg.trainer
    rewards = Rewards(cfg.reward.fn) if cfg.reward.alpha > 0 else None  # the user's function, before any model
    tokenizer, teacher, student = _models(cfg, run_dir, engine)
    result = RunResult(run_dir, run_dir / "model", tc.steps, objective=objective_name(cfg.loss, cfg.reward),
                       evaluation=evaluation_name(cfg))
    data = TrainData(cfg.data, tokenizer, tc.seed)
    result.data["train"] = data.counts
    splits, pairs = _splits(cfg, tokenizer, result)
    for t in each_teacher(teacher).values():
        if isinstance(t, CachedTeacher):
            t.check_covers({"train": data.examples, **pairs})
    if isinstance(teacher, Teachers):  # combine=route: where each prompt goes
        for split, records in (("train", data.records), *((s, splits[s]) for s in pairs)):
            teacher.learn(records, data.examples if split == "train" else pairs[split])
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    student = engine.wrap_student(student, optimizer)
    if cfg.teacher.student_base:  # the student's own weights without its adapters
        teacher = LocalTeacher(AdaptersDisabled(student))
    scheduler = cosine_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    vocab = len(tokenizer)
    check_vocabulary(cfg, vocab)
    fused = cfg.loss.fused
    not_fused = fused_loss_problem(student, teacher, vocab, engine.device) if fused else None
    if not_fused:
        console.print(f"[yellow]full logits instead of the fused loss: {not_fused}[/yellow]")
        fused = False
    stops = stop_ids(tokenizer)  # where a response ends: sampling, the export's generation config
    cache = None
    if "teacher" in sources_in_use(cfg.sources.weights) and cfg.sources.teacher_cache != "none":
        cache = TeacherCache(cfg.sources.teacher_cache or default_root(), cfg.teacher.path, cfg.sources.teacher,
                             stops=stops, vocab=vocab, dtype=cfg.teacher.dtype)
    sources = SourceContext(cfg.sources, student, teacher, pad_id=tokenizer.pad_token_id, stops=stops,
                            max_length=cfg.data.max_length, vocab=vocab, total_steps=tc.steps, teacher_cache=cache,
                            keep_teacher_hidden=teacher is not None and cfg.loss.kind != "ce" and fused,
                            reward=None if rewards is None else RewardTerm(
                                rewards, cfg.reward.alpha, cfg.reward.group,
                                lambda ids: tokenizer.decode(ids, skip_special_tokens=True)))
    state = RunState(cfg, run_dir, engine, tokenizer, student, teacher, params, optimizer, scheduler, data, sources,
                     fused, validation_records=splits["validation"], test_records=splits.get("test", []))
    if cfg.sources.asynchronous.worker_count:
        if engine.world > 1:
            raise DistillError("sources.asynchronous.workers: generation workers serve one process's student for "
                               f"now; this run has {engine.world} ranks")
        state.ahead = Pipeline(cfg, sources, data, engine.device)
        result.asynchronous = {"staleness": cfg.sources.asynchronous.staleness,
                               "workers": cfg.sources.asynchronous.worker_count}
    return state, result


def _models(cfg: DistillConfig, run_dir: Path, engine: Engine
            ) -> tuple[Tokenizer, Teacher | Teachers | None, PreTrainedModel]:
    """The student's tokenizer, the teacher or teachers (``_teacher``) and the student, with their
    tokenizers and vocabularies checked against each other."""
    tokenizer, tok_path = _tokenizer_for(cfg, run_dir, engine)
    device = engine.device
    teacher: Teacher | Teachers | None
    if members := member_configs(cfg):
        each = {}
        for name, view in members.items():
            try:
                each[name] = _teacher(view, tokenizer, tok_path, engine)
            except DistillError as e:
                raise DistillError(f"teachers.{name}: {e}") from None
        routed = cfg.combine == "route"
        teacher = Teachers(each, weights=None if routed else {n: v.teacher.weight for n, v in members.items()},
                           routes={task: n for n, v in members.items() for task in v.teacher.routes} if routed
                           else None, in_step=engine.world > 1 and engine.placement.sharded("teacher"))
    else:
        teacher = _teacher(cfg, tokenizer, tok_path, engine)
    # Seed right before the student: loading a teacher may consume random numbers, and a student
    # built from scratch must get the same initial weights with or without one.
    set_seed(cfg.trainer.seed)
    with engine.loading("student"):
        student = load_model(cfg.student, "student", device, tokenizer, seed=cfg.trainer.seed)
    if cfg.trainer.activation_checkpointing:
        enable_activation_checkpointing(student)
    check_vocab_rows(student, tokenizer, f"student {cfg.student.path or 'from arch'}")
    for warning in _warnings(cfg, student, device, engine.uses_deepspeed):
        console.print(f"[yellow]warning: {warning}[/yellow]")
    return tokenizer, teacher, student


def _teacher(cfg: DistillConfig, tokenizer: Tokenizer, tok_path: str, engine: Engine) -> Teacher | None:
    """``cfg.teacher``: loaded here (unless it is the student's base: ``_build``), read from its
    offline cache, or served on Ray; its tokenizer checked against the student's."""
    # The chat template the data is rendered with is the teacher's too (the student's tokenizer
    # renders the data and is saved with the distilled model).
    match_teacher_tokenizer(cfg.teacher, tokenizer, tok_path, cfg.data.chat_template)
    teacher, device = None, engine.device
    # The teacher's body, unless it is the student's (student_base), served elsewhere (remote), or an
    # offline cache stands in for it.
    if cfg.teacher.path and not cfg.teacher.student_base and not cfg.teacher.remote and (
            not cfg.teacher.cache or cfg.teacher.live):
        with engine.loading("teacher", cfg.teacher.dtype):
            model = load_model(cfg.teacher, "teacher", device)
        check_vocab_rows(model, tokenizer, f"teacher {cfg.teacher.path}")
        teacher = LocalTeacher(engine.wrap_teacher(model, cfg.teacher.dtype), name=cfg.teacher.path)
    if cfg.teacher.cache:
        teacher = cached_teacher(cfg, tokenizer, device, live=teacher)
    if cfg.teacher.remote:
        teacher = remote_teacher(cfg, tokenizer, device, rank=engine.rank)
    return teacher


def each_teacher(teacher: Teacher | Teachers | None) -> dict[str, Teacher]:
    """The run's teachers by name ("" for a single one)."""
    if teacher is None:
        return {}
    return dict(teacher.members) if isinstance(teacher, Teachers) else {"": teacher}


def _splits(cfg: DistillConfig, tokenizer: Tokenizer, result: RunResult) -> tuple[dict[str, list], dict[str, list]]:
    """The validation (and with final_eval, test) records, and their token ids; what data.overlong
    did is said."""
    splits: dict[str, list] = {}
    pairs: dict[str, list] = {}
    for split in ("validation", "test") if cfg.final_eval else ("validation",):
        splits[split], pairs[split], result.data[split] = encode_split(cfg.data, split, tokenizer)
    for split, counts in result.data.items():
        said = []
        if counts.get("skipped") or counts.get("truncated"):
            said.append(f"{counts['skipped']} skipped and {counts['truncated']} truncated: prompts of at least "
                        f"data.max_length={cfg.data.max_length} tokens (data.overlong={cfg.data.overlong})")
        if counts.get("cut"):
            said.append(f"{counts['cut']} completions cut to fit data.max_length={cfg.data.max_length}")
        if said:
            console.print(f"[yellow]data.{split}: of {counts['records']} records, {'; '.join(said)}[/yellow]")
    return splits, pairs


def _start(state: RunState, result: RunResult) -> None:
    """Resume from the newest checkpoint, or start: save the config and measure the "before" rows
    (the teacher's own and the student's before training). Opens the metrics log."""
    cfg, engine, run_dir = state.cfg, state.engine, state.run_dir
    saved = engine.load_checkpoint(run_dir, state.student) if cfg.resume is not None else None
    if saved is not None:
        _resume(state, saved)
        if state.ahead is not None:
            state.ahead.start(state.step, saved.get("ahead"))
    else:
        if cfg.resume is not None:
            console.print(f"no checkpoint in {run_dir}: starting from step 0")
        if engine.is_main:
            _save_config(run_dir, cfg)
        _before(state)
    held = {n or "teacher": t.module for n, t in each_teacher(state.teacher).items() if t.module is not None}
    console.print(
        f"student: {count_parameters(state.params):,} trainable of {count_parameters(state.student.parameters()):,} "
        "parameters" + "".join(f"; {n}: {count_parameters(m.parameters()):,}" for n, m in held.items())
        + f"; {len(state.data.examples) or 'streamed'} training examples; objective {result.objective}; "
        f"device {engine.device}" + (f"; {engine.world} ranks, ZeRO stage {engine.stage}" if engine.uses_deepspeed
                                     else "")
    )
    if engine.is_main:
        state.metrics = MetricsLog(run_dir, resume_step=state.step if cfg.resume is not None else None)
        if saved is None and state.validation:
            before = dict(state.validation["student before"])
            for row, values in state.validation.items():  # "teacher", or "teacher NAME" of several
                if row.startswith("teacher"):
                    before[row.replace(" ", "_") + "_ce" if " " in row else "teacher_ce"] = values["ce"]
            state.metrics.log("validation", 0, before)
    if state.ahead is not None and saved is None:
        state.ahead.start(state.step)
    result.validation, result.test = state.validation, state.test  # the loop fills them in
    state.last_saved = state.step if state.step > 0 else None  # a resumed run starts at its checkpoint


def _resume(state: RunState, saved: dict) -> None:
    """Where the checkpoint ``saved`` left the run: step, schedule (extended to a raised
    trainer.steps), data order and the rows measured so far."""
    cfg, tc, run_dir = state.cfg, state.cfg.trainer, state.run_dir
    state.step = saved["step"]
    if state.step >= tc.steps and (run_dir / "report.json").exists():
        raise DistillError(f"resume: {run_dir} finished at step {state.step} (trainer.steps={tc.steps}); "
                           f"to train further, raise it: distill resume={run_dir} trainer.steps=N")
    state.scheduler.load_state_dict(saved["scheduler"])
    if tc.steps > state.scheduler.lr_lambdas[0].total:  # extended: the rate goes on from where it stands
        state.scheduler.lr_lambdas[0].extend(tc.steps, state.step)
        if state.engine.is_main:
            _save_config(run_dir, cfg)  # a later resume continues the extended run
    state.data.load_state_dict(saved["data"])
    state.tokens_seen, state.test = saved["tokens_seen"], saved["test"]
    state.validation = saved.get("validation", {})
    console.print(f"resuming {run_dir} from step {state.step} of {tc.steps}")


def _before(state: RunState) -> None:
    """The "before" point: the teacher's own cross-entropy and the student before training."""
    for split, records in (("validation", state.validation_records), ("test", state.test_records)):
        rows = getattr(state, split)
        if not records:
            continue
        for name, teacher in each_teacher(state.teacher).items():
            if teacher.module is None:  # read from a cache or served: its own rows are not measured here
                continue
            row = f"teacher {name}".strip()  # its own losses; its generations are scored on the test split only
            rows[row] = measure(state, split, row, teacher.module, records, with_teacher=False,
                                generate=split == "test")
        rows["student before"] = measure(state, split, "student", state.student, records, with_teacher=True)


def _finish(state: RunState, result: RunResult) -> None:
    """After the last step: the curves, the exported student, its test row, and the sharding."""
    engine = state.engine
    if state.metrics is not None:
        state.metrics.close()  # flushed for the plot
    _export(engine, state.student, result.model_dir, state.tokenizer, state.sources.stops)
    if engine.is_main:
        plot_curves(state.metrics.path, state.run_dir / "curves.png")
    if state.test_records:
        state.test["student after"] = measure(state, "test", "student", state.student, state.test_records,
                                              with_teacher=True)
    if engine.uses_deepspeed:
        result.sharding = _sharding_report(engine, state.student, state.teacher)


def evaluation_name(cfg: DistillConfig) -> str:
    """How the run scores generations, in words, for the report."""
    e = cfg.eval
    if not e.samples:
        return "greedy decoding"
    n = e.samples
    return (f"greedy decoding, and {n} samples per prompt at temperature {e.temperature:g}, top-p {e.top_p:g}: "
            f"mean@{n} (the samples' mean score), pass@{n} (a prompt with a right sample), distinct@{n} (distinct "
            "right answers per prompt)")


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


def _export(engine: Engine, student: PreTrainedModel, out: Path, tokenizer: Tokenizer, stops: list[int]) -> None:
    """The student in Hugging Face format at ``out`` (written atomically by rank 0): LoRA merged,
    gathered one module at a time from every rank where it is sharded."""
    state = export_state_dict(student, keep=engine.is_main)  # collective under ZeRO-3
    if engine.is_main:
        export_model(out, lambda d: (save_model(student, d, stops if len(stops) > 1 else None, state_dict=state),
                                     tokenizer.save_pretrained(d)))
    engine.barrier()


def _memory_report(engine: Engine, plan: RunPlan | None) -> dict:
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


def _sharding_report(engine: Engine, student: PreTrainedModel, teacher: Teacher | None) -> dict:
    """Ranks, stage, and the parameter elements each rank holds of each model and its peak memory."""
    teacher = teacher.module if teacher is not None else None
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
