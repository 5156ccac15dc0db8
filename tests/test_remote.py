"""A teacher served on Ray (``distill serve-teacher``) on a local cluster: the same losses,
samples and runs as the teacher in this process; a worker killed mid-run is restarted and the run
ends identical; a teacher that differs, or workers that are gone, stop the run in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import cli_killed_and_resumed

import distill.train as train_mod
from distill.config import (
    DataConfig,
    DistillConfig,
    LossConfig,
    ModelConfig,
    SamplingConfig,
    TeacherConfig,
    TrainerConfig,
)
from distill.data import collate
from distill.errors import DistillError
from distill.models import load_model
from distill.objective import batch_loss
from distill.offline.build import encoded_splits, run_tokenizer
from distill.remote.teacher import RemoteTeacher, remote_teacher
from distill.teacher import LocalTeacher
from distill.tracking import WALL_CLOCK, MetricsLog

pytestmark = pytest.mark.slow  # a Ray cluster and serve-teacher subprocesses


def serve(teacher_dir, name: str, cwd, workers: int = 1) -> subprocess.Popen:
    """``distill serve-teacher`` in a subprocess (its output in ``cwd/NAME.log``), once it is ready."""
    log = cwd / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "serve-teacher", f"teacher.path={teacher_dir}",
                                 f"teacher.remote={name}", f"teacher.remote_workers={workers}"], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if "ready" in log.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"serve-teacher did not get ready: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.log.read_text()[-3000:]
    return proc.log.read_text()


@pytest.fixture(scope="module")
def served(teacher_dir, tmp_path_factory):
    """The test teacher served as ``t`` (one worker: the other CPU is for the next server); this
    process disconnects at the end."""
    proc = serve(teacher_dir, "t", tmp_path_factory.mktemp("serve"))
    yield "t"
    import ray

    ray.shutdown()
    assert "serve-teacher t: stopped" in stop(proc)


def make_cfg(teacher_dir, student_dir, remote=None, overlap=None) -> DistillConfig:
    return DistillConfig(
        teacher=TeacherConfig(path=str(teacher_dir), remote=remote, remote_overlap=overlap),
        student=ModelConfig(path=str(student_dir)),
        data=DataConfig(num_train=24, num_validation=4, num_test=4, max_length=96),
        loss=LossConfig(kind="gjsd", beta=0.5),
        trainer=TrainerConfig(steps=3, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3,
                              log_every=1, max_new_tokens=6, eval_batch_size=8, progress=False),
    )


def test_the_remote_teacher_gives_the_local_losses_and_samples(served, teacher_dir, student_dir):
    cfg = make_cfg(teacher_dir, student_dir, served)
    tokenizer = run_tokenizer(cfg)
    pairs = encoded_splits(cfg, tokenizer)["train"][:8]
    batch = collate(pairs, tokenizer.pad_token_id)
    cpu = torch.device("cpu")
    local = LocalTeacher(load_model(cfg.teacher, "teacher", cpu))
    student = load_model(cfg.student, "student", cpu)
    remote = remote_teacher(cfg, tokenizer, cpu)
    vocab = len(tokenizer)
    for kind in ("fkl", "rkl", "gjsd", "tvd", "skew_rkl"):
        for fused in (True, False):
            loss = LossConfig(kind=kind, ce_weight=0.25)
            a, b = (batch_loss(loss, student, t, batch, bf16=False, vocab=vocab, fused=fused).loss.detach()
                    for t in (local, remote))
            assert torch.equal(a, b), (kind, fused, a, b)  # the same forward on the same batch, elsewhere
    prompts = [p for p, _ in pairs[:4]]
    sampling = SamplingConfig(max_new_tokens=8)
    got = []
    for t in (local, remote):
        hidden = []
        responses = t.generate(prompts, sampling, pad_id=tokenizer.pad_token_id, stops=[tokenizer.eos_token_id],
                               seed=7, vocab=vocab, hidden=hidden)
        got.append((responses, hidden))
    assert got[0][0] == got[1][0] and all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1], strict=True))
    # bf16 on the wire: half the bytes, and the loss within bf16's rounding.
    half = remote_teacher(make_cfg(teacher_dir, student_dir, served), tokenizer, cpu)
    half.wire = "bfloat16"
    a, b = (batch_loss(LossConfig(kind="fkl"), student, t, batch, bf16=False, vocab=vocab, fused=True).loss.detach()
            for t in (local, half))
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=1e-2)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK and k != "teacher_ce"} for r in rows]


def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_identical(served, teacher_dir, student_dir, tmp_path,
                                                                         monkeypatch):
    live = train_mod.train(make_cfg(teacher_dir, student_dir), tmp_path / "local")
    made = []
    monkeypatch.setattr(train_mod, "remote_teacher", lambda *a, **k: made.append(remote_teacher(*a, **k)) or made[-1])
    remote = train_mod.train(make_cfg(teacher_dir, student_dir, served, overlap=True), tmp_path / "remote")
    monkeypatch.undo()
    assert _strip(MetricsLog.read(live.run_dir / "metrics.jsonl")) == _strip(
        MetricsLog.read(remote.run_dir / "metrics.jsonl"))
    # Steps 2 and 3 found their hidden states asked for during the step before (prefetch).
    assert made[0].prefetched >= 2 and not made[0].pending
    # A kill -9 of the worker before the third forward: Ray restarts it and sends the request again.
    import ray

    calls, killed = {"n": 0}, []
    real = RemoteTeacher.hidden_states

    def killing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            pid = ray.get(self.worker.identity.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RemoteTeacher, "hidden_states", killing)
    again = train_mod.train(make_cfg(teacher_dir, student_dir, served), tmp_path / "killed")
    assert killed and calls["n"] > 3
    cfg = make_cfg(teacher_dir, student_dir, served)
    worker = remote_teacher(cfg, run_tokenizer(cfg), torch.device("cpu")).worker
    assert ray.get(worker.identity.remote())["pid"] != killed[0]  # a new process answers since the kill
    assert _strip(MetricsLog.read(again.run_dir / "metrics.jsonl")) == _strip(
        MetricsLog.read(remote.run_dir / "metrics.jsonl"))
    wa, wb = (load_file(str(r.model_dir / "model.safetensors")) for r in (remote, again))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_on_policy_steps_ask_the_served_teacher_before_the_students_forward(served, teacher_dir, student_dir,
                                                                          tmp_path, monkeypatch):
    """Overlapping, on-policy samples are sent to the worker as soon as they are drawn, and the
    student's decoder runs while the worker computes: every training forward of a run on the
    student's samples was asked for ahead. By default on this machine (a CPU worker beside a CPU
    trainer) they take turns: nothing is asked ahead, the teacher's forward comes first. Both runs'
    metrics are the local teacher's."""
    import distill.loop as loop
    import distill.objective as objective

    runs, made, order, training = [], [], [], [False]
    hidden, decoder, accumulate = RemoteTeacher.hidden_states, objective.final_hidden, loop.accumulate

    def in_step(*a, **k):
        training[0] = True
        try:
            return accumulate(*a, **k)
        finally:
            training[0] = False

    monkeypatch.setattr(loop, "accumulate", in_step)
    monkeypatch.setattr(RemoteTeacher, "hidden_states",
                        lambda self, *a, **k: (training[0] and order.append("teacher")) or hidden(self, *a, **k))
    monkeypatch.setattr(objective, "final_hidden",
                        lambda *a, **k: (training[0] and order.append("student")) or decoder(*a, **k))
    orders = []
    for name, remote_name, overlap in (("local", None, None), ("overlapped", served, True), ("turns", served, None)):
        c = make_cfg(teacher_dir, student_dir, remote_name, overlap)
        c.sources.weights["dataset"].start, c.sources.weights["student"].start = 0.0, 1.0
        c.sources.student.max_new_tokens = 8
        if remote_name:
            monkeypatch.setattr(train_mod, "remote_teacher",
                                lambda *a, **k: made.append(remote_teacher(*a, **k)) or made[-1])
        order.clear()
        runs.append(MetricsLog.read(train_mod.train(c, tmp_path / name).run_dir / "metrics.jsonl"))
        orders.append(list(order))
    assert _strip(runs[0]) == _strip(runs[1]) == _strip(runs[2])
    forwards = orders[1].count("teacher")
    assert forwards >= 3 and made[0].prefetches and made[0].prefetched == forwards and not made[0].pending
    assert orders[1][:2] == ["student", "teacher"]  # each micro-batch: the student's decoder first
    assert orders[2].count("teacher") == forwards and not made[1].prefetches and made[1].prefetched == 0
    assert orders[2][:2] == ["teacher", "student"] and not made[1].pending


def test_rays_token_is_readable_by_its_owner_alone(served, tmp_path):
    """Ray writes its token readable by every user; distill makes it its owner's alone (the file of
    the cluster serving here, and any file given)."""
    import stat

    from distill.remote.cluster import private_token

    assert stat.S_IMODE((Path.home() / ".ray" / "auth_token").stat().st_mode) == 0o600
    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    private_token(token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    private_token(tmp_path / "absent")  # a token given another way: nothing to do


def test_another_teacher_is_refused_at_connect(served, tokenizer_dir, teacher_dir, student_dir, tmp_path):
    from conftest import make_llama

    other = make_llama(tokenizer_dir, tmp_path / "other", hidden=48, vocab_pad=24, seed=5)
    cfg = make_cfg(other, student_dir, served)
    with pytest.raises(DistillError, match=r"teacher.remote=t: worker 0 serves another teacher .*\(teacher: "):
        remote_teacher(cfg, run_tokenizer(cfg), torch.device("cpu"))
    cfg = make_cfg(teacher_dir, student_dir, "nobody")
    with pytest.raises(DistillError, match="teacher.remote=nobody: no workers of that name"):
        remote_teacher(cfg, run_tokenizer(cfg), torch.device("cpu"))


def test_workers_that_are_gone_stop_the_run_in_one_line(served, teacher_dir, student_dir, tmp_path):
    """serve-teacher killed: its workers go with it (once Ray sees their owner gone), nothing restarts
    them, and the next request stops the run in one line; no answer is ever partial."""
    proc = serve(teacher_dir, "gone", tmp_path)
    cfg = make_cfg(teacher_dir, student_dir, "gone")
    tokenizer = run_tokenizer(cfg)
    teacher = remote_teacher(cfg, tokenizer, torch.device("cpu"))
    batch = collate(encoded_splits(cfg, tokenizer)["train"][:2], tokenizer.pad_token_id)
    want = teacher.hidden_states(batch.input_ids, batch.attention_mask)
    proc.kill()
    proc.wait()
    deadline = time.time() + 120
    with pytest.raises(DistillError, match="teacher.remote=gone: a worker died and did not come back"):
        while time.time() < deadline:  # until Ray has noticed: every answer before that is whole
            assert torch.equal(teacher.hidden_states(batch.input_ids, batch.attention_mask), want)
            time.sleep(1)


def test_a_trainer_killed_and_resumed_ends_as_an_uninterrupted_run(served, teacher_dir, student_dir, tmp_path):
    """kill -9 of a trainer that uses a served teacher, then ``distill resume=RUN``: the same weights."""
    args = [f"teacher.path={teacher_dir}", f"student.path={student_dir}", f"teacher.remote={served}",
            "data.num_train=24", "data.num_validation=4", "data.num_test=4",
            "data.max_length=96", "trainer.steps=8", "trainer.batch_size=4", "trainer.save_every=2",
            "trainer.eval_every=100", "trainer.warmup_steps=1", "trainer.progress=false", "final_eval=false"]
    whole, cut = cli_killed_and_resumed(args, tmp_path)
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (whole, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_requests_sent_together_share_a_forward(served, teacher_dir, student_dir):
    """Several callers' requests (ranks, jobs) that arrive while a forward runs are answered by one
    forward: each answer as its own forward's, to float rounding (other padding widths)."""
    import ray

    cfg = make_cfg(teacher_dir, student_dir, served)
    tokenizer = run_tokenizer(cfg)
    pairs = encoded_splits(cfg, tokenizer)["train"]
    teacher = remote_teacher(cfg, tokenizer, torch.device("cpu"))
    requests = []
    for i in range(8):  # of different widths
        b = collate(pairs[3 * i: 3 * i + 2 + i % 3], tokenizer.pad_token_id)
        requests.append((b.input_ids, b.attention_mask, b.labels[:, 1:] != -100, False, "float32"))
    alone = [ray.get(teacher.worker.forward.remote(*r, f"caller{i}")) for i, r in enumerate(requests)]
    before = ray.get(teacher.worker.counts.remote())
    together = ray.get([teacher.worker.forward.remote(*r, f"caller{i}") for i, r in enumerate(requests)])
    after = ray.get(teacher.worker.counts.remote())
    assert after["requests"] - before["requests"] == 8 and after["forwards"] - before["forwards"] < 8
    # One caller's requests never share a forward: each is computed as on its own, bit for bit.
    mine = ray.get([teacher.worker.forward.remote(*r, "one caller") for r in requests])
    assert ray.get(teacher.worker.counts.remote())["forwards"] - after["forwards"] == 8
    assert all(torch.equal(a, b) for a, b in zip(alone, mine, strict=True))
    for a, b in zip(alone, together, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_skd_with_a_served_teacher_draws_what_a_local_teacher_draws(served, teacher_dir, student_dir, tmp_path):
    """SKD's verification rounds on the worker (its KV cache kept between rounds, the top-K taken
    here through the head): the same sequences, statistics and teacher hidden states as the
    teacher in this process, and a 3-step SKD run with the same metrics."""
    from distill.data import left_pad
    from distill.sources.skd import skd_generate

    cfg = make_cfg(teacher_dir, student_dir, served)
    tokenizer = run_tokenizer(cfg)
    cpu = torch.device("cpu")
    local = LocalTeacher(load_model(cfg.teacher, "teacher", cpu))
    remote = remote_teacher(cfg, tokenizer, cpu)
    student = load_model(cfg.student, "student", cpu)
    prompts = [p for p, _ in encoded_splits(cfg, tokenizer)["train"][:6]]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    outs = [skd_generate(student, t, ids, attention_mask=mask, k=3, gamma=3, max_new_tokens=12,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(3), vocab=len(tokenizer), keep_teacher_hidden=True)
            for t in (local, remote)]
    assert torch.equal(outs[0].sequences, outs[1].sequences) and outs[0].stats == outs[1].stats
    assert torch.equal(outs[0].target_hidden, outs[1].target_hidden)
    assert outs[1].stats.rounds > 1  # several rounds in one cached session
    # A session the worker lost (restarted, evicted) is rebuilt from the prefix: the same logits.
    import ray  # (after distill joined the cluster: it sets Ray's token authentication first)

    tokens = ids.clone()
    whole = remote.verifier()
    whole.forward(tokens, mask, 4)
    want = whole.forward(tokens, mask, tokens.shape[1])
    lost = remote.verifier()
    lost.forward(tokens, mask, 4)
    ray.get(remote.worker.close.remote(lost.session))
    assert torch.allclose(lost.forward(tokens, mask, tokens.shape[1]), want, rtol=1e-5, atol=1e-5)
    # A 3-step run on SKD alone: the served teacher's metrics are the local teacher's.
    runs = []
    for name, remote_name in (("local", None), ("remote", served)):
        c = make_cfg(teacher_dir, student_dir, remote_name)
        c.sources.weights["dataset"].start, c.sources.weights["skd"].start = 0.0, 1.0
        c.sources.skd.max_new_tokens = 8
        runs.append(MetricsLog.read(train_mod.train(c, tmp_path / name).run_dir / "metrics.jsonl"))
    assert _strip(runs[0]) == _strip(runs[1])
