"""The training loop in-process: token-count invariance, resume after a kill, interrupt, LoRA, SFT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import distill.loop as loop_mod
import distill.train as train_mod
from distill.config import DataConfig, DistillConfig, LoraConfig, LossConfig, ModelConfig, TeacherConfig, TrainerConfig
from distill.data import length_buckets
from distill.errors import DistillError
from distill.objective import batch_loss, objective_name
from distill.schedule import CosineSchedule
from distill.teacher import LocalTeacher
from distill.tracking import WALL_CLOCK, MetricsLog


def make_cfg(teacher_dir, student_dir, **trainer) -> DistillConfig:
    t = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3, save_every=2, log_every=1,
             max_new_tokens=6, eval_batch_size=8, progress=False)
    t.update(trainer)
    return DistillConfig(
        teacher=TeacherConfig(path=str(teacher_dir)),
        student=ModelConfig(path=str(student_dir)),
        data=DataConfig(num_train=24, num_validation=4, num_test=4, max_length=96),
        loss=LossConfig(kind="gjsd", beta=0.5),
        trainer=TrainerConfig(**t),
    )


def final_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("kind", ["gjsd", "ce"])
def test_step_independent_of_micro_batch_split(teacher_dir, student_dir, tmp_path, kind, monkeypatch):
    """Three real optimizer steps (no warm-up: every step moves the weights) over the same 8
    sequences per step, whole, split 8x1 into length buckets, 4x2 and 2x4: the same loss, gradient
    norm and weights after every split. Averaging each micro-batch (or bucket) over its own tokens
    (the classic accumulation bug) weights the tokens differently and fails here; so does
    forgetting to divide by the count."""
    groups = []

    def spy(lengths, max_buckets):
        out = length_buckets(lengths, max_buckets)
        groups.append(len(out))
        return out

    monkeypatch.setattr(loop_mod, "length_buckets", spy)
    runs = {}
    for name, bs, accum, buckets in [("whole", 8, 1, 1), ("buckets", 8, 1, 4), ("4x2", 4, 2, 4), ("2x4", 2, 4, 4)]:
        cfg = make_cfg(teacher_dir, student_dir, steps=3, batch_size=bs, grad_accum=accum, warmup_steps=0,
                       max_grad_norm=1e9, length_buckets=buckets)
        cfg.final_eval, cfg.data.num_validation = False, 0
        cfg.loss.kind = kind
        groups.clear()
        runs[name] = train_mod.train(cfg, tmp_path / name)
        if name == "buckets":
            assert max(groups) > 1  # the data's lengths differ enough to split a batch
    logs = {k: MetricsLog.read(r.run_dir / "metrics.jsonl") for k, r in runs.items()}
    weights = {k: final_weights(r.run_dir) for k, r in runs.items()}
    assert len(logs["whole"]) == 3 and logs["whole"][0]["lr"] > 0
    for name in ("buckets", "4x2", "2x4"):
        for a, b in zip(logs[name], logs["whole"], strict=True):
            assert a["response_tokens"] == b["response_tokens"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        for k in weights["whole"]:
            # Adam turns a near-zero gradient into a near-full step, so rounding in the few weights
            # whose gradient is ~0 shows at ~1e-5; a wrong weighting moves weights by ~lr (1e-3).
            assert torch.allclose(weights[name][k], weights["whole"][k], atol=5e-5), (name, k)
    base = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    assert any(not torch.allclose(weights["whole"][k], base[k], atol=1e-4) for k in weights["whole"])  # it trained


@pytest.mark.parametrize("loss_kind,ce_weight,lora", [("gjsd", 0.0, False), ("tvd", 0.0, True), ("ce", 0.0, False),
                                                      ("rkl", 0.4, False)])
def test_fused_loss_paths_train_alike(teacher_dir, student_dir, tmp_path, loss_kind, ce_weight, lora):
    """Full logits, the fused PyTorch path and the fused Triton kernels (interpreter) give the same
    training run: same losses, same weights, within fp32 rounding; for distillation, SFT
    (cross-entropy) and a mixed objective; also for a LoRA student, whose frozen LM head gets no
    gradient while the hidden states do."""
    runs = {}
    for name, fused, backend in [("full", False, "torch"), ("torch", True, "torch"), ("triton", True, "triton")]:
        cfg = make_cfg(teacher_dir, student_dir, steps=2, log_every=1)
        cfg.final_eval, cfg.data.num_validation = False, 0
        cfg.student.lora = LoraConfig(enabled=lora, r=4)
        cfg.loss = LossConfig(kind=loss_kind, beta=0.3, temperature=2.0, ce_weight=ce_weight, fused=fused,
                              backend=backend, chunk_size=50)
        runs[name] = train_mod.train(cfg, tmp_path / name)
    logs = {k: [r["loss"] for r in MetricsLog.read(v.run_dir / "metrics.jsonl")] for k, v in runs.items()}
    weights = {k: final_weights(v.run_dir) for k, v in runs.items()}
    for name in ("torch", "triton"):
        assert logs[name] == pytest.approx(logs["full"], rel=1e-5)
        for k in weights["full"]:
            assert torch.allclose(weights[name][k], weights["full"][k], atol=1e-5), (name, k)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_step_in_bf16_matches_full_logits(teacher_dir, student_dir, backend):
    """bf16 autocast: the fused step and the full-logit step see the same hidden states and the
    same fp32 head, so loss and every gradient agree to fp32 rounding; in particular the LM-head
    weight gradient is not rounded to bf16 on its way out."""
    from distill.data import TrainData
    from distill.models import load_model, load_tokenizer

    cpu = torch.device("cpu")
    tok = load_tokenizer(student_dir)
    teacher = load_model(ModelConfig(path=str(teacher_dir)), "teacher", cpu).eval()
    student = load_model(ModelConfig(path=str(student_dir)), "student", cpu)
    batch = TrainData(DataConfig(num_train=8), tok, seed=0).next_batch(8)
    loss_cfg = LossConfig(kind="gjsd", beta=0.3, temperature=2.0, backend=backend, chunk_size=50)
    results = {}
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        loss = batch_loss(loss_cfg, student, LocalTeacher(teacher), batch, bf16=True, vocab=len(tok),
                          fused=fused).loss
        loss.backward()
        results[fused] = float(loss), {n: p.grad.clone() for n, p in student.named_parameters()}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        assert results[True][1][name].dtype == torch.float32
        assert torch.allclose(results[True][1][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max())), name


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the loop handles it."""




def train_killed_in_step_5(cfg: DistillConfig, run_dir, monkeypatch) -> None:
    """Train ``cfg`` (grad_accum 1) and die while drawing the data of step 5, as a kill would:
    the last checkpoint is step 4 (save_every 2), step 5 is lost."""
    real_next = train_mod.TrainData.next_examples
    calls = {"n": 0}

    def dying_next(self, size):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return real_next(self, size)

    monkeypatch.setattr(train_mod.TrainData, "next_examples", dying_next)
    with pytest.raises(Killed):
        train_mod.train(cfg, run_dir)
    monkeypatch.setattr(train_mod.TrainData, "next_examples", real_next)


def test_resume_after_kill_matches_uninterrupted(teacher_dir, student_dir, tmp_path, monkeypatch):
    full = train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "full")
    train_killed_in_step_5(make_cfg(teacher_dir, student_dir), tmp_path / "cut", monkeypatch)
    assert not (tmp_path / "cut" / "model").exists()
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-0000002", "step-0000004"]

    # `distill resume=DIR` alone: the run's saved config is what continues.
    resumed = train_mod.train(DistillConfig(resume=str(tmp_path / "cut")), tmp_path / "ignored")
    assert resumed.run_dir == tmp_path / "cut"

    a = MetricsLog.read(full.run_dir / "metrics.jsonl")
    b = MetricsLog.read(resumed.run_dir / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert full.test == resumed.test
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_finishes_the_step_and_resumes_exactly(teacher_dir, student_dir, tmp_path, monkeypatch):
    """SIGINT in the middle of a step (between micro-batches): the step completes, is saved, and
    resuming ends exactly like an uninterrupted run."""
    full = train_mod.train(make_cfg(teacher_dir, student_dir, grad_accum=2), tmp_path / "full")
    real_next = train_mod.TrainData.next_examples
    calls = {"n": 0}

    def interrupted(self, size):
        calls["n"] += 1
        if calls["n"] == 6:  # second micro-batch of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self, size)

    monkeypatch.setattr(train_mod.TrainData, "next_examples", interrupted)
    before = signal.getsignal(signal.SIGINT)  # ignored where the suite runs in the background (nohup ... &)
    with pytest.raises(DistillError, match=r"interrupted at step 3; checkpoint saved.*distill resume="):
        train_mod.train(make_cfg(teacher_dir, student_dir, grad_accum=2), tmp_path / "run")
    monkeypatch.setattr(train_mod.TrainData, "next_examples", real_next)
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").is_dir()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    resumed = train_mod.train(DistillConfig(resume=str(tmp_path / "run")), tmp_path / "ignored")
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.test == resumed.test


def test_second_ctrl_c_stops_at_once(teacher_dir, student_dir, tmp_path, monkeypatch):
    real_next = train_mod.TrainData.next_examples
    calls = {"n": 0}

    def interrupted(self, size):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self, size)

    monkeypatch.setattr(train_mod.TrainData, "next_examples", interrupted)
    with pytest.raises(DistillError, match=r"stopped at once during step 5; the last checkpoint is step 4"):
        train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "step-0000005").exists()


def test_sft_and_lora_export(teacher_dir, student_dir, tmp_path):
    cfg = make_cfg(teacher_dir, student_dir, steps=3)
    cfg.loss = LossConfig(kind="ce")
    cfg.teacher = TeacherConfig()
    cfg.student.lora = LoraConfig(enabled=True, r=4, alpha=8)
    result = train_mod.train(cfg, tmp_path / "lora")
    assert set(result.test) == {"student before", "student after"}
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"  # merged: a plain transformers model
    assert not any("lora" in k for k in model.state_dict())
    # The trained adapters were merged: the projections moved, the untouched embeddings did not.
    base = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    merged = model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    report = json.loads((result.run_dir / "report.json").read_text())
    assert set(report["test"]) == {"student before", "student after"}
    assert (result.run_dir / "curves.png").stat().st_size > 1000
    assert (result.run_dir / "tensorboard").is_dir()


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(DistillError, match="not a distill run directory"):
        train_mod.train(DistillConfig(resume=str(tmp_path)), tmp_path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    from distill.checkpoint import atomic_dir

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as d:
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as d:
        (d / "a.bin").write_bytes(b"1")
    with atomic_dir(tmp_path / "out") as d:  # replacing an existing export
        (d / "b.bin").write_bytes(b"2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.bin"]
    assert (tmp_path / "out").stat().st_mode & 0o755 == 0o755
    # A crash between moving the old copy aside and moving the new one in: the old one comes back.
    os.replace(tmp_path / "out", tmp_path / ".out.old")
    with atomic_dir(tmp_path / "other"):
        pass
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out"):
        raise RuntimeError
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.bin"]


def test_bf16_autocast_trains_like_fp32(teacher_dir, student_dir, tmp_path):
    """bf16 autocast changes the rounding of the decoder, not what is trained: losses of the same
    two steps agree with fp32 within bf16's precision, and validation runs."""
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = make_cfg(teacher_dir, student_dir, steps=2, precision=precision, eval_every=2, save_every=2)
        cfg.final_eval = False
        result = train_mod.train(cfg, tmp_path / precision)
        rows[precision] = MetricsLog.read(result.run_dir / "metrics.jsonl")
    for split in ("train", "validation"):
        for a, b in zip(*([r for r in rows[p] if r["split"] == split] for p in ("bf16", "fp32")), strict=True):
            key = "loss" if split == "train" else "divergence"
            assert a[key] == pytest.approx(b[key], rel=2e-2), (split, a, b)


def test_checkpoints_ordered_by_step(tmp_path):
    from distill.checkpoint import list_checkpoints

    for step in (9_999_999, 10_000_000, 200):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000200", "step-9999999", "step-10000000"]


def test_a_finished_run_is_extended_by_raising_steps(teacher_dir, student_dir, tmp_path):
    """resume=RUN with more steps continues a finished run with its optimizer state: with a constant
    learning rate after warm-up (min_lr_ratio=1, so the schedule does not depend on the length),
    4 steps and then 2 more end exactly as 6 steps in one go. With a decaying rate the extension
    goes on at the rate where the run stopped (no jump back up). Without more steps, resuming a
    finished run says so; fewer steps are refused."""
    def cfg(steps, min_lr_ratio=1.0):
        c = make_cfg(teacher_dir, student_dir, steps=steps, min_lr_ratio=min_lr_ratio, eval_every=100)
        c.final_eval = False
        return c

    whole = train_mod.train(cfg(6), tmp_path / "whole")
    short = train_mod.train(cfg(4), tmp_path / "short")
    with pytest.raises(DistillError, match=r"finished at step 4 \(trainer.steps=4\); to train further, raise it"):
        train_mod.train(DistillConfig(resume=str(short.run_dir)), tmp_path / "ignored")
    with pytest.raises(DistillError, match="trainer.steps=3 is below the run's 4"):
        train_mod.train(DistillConfig(resume=str(short.run_dir)), tmp_path / "ignored", steps=3)
    longer = train_mod.train(DistillConfig(resume=str(short.run_dir)), tmp_path / "ignored", steps=6)
    assert longer.steps == 6 and json.loads((longer.run_dir / "report.json").read_text())["steps"] == 6
    wa, wb = final_weights(whole.run_dir), final_weights(longer.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train_rows = [r["step"] for r in MetricsLog.read(longer.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train_rows == [1, 2, 3, 4, 5, 6]
    # The extension is the run's config now: resuming it says it finished at 6, and 5 is a shortening.
    with pytest.raises(DistillError, match=r"finished at step 6 \(trainer.steps=6\)"):
        train_mod.train(DistillConfig(resume=str(short.run_dir)), tmp_path / "ignored")
    with pytest.raises(DistillError, match="trainer.steps=5 is below the run's 6"):
        train_mod.train(DistillConfig(resume=str(short.run_dir)), tmp_path / "ignored", steps=5)
    # Stopped mid-decay (its checkpoint at step 2 of 4 the latest), then extended to 6 steps.
    decaying = train_mod.train(cfg(4, min_lr_ratio=0.1), tmp_path / "decaying")
    shutil.rmtree(decaying.run_dir / "checkpoints" / "step-0000004")
    (decaying.run_dir / "report.json").unlink()
    train_mod.train(DistillConfig(resume=str(decaying.run_dir)), tmp_path / "ignored", steps=6)
    lrs = [r["lr"] for r in MetricsLog.read(decaying.run_dir / "metrics.jsonl") if r["split"] == "train"]
    # The row of step s holds the rate its update used: the schedule's value at s - 1.
    curve = CosineSchedule(warmup=1, total=4, min_ratio=0.1)
    factors = [curve(0), curve(1)]
    curve.extend(6, 2)
    factors += [curve(i) for i in range(2, 6)]
    peak = make_cfg(teacher_dir, student_dir).trainer.lr
    assert lrs == pytest.approx([peak * f for f in factors])  # rebuilt for 6 steps, it jumped up


def test_warnings_for_settings_that_are_probably_wrong(teacher_dir, student_dir, monkeypatch):
    from distill.models import load_model

    cfg = make_cfg(teacher_dir, student_dir, steps=10, warmup_steps=30, precision="bf16")
    cfg.student.dtype = "bfloat16"
    student = load_model(cfg.student, "student", torch.device("cpu"))
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: False)
    found = train_mod._warnings(cfg, student, torch.device("cpu"))
    assert len(found) == 3
    assert "warmup_steps=30 is not below trainer.steps=10" in found[0]
    assert "no fp32 master copy" in found[1] and "emulated" in found[2]
    cfg.trainer.warmup_steps, cfg.student.dtype, cfg.trainer.precision = 2, "float32", "fp32"
    student = load_model(cfg.student, "student", torch.device("cpu"))
    assert train_mod._warnings(cfg, student, torch.device("cpu")) == []


def test_overlong_training_records_are_counted_in_the_report(teacher_dir, student_dir, tmp_path, capsys):
    f = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Write {i} in words.", "completion": "some words"} for i in range(6)]
    rows[2]["prompt"] = "Write 5 in words. " * 30
    rows[4]["completion"] = "some words " * 30
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(teacher_dir, student_dir, steps=1)
    cfg.data = DataConfig(train=str(f), validation=str(f), max_length=48)
    result = train_mod.train(cfg, tmp_path / "skip")
    assert result.data["train"] == {"records": 6, "skipped": 1, "truncated": 0, "cut": 1}
    assert json.loads((result.run_dir / "report.json").read_text())["data"]["validation"]["skipped"] == 1
    assert "data.train: 1 of 6 records skipped" in (result.run_dir / "report.md").read_text()
    printed = " ".join(capsys.readouterr().err.split())  # the console wraps at the test's width
    assert "data.train: of 6 records, 1 skipped and 0 truncated" in printed
    assert "1 completions cut to fit data.max_length=48" in printed
    cfg.data.overlong = "error"
    with pytest.raises(DistillError, match=r"train.jsonl:3: prompt is \d+ tokens"):
        train_mod.train(cfg, tmp_path / "error")


def test_objective_names():
    """The report's words for the objective: SFT's cross-entropy has no temperature."""
    assert objective_name(LossConfig(kind="ce", temperature=2.0)) == "ce"
    assert objective_name(LossConfig(kind="gjsd", beta=0.3, temperature=2.0, ce_weight=0.25)) == \
        "0.75 * gjsd(beta=0.3) at temperature 2.0 + 0.25 * ce"


def test_resuming_drops_a_metrics_line_torn_by_a_kill(tmp_path):
    """A kill while a metrics line is written leaves half a line; resuming drops it with the rows
    after the checkpoint instead of failing to parse the file."""
    rows = [{"split": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"split": "tr')
    MetricsLog(tmp_path, resume_step=2).close()
    assert MetricsLog.read(tmp_path / "metrics.jsonl") == rows[:2]


def test_curves_leave_no_line_across_steps_without_generation(tmp_path):
    """Dataset steps between generating ones spent 0 s generating and have no response length:
    the curve shows 0 and a gap there, not a line from one generating interval to the next."""
    import math

    from distill.tracking import plot_curves, series

    rows = [{"split": "train", "step": s, "loss": 1.0, "source_dataset": float(s == 2)} for s in (1, 2, 3)]
    for r in (rows[0], rows[2]):
        r.update(gen_seconds=2.0, response_length=5.0, source_dataset=0.0, source_student=1.0)
    rows.append({"split": "validation", "step": 3, "accuracy": 0.5})
    assert series(rows, "train", "gen_seconds") == ([1, 2, 3], [2.0, 0.0, 2.0])
    steps, lengths = series(rows, "train", "response_length")
    assert steps == [1, 2, 3] and lengths[0] == 5.0 and math.isnan(lengths[1])
    assert series(rows, "validation", "accuracy") == ([3], [0.5])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_curves(path, tmp_path / "curves.png").stat().st_size > 0


def cli_killed_and_resumed(args: list[str], tmp_path) -> tuple:
    """``distill ARGS`` run whole into ``tmp_path/whole``, and again into ``tmp_path/cut`` killed
    with SIGKILL once its step-4 checkpoint exists, then ``distill resume``: both directories,
    after checking the kill left no model and the resume said so."""
    cli = [sys.executable, "-m", "distill", *args]
    whole = subprocess.run([*cli, f"output_dir={tmp_path / 'whole'}"], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cli, f"output_dir={cut}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step-0000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists()
    resumed = subprocess.run([sys.executable, "-m", "distill", f"resume={cut}"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    return tmp_path / "whole", cut
