"""export_draft: a serving-ready draft that transformers' assisted generation accepts unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from distill.export import export_draft
from distill.speculative import speculative_generate


def test_exported_draft_serves_the_target_losslessly(teacher_dir, student_dir, tmp_path):
    """The student has 200 vocabulary rows, the target 224 (padding rows): the draft is padded to
    the target's size, and greedy assisted generation equals the target's own greedy output."""
    result = export_draft(student_dir, teacher_dir, tmp_path / "draft", num_assistant_tokens=3)
    target = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.vocab_size < target.config.vocab_size == draft.config.vocab_size
    assert result.padded_rows == target.config.vocab_size - student.config.vocab_size
    assert draft.generation_config.num_assistant_tokens == 3
    assert draft.generation_config.eos_token_id == target.generation_config.eos_token_id
    assert draft.config.eos_token_id == target.config.eos_token_id
    assert list((tmp_path / "draft").glob("*.safetensors"))
    assert AutoTokenizer.from_pretrained(tmp_path / "draft").get_vocab() == AutoTokenizer.from_pretrained(
        teacher_dir).get_vocab()
    # The student's own rows are unchanged by the padding.
    assert torch.equal(draft.get_output_embeddings().weight[: student.config.vocab_size],
                       student.get_output_embeddings().weight)

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    for prompt in ["Write 66 in words.", "Tom has 5 apples. He eats 2. How many", "Write 1357"]:
        ids = tok(prompt, return_tensors="pt")
        alone = target.generate(**ids, max_new_tokens=24, do_sample=False)
        assisted = target.generate(**ids, max_new_tokens=24, do_sample=False, assistant_model=draft)
        assert torch.equal(alone, assisted), prompt
        # distill's own speculative decoding with the exported draft: the same tokens.
        ours = speculative_generate(target, draft, ids.input_ids, gamma=3, max_new_tokens=24, do_sample=False,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert torch.equal(ours.sequences[0, : alone.shape[1]], alone[0])
    usage = result.usage()
    assert f'"model": "{tmp_path / "draft"}", "num_speculative_tokens": 3' in usage and "assistant_model=draft" in usage


def test_refuses_a_student_with_another_tokenizer(teacher_dir, swapped_student_dir, tmp_path):
    other = swapped_student_dir
    with pytest.raises(DistillError, match="tokenizers differ"):
        export_draft(other, teacher_dir, tmp_path / "draft")
    assert not (tmp_path / "draft").exists()


def test_refuses_short_context_and_missing_dirs(teacher_dir, student_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(student_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistillError, match="64 positions"):
        export_draft(short, teacher_dir, tmp_path / "draft")
    with pytest.raises(DistillError, match="not found"):
        export_draft(tmp_path / "nope", teacher_dir, tmp_path / "draft")
