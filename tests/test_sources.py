"""Sources of training sequences: the per-step draw, schedules, sampling, generated labels, and
training on a mixture (post-generation token counts, exact resume)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import WALL_CLOCK, final_weights, make_cfg, train_killed_in_step_5

import distill.loop as loop_mod
import distill.train as train_mod
from distill.config import DistillConfig, SamplingConfig, Schedule, source_weights
from distill.data import collate
from distill.errors import DistillError
from distill.fused_loss import LossTerms
from distill.generation import responses, sample
from distill.losses import count_tokens
from distill.models import load_model, load_tokenizer
from distill.schedule import value_at
from distill.sources import REGISTRY
from distill.sources.base import Generated, GeneratingSource, SourceContext, SourceStats
from distill.sources.mixture import draw_source
from distill.teacher import as_teacher
from distill.tracking import MetricsLog


def test_schedules():
    assert value_at(Schedule(0.3), 50, 100) == 0.3
    assert value_at(Schedule(1.0, 0.0, "linear"), 25, 101) == pytest.approx(0.75)  # steps 0 .. 100
    assert value_at(Schedule(1.0, 0.0, "linear", steps=50), 80, 100) == 0.0  # stays at the end
    assert value_at(Schedule(1.0, 0.0, "cosine"), 50, 101) == pytest.approx(0.5)
    assert value_at(Schedule(1.0, 0.0, "cosine"), 25, 101) == pytest.approx(0.8536, abs=1e-4)
    assert [value_at(Schedule(8, 2, "step", steps=3), s, 10) for s in (0, 2, 3, 9)] == [8, 8, 2, 2]
    # Without steps: the run's last step (total - 1) is at the end value, for every kind.
    for kind in ("linear", "cosine", "step"):
        assert value_at(Schedule(1.0, 0.0, kind), 99, 100) == 0.0, kind


def test_the_draw_follows_the_weights_and_depends_only_on_seed_and_step():
    w = source_weights(dataset=Schedule(0.3), student=Schedule(0.7))
    draws = [draw_source(w, 5, s, 4000) for s in range(4000)]
    assert draws == [draw_source(w, 5, s, 4000) for s in range(4000)]  # no hidden state
    assert set(draws) == {"dataset", "student"}
    share = draws.count("student") / 4000
    assert abs(share - 0.7) < 4 * (0.7 * 0.3 / 4000) ** 0.5
    assert draws != [draw_source(w, 6, s, 4000) for s in range(4000)]  # the seed matters
    # A schedule: SKD first, on-policy at the end.
    moving = source_weights(dataset=Schedule(0.0), skd=Schedule(1.0, 0.0, "linear"),
                           student=Schedule(0.0, 1.0, "linear"))
    early = [draw_source(moving, 0, s, 1000) for s in range(100)]
    late = [draw_source(moving, 0, s, 1000) for s in range(900, 1000)]
    assert early.count("skd") > 80 and late.count("student") > 80
    with pytest.raises(DistillError, match="every weight is 0 at step 1000"):
        draw_source(source_weights(dataset=Schedule(1.0, 0.0, "linear")), 0, 1000, 1000)


@pytest.mark.slow
def test_the_draw_is_the_same_in_another_process():
    """Two ranks draw alike: the draw of a fresh interpreter equals this one's."""
    code = ("from distill.config import Schedule, source_weights; from distill.sources.mixture import draw_source; "
            "w = source_weights(dataset=Schedule(0.5), student=Schedule(0.25), skd=Schedule(0.25)); "
            "print(','.join(draw_source(w, 3, s, 200) for s in range(200)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    w = source_weights(dataset=Schedule(0.5), student=Schedule(0.25), skd=Schedule(0.25))
    assert other.split(",") == [draw_source(w, 3, s, 200) for s in range(200)]


@pytest.mark.slow
def test_the_draw_is_the_same_on_two_ranks():
    """Two gloo ranks (processes) draw each step's source alike: no rank flips its own coin."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = str(Path(__file__).with_name("two_rank_draw.py"))
    procs = [subprocess.Popen([sys.executable, script, port, str(rank)], stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0].strip() == "same", outs


def test_responses_end_at_the_first_stop():
    new = torch.tensor([[5, 6, 2, 0, 0], [7, 8, 9, 10, 11], [2, 0, 0, 0, 0]])
    assert responses(new, [2]) == [[5, 6, 2], [7, 8, 9, 10, 11], [2]]
    assert responses(new, [9, 2]) == [[5, 6, 2], [7, 8, 9], [2]]


def test_sampling_is_seeded_in_eval_mode_and_restores_state(teacher_dir, tokenizer_dir):
    model = load_model(_cfg_model(teacher_dir), "t", torch.device("cpu"))
    model.train()
    tok = load_tokenizer(tokenizer_dir)
    prompts = [tok("Write 12 in words.").input_ids, tok("Tom has 3 apples.").input_ids]
    modes = []
    real = model.generate
    model.generate = lambda *a, **k: modes.append(model.training) or real(*a, **k)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12)
    state = torch.random.get_rng_state()
    a = sample(model, prompts, cfg, pad_id=tok.pad_token_id, stops=[tok.eos_token_id], seed=3, vocab=len(tok))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    assert modes == [False] and model.training  # eval mode (dropout off) while sampling, train mode after
    assert a == sample(model, prompts, cfg, pad_id=tok.pad_token_id, stops=[tok.eos_token_id], seed=3, vocab=len(tok))
    assert a != sample(model, prompts, cfg, pad_id=tok.pad_token_id, stops=[tok.eos_token_id], seed=4, vocab=len(tok))
    # The teacher has 24 padding rows beyond the tokenizer: never sampled, even when they are likely.
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tok):] *= 50
    many = sample(model, prompts * 8, cfg, pad_id=tok.pad_token_id, stops=[tok.eos_token_id], seed=0, vocab=len(tok))
    assert max(max(r) for r in many) < len(tok)
    greedy = sample(model, prompts[:1], SamplingConfig(greedy=True, max_new_tokens=6), pad_id=tok.pad_token_id,
                    stops=[tok.eos_token_id], seed=0)
    ref = real(input_ids=torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id)[0, len(prompts[0]):].tolist()
    assert greedy[0] == ref[: len(greedy[0])]


def test_sampling_ignores_the_models_generation_defaults(teacher_dir, tokenizer_dir):
    """A generation_config.json with a repetition penalty and min_new_tokens (as instruct models
    ship them) must not shape the samples: they come from the model's distribution."""
    model = load_model(_cfg_model(teacher_dir), "t", torch.device("cpu"))
    tok = load_tokenizer(tokenizer_dir)
    prompts = [tok("Write 12 in words.").input_ids, tok("Tom has 3 apples.").input_ids] * 4
    args = dict(pad_id=tok.pad_token_id, stops=[tok.eos_token_id], seed=5, vocab=len(tok))
    plain = [sample(model, prompts, SamplingConfig(**kw, max_new_tokens=16), **args)
             for kw in (dict(), dict(greedy=True))]
    model.generation_config.repetition_penalty, model.generation_config.min_new_tokens = 5.0, 15
    assert [sample(model, prompts, SamplingConfig(**kw, max_new_tokens=16), **args)
            for kw in (dict(), dict(greedy=True))] == plain
    assert model.generation_config.repetition_penalty == 5.0  # put back


def test_evaluation_ignores_the_models_generation_defaults(teacher_dir, tokenizer_dir):
    """Evaluation's greedy completions come through the same helper as the samples: a planted
    repetition penalty and min_new_tokens change none of them."""
    from distill.data import Record
    from distill.evaluation import generate

    model = load_model(_cfg_model(teacher_dir), "t", torch.device("cpu"))
    tok = load_tokenizer(tokenizer_dir)
    records = [Record(prompt=p, completion="", source="test") for p in
               ("Write 12 in words.", "Tom has 3 apples.", "Spell cat backwards.")]
    args = dict(max_new_tokens=16, batch_size=2, max_length=64)
    plain = generate(model, tok, records, **args)
    model.generation_config.repetition_penalty, model.generation_config.min_new_tokens = 5.0, 15
    assert generate(model, tok, records, **args) == plain
    assert model.generation_config.repetition_penalty == 5.0  # put back


def make_sequences(source, pairs, sources_cfg, *, student, teacher, pad_id, stops, max_length, vocab, seed,
                   teacher_cache=None, keep_teacher_hidden=False, step=0):
    """``pairs`` through the source named ``source``: (pairs, stats, teacher hidden states)."""
    ctx = SourceContext(sources_cfg, student, as_teacher(teacher), pad_id=pad_id, stops=stops, max_length=max_length,
                        vocab=vocab, teacher_cache=teacher_cache, keep_teacher_hidden=keep_teacher_hidden)
    got = REGISTRY[source].sequences(pairs, ctx, step=step, seed=seed)
    return got.pairs, got.stats, got.hidden


def _cfg_model(path):
    from distill.config import ModelConfig

    return ModelConfig(path=str(path))


@pytest.mark.parametrize("source", ["student", "teacher", "skd"])
def test_generated_pairs_replace_the_responses(teacher_dir, student_dir, tokenizer_dir, source):
    """Prompts kept, responses generated (through the first stop), labels rebuilt from them."""
    cfg = make_cfg(teacher_dir, student_dir)
    cfg.sources.skd.k = Schedule(5.0)
    tok = load_tokenizer(tokenizer_dir)
    cpu = torch.device("cpu")
    student, teacher = load_model(cfg.student, "s", cpu), load_model(cfg.teacher, "t", cpu)
    data = train_mod.TrainData(cfg.data, tok, seed=0)
    pairs = data.next_pairs(6)
    got, stats, _ = make_sequences(source, pairs, cfg.sources, student=student, teacher=teacher,
                                   pad_id=tok.pad_token_id, stops=[tok.eos_token_id], max_length=cfg.data.max_length,
                              vocab=len(tok), seed=1)
    assert [p for p, _ in got] == [p for p, _ in pairs]
    assert [c for _, c in got] != [c for _, c in pairs]
    for _, r in got:
        assert 1 <= len(r) <= cfg.sources.skd.max_new_tokens and max(r) < len(tok)
        assert tok.eos_token_id not in r[:-1]
    batch = collate(got, tok.pad_token_id)
    assert count_tokens(batch.labels[:, 1:]) == sum(len(r) for _, r in got) == stats.tokens == stats.generated
    if source == "skd":
        assert stats.drafted > 0 and 0 < stats.teacher_forwards < stats.tokens
    # Truncated: reached max_new_tokens (48 for every source here) without a stop token. These random
    # models seldom stop; with every token a stop, each response ends at its first token.
    limit = cfg.sources.student.max_new_tokens
    assert stats.truncated == sum(len(r) == limit and r[-1] != tok.eos_token_id for _, r in got) > 0
    assert stats.metrics()["gen_truncated"] == stats.truncated / 6 and stats.clipped == 0
    warned = "truncated" in stats.problems(cfg.data.max_length, [tok.eos_token_id])
    assert warned == (stats.truncated / 6 > 0.2)
    every = list(range(len(tok)))
    short, stats, _ = make_sequences(source, pairs, cfg.sources, student=student, teacher=teacher,
                                   pad_id=tok.pad_token_id, stops=every, max_length=cfg.data.max_length,
                                   vocab=len(tok), seed=1)
    assert {len(r) for _, r in short} == {1} and stats.truncated == 0
    # Clipped: prompt and response cut to data.max_length.
    tight = max(len(p) for p, _ in pairs) + 3
    _, stats, _ = make_sequences(source, pairs, cfg.sources, student=student, teacher=teacher,
                                   pad_id=tok.pad_token_id, stops=[tok.eos_token_id], max_length=tight,
                               vocab=len(tok), seed=1)
    assert stats.clipped == sum(len(r) > tight - len(p) for (p, _), (_, r) in zip(pairs, got, strict=True)) > 0
    assert "data.max_length" in stats.problems(tight, [tok.eos_token_id])["clipped"]


def test_a_run_whose_samples_never_stop_warns_once(teacher_dir, student_dir, tmp_path, capsys):
    """On-policy samples of a random student hit max_new_tokens without a stop token: the metric
    counts them in every logged interval and the console warns once, naming the likely causes."""
    cfg = make_cfg(teacher_dir, student_dir, steps=3, eval_every=100)
    cfg.final_eval, cfg.data.num_validation = False, 0
    cfg.sources.weights = source_weights(dataset=Schedule(0.0), student=Schedule(1.0))
    cfg.sources.student.max_new_tokens = 4
    result = train_mod.train(cfg, tmp_path / "run")
    rows = [r for r in MetricsLog.read(result.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 3 and all(r["gen_truncated"] > 0.2 for r in rows)
    printed = " ".join(capsys.readouterr().err.split())
    assert printed.count("samples reached max_new_tokens without a stop token") == 1
    assert "wrong stop token or a base-model student" in printed


def test_the_loss_is_normalised_by_the_generated_token_count(teacher_dir, student_dir, tmp_path, monkeypatch):
    """On-policy steps: a loss of 1 per counted token must log exactly 1, which it does only if the
    step divides by the tokens of the generated responses (the dataset's completions are longer
    or shorter: dividing by their count, a peer's bug, logs something else)."""
    def per_token_one(loss_cfg, student, teacher, batch, **kw):
        n = count_tokens(batch.labels[:, 1:])
        zero = sum(p.sum() for p in student.parameters()) * 0
        return LossTerms(zero + n, None, None)

    monkeypatch.setattr(loop_mod, "batch_loss", per_token_one)
    cfg = make_cfg(teacher_dir, student_dir, steps=2, grad_accum=2, eval_every=100)
    cfg.final_eval = False
    cfg.sources.weights = source_weights(dataset=Schedule(0.0), student=Schedule(1.0))
    cfg.sources.student.max_new_tokens = 3  # far shorter than the dataset's completions
    run = train_mod.train(cfg, tmp_path / "run")
    rows = [r for r in MetricsLog.read(run.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] for r in rows] == [1.0, 1.0] and all(r["source_student"] == 1.0 for r in rows)
    assert all(r["response_length"] <= 3 for r in rows)
    # The step trained on the generated responses (8 of them a step), not the dataset's.
    assert rows[0]["response_tokens"] == pytest.approx(8 * rows[0]["response_length"])


class ReversedPromptSource(GeneratingSource):
    """A fifth source, defined here as a user would in a file of their own: each response is the
    prompt's last three tokens reversed, then a stop token."""

    name = "reversed"
    what = "the prompt's tail, reversed"

    def generate(self, prompts, ctx, *, step, seed, synced):
        self.calls = getattr(self, "calls", 0) + 1
        got = [p[-3:][::-1] + ctx.stops[:1] for p in prompts]
        return Generated(got, limit=4, stats=SourceStats(generated=sum(map(len, got))))


def test_a_new_source_is_a_class_and_a_registry_line(teacher_dir, student_dir, tmp_path, monkeypatch):
    """A source defined outside distill, registered with one line, trains: the steps draw it, the
    loss counts its responses, the metrics and the plan name it; an unknown name and a teacher
    source without a teacher are refused by name before anything loads."""
    from distill.plan import make_plan

    source = ReversedPromptSource()
    monkeypatch.setitem(REGISTRY, "reversed", source)  # the registry line
    cfg = make_cfg(teacher_dir, student_dir, steps=2, eval_every=100)
    cfg.final_eval, cfg.data.num_validation = False, 0
    cfg.sources.weights = source_weights(dataset=Schedule(0.0), reversed=Schedule(1.0))
    assert "reversed: the prompt's tail, reversed; weight 1; about 100% of steps" in make_plan(cfg, 1).sources
    rows = [r for r in MetricsLog.read(train_mod.train(cfg, tmp_path / "run").run_dir / "metrics.jsonl")
            if r["split"] == "train"]
    assert source.calls == 2 and all(r["source_reversed"] == 1.0 and r["source_dataset"] == 0.0 for r in rows)
    assert all(r["response_length"] == 4 for r in rows)  # its responses, not the dataset's
    assert rows[-1]["response_tokens"] == 2 * 4 * 4  # 2 steps x 4 sequences x 4 tokens
    cfg.sources.weights = source_weights(dataset=Schedule(0.0), reverse=Schedule(1.0))
    with pytest.raises(DistillError, match="sources.weights.reverse: no such source; the sources are dataset, "
                                           "teacher, student, skd, reversed"):
        train_mod.train(cfg, tmp_path / "typo")
    cfg.sources.weights, cfg.teacher.path, cfg.loss.kind = source_weights(skd=Schedule(0.5)), "", "ce"
    with pytest.raises(DistillError, match="sources.weights.skd generates with the teacher, but teacher.path"):
        train_mod.train(cfg, tmp_path / "no-teacher")


@pytest.mark.parametrize("weights,cache", [
    (dict(dataset=Schedule(0.5), student=Schedule(0.5)), True),
    (dict(dataset=Schedule(0.0), skd=Schedule(1.0), teacher=Schedule(0.5)), True),
    (dict(dataset=Schedule(0.0), teacher=Schedule(1.0)), False),
])
def test_a_killed_mixture_run_resumes_exactly(teacher_dir, student_dir, tmp_path, monkeypatch, weights, cache):
    """kill during step 5 of a run that generates (on-policy; SKD and SeqKD; SeqKD without the
    teacher cache, so the resumed run samples the teacher again), resume: the same metrics and
    weights as the run that was not killed."""
    def cfg():
        c = make_cfg(teacher_dir, student_dir)
        c.sources.weights = source_weights(**weights)
        c.sources.teacher_cache = None if cache else "none"
        c.sources.skd.k = Schedule(8.0, 2.0, "linear")
        for s in (c.sources.student, c.sources.teacher):
            s.max_new_tokens = 8
        c.sources.skd.max_new_tokens = 8
        return c

    full = train_mod.train(cfg(), tmp_path / "full")
    rows = [r for r in MetricsLog.read(full.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert sum(r.get("gen_seconds", 0) > 0 for r in rows) >= 2  # generating steps happened
    train_killed_in_step_5(cfg(), tmp_path / "cut", monkeypatch)
    resumed = train_mod.train(DistillConfig(resume=str(tmp_path / "cut")), tmp_path / "ignored")
    # The later runs read the teacher's responses from the cache the first one wrote: the same
    # responses (the same losses below), but no teacher forwards for them.
    cached = ("teacher_forwards_per_token", "teacher_cache_hits")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK + cached} for r in rows]  # noqa: E731
    hits = any(r.get("teacher_cache_hits") for r in MetricsLog.read(resumed.run_dir / "metrics.jsonl"))
    assert hits == bool(weights.get("teacher") and cache)
    assert strip(MetricsLog.read(full.run_dir / "metrics.jsonl")) == strip(
        MetricsLog.read(resumed.run_dir / "metrics.jsonl"))
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_teacher_cache_reuses_responses_and_refuses_a_bad_file(teacher_dir, student_dir, tokenizer_dir,
                                                                   tmp_path, monkeypatch):
    """Greedy SeqKD responses: generated once, then read back (also by a new cache object on the same
    files); other settings or other teacher weights use another file; a tampered file is ignored
    with a warning, never used."""
    import distill.teacher as teacher_mod
    from distill.sources.teacher_cache import TeacherCache

    calls = []
    real_sample = teacher_mod.sample
    monkeypatch.setattr(teacher_mod, "sample", lambda m, prompts, *a, **k: calls.append(len(prompts)) or
                        real_sample(m, prompts, *a, **k))
    cfg = make_cfg(teacher_dir, student_dir)
    cfg.sources.teacher = SamplingConfig(greedy=True, max_new_tokens=6)
    tok = load_tokenizer(tokenizer_dir)
    cpu = torch.device("cpu")
    teacher = load_model(cfg.teacher, "t", cpu)
    pairs = train_mod.TrainData(cfg.data, tok, seed=0).next_pairs(4)
    cache_key = dict(stops=[tok.eos_token_id], vocab=len(tok), dtype="float32")

    def run(cache, these=pairs, seed=1):
        return make_sequences("teacher", these, cfg.sources, student=teacher, teacher=teacher, pad_id=tok.pad_token_id,
                              stops=[tok.eos_token_id], max_length=96, vocab=len(tok),
                            seed=seed, teacher_cache=cache)[:2]

    cache = TeacherCache(tmp_path, teacher_dir, cfg.sources.teacher, **cache_key)
    first, stats = run(cache)
    assert calls == [4] and stats.cached == 0 and stats.teacher_forwards > 0
    again, stats = run(cache, seed=2)  # greedy: the seed does not matter
    assert calls == [4] and again == first and stats.cached == 4 and stats.teacher_forwards == 0
    # Hits are shown as hits, not as a generation speed (nothing was generated).
    assert stats.generated == 0 and "gen_tokens_per_s" not in stats.metrics()
    assert stats.note().startswith("teacher cache hits 4/4") and "tok/s" not in stats.note()
    part, _ = run(cache, these=pairs[:2] + train_mod.TrainData(cfg.data, tok, seed=9).next_pairs(1))
    assert calls == [4, 1] and part[:2] == first[:2]  # only the new prompt is generated
    cache.save()
    assert run(TeacherCache(tmp_path, teacher_dir, cfg.sources.teacher, **cache_key))[0] == first and calls == [4, 1]
    # Other settings, other teacher weights: other files.
    other = TeacherCache(tmp_path, teacher_dir, SamplingConfig(greedy=True, max_new_tokens=7), **cache_key)
    assert other.path != cache.path and not other.entries
    changed = tmp_path / "teacher2"
    shutil.copytree(teacher_dir, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert TeacherCache(tmp_path, changed, cfg.sources.teacher, **cache_key).path != cache.path
    for other_key in (dict(cache_key, stops=[tok.eos_token_id, 7]), dict(cache_key, vocab=150),
                      dict(cache_key, dtype="bfloat16")):
        assert TeacherCache(tmp_path, teacher_dir, cfg.sources.teacher, **other_key).path != cache.path
    # A tampered entry fails the checksum: warned about, not used, rebuilt on save.
    saved = json.loads(cache.path.read_text())
    key = next(iter(saved["entries"]))
    saved["entries"][key] = [5, 5, 5]
    cache.path.write_text(json.dumps(saved))
    with pytest.warns(RuntimeWarning, match="checksum does not match"):
        tampered = TeacherCache(tmp_path, teacher_dir, cfg.sources.teacher, **cache_key)
    assert not tampered.entries
    cache.path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert not TeacherCache(tmp_path, teacher_dir, cfg.sources.teacher, **cache_key).entries


def test_a_sampled_batch_is_reused_whole_or_not_at_all(tmp_path, teacher_dir):
    from distill.sources.teacher_cache import TeacherCache

    cache = TeacherCache(tmp_path, teacher_dir, SamplingConfig(temperature=0.7), stops=[2], vocab=200,
                         dtype="float32")
    batch = [[1, 2], [3, 4], [5]]
    cache.store(batch, 7, [[9], [8], [7]], batch)
    assert cache.lookup(batch, 7) == [[9], [8], [7]]
    assert cache.lookup(batch, 8) == [None] * 3  # another seed: other samples
    assert cache.lookup(batch[:2], 7) == [None] * 2  # another batch: other samples


@pytest.mark.parametrize("source,fused", [("skd", True), ("skd", False), ("teacher", True)])
def test_generation_keeps_the_teachers_hidden_states_for_the_loss(teacher_dir, student_dir, tokenizer_dir, source,
                                                                  fused):
    """SKD's verification forwards and SeqKD's decoding steps already computed the teacher's final
    hidden states before every response token: the loss on them runs no teacher forward and equals
    the loss after a fresh teacher forward (relative 1e-5 in fp32; the KV-cached forwards round
    differently), gradients too."""
    from distill.config import LossConfig
    from distill.objective import batch_loss
    from distill.sources.base import aligned_hidden

    cfg = make_cfg(teacher_dir, student_dir)
    tok = load_tokenizer(tokenizer_dir)
    cpu = torch.device("cpu")
    student, teacher = load_model(cfg.student, "s", cpu), load_model(cfg.teacher, "t", cpu).eval()
    cfg.sources.skd.k = Schedule(4.0)
    pairs = train_mod.TrainData(cfg.data, tok, seed=0).next_pairs(6)
    got, stats, hidden = make_sequences(source, pairs, cfg.sources, student=student, teacher=teacher,
                                        pad_id=tok.pad_token_id, stops=[tok.eos_token_id], max_length=40,
                                        vocab=len(tok), seed=2, keep_teacher_hidden=True)
    assert hidden is not None and any(len(p) + len(r) == 40 for p, r in got)  # some responses cut
    assert source != "skd" or stats.drafted > stats.accepted > 0
    batch = collate(got, tok.pad_token_id)
    forwards = []
    teacher.get_decoder().register_forward_pre_hook(lambda *a: forwards.append(1))
    loss_cfg = LossConfig(kind="gjsd", beta=0.3)

    def loss_and_grads(h):
        student.zero_grad()
        loss = batch_loss(loss_cfg, student, as_teacher(teacher), batch, bf16=False, vocab=len(tok), fused=fused,
                          teacher_hidden=h).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    reused, g_reused = loss_and_grads(aligned_hidden(got, hidden, batch))
    assert forwards == []
    fresh, g_fresh = loss_and_grads(None)
    assert forwards == [1]
    assert abs(float(reused - fresh)) < 1e-5 * abs(float(fresh))
    for a, b in zip(g_reused, g_fresh, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9


def test_a_distillspec_run_ends_with_its_draft_measured(teacher_dir, student_dir, tmp_path, monkeypatch):
    """draft.enabled: the run exports the student as a draft for the teacher (vocabulary padded to
    the teacher's, loadable) and its report holds alpha and tau by gamma from eval-draft, measured
    on the test prompts of the run's own tasks and difficulty."""
    from transformers import AutoModelForCausalLM

    import distill.draft_eval

    asked = []
    real = distill.draft_eval.builtin_records
    monkeypatch.setattr(distill.draft_eval, "builtin_records", lambda c, *a: asked.append(c) or real(c, *a))
    cfg = make_cfg(teacher_dir, student_dir, steps=2, eval_every=100)
    cfg.final_eval = False
    cfg.data.tasks, cfg.data.difficulty = ["arithmetic"], "easy"
    cfg.sources.weights = source_weights(dataset=Schedule(0.0), student=Schedule(1.0))
    cfg.sources.student.max_new_tokens = 8
    cfg.draft.enabled, cfg.draft.gammas, cfg.draft.num_prompts = True, [1, 2], 4
    cfg.draft.max_new_tokens, cfg.draft.repeats = 6, 1
    # The report's measured peak is read after the draft report (which loads teacher and draft again).
    # The read itself is the kernel's high-water mark, which can miss a peak already freed: what is
    # checked is the order.
    events = []
    real_report, real_peak = train_mod._draft_report, train_mod.peak_rss_bytes
    monkeypatch.setattr(train_mod, "_draft_report", lambda *a: events.append("draft report") or real_report(*a))
    monkeypatch.setattr(train_mod, "peak_rss_bytes", lambda: events.append("peak read") or real_peak())
    run = train_mod.train(cfg, tmp_path / "run")
    report = json.loads((run.run_dir / "report.json").read_text())
    assert events == ["draft report", "peak read"] and report["memory"]["measured_peak_bytes"] > 0
    assert 0 <= report["draft"]["alpha"] <= 1 and [r["gamma"] for r in report["draft"]["by_gamma"]] == [1, 2]
    assert all(1 <= r["tau_measured"] <= r["gamma"] + 1 for r in report["draft"]["by_gamma"])
    assert "the student as a draft for the teacher" in (run.run_dir / "report.md").read_text()
    draft = AutoModelForCausalLM.from_pretrained(run.run_dir / "draft")
    assert draft.config.vocab_size == AutoModelForCausalLM.from_pretrained(teacher_dir).config.vocab_size
    assert (run.run_dir / "draft_eval" / "draft_eval.png").is_file()
    assert [(c.tasks, c.difficulty) for c in asked] == [(["arithmetic"], "easy")]
    assert report["draft"]["prompts"] == "4 prompts of the built-in test split (arithmetic; difficulty easy)"


def test_a_draft_report_on_user_data_uses_the_runs_own_prompts(teacher_dir, student_dir, tmp_path, monkeypatch):
    """distillspec on user data without data.test: the draft is measured on data.validation's
    prompts (never the built-in tasks), and the report names them. Without either split the run
    is refused before it starts."""
    import distill.draft_eval

    read = []
    real = distill.draft_eval.read_records
    monkeypatch.setattr(distill.draft_eval, "read_records", lambda path, *a, **k: read.append(path) or
                        real(path, *a, **k))
    monkeypatch.setattr(distill.draft_eval, "builtin_records", lambda *a: pytest.fail("built-in prompts used"))
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for f, numbers in ((train_file, range(8)), (val_file, range(20, 26))):
        f.write_text("".join(json.dumps({"question": f"Write {i} in words.", "completion": "words"}) + "\n"
                             for i in numbers))
    cfg = make_cfg(teacher_dir, student_dir, steps=1, eval_every=100)
    cfg.data.train, cfg.data.validation, cfg.data.prompt_field = str(train_file), str(val_file), "question"
    cfg.data.metric = "none"
    cfg.draft.enabled, cfg.draft.gammas, cfg.draft.num_prompts = True, [1], 4
    cfg.draft.max_new_tokens, cfg.draft.repeats = 4, 1
    run = train_mod.train(cfg, tmp_path / "run")
    assert read == [val_file]
    report = json.loads((run.run_dir / "report.json").read_text())
    assert report["draft"]["prompts"] == f"4 prompts of data.validation ({val_file})"
    assert f"on 4 prompts of data.validation ({val_file})" in (run.run_dir / "report.md").read_text()
    cfg.data.validation = None
    with pytest.raises(DistillError, match="draft.enabled measures the draft on the run's held-out prompts"):
        train_mod.train(cfg, tmp_path / "refused")


def test_teacher_hidden_is_refused_for_a_soft_capped_teacher():
    """The head's output is not a Gemma-2 teacher's logits (soft-capping after it): hidden states
    from SKD cannot stand in for its forward, and the loss says so instead of computing nonsense."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from distill.config import LossConfig
    from distill.objective import batch_loss

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=30.0))
    batch = collate([([1, 2, 3], [4, 5])], 0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        batch_loss(LossConfig(kind="fkl"), gemma, as_teacher(gemma), batch, bf16=False, vocab=64, fused=False,
                   teacher_hidden=torch.zeros(1, 4, 32))


@pytest.mark.slow
def test_kill_9_during_an_on_policy_run_then_resume(teacher_dir, student_dir, tmp_path):
    """A real ``kill -9`` of the ``distill`` process in the middle of a GKD run (lambda 0.5), then
    ``distill resume=DIR``: the same metrics, test results and weights as a run that was not
    killed. Unlike the tests above nothing is planted: the kill lands wherever the process is,
    possibly inside a checkpoint or a metrics line."""
    overrides = [
        f"teacher.path={teacher_dir}", f"student.path={student_dir}", "loss.kind=gjsd",
        "sources.weights.dataset.start=0.5", "sources.weights.student.start=0.5", "sources.student.max_new_tokens=8",
        "data.num_train=24", "data.num_validation=4", "data.num_test=4", "data.max_length=96",
        "trainer.steps=40", "trainer.batch_size=4", "trainer.lr=3e-3", "trainer.warmup_steps=1",
        "trainer.eval_every=20", "trainer.save_every=3", "trainer.log_every=1", "trainer.max_new_tokens=6",
        "trainer.progress=false",
    ]
    cli = [sys.executable, "-m", "distill"]
    subprocess.run([*cli, *overrides, f"output_dir={tmp_path / 'full'}"], check=True, cwd=tmp_path,
                   capture_output=True, timeout=600)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cli, *overrides, f"output_dir={cut}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        log = cut / "metrics.jsonl"
        if log.exists() and '"step": 10,' in log.read_text():  # a few checkpoints in, far from the end
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists()
    subprocess.run([*cli, f"resume={cut}"], check=True, cwd=tmp_path, capture_output=True, timeout=600)

    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]  # noqa: E731
    full_rows = MetricsLog.read(tmp_path / "full" / "metrics.jsonl")
    assert sum(r.get("source_student", 0) for r in full_rows if r["split"] == "train") >= 5  # on-policy steps ran
    assert strip(full_rows) == strip(MetricsLog.read(cut / "metrics.jsonl"))
    report = lambda d: json.loads((d / "report.json").read_text())["test"]  # noqa: E731
    assert report(tmp_path / "full") == report(cut)
    wa, wb = final_weights(tmp_path / "full"), final_weights(cut)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
