"""Sampled evaluation: mean@n, pass@n and distinct right answers on planted samples, the ranks'
split of the records, and seeded samples that do not depend on how the records are split."""

from __future__ import annotations

import pytest

from distill.config import DataConfig, EvalConfig
from distill.data import Record, builtin_records
from distill.evaluation import _share, generate, generate_samples, sampled_metrics
from distill.models import load_model, load_tokenizer


def _arith(answer: int) -> Record:
    return Record("Ann has ...", f"1 + 2 = 3. #### {answer}", "builtin:arithmetic", "arithmetic")


def test_mean_pass_and_distinct_on_planted_samples():
    """Arithmetic: right means the final answer; two spellings of one right answer are two distinct
    right answers. Spelling is exact match. Each task's numbers, and their mean over the tasks.
    Breaks caught: pass@n as a mean, mean@n as any(), distinct counting wrong samples."""
    records = [_arith(5), _arith(7), Record("Write 3 in words.", "three", "builtin:spelling", "spelling")]
    samples = [
        ["#### 5", "2 + 3 = 5. #### 5", "#### 6", "#### 5"],  # 3 of 4 right, 2 distinct right texts
        ["#### 1", "#### 2", "#### 3", "nothing"],  # none right
        ["three", "  three ", "tree", "four"],  # 2 right, one distinct after whitespace
    ]
    m = sampled_metrics(records, samples)
    assert m["arithmetic/mean@4"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["arithmetic/pass@4"] == pytest.approx(0.5)
    assert m["arithmetic/distinct@4"] == pytest.approx((2 + 0) / 2)
    assert m["spelling/mean@4"] == pytest.approx(0.5)
    assert m["spelling/pass@4"] == 1.0 and m["spelling/distinct@4"] == 1.0
    assert m["mean@4"] == pytest.approx((3 / 8 + 0.5) / 2)
    assert m["pass@4"] == pytest.approx((0.5 + 1.0) / 2)


def test_user_data_is_scored_by_its_metric():
    """One group (the user's data): its numbers under plain names; exact match counts distinct right
    answers, a graded metric gives its mean and each prompt's best sample."""
    records = [Record("q1", "paris", "d.jsonl:1"), Record("q2", "rome", "d.jsonl:2")]
    samples = [["paris", "Paris", "paris "], ["milan", "rome", "roma"]]
    m = sampled_metrics(records, samples, metric="exact")
    assert m == {"mean@3": pytest.approx((2 / 3 + 1 / 3) / 2), "pass@3": 1.0, "distinct@3": 1.0}
    chrf = sampled_metrics(records, samples, metric="chrf")
    assert set(chrf) == {"chrf_mean@3", "chrf_pass@3"}
    assert chrf["chrf_pass@3"] == pytest.approx(100.0) and 0 < chrf["chrf_mean@3"] < 100


@pytest.mark.parametrize("n,size,world", [(10, 3, 2), (7, 7, 3), (2, 4, 2), (0, 4, 2)])
def test_the_ranks_split_the_batches_and_step_together_when_asked(n, size, world):
    """Each batch of records is run by exactly one rank; in lockstep every rank makes as many calls,
    the extra ones marked as not kept."""

    class Rank:
        def __init__(self, rank):
            self.rank, self.world = rank, world

    for lockstep in (False, True):
        shares = [_share(n, size, Rank(r), lockstep) for r in range(world)]
        kept = sorted((s, e) for share in shares for s, e, k in share if k)
        assert kept == [(s, min(s + size, n)) for s in range(0, n, size)]
        if lockstep:
            assert len({len(share) for share in shares}) == 1


def test_sampled_evaluation_is_seeded_and_does_not_depend_on_the_split(teacher_dir, tokenizer_dir):
    """The samples of a record are the same whether one process or two ranks (each its share of
    the batches) draw them; another split name draws others; greedy evaluation is split alike."""
    import torch

    tok = load_tokenizer(tokenizer_dir)
    from distill.config import ModelConfig

    model = load_model(ModelConfig(path=str(teacher_dir)), "t", torch.device("cpu"))
    records = builtin_records(DataConfig(), "validation", 6)
    cfg = EvalConfig(samples=3)
    kw = dict(seed=0, max_new_tokens=5, batch_size=4, max_length=96)  # 4 rows: one prompt's 3 samples a batch

    class Rank:
        def __init__(self, rank):
            self.rank, self.world = rank, 2

        def all_gather(self, obj):
            got.append(obj)
            return [obj]

    whole = generate_samples(model, tok, records, cfg, what="validation", **kw)
    assert len(whole) == 6 and all(len(s) == 3 for s in whole)
    got: list = []
    for r in (0, 1):
        generate_samples(model, tok, records, cfg, what="validation", engine=Rank(r), **kw)
    assert [s for _, s in sorted(x for part in got for x in part)] == whole
    assert generate_samples(model, tok, records, cfg, what="test", **kw) != whole
    greedy = generate(model, tok, records, max_new_tokens=5, batch_size=4, max_length=96)
    got = []
    for r in (0, 1):
        generate(model, tok, records, max_new_tokens=5, batch_size=4, max_length=96, engine=Rank(r))
    assert [s for _, (s,) in sorted(x for part in got for x in part)] == greedy
