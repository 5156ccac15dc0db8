"""The training loop: supervised KD (teacher logits on dataset responses) and SFT, in one place.

One optimizer step draws ``grad_accum`` micro-batches, counts their response tokens first, and
scales each micro-batch's summed loss by that global count, so the step's loss is the mean over
every counted token however the batch is split.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from distill.checkpoint import export_model, load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from distill.config import DistillConfig, LossConfig, validate
from distill.data import Batch, TrainData, builtin_records, load_split
from distill.errors import DistillError
from distill.evaluation import evaluate, reference_losses
from distill.losses import count_tokens, cross_entropy, divergence, fused_linear_divergence
from distill.models import (
    check_same_tokenizer,
    check_vocab_rows,
    count_parameters,
    fused_head_problem,
    head_inputs,
    lm_logits,
    load_model,
    load_tokenizer,
    load_trainable_state,
    resolve_device,
    trainable_state,
    unwrap,
)
from distill.tokenizer import train_tokenizer
from distill.tracking import MetricsLog, plot_curves

log = logging.getLogger(__name__)
console = Console(stderr=True)


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    steps: int
    # Test-split metrics by row name: "teacher", "student before", "student after".
    test: dict[str, dict[str, float]] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer_for(cfg: DistillConfig, run_dir: Path) -> tuple[Tokenizer, str]:
    """The student's tokenizer; a scratch model without one gets a tokenizer trained on the task corpus."""
    s = cfg.student
    if s.tokenizer or s.path:
        path = s.tokenizer or s.path
        return load_tokenizer(path, "student"), str(path)
    out = run_dir / "tokenizer"
    if not (out / "tokenizer_config.json").exists():
        # Train and validation prompts of the built-in tasks; the test split stays unseen.
        corpus = builtin_records(cfg.data, "train", 8000) + builtin_records(cfg.data, "validation", 400)
        train_tokenizer([t for r in corpus for t in (r.prompt, r.completion)], out, s.arch.tokenizer_vocab_size)
    return load_tokenizer(out, "student"), str(out)


def _saved_config(run_dir: Path, current: DistillConfig) -> DistillConfig:
    """The config a run was started with: a resumed run continues exactly that recipe, on the
    device and with the progress display asked for now."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DistillError(f"resume: {run_dir} is not a distill run directory (no config.yaml)")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistillConfig), OmegaConf.load(path)))
    except Exception as e:  # a hand-edited or foreign file
        raise DistillError(f"resume: cannot read {path}: {e}") from None
    cfg.resume = str(run_dir)
    cfg.trainer.device, cfg.trainer.progress = current.trainer.device, current.trainer.progress
    return cfg


def step_loss(
    loss: LossConfig,
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    batch: Batch,
    *,
    bf16: bool,
    vocab: int,
    fused: bool,
) -> torch.Tensor:
    """Summed loss of one micro-batch over its counted (response) tokens. ``fused``: the LM head
    and the divergence in one pass over token chunks (see ``fused_loss_problem``)."""
    labels = batch.labels[:, 1:]  # next-token targets: position i predicts token i + 1
    ids, mask = batch.input_ids, batch.attention_mask
    if fused:
        h_s, w_s, b_s = head_inputs(student, ids, mask, bf16, vocab)
        with torch.no_grad():
            h_t, w_t, b_t = head_inputs(teacher, ids, mask, bf16, vocab)
        return fused_linear_divergence(
            h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, reduction="sum",
            chunk_size=loss.chunk_size, backend=loss.backend, **loss.divergence_kwargs(),
        )
    s = lm_logits(student, ids, mask, bf16, vocab)
    if loss.kind == "ce":
        return cross_entropy(s, labels, reduction="sum")
    with torch.no_grad():
        t = lm_logits(teacher, ids, mask, bf16, vocab)
    return divergence(s, t, labels, reduction="sum", backend=loss.backend, **loss.divergence_kwargs())


def fused_loss_problem(
    student: PreTrainedModel, teacher: PreTrainedModel, vocab: int, device: torch.device
) -> str | None:
    """Why the fused loss cannot stand in for full logits with these models (None when it can)."""
    probe = torch.arange(min(vocab, 16), device=device)[None]  # any valid ids will do
    for role, model in (("student", student), ("teacher", teacher)):
        problem = fused_head_problem(model, probe, torch.ones_like(probe))
        if problem:
            return f"{role}: {problem}"
    return None


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


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]distill[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def train(cfg: DistillConfig, run_dir: Path) -> RunResult:
    """Run the recipe described by ``cfg``, writing everything under ``run_dir``."""
    if cfg.resume is not None:
        cfg, run_dir = _saved_config(Path(cfg.resume), cfg), Path(cfg.resume)
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.trainer
    device = resolve_device(tc.device)

    # Models and tokenizers, checked before any compute.
    tokenizer, tok_path = _tokenizer_for(cfg, run_dir)
    teacher = None
    if cfg.teacher.path:
        teacher_tok = load_tokenizer(cfg.teacher.tokenizer or cfg.teacher.path, "teacher")
        check_same_tokenizer(teacher_tok, tokenizer, cfg.teacher.tokenizer or cfg.teacher.path, tok_path)
        teacher = load_model(cfg.teacher, "teacher", device)
        check_vocab_rows(teacher, tokenizer, f"teacher {cfg.teacher.path}")
    # Seed right before the student: loading a teacher may consume random numbers, and a student
    # built from scratch must get the same initial weights with or without one.
    seed_everything(tc.seed)
    student = load_model(cfg.student, "student", device, tokenizer)
    check_vocab_rows(student, tokenizer, f"student {cfg.student.path or 'from arch'}")
    if cfg.loss.kind == "ce" and teacher is not None:
        log.info("loss.kind=ce: the teacher is only evaluated, not used for training")

    data = TrainData(cfg.data, tokenizer, tc.seed)
    val_records = load_split(cfg.data, "validation", tokenizer)
    test_records = load_split(cfg.data, "test", tokenizer) if cfg.final_eval else []
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, tc.warmup_steps, tc.steps, min_lr_rate=tc.min_lr_ratio
    )
    gen_args = dict(max_new_tokens=tc.max_new_tokens, batch_size=tc.eval_batch_size, max_length=cfg.data.max_length)

    step, tokens_seen = 0, 0
    result = RunResult(run_dir, run_dir / "model", tc.steps)
    resumed = load_latest_checkpoint(run_dir) if cfg.resume is not None else None
    if resumed is not None:
        weights, state = resumed
        load_trainable_state(student, weights, f"resume {run_dir}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, tokens_seen, result.test = state["step"], state["tokens_seen"], state["test"]
        console.print(f"resuming {run_dir} from step {step}")
    else:
        if cfg.resume is not None:
            console.print(f"no checkpoint in {run_dir}: starting from step 0")
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if test_records:
            console.print(f"evaluating on the test split ({len(test_records)} examples) before training")
            if teacher is not None:
                result.test["teacher"] = evaluate(teacher, tokenizer, test_records, **gen_args)
            result.test["student before"] = evaluate(student, tokenizer, test_records, **gen_args)
    console.print(
        f"student: {count_parameters(params):,} trainable of {count_parameters(student.parameters()):,} parameters"
        + (f"; teacher: {count_parameters(teacher.parameters()):,}" if teacher is not None else "")
        + f"; {len(data.examples) or 'streamed'} training examples; device {device}"
    )

    metrics = MetricsLog(run_dir, resume_step=step if cfg.resume is not None else None)
    last_saved = step

    def checkpoint() -> None:
        nonlocal last_saved
        state = {
            "step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "data": data.state_dict(), "rng": rng_state(), "test": result.test,
        }
        save_checkpoint(run_dir, step, trainable_state(student), state, tc.keep_checkpoints)
        last_saved = step

    student.train()
    bf16, vocab = tc.precision == "bf16", len(tokenizer)
    fused = cfg.loss.fused and cfg.loss.kind != "ce"  # cross-entropy (SFT) takes the full logits
    not_fused = fused_loss_problem(student, teacher, vocab, device) if fused else None
    if not_fused:
        console.print(f"[yellow]full logits instead of the fused loss: {not_fused}[/yellow]")
        fused = False
    t_start, tokens_window, loss_window = time.perf_counter(), 0, []
    try:
        with _progress(tc.progress) as progress, _StopAtStepBoundary() as stop:
            task = progress.add_task("train", total=tc.steps, completed=step, loss=math.nan, tps=0.0)
            while step < tc.steps:
                micro = [data.next_batch(tc.batch_size) for _ in range(tc.grad_accum)]
                # The step's denominator: counted tokens of all its micro-batches, known before any backward.
                n_counted = sum(count_tokens(b.labels[:, 1:]) for b in micro)
                loss_sum = 0.0
                for b in micro:
                    loss = step_loss(cfg.loss, student, teacher, b.to(device), bf16=bf16, vocab=vocab, fused=fused)
                    (loss / max(n_counted, 1)).backward()
                    loss_sum += float(loss.detach())
                    tokens_window += b.num_tokens
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += n_counted
                loss_window.append(loss_sum / max(n_counted, 1))

                if step % tc.log_every == 0 or step == tc.steps:
                    elapsed = time.perf_counter() - t_start
                    tps = tokens_window / max(elapsed, 1e-9)
                    mean_loss = sum(loss_window) / len(loss_window)
                    metrics.log("train", step, {
                        "loss": mean_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "response_tokens": tokens_seen, "tokens_per_s": tps,
                    })
                    progress.update(task, loss=mean_loss, tps=tps)
                    t_start, tokens_window, loss_window = time.perf_counter(), 0, []
                progress.update(task, completed=step)

                if val_records and (step % tc.eval_every == 0 or step == tc.steps):
                    val = reference_losses(student, teacher, tokenizer, val_records, cfg.loss,
                                           batch_size=tc.eval_batch_size, max_length=cfg.data.max_length)
                    val.update(evaluate(student, tokenizer, val_records, **gen_args))
                    metrics.log("validation", step, val)
                    progress.console.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
                if step % tc.save_every == 0 or step == tc.steps or stop.requested:
                    checkpoint()
                if stop.requested and step < tc.steps:
                    raise DistillError(
                        f"interrupted at step {step}; checkpoint saved. Continue with: distill resume={run_dir}"
                    )
    except KeyboardInterrupt:
        raise DistillError(
            f"stopped at once during step {step + 1}; the last checkpoint is step {last_saved}. "
            f"Continue from it with: distill resume={run_dir}"
        ) from None
    finally:
        metrics.close()

    final = unwrap(student)
    export_model(result.model_dir, lambda d: (final.save_pretrained(d), tokenizer.save_pretrained(d)))
    plot_curves(metrics.path, run_dir / "curves.png")
    if test_records:
        result.test["student after"] = evaluate(student, tokenizer, test_records, **gen_args)
    _write_report(result)
    return result


def _write_report(result: RunResult) -> None:
    report = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir), "steps": result.steps,
              "test": result.test}
    (result.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if result.test:
        keys = sorted({k for row in result.test.values() for k in row})
        lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, row in result.test.items():
            lines.append(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.4g}" for k in keys) + " |")
        (result.run_dir / "report.md").write_text("\n".join(lines) + "\n")

