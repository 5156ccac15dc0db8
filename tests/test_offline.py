"""The offline teacher cache: written once (``distill cache-teacher``), read in training with no
teacher forward, equal to the in-process teacher; checked, resumable, and refused where it does
not fit the run."""

from __future__ import annotations

import copy
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

import distill.train as train_mod
from distill.config import DataConfig, DistillConfig, LossConfig, ModelConfig, TeacherConfig, TrainerConfig
from distill.data import IGNORE_INDEX, collate
from distill.errors import DistillError
from distill.models import load_model
from distill.objective import batch_loss
from distill.offline.build import cache_teacher, encoded_splits, run_tokenizer
from distill.offline.store import DONE, CacheReader, row_key, shard_name
from distill.offline.teacher import cached_teacher
from distill.sources import check as check_sources
from distill.teacher import LocalTeacher
from distill.tracking import WALL_CLOCK, MetricsLog

KINDS = ["fkl", "rkl", "gjsd", "tvd", "skew_fkl", "skew_rkl"]


def make_cfg(teacher_dir, student_dir, cache=None, **teacher) -> DistillConfig:
    return DistillConfig(
        teacher=TeacherConfig(path=str(teacher_dir), cache=None if cache is None else str(cache), **teacher),
        student=ModelConfig(path=str(student_dir)),
        data=DataConfig(num_train=24, num_validation=4, num_test=4, max_length=96),
        loss=LossConfig(kind="gjsd", beta=0.5),
        trainer=TrainerConfig(steps=3, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3,
                              log_every=1, max_new_tokens=6, eval_batch_size=8, progress=False),
    )


@pytest.fixture(scope="module")
def caches(teacher_dir, student_dir, tmp_path_factory):
    """A float32 hidden-state cache and a top-8 cache of ``make_cfg``'s data (shards of 16 examples)."""
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for name, extra in (("hidden", dict(cache_dtype="float32")), ("top8", dict(cache_top_k=8))):
        cfg = make_cfg(teacher_dir, student_dir, root / name, cache_shard_examples=16, **extra)
        out[name] = (cfg, cache_teacher(cfg, progress=False))
    return out


def _batch_and_models(cfg):
    tokenizer = run_tokenizer(cfg)
    pairs = encoded_splits(cfg, tokenizer)["train"][:8]
    cpu = torch.device("cpu")
    teacher = load_model(cfg.teacher, "teacher", cpu)
    student = load_model(cfg.student, "student", cpu)
    return tokenizer, collate(pairs, tokenizer.pad_token_id), teacher, student


@pytest.mark.parametrize("fused", [True, False])
def test_cached_teacher_gives_the_in_process_loss_and_gradient(caches, fused):
    cfg, summary = caches["hidden"]
    assert summary.rows == 32 and summary.shards == 2  # 24 + 4 + 4 distinct sequences, 16 a shard
    tokenizer, batch, teacher, student = _batch_and_models(cfg)
    cached = cached_teacher(cfg, tokenizer, torch.device("cpu"))
    vocab = len(tokenizer)
    for kind in KINDS:
        loss = LossConfig(kind=kind, ce_weight=0.25)
        grads = []
        for t in (LocalTeacher(teacher), cached):
            student.zero_grad()
            terms = batch_loss(loss, student, t, batch, bf16=False, vocab=vocab, fused=fused)
            terms.loss.backward()
            grads.append((terms.loss.detach(), student.lm_head.weight.grad.clone()))
        (a, ga), (b, gb) = grads
        assert torch.allclose(a, b, rtol=1e-6, atol=0), (kind, a, b)
        assert (ga - gb).abs().max() <= 1e-6 * ga.abs().max(), kind  # (teacher forwards batched otherwise)
    assert cached.module is None and cached.reader.rows_read == len(KINDS) * batch.input_ids.shape[0]


def test_a_run_from_the_cache_equals_the_in_process_run_without_the_teacher_body(caches, tmp_path, monkeypatch):
    cfg, _ = caches["hidden"]
    live = train_mod.train(make_cfg(cfg.teacher.path, cfg.student.path), tmp_path / "live")
    loaded = []
    real_load = train_mod.load_model
    monkeypatch.setattr(train_mod, "load_model", lambda m, role, *a, **k: loaded.append(role) or real_load(
        m, role, *a, **k))
    cached = train_mod.train(cfg, tmp_path / "cached")
    assert loaded == ["student"]  # the teacher's body never loaded: its head alone, from its checkpoint
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK and k != "teacher_ce"}  # noqa: E731
                          for r in rows]
    a = strip(MetricsLog.read(live.run_dir / "metrics.jsonl"))
    b = strip(MetricsLog.read(cached.run_dir / "metrics.jsonl"))
    # Equal to float rounding: the cache ran the teacher on other batches (other padding widths).
    assert len(a) >= 4 and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in rb.items() if isinstance(v, float)}, rel=1e-6, abs=1e-12), ra["step"]
        assert {k: v for k, v in ra.items() if not isinstance(v, float)} == {
            k: v for k, v in rb.items() if not isinstance(v, float)}
    assert set(live.test) - set(cached.test) == {"teacher"}  # the teacher's own row needs its body
    for row in cached.test:
        assert cached.test[row] == pytest.approx(live.test[row], rel=1e-6)
    wa = load_file(str(live.model_dir / "model.safetensors"))
    wb = load_file(str(cached.model_dir / "model.safetensors"))
    # Adam's steps are about lr = 3e-3 each: the weights agree to a few 1e-4 of one step.
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_sources_the_cache_cannot_hold_are_refused_unless_the_teacher_is_live(caches, tmp_path):
    cfg, _ = caches["hidden"]
    cfg = copy.deepcopy(cfg)
    cfg.sources.weights["student"].start = 1.0
    with pytest.raises(DistillError, match=r"sources.weights.student: student samples .* teacher.live=true"):
        check_sources(cfg)
    cfg.teacher.live = True
    assert [s.name for s in check_sources(cfg)] == ["dataset", "student"]
    cfg.trainer.steps, cfg.final_eval = 2, False
    cfg.sources.weights["dataset"].start = 0.0  # on-policy only: every teacher forward is live
    result = train_mod.train(cfg, tmp_path / "mixed")
    rows = [r for r in MetricsLog.read(result.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["source_student"] for r in rows] == [1.0, 1.0]


def test_top_k_cache_trains_on_the_bucketed_divergence(caches):
    cfg, summary = caches["top8"]
    assert summary.bytes_per_token < caches["hidden"][1].bytes_per_token / 2
    tokenizer, batch, teacher, student = _batch_and_models(cfg)
    cached = cached_teacher(cfg, tokenizer, torch.device("cpu"))
    positions = batch.labels[:, 1:] != IGNORE_INDEX
    top = cached.top_k(batch.input_ids, batch.attention_mask, positions)
    # The stored top 8 are the teacher's own: its largest log-probabilities, and its tail's mass.
    with torch.no_grad():
        z = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :len(tokenizer)]
    logp = z.float().log_softmax(-1)[positions]
    want, ids = logp.topk(8, dim=-1)
    assert torch.equal(top.ids, ids)
    assert torch.allclose(top.logprobs, want, atol=2e-2)  # bf16 storage
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert torch.allclose(top.tail, tail, atol=1e-5)
    exact = batch_loss(LossConfig(kind="fkl"), student, LocalTeacher(teacher), batch, bf16=False,
                       vocab=len(tokenizer), fused=True).loss
    approx = batch_loss(LossConfig(kind="fkl"), student, cached, batch, bf16=False, vocab=len(tokenizer),
                        fused=True).loss
    assert approx < exact  # merging the tail loses information: forward KL can only fall
    # ... to the forward KL between the bucketed distributions (float64, from the student's logits).
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    s = s[positions].double().log_softmax(-1)
    q = torch.cat([s.gather(-1, top.ids), s.scatter(-1, top.ids, float("-inf")).logsumexp(-1, keepdim=True)], -1)
    p = torch.cat([top.logprobs.double(), top.tail.double()[:, None]], -1).log_softmax(-1)
    assert float(approx.detach()) == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-5)


def test_the_cache_refuses_other_data_and_other_teachers(caches, teacher_dir, student_dir, tmp_path):
    cfg, _ = caches["hidden"]
    other = make_cfg(teacher_dir, student_dir, cfg.teacher.cache)
    other.data.num_train = 40
    with pytest.raises(DistillError, match=r"of 40 train sequences are not in teacher.cache"):
        train_mod.train(other, tmp_path / "r")
    # cache-teacher refuses to add to a directory written with other settings, naming them.
    other.teacher.cache_dtype = "bfloat16"
    with pytest.raises(DistillError, match=r"differing: cache_dtype, data"):
        cache_teacher(other, progress=False)
    # A run with another teacher precision: refused by name before any step.
    other = make_cfg(teacher_dir, student_dir, cfg.teacher.cache)
    other.trainer.precision = "bf16"
    with pytest.raises(DistillError, match=r"written for another run \(precision: fp32 there, bf16 here\)"):
        train_mod.train(other, tmp_path / "r2")


def test_a_damaged_or_unfinished_cache_is_never_read(caches, tmp_path):
    cfg, _ = caches["hidden"]
    dup = tmp_path / "copy"
    shutil.copytree(cfg.teacher.cache, dup)
    reader = CacheReader(dup)
    key = next(iter(reader.index))
    shard, row = reader.index[key]
    start = reader.shards[shard].offsets[row]
    # Flip one byte of the row's stored hidden states, where the file holds them.
    path = dup / shard_name(shard)
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8: 8 + header])
    begin = 8 + header + meta["hidden"]["data_offsets"][0] + start * 4 * meta["hidden"]["shape"][1]
    raw[begin + 1] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match=rf"{shard_name(shard)}: row {row} fails its check"):
        CacheReader(dup).row(key)
    (dup / DONE).unlink()
    with pytest.raises(DistillError, match="is incomplete"):
        CacheReader(dup)


def test_each_rank_reads_only_the_rows_of_its_own_batches(caches):
    cfg, _ = caches["hidden"]
    tokenizer = run_tokenizer(cfg)
    pairs = encoded_splits(cfg, tokenizer)["train"]
    teacher = cached_teacher(cfg, tokenizer, torch.device("cpu"))
    reads = []
    real = teacher.reader.row
    teacher.reader.row = lambda key: reads.append(key) or real(key)
    for rank in range(2):  # ranks take alternate examples, as DistillSampler's shards do
        mine = pairs[rank::2][:4]
        batch = collate(mine, tokenizer.pad_token_id)
        teacher.hidden_states(batch.input_ids, batch.attention_mask, positions=batch.labels[:, 1:] != IGNORE_INDEX)
        assert reads == [row_key(p + c, len(p)) for p, c in mine]
        reads.clear()


@pytest.mark.slow
def test_a_killed_cache_teacher_resumes_at_its_shard_and_writes_the_same_cache(teacher_dir, student_dir, tmp_path):
    args = [f"teacher.path={teacher_dir}", f"student.path={student_dir}", "data.num_train=300",
            "data.num_validation=4", "data.num_test=4", "data.max_length=96", "teacher.cache_shard_examples=16",
            "trainer.eval_batch_size=4", "trainer.progress=false"]
    cmd = [sys.executable, "-m", "distill.cli", "cache-teacher"]
    whole = subprocess.run([*cmd, *args, f"teacher.cache={tmp_path / 'whole'}"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    shards = json.loads((tmp_path / "whole" / DONE).read_text())["shards"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, *args, f"teacher.cache={cut}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / shard_name(3)).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in cut.glob("shard_*"))
    assert 4 <= len(written) < shards and not (cut / DONE).exists()
    before = {n: (cut / n).stat().st_mtime_ns for n in written}
    again = subprocess.run([*cmd, *args, f"teacher.cache={cut}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"({shards - len(written)} written now)" in again.stdout
    assert all((cut / n).stat().st_mtime_ns == t for n, t in before.items())  # kept, not redone
    assert not list(cut.glob(".shard_*"))
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.slow
def test_the_commands_say_what_is_wrong_in_one_line(caches, tmp_path):
    from test_cli import _one_line_error, run_cli

    cfg, _ = caches["hidden"]
    proc = run_cli("recipe=gkd", f"teacher.path={cfg.teacher.path}", f"student.path={cfg.student.path}",
                   f"teacher.cache={cfg.teacher.cache}", cwd=tmp_path)
    _one_line_error(proc, "sources.weights.student", "teacher.live=true")
    assert not (tmp_path / "outputs").exists()
    proc = run_cli("cache-teacher", f"teacher.path={cfg.teacher.path}", cwd=tmp_path)
    _one_line_error(proc, "cache-teacher: teacher.cache is not set")
    proc = run_cli("cache-teacher", f"teacher.cache={tmp_path / 'c'}", "teacher.cache_top_k=100000", cwd=tmp_path)
    _one_line_error(proc, "teacher.cache_top_k=100000 must be below the vocabulary")


def test_a_teacher_given_as_a_plain_model_config_still_works():
    cfg = DistillConfig(teacher=ModelConfig(path="t", dtype="bfloat16"))
    assert isinstance(cfg.teacher, TeacherConfig) and cfg.teacher.dtype == "bfloat16" and cfg.teacher.cache is None
