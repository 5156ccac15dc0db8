"""eval-draft: the DistillSpec metrics where their values are known, and bad input named early."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from distill import draft_eval
from distill.draft_eval import (
    DraftEvalConfig,
    acceptance_on,
    evaluate_draft,
    predicted_block_efficiency,
    predicted_speedup,
    response_mask,
)
from distill.errors import DistillError
from distill.export import export_draft


def small(tmp_path, **kw) -> DraftEvalConfig:
    base = dict(num_prompts=4, max_new_tokens=6, gammas=[1, 3], batch_size=2, repeats=1, out=str(tmp_path / "eval"))
    return DraftEvalConfig(**{**base, **kw})


def test_predicted_block_efficiency_and_speedup_by_hand():
    """Leviathan et al.'s formulas at values worked out by hand."""
    assert predicted_block_efficiency(0.8, 4) == pytest.approx(3.3616)  # (1 - 0.8^5) / 0.2
    assert predicted_block_efficiency(0.5, 2) == pytest.approx(1.75)
    assert predicted_block_efficiency(0.0, 5) == 1.0  # every first draft rejected: one token a round
    assert predicted_block_efficiency(1.0, 3) == 4.0  # every draft and the bonus token
    assert predicted_speedup(3.3616, 0.1, 4) == pytest.approx(2.401142857)  # 3.3616 / 1.4
    assert predicted_speedup(3.3616, 0.1, 4, verify_cost=1.5) == pytest.approx(1.769263158)  # 3.3616 / 1.9


def test_target_as_its_own_draft(tmp_path, teacher_dir, monkeypatch):
    """A draft equal to the target: alpha = 1 at every response position, every draft accepted,
    so each round yields gamma + 1 tokens (measured and predicted); the report names the draft and
    plots alpha along the response. Every phase shows a progress row that ends full."""
    rows = {}
    real_showing = draft_eval.showing

    @contextlib.contextmanager
    def recording(progress, description, total):
        with real_showing(progress, description, total) as advance:
            rows[description] = [0, total]

            def counted(tokens: int = 0) -> None:
                rows[description][0] += 1
                advance(tokens)
            yield counted

    monkeypatch.setattr(draft_eval, "showing", recording)
    result = evaluate_draft(small(tmp_path, target=str(teacher_dir), draft=str(teacher_dir), name="the teacher"))
    assert list(rows) == ["alpha (target samples)", "c and v (forward timing)", "gamma 1: acceptance",
                          "gamma 1: wall clock", "gamma 3: acceptance", "gamma 3: wall clock"]
    assert all(done == total > 0 for done, total in rows.values()), rows
    assert result["alpha"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["alpha_by_response_position"]) == 6
    assert all(a == pytest.approx(1.0, abs=1e-5) for a in result["alpha_by_response_position"])
    for r in result["by_gamma"]:
        assert r["acceptance_rate"] == 1.0 and r["acceptance_by_draft_position"] == [1.0] * r["gamma"]
        assert r["tau_measured"] == r["gamma"] + 1
        assert r["tau_predicted"] == pytest.approx(r["gamma"] + 1, rel=1e-5)
    out = tmp_path / "eval"
    assert json.loads((out / "draft_eval.json").read_text())["name"] == "the teacher"
    assert (out / "draft_eval.md").read_text().startswith("Draft: the teacher. Target: `")
    assert (out / "draft_eval.png").stat().st_size > 0


def test_acceptance_is_the_overlap_of_the_two_distributions(teacher_dir, student_dir, tmp_path):
    """beta at each response position equals sum_v min(p_t(v), q_t(v)) computed here from the two
    models' logits (an independent formula for 1 - TVD), and counts through the first EOS only."""
    from transformers import AutoModelForCausalLM

    draft_dir = export_draft(student_dir, teacher_dir, tmp_path / "draft").out_dir
    target = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, 150, (3, 5), generator=g)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[0, :2] = 0  # left padding
    eos = 3
    responses = torch.randint(4, 150, (3, 7), generator=g)
    responses[1, 4] = eos  # positions after it do not count
    seqs = torch.cat([prompts, responses], 1)
    beta, counted = acceptance_on(target, draft, seqs, prompt_mask, torch.tensor([eos]), temperature=1.3)
    assert counted.tolist()[1] == [True] * 5 + [False] * 2 and counted[[0, 2]].all()
    mask = torch.cat([prompt_mask, counted.long()], 1)
    with torch.no_grad():
        p = torch.softmax(target(seqs, attention_mask=mask).logits.double()[:, 4:-1] / 1.3, -1)
        q = torch.softmax(draft(seqs, attention_mask=mask).logits.double()[:, 4:-1, :p.shape[-1]] / 1.3, -1)
    overlap = torch.minimum(p, q).sum(-1)
    assert torch.allclose(beta[counted].double(), overlap[counted], atol=1e-5)
    assert (overlap[counted] < 0.99).all()  # the student is not the teacher


def test_a_different_draft_is_accepted_less(tmp_path, teacher_dir, student_dir):
    draft = export_draft(student_dir, teacher_dir, tmp_path / "draft").out_dir
    result = evaluate_draft(small(tmp_path, target=str(teacher_dir), draft=str(draft), gammas=[2]))
    assert 0.0 < result["alpha"] < 0.99
    (row,) = result["by_gamma"]
    assert row["acceptance_rate"] < 0.99 and 1.0 <= row["tau_measured"] < 3.0


@pytest.mark.parametrize(("change", "message"), [
    ({"draft": "nowhere"}, "draft directory not found: nowhere"),
    ({"prompts": "missing.jsonl"}, "prompts file not found: missing.jsonl"),
    ({"gammas": [0, 2]}, "gammas must be >= 1"),
    ({"repeats": 0}, "repeats must be >= 1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"max_new_tokens": 250}, r"builtin:\w+: prompt is \d+ tokens; with max_new_tokens=250 and gamma=3"),
])
def test_bad_options_are_named(tmp_path, teacher_dir, change, message):
    cfg = small(tmp_path, **{"target": str(teacher_dir), "draft": str(teacher_dir), **change})
    with pytest.raises(DistillError, match=message):
        evaluate_draft(cfg)
    assert not (tmp_path / "eval").exists()


def test_a_draft_with_fewer_rows_than_the_target_emits_is_refused(tmp_path, teacher_dir, student_dir):
    """The target may sample its padding rows, which the student cannot embed: export first."""
    with pytest.raises(DistillError, match=r"embeds 200 tokens but the target can emit 224: pad the draft's vocabulary "
                                           r"first \(distill export-draft\)"):
        evaluate_draft(small(tmp_path, target=str(teacher_dir), draft=str(student_dir)))


def test_response_mask_keeps_the_eos_also_when_pad_is_eos():
    """Llama-style tokenizers pad with the EOS id: the first EOS is part of the response, the
    padding after it is not, and a row without EOS is real throughout."""
    eos = torch.tensor([3])
    new = torch.tensor([[5, 3, 3, 3], [5, 6, 7, 8], [3, 9, 3, 3]])
    assert response_mask(new, eos).tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert response_mask(new, torch.tensor([3, 9]))[2].tolist() == [True, False, False, False]
