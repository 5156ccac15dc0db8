"""The memory plan: exact model sizes from configs, what each ZeRO stage divides, activations as
autograd saves them, the CLI, and a run that does not fit stopping before it loads anything."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from distill import train as train_mod
from distill.config import ArchConfig, DistillConfig, LoraConfig, ModelConfig, Schedule, TeacherConfig, source_weights
from distill.errors import DistillError
from distill.models import load_tokenizer
from distill.plan import _saved_activations, make_plan, model_shape, render

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
LLAMA_70B_8B = [  # docs/scaling.md's plan (benchmarks/results/full/llama-3.1-70b-to-8b.txt)
    f"teacher.path={CONFIGS / 'llama-3.1-70b'}", f"student.path={CONFIGS / 'llama-3.1-8b'}", "teacher.dtype=bfloat16",
    "student.dtype=bfloat16", "trainer.precision=bf16", "trainer.device=cuda", "plan.world_size=8",
    "plan.device_memory_gb=80", "deepspeed=zero3", "recipe=gkd", "trainer.batch_size=16", "data.max_length=2048",
    "trainer.activation_checkpointing=true", "trainer.eval_batch_size=16",
]


def cfg_for(teacher_dir, student_dir, **trainer) -> DistillConfig:
    cfg = DistillConfig(teacher=TeacherConfig(path=str(teacher_dir)), student=ModelConfig(path=str(student_dir)))
    cfg.trainer = replace(cfg.trainer, device="cpu", **trainer)
    return cfg


def test_parameters_counted_as_loaded(teacher_dir, student_dir):
    """Meta-device counts equal the loaded models': a padded vocabulary (teacher), tied embeddings
    counted once (student), LoRA adapters as the trained part."""
    for path, role in ((teacher_dir, "teacher"), (student_dir, "student")):
        loaded = AutoModelForCausalLM.from_pretrained(path)
        shape = model_shape(ModelConfig(path=str(path)), role)
        assert shape.parameters == sum(p.numel() for p in loaded.parameters())
        assert shape.rows == loaded.get_output_embeddings().weight.shape[0]
    from distill.models import apply_lora

    lora = LoraConfig(enabled=True, r=4)
    peft = apply_lora(AutoModelForCausalLM.from_pretrained(student_dir), lora)
    shape = model_shape(ModelConfig(path=str(student_dir), lora=lora), "student")
    assert shape.trainable == sum(p.numel() for p in peft.parameters() if p.requires_grad) > 0
    assert shape.parameters == sum(p.numel() for p in peft.parameters())


def test_llama_3_1_sizes_from_their_configs():
    """The published sizes of Llama 3.1 70B and 8B, from config.json alone."""
    big = model_shape(ModelConfig(path=str(CONFIGS / "llama-3.1-70b"), dtype="bfloat16"), "teacher")
    small = model_shape(ModelConfig(path=str(CONFIGS / "llama-3.1-8b"), dtype="bfloat16"), "student")
    assert (big.parameters, small.parameters) == (70_553_706_496, 8_030_261_248)
    # K and V of 80 (32) layers x 8 KV heads x 128 dims in bf16, per token.
    assert (big.kv_bytes_per_token, small.kv_bytes_per_token) == (2 * 80 * 1024 * 2, 2 * 32 * 1024 * 2)


def test_activations_are_what_autograd_saves(teacher_dir, student_dir):
    """The meta-device measure equals what a real CPU forward saves (PyTorch's fused CPU attention
    keeps no [length x length] scores, as on a GPU); checkpointing keeps the layers' inputs and one
    layer's activations."""
    for path in (teacher_dir, student_dir):
        model = AutoModelForCausalLM.from_pretrained(path)
        real = _saved_activations(model, 4, 32)
        shape = model_shape(ModelConfig(path=str(path)), "student", rows=4, length=32)
        assert shape.activations == real > 4 * 32 * model.config.hidden_size * 4
    hidden = AutoModelForCausalLM.from_pretrained(teacher_dir).config.hidden_size  # 2 layers
    ckpt = model_shape(ModelConfig(path=str(teacher_dir)), "student", rows=4, length=64, checkpointing=True)
    full = model_shape(ModelConfig(path=str(teacher_dir)), "student", rows=4, length=64)
    assert 2 * 4 * 64 * hidden * 4 <= ckpt.activations < full.activations


def test_each_stage_divides_what_it_shards(teacher_dir, student_dir):
    world = 4
    cfg = cfg_for(teacher_dir, student_dir, batch_size=8)
    plans = {p.name: p for p in make_plan(cfg, world).stages}
    s = model_shape(ModelConfig(path=str(student_dir)), "student")
    t = model_shape(ModelConfig(path=str(teacher_dir)), "teacher")
    p0, p1, p2, p3, off = (plans[n] for n in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"))
    n = s.parameters
    assert p0.resident["optimizer state"] == 8 * n  # AdamW's two fp32 moments
    # DeepSpeed's ZeRO optimizer: an fp32 master copy besides the moments, and an fp32 gradient
    # partition besides the model's gradients, which stage 2 partitions.
    assert p1.resident["optimizer state"] == p2.resident["optimizer state"] == 12 * n // world
    assert p1.resident["gradients"] == 4 * n + 4 * n // world and p2.resident["gradients"] == 2 * (4 * n // world)
    assert p2.resident["student weights"] == 4 * s.parameters and p3.resident["student weights"] == (
        4 * s.parameters // world)
    for p in (p0, p1, p2, p3):  # the teacher is sharded on several ranks whatever the student's stage
        assert p.resident["teacher weights"] == 4 * t.parameters // world
    assert "optimizer state" not in off.resident and off.resident["student weights"] == 0 and off.cpu > 0
    replicated = make_plan(replace(cfg, deepspeed=replace(cfg.deepspeed, shard_teacher=False)), world)
    assert replicated.stages[1].resident["teacher weights"] == 4 * t.parameters
    def state(p):  # weights, gradients, optimizer state (DeepSpeed's buckets aside)
        return sum(v for k, v in p.resident.items() if k != "ZeRO buckets")

    assert state(p0) > state(p1) > state(p2) > state(p3) > state(off)



def test_zero3_gathers_full_buffers_and_reduce_scatters_copies(teacher_dir, student_dir):
    """ZeRO-3 gathers a parameter into a full-size buffer beside the rank's partition; the gradient
    reduce-scatter flattens the bucket into one more copy, and gloo (the CPU) makes a second."""
    world = 2
    cfg = cfg_for(teacher_dir, student_dir, batch_size=8)
    s = model_shape(ModelConfig(path=str(student_dir)), "student")
    t = model_shape(ModelConfig(path=str(teacher_dir)), "teacher")
    p3 = {p.name: p for p in make_plan(cfg, world).stages}["zero3"]
    assert p3.training["ZeRO-3 gathered parameters"] == 4 * (s.parameters + t.parameters)
    assert p3.training["ZeRO-3 gradient reduce-scatter"] == 2 * 4 * s.trainable
    full = {"student gathered": 4 * s.parameters, "teacher gathered": 4 * t.parameters}
    gathered = {k: v for k, v in p3.generation.items() if k.endswith(" gathered")}
    assert gathered and all(full[k] == v for k, v in gathered.items())  # evaluation's round: the whole model
    gpu = cfg_for(teacher_dir, student_dir, batch_size=8)
    gpu.trainer, gpu.plan = replace(gpu.trainer, device="cuda"), replace(gpu.plan, device_memory_gb=80)
    g3 = {p.name: p for p in make_plan(gpu, world).stages}["zero3"]
    assert g3.training["ZeRO-3 gradient reduce-scatter"] == 4 * s.trainable
    assert "ZeRO-3 gradient reduce-scatter" not in {p.name: p for p in make_plan(cfg, world).stages}["zero2"].training


def test_cpu_plans_a_generating_sources_round_beside_training(teacher_dir, student_dir):
    """On the CPU glibc keeps what a round between steps freed: a source that generates (GKD) is
    planned beside the training step; evaluation's rounds (memory returned after them) and a GPU's
    caching allocator are not. Backward adds one layer's share of the saved activations."""
    cfg = cfg_for(teacher_dir, student_dir, batch_size=8)
    supervised = make_plan(cfg, 1).chosen
    assert supervised.kept == 0
    layers = AutoModelForCausalLM.from_pretrained(student_dir).config.num_hidden_layers
    assert supervised.training["backward of one layer"] == supervised.training["activations"] // layers > 0
    cfg.sources = replace(cfg.sources, weights=source_weights(dataset=Schedule(start=0.5), student=Schedule(start=0.5)))
    gkd = make_plan(cfg, 1).chosen
    assert gkd.kept_what == "student samples" and gkd.kept > 0
    assert gkd.peak == (sum(gkd.resident.values()) + gkd.runtime
                        + max(sum(gkd.training.values()) + gkd.kept, sum(gkd.generation.values())))
    assert gkd.peak - gkd.runtime == supervised.peak - supervised.runtime + gkd.kept  # the tiny models: training tops
    gpu = replace(cfg, trainer=replace(cfg.trainer, device="cuda"), plan=replace(cfg.plan, device_memory_gb=80))
    assert make_plan(gpu, 1).chosen.kept == 0


def test_a_cached_teacher_is_planned_as_its_head(teacher_dir, student_dir, tmp_path):
    """teacher.cache: each rank holds the teacher's LM head only, never shards or gathers the
    teacher, and runs no teacher generation (its evaluation row needs the body)."""
    t = model_shape(ModelConfig(path=str(teacher_dir)), "teacher")
    cfg = cfg_for(teacher_dir, student_dir, batch_size=8)
    cfg.teacher.cache = str(tmp_path / "cache")
    for p in make_plan(cfg, 2).stages:
        assert p.resident["teacher LM head"] == t.rows * t.hidden * 4 and "teacher weights" not in p.resident
        assert "teacher" not in p.gathers and not any("teacher" in k for k in p.generation)
    plan = make_plan(cfg, 1)
    assert plan.chosen.generation_what == "evaluation (student)" and "teacher read from the cache" in plan.placement
    cfg.teacher.live = True  # the body too, for what the cache cannot hold
    assert make_plan(cfg, 2).stages[1].resident["teacher weights"] == 4 * t.parameters // 2

def test_bf16_weights_get_an_fp32_master_copy_on_deepspeed(teacher_dir, student_dir):
    cfg = cfg_for(teacher_dir, student_dir, batch_size=8)
    cfg.student = replace(cfg.student, dtype="bfloat16")
    n = model_shape(cfg.student, "student").parameters
    assert make_plan(cfg, 2).stages[1].resident["optimizer state"] == 12 * n // 2  # moments + master
    assert make_plan(cfg, 2).stages[0].resident["optimizer state"] == 12 * n  # DeepSpeed without ZeRO
    assert make_plan(cfg, 1).chosen.resident["optimizer state"] == 2 * 2 * n  # torch's AdamW: bf16 moments


def test_a_run_that_does_not_fit_stops_before_loading(teacher_dir, student_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_mod, "load_model", no_loading)
    cfg = cfg_for(teacher_dir, student_dir, steps=1)
    cfg.plan = replace(cfg.plan, device_memory_gb=0.01)
    with pytest.raises(DistillError, match=r"the plan does not fit: .* per rank .* try .*student.lora.enabled=true"):
        train_mod.train(cfg, tmp_path / "run")
    cfg.plan = replace(cfg.plan, check=False)  # the check is the only thing in the way
    with pytest.raises(AssertionError, match="a model was loaded"):
        train_mod.train(cfg, tmp_path / "run2")


@pytest.mark.slow
def test_plan_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill", "plan", "recipe=gkd", "trainer.device=cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for needle in ("sources:", "student: student samples", "loss: gjsd(beta=0.5); fused LM head + loss",
                   "placement: 1 rank on cpu", "optimizer state", "activations", "estimated peak", "-> fits",
                   "zero3_offload"):
        assert needle in proc.stdout, needle
    tiny = subprocess.run([sys.executable, "-m", "distill", "plan", "trainer.device=cpu", "plan.device_memory_gb=0.01"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert tiny.returncode == 1 and "DOES NOT FIT" in tiny.stdout and "to fit, try" in tiny.stdout
    assert not list(tmp_path.iterdir())  # nothing written
    bad = subprocess.run([sys.executable, "-m", "distill", "plan", "deepspeed=zero4"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "no option 'zero4'" in bad.stderr


def test_readme_plan_is_the_committed_one():
    """benchmarks/results/full/llama-3.1-70b-to-8b.txt (quoted in docs/scaling.md) is what the plan says now."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from distill.config import register

    register()
    with initialize_config_module("distill.recipes", version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=LLAMA_70B_8B))
    committed = (ROOT / "benchmarks" / "results" / "full" / "llama-3.1-70b-to-8b.txt").read_text()
    plan = make_plan(cfg)
    assert plan.fits and plan.chosen.gathers == {"student": True, "teacher": False}
    assert render(plan).replace(str(ROOT) + "/", "") in committed


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_plan_bounds_the_measured_peak(tmp_path, stage):
    """A run's report holds its planned and measured peak (on the CPU: peak resident memory,
    libraries included), and the plan bounds it: measured here -10% in one process and -2% on
    ZeRO-3 (benchmarks/results/full/plan_memory.md has the matrix). The bound allows 5% above for
    the run-to-run noise of resident memory (about 3%)."""
    proc = subprocess.run([sys.executable, "-m", "distill", "student=tiny",
                           "student.arch.hidden_size=256", "student.arch.num_layers=4", "trainer.steps=2",
                           "trainer.batch_size=32", "data.max_length=48", "trainer.eval_every=100",
                           "final_eval=false", "data.num_validation=20", "trainer.progress=false",
                           f"deepspeed.stage={stage}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=600, env=NO_LAUNCHER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    memory = json.loads((tmp_path / "run" / "report.json").read_text())["memory"]
    assert memory["placement"] == ("none" if stage == 0 else "zero3")
    low, high = PLAN_ERROR[stage]
    assert low <= memory["error"] <= high, memory


# A ZeRO stage in one process without a launcher's variables: distill sets up its one rank.
NO_LAUNCHER = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
NO_LAUNCHER["DS_ACCELERATOR"] = "cpu"
PLAN_ERROR = {0: (-0.2, 0.05), 3: (-0.2, 0.05)}  # measured / planned - 1; the goal is [-20%, 0%]


def test_plan_of_an_arch_student_uses_its_tokenizer(teacher_dir):
    """A student built from scratch is sized for the tokenizer it will get (rows padded to 64): the
    one named, or the one a run trains (arch.tokenizer_vocab_size)."""
    arch = ArchConfig(hidden_size=64, num_layers=1, intermediate_size=128)
    cfg = DistillConfig(teacher=TeacherConfig(path=str(teacher_dir)),
                        student=ModelConfig(arch=arch, tokenizer=str(teacher_dir)))
    rows = make_plan(cfg, 1).student.rows
    assert rows % 64 == 0 and len(load_tokenizer(teacher_dir)) <= rows < len(load_tokenizer(teacher_dir)) + 64
    cfg.student = replace(cfg.student, tokenizer=None)
    assert make_plan(cfg, 1).student.rows == -(-arch.tokenizer_vocab_size // 64) * 64


def test_plan_charges_only_the_rounds_that_run(teacher_dir, student_dir, tmp_path, monkeypatch):
    """The teacher decodes for evaluation only on a test split: user data without one plans no such
    round. A draft report (draft.enabled) loads teacher and draft again beside everything. CPU ranks
    planned from an unlaunched process share this machine's memory."""
    cfg = cfg_for(teacher_dir, student_dir)
    assert make_plan(cfg, 1).chosen.generation_what == "evaluation (teacher)"  # built-in tasks: a test split
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "Write 5 in words.", "completion": "five"}\n')
    cfg.data = replace(cfg.data, train=str(f), validation=str(f))
    assert make_plan(cfg, 1).chosen.generation_what == "evaluation (student)"
    cfg.data = replace(cfg.data, test=str(f))
    assert make_plan(cfg, 1).chosen.generation_what == "evaluation (teacher)"
    cfg.draft = replace(cfg.draft, enabled=True)
    plan = make_plan(cfg, 1).chosen
    assert plan.generation_what == "draft report"
    assert plan.generation["teacher, loaded again"] == plan.resident["teacher weights"]
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert make_plan(cfg, 2).available == make_plan(cfg, 1).available // 2


def test_serve_teacher_plans_its_workers_before_starting_them(teacher_dir, tmp_path):
    from distill.plan import worker_plan

    cfg = DistillConfig(teacher=TeacherConfig(path=str(teacher_dir), remote="w", remote_workers=2))
    plan = worker_plan(cfg)
    shape = model_shape(cfg.teacher, "teacher")
    assert plan.resident["teacher weights"] == shape.parameters * 4
    rows, length = cfg.trainer.batch_size, cfg.data.max_length
    assert plan.work_what.startswith("forward") and plan.work["hidden states sent (fp32)"] == (
        rows * length * shape.hidden * 4)
    more = worker_plan(replace(cfg, trainer=replace(cfg.trainer, batch_size=2 * rows)))
    assert sum(more.work.values()) > sum(plan.work.values())
    one = worker_plan(replace(cfg, teacher=replace(cfg.teacher, remote_workers=1)))
    assert one.available == 2 * plan.available or one.available == 2 * plan.available + 1  # the machine, shared
    proc = subprocess.run([sys.executable, "-m", "distill", "serve-teacher", f"teacher.path={teacher_dir}",
                           "teacher.remote=w", "plan.device_memory_gb=0.01"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "plan per worker:" in proc.stdout and "teacher weights" in proc.stdout
    assert "a worker needs about" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
