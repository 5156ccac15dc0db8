"""eval-draft: the DistillSpec metrics where their values are known, and bad input named early."""

from __future__ import annotations

import json

import pytest
import torch

from distill.draft_eval import DraftEvalConfig, evaluate_draft, response_mask
from distill.errors import DistillError
from distill.export import export_draft


def small(tmp_path, **kw) -> DraftEvalConfig:
    base = dict(num_prompts=4, max_new_tokens=6, gammas=[1, 3], batch_size=2, repeats=1, out=str(tmp_path / "eval"))
    return DraftEvalConfig(**{**base, **kw})


def test_target_as_its_own_draft(tmp_path, teacher_dir):
    """A draft equal to the target: alpha = 1 at every response position, every draft accepted,
    predicted tau = gamma + 1; the report names the draft and plots alpha along the response."""
    result = evaluate_draft(small(tmp_path, target=str(teacher_dir), draft=str(teacher_dir), name="the teacher"))
    assert result["alpha"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["alpha_by_response_position"]) == 6
    assert all(a == pytest.approx(1.0, abs=1e-5) for a in result["alpha_by_response_position"])
    for r in result["by_gamma"]:
        assert r["acceptance_rate"] > 0.999
        assert r["tau_predicted"] == pytest.approx(r["gamma"] + 1, rel=1e-5)
        assert 1.0 <= r["tau_measured"] <= r["gamma"] + 1
        assert r["verify_cost"] > 0
        assert r["speedup_predicted_with_verify_cost"] == pytest.approx(
            r["tau_measured"] / (result["c"] * r["gamma"] + r["verify_cost"]))
    assert result["c"] > 0
    for r in result["by_gamma"]:
        assert r["speedup_measured"] == pytest.approx(r["target_alone_seconds"] / r["seconds"])
    out = tmp_path / "eval"
    assert json.loads((out / "draft_eval.json").read_text())["name"] == "the teacher"
    assert (out / "draft_eval.md").read_text().startswith("Draft: the teacher. Target: `")
    assert (out / "draft_eval.png").stat().st_size > 0


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
