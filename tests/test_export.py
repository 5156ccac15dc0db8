"""export_draft: a serving-ready draft that transformers' assisted generation accepts unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

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
        assert torch.equal(ours.sequences, alone)
    usage = result.usage()
    assert f'"model": "{(tmp_path / "draft").resolve()}", "num_speculative_tokens": 3' in usage
    assert "assistant_model=draft" in usage


def test_assisted_generation_drafts_num_assistant_tokens_every_round(teacher_dir, tmp_path):
    """What the exported generation_config controls in transformers' assisted generation: every
    round asks the draft for num_assistant_tokens (a constant schedule, not transformers' default
    heuristic that grows and shrinks it), and the draft returns all of them (no early stop on its
    confidence, whose default threshold of 0.4 would end rounds early) unless it drafts an EOS or
    reaches the length limit. Recorded at the draft's own generate calls; how many of the drafts
    the target accepts is the draft's quality, not the config's."""
    k, new = 3, 24
    # A target whose generation_config asks for the heuristic schedule: the draft's must not inherit it.
    heuristic = tmp_path / "target"
    shutil.copytree(teacher_dir, heuristic)
    GenerationConfig(num_assistant_tokens_schedule="heuristic").save_pretrained(heuristic)
    export_draft(heuristic, heuristic, tmp_path / "draft", num_assistant_tokens=k)
    target = AutoModelForCausalLM.from_pretrained(heuristic).eval()
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rounds = []
    real_generate = draft.generate

    def recording_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        drafted = out.sequences[0, kwargs["input_ids"].shape[1]:].tolist()
        rounds.append((kwargs["max_new_tokens"], drafted))
        return out

    draft.generate = recording_generate
    for prompt in ["Write 66 in words.", "Tom has 5 apples. He eats 2. How many"]:
        rounds.clear()
        ids = tok(prompt, return_tensors="pt")
        target.generate(**ids, max_new_tokens=new, do_sample=False, assistant_model=draft)
        assert len(rounds) > 1
        for asked, drafted in rounds:
            assert asked == k or asked < k and rounds[-1][0] == asked  # fewer only at the length limit
            assert len(drafted) == asked or tok.eos_token_id in drafted, (asked, drafted)


def test_a_rejected_draft_never_replaces_a_good_export(teacher_dir, student_dir, tmp_path):
    """A student that needs remote code is refused before anything is written; the good draft
    already in out_dir stays as it was."""
    export_draft(student_dir, teacher_dir, tmp_path / "draft")
    before = {f.name: f.read_bytes() for f in (tmp_path / "draft").iterdir()}
    remote = tmp_path / "remote"
    shutil.copytree(student_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistillError, match=r"remote.code"):
        export_draft(remote, teacher_dir, tmp_path / "draft")
    assert {f.name: f.read_bytes() for f in (tmp_path / "draft").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_lora_adapter_directory_is_merged(teacher_dir, student_dir, tmp_path):
    """A PEFT adapter directory (no tokenizer files of its own: its base model's are used) is
    exported with the adapters merged into the weights."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(student_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()  # trained adapters: B != 0, so merging changes the outputs
    peft.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer.json").exists()
    export_draft(tmp_path / "adapter", teacher_dir, tmp_path / "draft")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    plain = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        merged, base, ours = peft.eval()(x).logits, plain(x).logits, draft(x).logits[..., : plain.config.vocab_size]
    assert torch.allclose(ours, merged, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)


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
