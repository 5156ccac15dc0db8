"""The LM head read from a checkpoint alone (distill.lm_head): tied or not, with a bias, sharded,
without the body; refused for logit transforms."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, PhiConfig

from distill.config import ASSETS
from distill.errors import DistillError
from distill.lm_head import load_lm_head
from distill.models import final_hidden

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _saved(config, path, **save):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, **save)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_the_head_is_the_models_and_gives_its_logits(tmp_path, tied):
    model = _saved(LlamaConfig(**SMALL, tie_word_embeddings=tied), tmp_path)
    head = load_lm_head(tmp_path)
    assert torch.equal(head.weight, model.get_output_embeddings().weight) and head.bias is None
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        via_head = torch.nn.functional.linear(final_hidden(model, ids, torch.ones_like(ids)), head.weight)
    assert torch.allclose(via_head, logits, rtol=1e-6, atol=1e-6)
    assert head.names[0] == ("model.embed_tokens.weight" if tied and "lm_head.weight" not in _keys(tmp_path)
                             else "lm_head.weight")


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_a_bias_comes_with_the_weight(tmp_path):
    config = PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4)
    model = _saved(config, tmp_path)
    head = load_lm_head(tmp_path, dtype=torch.float64)
    assert head.bias is not None and head.weight.dtype == torch.float64
    assert torch.equal(head.bias, model.get_output_embeddings().bias.double())


def test_a_sharded_checkpoint_is_read_without_its_body(tmp_path):
    """Only the shard holding the head is opened: the others may be gone (the body is never read)."""
    model = _saved(LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path, max_shard_size="20KB")
    import json

    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    keep = weight_map["lm_head.weight"]
    removed = {f for f in weight_map.values() if f != keep}
    assert removed  # several shards
    for f in removed:
        (tmp_path / f).unlink()
    assert torch.equal(load_lm_head(tmp_path).weight, model.lm_head.weight)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path)  # the whole model cannot load any more


def test_the_shipped_teacher_head():
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher")
    assert torch.equal(load_lm_head(ASSETS / "teacher").weight, model.get_output_embeddings().weight)


def test_logit_transforms_and_missing_heads_are_refused_by_name(tmp_path):
    gemma = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    _saved(gemma, tmp_path / "gemma")
    with pytest.raises(DistillError, match="final_logit_softcapping=30.0"):
        load_lm_head(tmp_path / "gemma")
    _saved(LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").unlink()
    with pytest.raises(DistillError, match="no model.safetensors"):
        load_lm_head(tmp_path / "llama")
