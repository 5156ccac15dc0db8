"""The model layer on ZeRO-3 partitioned models, in a process of its own (one gloo rank):
``python tests/zero3_seam.py PORT OUT_DIR MODEL_DIR...``; prints "zero3 ok" when every check holds.
Run by tests/test_sharding.py."""
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from distill.models import (  # noqa: E402
    count_parameters,
    export_state_dict,
    final_hidden,
    fused_head_problem,
    lm_head,
    lm_logits,
    load_trainable_state,
    save_model,
    trainable_state,
)

deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def partitioned(model_dir: str):
    zero3 = HfDeepSpeedConfig(ds_config)  # while it lives, from_pretrained partitions the weights
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    del zero3
    return model


def check(model_dir: str, out: str) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = partitioned(model_dir)
    deepspeed.initialize(model=model, config=ds_config)
    model.eval()
    head = model.get_output_embeddings().weight
    assert head.shape == (0,) and hasattr(head, "ds_id"), "not partitioned"
    assert count_parameters(model.parameters()) == count_parameters(reference.parameters())
    state = trainable_state(model)
    for n, p in reference.named_parameters():
        assert torch.equal(state[n], p), n
    load_trainable_state(model, {n: 2 * t for n, t in state.items()}, "test")
    assert all(torch.equal(t, 2 * state[n]) for n, t in trainable_state(model).items())
    load_trainable_state(model, state, "test")
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = reference(ids).logits[:, :-1]
        got = lm_logits(model, ids, mask, bf16=False, vocab=None)
        assert torch.allclose(got, want, atol=1e-5), "lm_logits"
        # bf16 autocast: the fp32 head wrapper gathers the head it wraps.
        got16, want16 = (lm_logits(m, ids, mask, bf16=True) for m in (model, reference))
        assert torch.allclose(got16, want16, atol=1e-5), "fp32 head"
        hidden = final_hidden(model, ids, mask)
        with lm_head(model) as (w, b):
            assert torch.allclose(torch.nn.functional.linear(hidden, w, b), want, atol=1e-5), "lm_head"
        assert fused_head_problem(model, ids, mask) is None
    exported = export_state_dict(model)
    for k, v in reference.state_dict().items():
        assert torch.equal(exported[k], v), k
    save_model(model, out)
    again = AutoModelForCausalLM.from_pretrained(out)
    for k, v in reference.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


for i, model_dir in enumerate(sys.argv[3:]):
    check(model_dir, os.path.join(sys.argv[2], str(i)))
print("zero3 ok")
