"""Speculative KD: the top-K / top-p acceptance rule, and block-wise SKD distributed exactly as
token-by-token SKD (chi-square against the enumerated distribution, with a negative control)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_speculative import V, chi_square_p, exact_distribution, tiny_lm

from distill.config import ASSETS, DataConfig, ModelConfig
from distill.data import builtin_records, left_pad, prompt_ids
from distill.models import load_model, load_tokenizer
from distill.sources.skd import skd_generate
from distill.speculative import Verdict, propose_and_verify, teacher_top_k


def test_rule_accepts_the_top_k_prefix_and_replaces_the_first_miss():
    """Logits by hand (V = 4): a draft is in the top 2 unless two tokens score strictly higher."""
    t = torch.tensor([[[0.0, 3.0, 2.0, 1.0],   # draft 2: rank 2 -> in
                       [5.0, 4.0, 0.0, 1.0],   # draft 1: rank 2 -> in
                       [0.0, 0.0, 9.0, 1.0],   # draft 0: rank 2 (ties below) -> out
                       [1.0, 1.0, 1.0, 1.0]]])  # after the block: never used (no bonus)
    drafts = torch.tensor([[2, 1, 0]])
    v = teacher_top_k(drafts, None, t, k=2, greedy_teacher=True)
    assert v.n_ok.tolist() == [2] and v.n_emit.tolist() == [3]
    assert v.tokens[0, :3].tolist() == [2, 1, 2]  # the teacher's argmax replaces the miss
    v = teacher_top_k(drafts, None, t, k=3, greedy_teacher=True)  # all in: the block, no bonus token
    assert v.n_ok.tolist() == [3] and v.n_emit.tolist() == [3] and v.tokens[0, :3].tolist() == [2, 1, 0]
    v = teacher_top_k(torch.tensor([[0, 1, 0]]), None, t, k=1, greedy_teacher=True)  # first draft out
    assert v.n_ok.tolist() == [0] and v.n_emit.tolist() == [1] and v.tokens[0, 0].item() == 1
    # top-p: at position 0 the mass strictly above token 2 is p(1) = 0.64 (T = 1).
    p0 = torch.softmax(t[0, 0], -1)
    assert float(p0[1]) == pytest.approx(0.6439, abs=1e-3)
    assert teacher_top_k(drafts[:, :1], None, t[:, :2], top_p=0.7, greedy_teacher=True).n_ok.tolist() == [1]
    assert teacher_top_k(drafts[:, :1], None, t[:, :2], top_p=0.6, greedy_teacher=True).n_ok.tolist() == [0]
    with pytest.raises(ValueError, match="k or top_p"):
        teacher_top_k(drafts, None, t, k=2, top_p=0.5)


def exact_skd(student, teacher, prompt: list[int], new: int, k: int | None, top_p: float | None,
              s_temp: float, t_temp: float) -> dict[tuple[int, ...], float]:
    """Token-by-token SKD by enumeration: at each position
    P(y) = q(y) 1[y in S] + (1 - q(S)) p(y), S the teacher's top-k (or top-p nucleus)."""
    conts = list(itertools.product(range(V), repeat=new))
    ids = torch.tensor([prompt + list(c) for c in conts])
    with torch.no_grad():
        q = torch.softmax(student(ids).logits.double() / s_temp, -1)
        z = teacher(ids).logits.double()
    p = torch.softmax(z / t_temp, -1)
    above = z[..., None, :] > z[..., :, None]  # [.., y, v]: v scores strictly higher than y
    inside = above.sum(-1) < k if top_p is None else (p[..., None, :] * above).sum(-1) < top_p
    step = q * inside + (1 - (q * inside).sum(-1, keepdim=True)) * p
    n = len(prompt)
    return {c: float(torch.prod(torch.stack([step[row, n - 1 + i, c[i]] for i in range(new)])))
            for row, c in enumerate(conts)}


def skd_counts(student, teacher, prompts, reps, gamma=3, new=3, seed=0, rule=None, **kw):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts for _ in range(reps)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(reps)])
    gen = torch.Generator().manual_seed(seed)
    if rule is None:
        out = skd_generate(student, teacher, ids, attention_mask=mask, gamma=gamma, max_new_tokens=new,
                           eos_token_id=[], pad_token_id=0, generator=gen, **kw)
    else:
        out = propose_and_verify(teacher, student, ids, rule, attention_mask=mask, gamma=gamma, max_new_tokens=new,
                                 temperature=kw["temperature"], eos_token_id=[], pad_token_id=0, generator=gen)
    counts = [dict() for _ in prompts]
    for row, seq in enumerate(out.sequences[:, width:].tolist()):
        counts[row // reps][tuple(seq)] = counts[row // reps].get(tuple(seq), 0) + 1
    return counts, out.stats


PROMPTS = [[1, 2, 3, 4], [3, 1]]  # different lengths: padding, and holes from ragged acceptance


@pytest.mark.parametrize("sel,gamma,new", [(dict(k=2), 3, 3), (dict(top_p=0.6), 3, 3), (dict(k=2), 2, 4)])
def test_block_wise_skd_is_token_by_token_skd(sel, gamma, new):
    """Blocks of gamma against the enumerated token-by-token distribution (student at T 0.8,
    teacher at 1.2), also with sequences longer than a block (rounds after a fully accepted one);
    the negative control keeps the drafts after the first rejection and fails."""
    student, teacher = tiny_lm(1, 6.0), tiny_lm(0, 6.0)
    reps = 3000
    exact = [exact_skd(student, teacher, p, new, sel.get("k"), sel.get("top_p"), 0.8, 1.2) for p in PROMPTS]
    counts, stats = skd_counts(student, teacher, PROMPTS, reps, gamma=gamma, new=new, temperature=0.8,
                               teacher_temperature=1.2, **sel)
    assert 0.1 < stats.acceptance_rate < 0.9  # accepted runs and replacements both happen
    for c, e in zip(counts, exact, strict=True):
        assert chi_square_p(c, e, reps) > 1e-3

    def keep_drafts_after_rejection(drafts, q, t_logits, generator):
        v = teacher_top_k(drafts, q, t_logits, generator, temperature=1.2, **sel)
        rows, at = torch.arange(len(drafts)), v.n_ok.clamp(max=drafts.shape[1] - 1)
        tokens = torch.cat([drafts, drafts[:, :1]], 1)
        tokens[rows, at] = v.tokens[rows, at]  # the replacement, then the drafts it invalidated
        return Verdict(tokens, torch.full_like(v.n_ok, drafts.shape[1]), v.n_ok)

    counts, _ = skd_counts(student, teacher, PROMPTS, reps, gamma=gamma, new=new, rule=keep_drafts_after_rejection,
                           temperature=0.8)
    assert min(chi_square_p(c, e, reps) for c, e in zip(counts, exact, strict=True)) < 1e-6


def test_k_equal_to_the_vocabulary_is_student_sampling():
    student, teacher = tiny_lm(1, 6.0), tiny_lm(0, 6.0)
    reps = 3000
    exact = [exact_distribution(student, p, 3, 0.8) for p in PROMPTS]
    counts, stats = skd_counts(student, teacher, PROMPTS, reps, k=V, temperature=0.8)
    assert stats.acceptance_rate == 1.0
    assert stats.target_forwards_per_token == pytest.approx(1 / 3)  # one teacher forward per block of 3
    for c, e in zip(counts, exact, strict=True):
        assert chi_square_p(c, e, reps) > 1e-3


@pytest.mark.parametrize("gamma", [1, 4])
def test_k_1_with_a_greedy_teacher_is_the_teachers_greedy_decoding(gamma):
    """The shipped teacher and student on built-in prompts (a batch, left-padded, ragged acceptance):
    token for token the teacher's greedy ``generate``."""
    cpu = torch.device("cpu")
    teacher = load_model(ModelConfig(path=str(ASSETS / "teacher")), "t", cpu).eval()
    student = load_model(ModelConfig(path=str(ASSETS / "student")), "s", cpu).eval()
    tok = load_tokenizer(ASSETS / "teacher")
    prompts = [prompt_ids(r, tok) for r in builtin_records(DataConfig(), "test", 12)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    ref = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = skd_generate(student, teacher, ids, attention_mask=mask, k=1, teacher_greedy=True, gamma=gamma,
                       max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences, ref)
    assert 0.0 < out.stats.acceptance_rate < 1.0


def test_bad_arguments():
    m = tiny_lm(0, 1.0)
    ids = torch.tensor([[1, 2]])
    for kw, message in ((dict(k=0), r"k must lie in \[1, 5\]"), (dict(k=6), "k must lie"), (dict(), "k .* or top_p"),
                        (dict(k=2, top_p=0.5), "not both"), (dict(top_p=1.5), "top_p"),
                        (dict(k=2, teacher_temperature=0), "teacher_temperature"), (dict(k=2, gamma=0), "gamma"),
                        (dict(k=2, temperature=-1.0), "temperature must be > 0")):
        with pytest.raises(ValueError, match=message):
            skd_generate(m, m, ids, **kw)
