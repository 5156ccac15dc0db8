"""Several teachers (``teachers``): the weighted sum and the routing equal their single-teacher
parts, any kind of teacher can be a member, the per-teacher breakdown, the refusals, and two
specialist teachers teaching one student by routing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama

import distill.train as train_mod
from distill.config import DataConfig, DistillConfig, LossConfig, ModelConfig, TeacherConfig, TrainerConfig, validate
from distill.data import collate, encode_split
from distill.errors import DistillError
from distill.models import load_model, load_tokenizer
from distill.objective import batch_loss
from distill.offline.build import cache_teacher
from distill.offline.teacher import cached_teacher
from distill.sources import check as check_sources
from distill.teacher import LocalTeacher, Teachers
from distill.tracking import MetricsLog

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def second_teacher(tokenizer_dir, tmp_path_factory):
    return make_llama(tokenizer_dir, tmp_path_factory.mktemp("teacher_b"), hidden=40, seed=5)


def make_cfg(a_dir, b_dir, student_dir, combine="sum", **members) -> DistillConfig:
    extra = members or ({"a": dict(routes=["arithmetic"]), "b": dict(routes=["spelling"])} if combine == "route"
                        else {"a": dict(weight=3.0), "b": {}})
    return DistillConfig(
        teachers={"a": TeacherConfig(path=str(a_dir), **extra["a"]), "b": TeacherConfig(path=str(b_dir), **extra["b"])},
        combine=combine, student=ModelConfig(path=str(student_dir)),
        data=DataConfig(num_train=24, num_validation=4, num_test=4, max_length=96),
        loss=LossConfig(kind="gjsd", beta=0.5),
        trainer=TrainerConfig(steps=3, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3,
                              log_every=1, max_new_tokens=6, eval_batch_size=8, progress=False),
    )


def _setup(teacher_dir, second_teacher, student_dir):
    tok = load_tokenizer(student_dir, "student")
    records, pairs, _ = encode_split(DataConfig(num_train=8), "train", tok)
    ta = LocalTeacher(load_model(ModelConfig(path=str(teacher_dir)), "teacher", CPU))
    tb = LocalTeacher(load_model(ModelConfig(path=str(second_teacher)), "teacher", CPU))
    return tok, records[:8], pairs[:8], ta, tb, load_model(ModelConfig(path=str(student_dir)), "student", CPU)


def _terms(loss, student, teacher, batch, vocab, fused):
    student.zero_grad()
    terms = batch_loss(loss, student, teacher, batch, bf16=False, vocab=vocab, fused=fused)
    terms.loss.backward()
    return terms, student.lm_head.weight.grad.clone()


@pytest.mark.parametrize("fused", [True, False])
def test_the_sum_of_teachers_is_the_weighted_sum_of_their_losses(teacher_dir, second_teacher, student_dir, fused):
    tok, _, pairs, ta, tb, student = _setup(teacher_dir, second_teacher, student_dir)
    batch, vocab = collate(pairs, tok.pad_token_id), len(tok)
    both = Teachers({"a": ta, "b": tb}, weights={"a": 3.0, "b": 1.0})
    for kind in ("fkl", "gjsd", "tvd"):
        loss = LossConfig(kind=kind, ce_weight=0.25)
        (sa, ga), (sb, gb) = (_terms(loss, student, t, batch, vocab, fused) for t in (ta, tb))
        terms, g = _terms(loss, student, both, batch, vocab, fused)
        assert torch.allclose(terms.loss, 0.75 * sa.loss + 0.25 * sb.loss, rtol=1e-6, atol=0), kind
        assert torch.allclose(terms.divergence, 0.75 * sa.divergence + 0.25 * sb.divergence, rtol=1e-6), kind
        assert torch.allclose(terms.cross_entropy, sa.cross_entropy, rtol=1e-6), kind  # counted once
        assert (g - (0.75 * ga + 0.25 * gb)).abs().max() <= 1e-6 * g.abs().max(), kind
        n = int((batch.labels[:, 1:] != -100).sum())
        assert {k: (float(d), t) for k, (d, t) in terms.by_teacher.items()} == {
            "a": (pytest.approx(float(sa.divergence), rel=1e-6), n),
            "b": (pytest.approx(float(sb.divergence), rel=1e-6), n)}


@pytest.mark.parametrize("fused", [True, False])
def test_routing_teaches_each_row_by_its_own_teacher(teacher_dir, second_teacher, student_dir, fused):
    tok, records, pairs, ta, tb, student = _setup(teacher_dir, second_teacher, student_dir)
    vocab = len(tok)
    routed = Teachers({"a": ta, "b": tb}, routes={"arithmetic": "a", "spelling": "b"})
    routed.learn(records, pairs)
    rows = {n: [i for i, r in enumerate(records) if r.task == task] for n, task in (("a", "arithmetic"),
                                                                                    ("b", "spelling"))}
    assert rows["a"] and rows["b"]
    loss = LossConfig(kind="rkl", ce_weight=0.25)
    terms, g = _terms(loss, student, routed, collate(pairs, tok.pad_token_id), vocab, fused)
    # Each teacher alone on its own rows (a batch of those rows, padded to their own width).
    alone = {n: _terms(loss, student, t, collate([pairs[i] for i in rows[n]], tok.pad_token_id), vocab, fused)
             for n, t in (("a", ta), ("b", tb))}
    assert torch.allclose(terms.loss, alone["a"][0].loss + alone["b"][0].loss, rtol=1e-6, atol=0)
    assert torch.allclose(terms.cross_entropy, alone["a"][0].cross_entropy + alone["b"][0].cross_entropy, rtol=1e-6)
    g_alone = alone["a"][1] + alone["b"][1]
    assert (g - g_alone).abs().max() <= 1e-6 * g.abs().max()
    for n in ("a", "b"):
        div, tokens = terms.by_teacher[n]
        assert float(div) == pytest.approx(float(alone[n][0].divergence), rel=1e-6)
        assert tokens == sum(len(pairs[i][1]) for i in rows[n])


def test_one_member_is_the_single_teacher_exactly(teacher_dir, second_teacher, student_dir):
    tok, _, pairs, ta, _, student = _setup(teacher_dir, second_teacher, student_dir)
    batch, loss = collate(pairs, tok.pad_token_id), LossConfig(kind="gjsd", ce_weight=0.5)
    (one, g1), (alone, g2) = (_terms(loss, student, t, batch, len(tok), True)
                              for t in (Teachers({"a": ta}, weights={"a": 2.0}), ta))
    assert torch.equal(one.loss, alone.loss) and torch.equal(g1, g2)


def test_a_cached_member_teaches_as_the_loaded_one(teacher_dir, second_teacher, student_dir, tmp_path):
    cfg = make_cfg(teacher_dir, second_teacher, student_dir)
    view = DistillConfig(teacher=TeacherConfig(path=str(teacher_dir), cache=str(tmp_path / "a"), cache_dtype="float32"),
                         student=cfg.student, data=cfg.data, loss=cfg.loss, trainer=cfg.trainer)
    cache_teacher(view, progress=False)
    tok, _, _, ta, tb, student = _setup(teacher_dir, second_teacher, student_dir)
    pairs = encode_split(cfg.data, "train", tok)[1][:6]
    batch, loss = collate(pairs, tok.pad_token_id), LossConfig(kind="fkl")
    cached = cached_teacher(view, tok, CPU)
    (x, gx), (y, gy) = (_terms(loss, student, Teachers({"a": a, "b": tb}, weights={"a": 1.0, "b": 1.0}), batch,
                               len(tok), True) for a in (ta, cached))
    assert torch.allclose(x.loss, y.loss, rtol=1e-6, atol=0) and (gx - gy).abs().max() <= 1e-6 * gx.abs().max()


def test_a_routed_run_reports_each_teacher(teacher_dir, second_teacher, student_dir, tmp_path):
    result = train_mod.train(make_cfg(teacher_dir, second_teacher, student_dir, "route"), tmp_path / "run")
    train_rows = [r for r in MetricsLog.read(result.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train_rows and all(r["divergence_a"] > 0 and r["divergence_b"] > 0 for r in train_rows)
    assert {"teacher a", "teacher b", "student before", "student after"} <= set(result.test)
    assert result.test["student after"]["divergence_a"] > 0
    assert "teacher a" in (result.run_dir / "report.md").read_text()


def test_several_teachers_are_refused_where_they_cannot_work(teacher_dir, second_teacher, student_dir,
                                                            swapped_student_dir, tmp_path):
    def refused(cfg, *needles, check=validate):
        with pytest.raises(DistillError) as e:
            check(cfg)
        assert all(n in str(e.value) for n in needles), str(e.value)

    ok = make_cfg(teacher_dir, second_teacher, student_dir)
    validate(ok)
    both = make_cfg(teacher_dir, second_teacher, student_dir)
    both.teacher.path = str(teacher_dir)
    refused(both, "teacher and teachers are both set")
    refused(make_cfg(teacher_dir, second_teacher, student_dir, "route", a=dict(routes=["arithmetic"]), b={}),
            "teachers.b.routes", "data.task values")
    refused(make_cfg(teacher_dir, second_teacher, student_dir, "route", a=dict(routes=["arithmetic"]),
                     b=dict(routes=["arithmetic"])), "teachers.b.routes", "teachers.a already")
    refused(make_cfg(teacher_dir, second_teacher, student_dir, "sum", a=dict(weight=0.0), b={}), "teachers.a.weight")
    refused(make_cfg(teacher_dir, second_teacher, student_dir, "sum", a=dict(routes=["x"]), b={}),
            "teachers.a.routes", "combine=route")
    refused(make_cfg(teacher_dir, second_teacher, student_dir, "sum", a=dict(live=True), b={}), "teachers.a.live")
    seqkd = make_cfg(teacher_dir, second_teacher, student_dir)
    seqkd.sources.weights["teacher"].start = 1.0
    refused(seqkd, "sources.weights.teacher", "one teacher", check=check_sources)
    cached = make_cfg(teacher_dir, second_teacher, student_dir, "sum", a=dict(cache=str(tmp_path)), b={})
    cached.sources.weights["student"].start = 1.0
    refused(cached, "sources.weights.student", "teachers.a.cache", "teachers.a.live=true", check=check_sources)
    # A member's tokenizer must be the student's, as a single teacher's is.
    with pytest.raises(DistillError, match="teachers.b: "):
        train_mod.train(make_cfg(teacher_dir, swapped_student_dir, student_dir), tmp_path / "swapped")
    # A task no route names, named with its record.
    with pytest.raises(DistillError, match=r"builtin:spelling: its task 'spelling' is routed to no teacher"):
        train_mod.train(make_cfg(teacher_dir, second_teacher, student_dir, "route", a=dict(routes=["arithmetic"]),
                                 b=dict(routes=["other"])), tmp_path / "unrouted")
    tok, records, pairs, ta, tb, _ = _setup(teacher_dir, second_teacher, student_dir)
    routed = Teachers({"a": ta, "b": tb}, routes={"arithmetic": "a", "spelling": "b"})
    routed.learn(records[:2], pairs[:2])
    b = collate(pairs, tok.pad_token_id)
    with pytest.raises(DistillError, match="no record of the data holds"):
        routed.parts(b.input_ids, b.attention_mask, b.labels[:, 1:] != -100)


TINY = ["student.tokenizer=${asset:teacher}", "student.arch.hidden_size=128", "student.arch.num_layers=2",
        "student.arch.intermediate_size=384", "trainer.batch_size=32", "trainer.progress=false",
        "data.difficulty=easy", "data.num_validation=20", "data.num_test=100", "draft.enabled=false"]


@pytest.mark.slow
def test_two_specialists_teach_one_student_by_routing(tmp_path):
    """Each specialist is pretrained (recipe=pretrain_teacher) on one task alone; a student taught by
    both, each example by its task's specialist, beats each specialist on the other's task."""
    import json

    from test_cli import run_cli

    def run(name, *args):
        proc = run_cli(*args, *TINY, f"output_dir={tmp_path / name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((tmp_path / name / "report.json").read_text())["test"]

    run("arith", "recipe=pretrain_teacher", "data.tasks=[arithmetic]", "trainer.steps=400", "trainer.lr=3e-3",
        "trainer.eval_every=400", "trainer.save_every=400")
    run("spell", "recipe=pretrain_teacher", "data.tasks=[spelling]", "trainer.steps=300", "trainer.eval_every=300",
        "trainer.save_every=300")
    test = run("student", "teacher=none", "student=tiny", "combine=route", "trainer.steps=300",
               "trainer.eval_every=300", "trainer.save_every=300",
               f"+teachers={{arith:{{path:{tmp_path / 'arith/model'},routes:[arithmetic]}},"
               f"spell:{{path:{tmp_path / 'spell/model'},routes:[spelling]}}}}")
    after = test["student after"]
    print({row: {k: v for k, v in r.items() if "accuracy" in k} for row, r in test.items()})
    assert after["arithmetic/accuracy"] > test["teacher spell"]["arithmetic/accuracy"]
    assert after["spelling/accuracy"] > test["teacher arith"]["spelling/accuracy"]
    for name in ("arith", "spell"):  # each teacher's part of the divergence fell
        assert after[f"divergence_{name}"] < test["student before"][f"divergence_{name}"] / 4


def test_the_plan_holds_each_teachers_weights_or_head(teacher_dir, second_teacher, student_dir, tmp_path):
    from distill.plan import make_plan, model_shape

    a, b = (model_shape(TeacherConfig(path=str(d)), "teacher") for d in (teacher_dir, second_teacher))
    loaded = make_plan(make_cfg(teacher_dir, second_teacher, student_dir), world=1)
    assert loaded.chosen.resident["teacher weights"] == 4 * (a.parameters + b.parameters)
    one_cached = make_plan(make_cfg(teacher_dir, second_teacher, student_dir, "sum", a=dict(cache=str(tmp_path)),
                                    b={}), world=1)
    assert one_cached.chosen.resident["teacher weights"] == 4 * (a.rows * a.hidden + b.parameters)
    served = make_plan(make_cfg(teacher_dir, second_teacher, student_dir, "sum", a=dict(remote="x"),
                                b=dict(remote="y")), world=1)
    assert "teacher weights" not in served.chosen.resident
    assert served.chosen.resident["teacher LM head"] >= 4 * (a.rows * a.hidden + b.rows * b.hidden)
    assert served.chosen.training["teacher hidden states"] == loaded.chosen.training["teacher hidden states"] == (
        4 * 96 * (a.hidden + b.hidden) * 4)  # batch_size 4 of max_length 96, fp32


def test_each_served_member_is_asked_for_its_share_of_the_next_step_at_once(teacher_dir, second_teacher,
                                                                           student_dir):
    """A member's ``prefetch`` stands for the whole next step (a served teacher keeps only the last
    call's requests), so ``Teachers`` asks each member once, with its rows of every batch."""
    tok, records, pairs, ta, tb, _ = _setup(teacher_dir, second_teacher, student_dir)

    class Asked(LocalTeacher):
        prefetches = True

        def prefetch(self, batches, bf16=False):
            self.calls = [*getattr(self, "calls", []), [ids.shape[0] for ids, _, _ in batches]]

    a, b = Asked(ta.model), Asked(tb.model)
    batches = [(x.input_ids, x.attention_mask, x.labels[:, 1:] != -100)
               for x in (collate(pairs[:4], tok.pad_token_id), collate(pairs[4:], tok.pad_token_id))]
    Teachers({"a": a, "b": b}, weights={"a": 1.0, "b": 1.0}).prefetch(batches)
    assert a.calls == b.calls == [[4, 4]]
    routed = Teachers({"a": a, "b": b}, routes={"arithmetic": "a", "spelling": "b"})
    routed.learn(records, pairs)
    a.calls = b.calls = []
    routed.prefetch(batches)
    tasks = [r.task for r in records]
    for member, task in ((a, "arithmetic"), (b, "spelling")):
        want = [n for n in (tasks[:4].count(task), tasks[4:].count(task)) if n]
        assert member.calls == [want], (task, member.calls)


@pytest.mark.parametrize("combine", ["sum", "route"])
def test_the_reward_term_is_added_once_with_several_teachers(teacher_dir, second_teacher, student_dir, combine):
    """With several teachers (weights 3 and 1, or routed by task) the policy-gradient term adds
    sum_i w_i CE_i once, whatever the parts and their weights: the objective with the term minus
    the objective without it is that sum, measured on whole logits. Breaks caught: the term on
    every part, a part's weight not divided out."""
    tok, records, pairs, ta, tb, student = _setup(teacher_dir, second_teacher, student_dir)
    teachers = Teachers({"a": ta, "b": tb}, weights={"a": 3.0, "b": 1.0}) if combine == "sum" else \
        Teachers({"a": ta, "b": tb}, routes={"arithmetic": "a", "spelling": "b"})
    teachers.learn(records, pairs)
    b = collate(pairs, tok.pad_token_id)
    loss, vocab = LossConfig(kind="fkl"), len(tok)
    pg = torch.linspace(-1.0, 1.5, len(pairs))
    with torch.no_grad():
        without = batch_loss(loss, student, teachers, b, bf16=False, vocab=vocab, fused=True).loss
        with_term = batch_loss(loss, student, teachers, b, bf16=False, vocab=vocab, fused=True, pg_weights=pg).loss
        logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1, :vocab].float()
        labels = b.labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # 0 where ignored
    assert float(with_term - without) == pytest.approx(float((pg[:, None] * ce).sum()), rel=1e-4)
