"""Generation ahead of the trainer on Ray workers (``sources.asynchronous``): s = 0 through a
worker is the synchronous engine; every batch comes from the weights of exactly max(t - s, 0)
steps; a run is the same twice, and after a kill -9 of a worker or of the trainer."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train import cli_killed_and_resumed

import distill.train as train_mod
from distill.config import (
    AsynchronousConfig,
    DataConfig,
    DistillConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RewardConfig,
    SamplingConfig,
    Schedule,
    SourcesConfig,
    TeacherConfig,
    TrainerConfig,
    validate,
)
from distill.errors import DistillError
from distill.tracking import WALL_CLOCK, MetricsLog, curve_panels

pytestmark = pytest.mark.slow  # a Ray cluster and its workers


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local cluster for the module (the first run starts it); this process leaves it at the end."""
    yield
    import ray

    ray.shutdown()


def make_cfg(teacher_dir, student_dir, staleness=0, workers=None, weights=None, lora=False, steps=6,
             kind="gjsd") -> DistillConfig:
    return DistillConfig(
        teacher=TeacherConfig(path=str(teacher_dir)),
        student=ModelConfig(path=str(student_dir), lora=LoraConfig(enabled=lora)),
        data=DataConfig(num_train=40, num_validation=4, num_test=4, max_length=96),
        loss=LossConfig(kind=kind, beta=0.5),
        sources=SourcesConfig(weights=weights or {"student": Schedule(1.0)},
                              student=SamplingConfig(max_new_tokens=8),
                              asynchronous=AsynchronousConfig(staleness=staleness, workers=workers)),
        trainer=TrainerConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=100, save_every=100,
                              log_every=1, max_new_tokens=6, eval_batch_size=8, progress=False),
        final_eval=False,
    )


def rows(run_dir, split="train"):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in MetricsLog.read(run_dir / "metrics.jsonl")
            if r["split"] == split]


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_staleness_zero_through_a_worker_is_the_synchronous_engine(teacher_dir, student_dir, tmp_path):
    """On-policy steps and dataset steps mixed: the same metrics, bit for bit, and weights."""
    mix = {"student": Schedule(1.0), "dataset": Schedule(1.0)}
    here = train_mod.train(make_cfg(teacher_dir, student_dir, weights=mix), tmp_path / "here")
    there = train_mod.train(make_cfg(teacher_dir, student_dir, workers=1, weights=mix), tmp_path / "worker")
    assert rows(here.run_dir) == [{k: v for k, v in r.items() if k != "staleness"} for r in rows(there.run_dir)]
    assert same_weights(here.run_dir, there.run_dir)
    policy = rows(there.run_dir, "policy")
    assert policy and all(r["staleness"] == 0 for r in policy)
    assert not rows(here.run_dir, "policy")  # in-process: nothing generated ahead


@pytest.mark.parametrize("staleness", [1, 2])
def test_each_batch_comes_from_the_weights_of_step_t_minus_s(teacher_dir, student_dir, tmp_path, staleness):
    """Step t's samples: the weights after max(t - s, 0) steps (the worker's checksum of the weights
    it sampled with against the trainer's at that step), and the run the same twice."""
    a = train_mod.train(make_cfg(teacher_dir, student_dir, staleness), tmp_path / "a")
    policy = rows(a.run_dir, "policy")
    assert [r["step"] for r in policy] == list(range(1, 7))
    trainer_weights = {r["step"] - 1: r["weights_checksum"] for r in policy}  # version t at step t
    for r in policy:
        t = r["step"] - 1
        assert r["policy_version"] == max(t - staleness, 0) and r["staleness"] == min(t, staleness)
        assert r["policy_checksum"] == trainer_weights[r["policy_version"]], (t, r)
    assert len(set(trainer_weights.values())) == 6  # every step moved the weights: the check can tell them apart
    b = train_mod.train(make_cfg(teacher_dir, student_dir, staleness), tmp_path / "b")
    assert rows(a.run_dir) == rows(b.run_dir) and same_weights(a.run_dir, b.run_dir)
    sync = train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "sync")
    assert not same_weights(a.run_dir, sync.run_dir)  # stale samples train otherwise
    report = (a.run_dir / "report.md").read_text()
    assert f"staleness s = {staleness}" in report
    panels = curve_panels(MetricsLog.read(a.run_dir / "metrics.jsonl"))
    assert [("policy", "staleness")] in panels and (a.run_dir / "curves.png").is_file()
    assert [("policy", "staleness")] not in curve_panels(MetricsLog.read(sync.run_dir / "metrics.jsonl"))


def test_a_lora_student_pushes_its_adapters_alone(teacher_dir, student_dir, tmp_path, monkeypatch):
    import ray

    import distill.asynchronous.pipeline as pipeline

    put = {}
    real = pipeline.Pipeline._push

    def push(self, version):  # what the trainer puts for the workers, by version
        real(self, version)
        put[version] = sorted(ray.get(self.weights[1]))

    monkeypatch.setattr(pipeline.Pipeline, "_push", push)
    run = train_mod.train(make_cfg(teacher_dir, student_dir, 1, lora=True, steps=3), tmp_path / "lora")
    # Versions 0 and 1 sample steps 0-2; the weights after steps 2 and 3 sample nothing and stay here.
    assert sorted(put) == [0, 1] and all(names and all("lora_" in n for n in names) for names in put.values())
    policy = rows(run.run_dir, "policy")
    assert [r["policy_version"] for r in policy] == [0, 0, 1]
    assert policy[2]["policy_checksum"] == policy[1]["weights_checksum"]


def test_skd_and_seqkd_generate_ahead_like_the_synchronous_engine(teacher_dir, student_dir, tmp_path):
    """The sources that generate with the teacher run in the workers too (the teacher is there)."""
    mix = {"skd": Schedule(1.0), "teacher": Schedule(1.0)}
    cfgs = [make_cfg(teacher_dir, student_dir, workers=w, weights=mix, steps=4) for w in (0, 1)]
    for w, cfg in enumerate(cfgs):  # each run with a teacher cache of its own: both generate
        cfg.sources.teacher_cache = str(tmp_path / f"cache{w}")
    here = train_mod.train(cfgs[0], tmp_path / "here")
    there = train_mod.train(cfgs[1], tmp_path / "worker")
    for a, b in zip(rows(here.run_dir), rows(there.run_dir), strict=True):
        assert a == {k: v for k, v in b.items() if k != "staleness"}, {k: (a.get(k), b.get(k)) for k in {*a, *b}
                                                                         if a.get(k) != b.get(k)}
    assert same_weights(here.run_dir, there.run_dir)
    # The teacher samples the worker drew went into the trainer's cache, as the trainer's own do.
    entries = [[json.loads(p.read_text())["entries"] for p in sorted((tmp_path / f"cache{w}" / "teacher").glob("*"))]
               for w in (0, 1)]
    assert entries[0] and entries[0] == entries[1]


def test_a_reward_function_runs_in_the_worker_as_in_the_trainer(teacher_dir, student_dir, tmp_path, monkeypatch):
    """The user's reward module (importable in the trainer only from its working directory) is
    imported by the worker too; the rewards and weights are the trainer's own; its errors come
    back as the trainer's one line naming the record."""
    (tmp_path / "async_rewards.py").write_text("def score(prompt, response, record):\n"
                                                "    return float(len(response) % 2)\n")
    (tmp_path / "async_rewards_bad.py").write_text("def score(prompt, response, record):\n"
                                                    "    raise KeyError('answer')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    runs = []
    for w in (0, 1):
        cfg = make_cfg(teacher_dir, student_dir, workers=w, steps=3)
        cfg.reward = RewardConfig(alpha=0.5, group=2, fn="async_rewards:score")
        runs.append(train_mod.train(cfg, tmp_path / f"run{w}").run_dir)
    here, there = rows(runs[0]), rows(runs[1])
    assert all("reward_mean" in r for r in here)
    assert here == [{k: v for k, v in r.items() if k != "staleness"} for r in there]
    assert same_weights(*runs)
    cfg = make_cfg(teacher_dir, student_dir, staleness=1, steps=3)
    cfg.reward = RewardConfig(alpha=0.5, group=2, fn="async_rewards_bad:score")
    with pytest.raises(DistillError, match=r"reward.fn=async_rewards_bad:score raised KeyError") as e:
        train_mod.train(cfg, tmp_path / "bad")
    assert "\n" not in str(e.value)


def test_a_worker_killed_mid_run_gives_the_same_weights(teacher_dir, student_dir, tmp_path, monkeypatch):
    import ray

    import distill.asynchronous.pipeline as pipeline

    whole = train_mod.train(make_cfg(teacher_dir, student_dir, 1), tmp_path / "whole")
    killed = []
    real = pipeline.Pipeline.take

    def take(self, step):
        if step == 3:  # step 4 was just sent: the worker dies generating it
            got = real(self, step)
            pid = ray.get(self.workers[0].identity.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return got
        return real(self, step)

    monkeypatch.setattr(pipeline.Pipeline, "take", take)
    again = train_mod.train(make_cfg(teacher_dir, student_dir, 1), tmp_path / "killed")
    assert killed
    assert rows(whole.run_dir) == rows(again.run_dir)
    assert same_weights(whole.run_dir, again.run_dir)


def test_a_trainer_killed_and_resumed_ends_as_an_uninterrupted_run(teacher_dir, student_dir, tmp_path):
    """kill -9 of the trainer at s = 2 after a checkpoint, then ``distill resume=RUN``: the steps
    generated ahead come back from the checkpoint, and the weights are the uninterrupted run's."""
    args = [f"teacher.path={teacher_dir}", f"student.path={student_dir}", "recipe=gkd", "sources.async.staleness=2",
            "sources.student.max_new_tokens=8", "data.num_train=40", "data.num_validation=4", "data.num_test=4",
            "data.max_length=96", "trainer.steps=8", "trainer.batch_size=4", "trainer.save_every=2",
            "trainer.eval_every=100", "trainer.warmup_steps=1", "trainer.progress=false", "final_eval=false"]
    whole, cut = cli_killed_and_resumed(args, tmp_path)
    assert same_weights(whole, cut)
    assert rows(whole, "policy") == rows(cut, "policy")


def test_bad_settings_are_refused(teacher_dir, student_dir):
    cfg = make_cfg(teacher_dir, student_dir, staleness=1, workers=0)
    with pytest.raises(DistillError, match="workers=0 leaves none"):
        validate(cfg)
    cfg = make_cfg(teacher_dir, student_dir, staleness=-1)
    with pytest.raises(DistillError, match="staleness must be >= 0"):
        validate(cfg)
