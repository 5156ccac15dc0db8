"""Model layer: loading from local directories, the tokenizer check, LoRA, vocabulary rows."""

from __future__ import annotations

import pytest
import torch

from distill.config import LoraConfig, ModelConfig
from distill.errors import DistillError
from distill.models import (
    check_same_tokenizer,
    check_vocab_rows,
    fused_head_problem,
    head_inputs,
    lm_logits,
    load_model,
    load_tokenizer,
    load_trainable_state,
    trainable_state,
    unwrap,
)

CPU = torch.device("cpu")


def test_teacher_frozen_student_trainable(teacher_dir, student_dir):
    teacher = load_model(ModelConfig(path=str(teacher_dir)), "teacher", CPU)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = load_model(ModelConfig(path=str(student_dir), dtype="bfloat16"), "student", CPU)
    assert student.training and all(p.dtype == torch.bfloat16 for p in student.parameters())
    assert type(teacher).__name__ == "LlamaForCausalLM" and type(student).__name__ == "Qwen2ForCausalLM"


def test_same_tokenizer_passes(teacher_dir, student_dir):
    check_same_tokenizer(load_tokenizer(teacher_dir), load_tokenizer(student_dir), "t", "s")


def test_different_tokenizers_named(student_dir, swapped_student_dir):
    other = swapped_student_dir
    with pytest.raises(DistillError, match=rf"tokenizers differ .*different ids.*{student_dir}.*{other}"):
        check_same_tokenizer(load_tokenizer(student_dir), load_tokenizer(other), str(student_dir), str(other))


def test_special_tokens_compared(student_dir):
    a, b = load_tokenizer(student_dir), load_tokenizer(student_dir)
    b.pad_token = b.eos_token
    with pytest.raises(DistillError, match="pad_token"):
        check_same_tokenizer(a, b, "a", "b")


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(DistillError, match="teacher.path: cannot load"):
        load_model(ModelConfig(path=str(tmp_path)), "teacher", CPU)


def test_vocab_rows_checked(student_dir, tokenizer_dir):
    model = load_model(ModelConfig(path=str(student_dir)), "student", CPU)
    tok = load_tokenizer(tokenizer_dir)
    check_vocab_rows(model, tok, "student")
    tok.add_tokens(["<extra_token>"])
    with pytest.raises(DistillError, match="vocabulary rows"):
        check_vocab_rows(model, tok, "student")


def test_lora_student_trains_adapters_only_and_merges(student_dir):
    cfg = ModelConfig(path=str(student_dir), lora=LoraConfig(enabled=True, r=4, alpha=8))
    model = load_model(cfg, "student", CPU)
    state = trainable_state(model)
    assert state and all("lora_" in k for k in state)
    # Perturb the adapters so the merge is not a no-op, then check merge preserves the function.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[2, 10, 11, 12]])
    model.eval()
    before = model(input_ids=ids).logits
    merged = unwrap(model)
    assert not hasattr(merged, "merge_and_unload")
    assert torch.allclose(merged(input_ids=ids).logits, before, atol=1e-5)
    # A checkpoint round trip restores exactly the adapters.
    saved = trainable_state(model)
    fresh = load_model(cfg, "student", CPU)
    load_trainable_state(fresh, saved, "test")
    fresh.eval()
    assert torch.allclose(fresh(input_ids=ids).logits, before)


@pytest.mark.parametrize("dtype,bf16", [("float32", True), ("bfloat16", False)])
def test_logits_are_fp32_from_the_fp32_hidden_state(teacher_dir, dtype, bf16):
    """The LM head never rounds logits to bf16 (a peer bug): bf16 autocast or bf16 weights alike."""
    from distill.models import lm_logits

    model = load_model(ModelConfig(path=str(teacher_dir), dtype=dtype), "teacher", CPU)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    mask = torch.ones_like(ids)
    logits = lm_logits(model, ids, mask, bf16=bf16)
    assert logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16  # what the model alone gives
    hidden = out.hidden_states[-1][:, :-1]
    want = hidden.float() @ model.get_output_embeddings().weight.float().T
    assert torch.allclose(logits, want, rtol=1e-6, atol=1e-6)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is restored


def test_fused_head_inputs_reproduce_the_logits(teacher_dir, student_dir):
    """head(decoder(x)) is the model's logits, for a separate head (Llama) and a tied one (Qwen2)."""
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    for path in (teacher_dir, student_dir):
        model = load_model(ModelConfig(path=str(path)), "m", CPU)
        assert fused_head_problem(model, ids, mask) is None
        hidden, weight, bias = head_inputs(model, ids, mask, vocab=150)
        assert hidden.shape[:2] == (2, 8) and weight.shape[0] == 150
        logits = torch.nn.functional.linear(hidden, weight, bias)
        assert torch.allclose(logits, lm_logits(model, ids, mask, vocab=150), atol=1e-5)


def test_fused_head_refused_when_logits_are_not_a_plain_projection(student_dir):
    """Soft-capped logits (Gemma 2) and a LoRA-wrapped LM head are detected, so the trainer
    computes full logits for them instead of a wrong fused loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    ids = torch.randint(0, 100, (1, 7))
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
    ))
    assert "not head(decoder(x))" in fused_head_problem(gemma, ids, mask)
    gemma.config.final_logit_softcapping = None
    assert fused_head_problem(gemma, ids, mask) is None

    lora = LoraConfig(enabled=True, r=2, target_modules="q_proj,lm_head")
    lora_head = load_model(ModelConfig(path=str(student_dir), lora=lora), "s", CPU)
    assert "not a plain Linear" in fused_head_problem(lora_head, ids, mask)
