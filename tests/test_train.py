"""The training loop in-process: token-count invariance, resume after a kill, interrupt, LoRA, SFT."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import distill.train as train_mod
from distill.config import DataConfig, DistillConfig, LoraConfig, LossConfig, ModelConfig, TrainerConfig
from distill.errors import DistillError
from distill.tracking import MetricsLog


def make_cfg(teacher_dir, student_dir, **trainer) -> DistillConfig:
    t = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3, save_every=2, log_every=1,
             max_new_tokens=6, eval_batch_size=8, progress=False)
    t.update(trainer)
    return DistillConfig(
        teacher=ModelConfig(path=str(teacher_dir)),
        student=ModelConfig(path=str(student_dir)),
        data=DataConfig(num_train=24, num_validation=4, num_test=4, max_length=96),
        loss=LossConfig(kind="gjsd", beta=0.5),
        trainer=TrainerConfig(**t),
    )


def final_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_loss_independent_of_micro_batch_split(teacher_dir, student_dir, tmp_path):
    """One step over 8 sequences: one micro-batch of 8 == two of 4 (global token count)."""
    runs = {}
    for bs, accum in [(8, 1), (4, 2), (2, 4)]:
        cfg = make_cfg(teacher_dir, student_dir, steps=1, batch_size=bs, grad_accum=accum, max_grad_norm=1e9)
        cfg.final_eval = False
        cfg.data.num_validation = 0
        runs[bs] = train_mod.train(cfg, tmp_path / f"bs{bs}")
    logs = {bs: MetricsLog.read(r.run_dir / "metrics.jsonl")[0] for bs, r in runs.items()}
    assert logs[8]["response_tokens"] == logs[4]["response_tokens"] == logs[2]["response_tokens"]
    assert logs[4]["loss"] == pytest.approx(logs[8]["loss"], rel=1e-5)
    assert logs[2]["loss"] == pytest.approx(logs[8]["loss"], rel=1e-5)
    w8, w2 = final_weights(runs[8].run_dir), final_weights(runs[2].run_dir)
    for k in w8:
        assert torch.allclose(w8[k], w2[k], atol=1e-6), k


@pytest.mark.parametrize("loss_kind,lora", [("gjsd", False), ("tvd", True)])
def test_fused_loss_paths_train_alike(teacher_dir, student_dir, tmp_path, loss_kind, lora):
    """Full logits, the fused PyTorch path and the fused Triton kernels (interpreter) give the same
    training run: same losses, same weights, within fp32 rounding; also for a LoRA student, whose
    frozen LM head gets no gradient while the hidden states do."""
    runs = {}
    for name, fused, backend in [("full", False, "torch"), ("torch", True, "torch"), ("triton", True, "triton")]:
        cfg = make_cfg(teacher_dir, student_dir, steps=2, log_every=1)
        cfg.final_eval, cfg.data.num_validation = False, 0
        cfg.student.lora = LoraConfig(enabled=lora, r=4)
        cfg.loss = LossConfig(kind=loss_kind, beta=0.3, temperature=2.0, fused=fused, backend=backend, chunk_size=50)
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
        loss = train_mod.step_loss(loss_cfg, student, teacher, batch, bf16=True, vocab=len(tok), fused=fused)
        loss.backward()
        results[fused] = float(loss), {n: p.grad.clone() for n, p in student.named_parameters()}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        assert results[True][1][name].dtype == torch.float32
        assert torch.allclose(results[True][1][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max())), name


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the loop handles it."""


def test_resume_after_kill_matches_uninterrupted(teacher_dir, student_dir, tmp_path, monkeypatch):
    full = train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "full")

    # Die while drawing the data of step 5: the last checkpoint is step 4, step 5 is lost.
    real_next = train_mod.TrainData.next_batch
    calls = {"n": 0}

    def dying_next(self, size):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return real_next(self, size)

    monkeypatch.setattr(train_mod.TrainData, "next_batch", dying_next)
    with pytest.raises(Killed):
        train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "cut")
    monkeypatch.setattr(train_mod.TrainData, "next_batch", real_next)
    assert not (tmp_path / "cut" / "model").exists()
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-0000002", "step-0000004"]

    # `distill resume=DIR` alone: the run's saved config is what continues.
    resumed = train_mod.train(DistillConfig(resume=str(tmp_path / "cut")), tmp_path / "ignored")
    assert resumed.run_dir == tmp_path / "cut"

    a = MetricsLog.read(full.run_dir / "metrics.jsonl")
    b = MetricsLog.read(resumed.run_dir / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert full.test == resumed.test
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_finishes_the_step_and_resumes_exactly(teacher_dir, student_dir, tmp_path, monkeypatch):
    """SIGINT in the middle of a step (between micro-batches): the step completes, is saved, and
    resuming ends exactly like an uninterrupted run."""
    full = train_mod.train(make_cfg(teacher_dir, student_dir, grad_accum=2), tmp_path / "full")
    real_next = train_mod.TrainData.next_batch
    calls = {"n": 0}

    def interrupted(self, size):
        calls["n"] += 1
        if calls["n"] == 6:  # second micro-batch of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self, size)

    monkeypatch.setattr(train_mod.TrainData, "next_batch", interrupted)
    with pytest.raises(DistillError, match=r"interrupted at step 3; checkpoint saved.*distill resume="):
        train_mod.train(make_cfg(teacher_dir, student_dir, grad_accum=2), tmp_path / "run")
    monkeypatch.setattr(train_mod.TrainData, "next_batch", real_next)
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed = train_mod.train(DistillConfig(resume=str(tmp_path / "run")), tmp_path / "ignored")
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.test == resumed.test


def test_second_ctrl_c_stops_at_once(teacher_dir, student_dir, tmp_path, monkeypatch):
    real_next = train_mod.TrainData.next_batch
    calls = {"n": 0}

    def interrupted(self, size):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self, size)

    monkeypatch.setattr(train_mod.TrainData, "next_batch", interrupted)
    with pytest.raises(DistillError, match=r"stopped at once during step 5; the last checkpoint is step 4"):
        train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "step-0000005").exists()


def test_sft_and_lora_export(teacher_dir, student_dir, tmp_path):
    cfg = make_cfg(teacher_dir, student_dir, steps=3)
    cfg.loss = LossConfig(kind="ce")
    cfg.teacher = ModelConfig()
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


def test_bf16_autocast_trains(teacher_dir, student_dir, tmp_path):
    cfg = make_cfg(teacher_dir, student_dir, steps=2, precision="bf16", eval_every=2, save_every=2)
    cfg.final_eval = False
    result = train_mod.train(cfg, tmp_path / "bf16")
    rows = MetricsLog.read(result.run_dir / "metrics.jsonl")
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows if r["split"] == "train")
    assert {r["split"] for r in rows} == {"train", "validation"}


def test_checkpoints_ordered_by_step(tmp_path):
    from distill.checkpoint import list_checkpoints

    for step in (9_999_999, 10_000_000, 200):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000200", "step-9999999", "step-10000000"]
