"""Model layer: loading from local directories, the tokenizer check, LoRA, vocabulary rows."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from distill import models
from distill.config import LoraConfig, ModelConfig
from distill.errors import DistillError
from distill.models import (
    check_same_tokenizer,
    check_vocab_rows,
    export_state_dict,
    final_hidden,
    fused_head_problem,
    head_forward,
    lm_head,
    lm_logits,
    load_model,
    load_tokenizer,
    load_trainable_state,
    save_model,
    trainable_state,
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


def test_lora_student_trains_adapters_only_and_merges(student_dir, tmp_path):
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
    # The export state dict equals PEFT's own merge (on a deep copy, as a reference), on the CPU,
    # and leaves the live model as it was.
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    got = export_state_dict(model)
    assert set(got) == set(want)
    for k in want:
        assert got[k].device.type == "cpu" and torch.allclose(got[k], want[k], atol=1e-6), k
    assert hasattr(model, "merge_and_unload") and torch.equal(model(input_ids=ids).logits, before)
    save_model(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(input_ids=ids).logits, before, atol=1e-5)
    # A checkpoint round trip restores exactly the adapters.
    saved = trainable_state(model)
    assert all(t.device.type == "cpu" for t in saved.values())
    fresh = load_model(cfg, "student", CPU)
    load_trainable_state(fresh, saved, "test")
    fresh.eval()
    assert torch.allclose(fresh(input_ids=ids).logits, before)


def test_save_model_keeps_tied_weights_tied(student_dir, tmp_path):
    """The export of a plain model with tied embeddings: one tensor in the file, tied on loading."""
    model = load_model(ModelConfig(path=str(student_dir)), "student", CPU)
    assert model.config.tie_word_embeddings
    save_model(model, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    save_model(model, tmp_path / "chat", eos_token_ids=[2, 7])  # EOS and a template's end of turn
    assert GenerationConfig.from_pretrained(tmp_path / "chat").eos_token_id == [2, 7]


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
        hidden = final_hidden(model, ids, mask)
        with lm_head(model, vocab=150) as (weight, bias):
            assert hidden.shape[:2] == (2, 8) and weight.shape[0] == 150
            logits = torch.nn.functional.linear(hidden, weight, bias)
        assert torch.allclose(logits, lm_logits(model, ids, mask, vocab=150), atol=1e-5)


def test_head_forward_restores_the_head_and_refuses_nesting(student_dir):
    """The head's own forward is back after the block (also after an error), a forward set on the
    instance by someone else (accelerate's hooks) is kept, and nesting is refused."""
    model = load_model(ModelConfig(path=str(student_dir)), "m", CPU)
    head = model.get_output_embeddings()
    x = torch.randn(3, head.in_features)
    with head_forward(model, lambda h, x: x.sum()) as called:
        assert called is head and float(head(x)) == pytest.approx(float(x.sum()))
        with pytest.raises(RuntimeError, match="nested"), head_forward(model, lambda h, x: x):
            pass
    assert "forward" not in head.__dict__ and torch.equal(head(x), x @ head.weight.T)
    with pytest.raises(ZeroDivisionError), head_forward(model, lambda h, x: x):
        raise ZeroDivisionError
    assert "forward" not in head.__dict__ and not hasattr(head, "_distill_head_forward")
    hooked = lambda x: "hooked"  # noqa: E731
    head.forward = hooked
    with head_forward(model, lambda h, x: x):
        pass
    assert head.forward is hooked


def _gemma(cap: float | None):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=cap,
    ))


def test_fused_head_refused_when_logits_are_not_a_plain_projection(student_dir, monkeypatch):
    """Gemma 2's real soft-cap of 30 is refused by its config attribute (a fresh model's logits are
    too small for tanh(z / 30) to show on a probe batch); a transform no attribute announces is
    caught by the probe (a cap of 0.5, with the attribute list emptied); a LoRA-wrapped LM head is
    refused by type. The trainer then computes full logits instead of a wrong fused loss."""
    ids = torch.randint(0, 100, (1, 7))
    mask = torch.ones_like(ids)
    gemma = _gemma(30.0)
    assert "final_logit_softcapping=30.0" in fused_head_problem(gemma, ids, mask)
    monkeypatch.setattr(models, "LOGIT_TRANSFORMS", {})
    assert fused_head_problem(gemma, ids, mask) is None  # why the attribute check is needed
    assert "not head(decoder(x))" in fused_head_problem(_gemma(0.5), ids, mask)
    monkeypatch.undo()
    assert fused_head_problem(_gemma(None), ids, mask) is None

    lora = LoraConfig(enabled=True, r=2, target_modules="q_proj,lm_head")
    lora_head = load_model(ModelConfig(path=str(student_dir), lora=lora), "s", CPU)
    assert "not a plain Linear" in fused_head_problem(lora_head, ids, mask)


@pytest.mark.parametrize("attrs,found", [
    (dict(logit_scale=0.0625), ["logit_scale=0.0625"]),  # Cohere
    (dict(logit_scale=1.0), []),
    (dict(logits_scaling=8.0), ["logits_scaling=8.0"]),  # Granite
    (dict(text_config=dict(final_logit_softcapping=30.0)), ["final_logit_softcapping=30.0"]),
])
def test_logit_transforms_from_config_attributes(attrs, found):
    from transformers import PretrainedConfig

    nested = attrs.pop("text_config", None)
    config = PretrainedConfig(**attrs)
    if nested is not None:
        config.text_config = PretrainedConfig(**nested)
    assert models.logit_transforms(config) == found
