"""The model layer on ZeRO-3 partitioned models, in a process of its own (one gloo rank):
``python tests/zero3_seam.py PORT OUT_DIR TEACHER_DIR STUDENT_DIR``; prints "zero3 ok" when every
check holds. Run by tests/test_sharding.py."""
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from distill.config import LossConfig  # noqa: E402
from distill.data import Batch  # noqa: E402
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


def check_training(teacher_dir: str, student_dir: str) -> None:
    """Two SGD steps of the training objective on a partitioned student (DeepSpeed's engine) and on a
    plain copy give the same weights: the head's gradient reaches its partition in the backward pass,
    on the fused path and on full logits (fp32 and through the fp32 head under bf16 autocast). Both a
    tied head (whose embedding's hooks would gather it anyway) and a separate one, whose padding
    rows beyond the vocabulary are dropped."""
    from distill.objective import batch_loss
    from distill.teacher import LocalTeacher

    ids = torch.randint(0, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    teachers = {}  # each model in turn is the other's teacher
    for d in (teacher_dir, student_dir):
        teachers[d] = (partitioned(d), AutoModelForCausalLM.from_pretrained(d).eval())
        deepspeed.initialize(model=teachers[d][0], config=ds_config)
        teachers[d][0].eval()
    sgd = {**ds_config, "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 unless told
    vocab = AutoModelForCausalLM.from_pretrained(student_dir).config.vocab_size
    cases = [("gjsd", True, False), ("ce", True, False), ("gjsd", False, False), ("fkl", False, True)]
    for model_dir, (kind, fused, bf16) in ((d, c) for d in (teacher_dir, student_dir) for c in cases):
        reference = AutoModelForCausalLM.from_pretrained(model_dir)
        engine, *_ = deepspeed.initialize(model=partitioned(model_dir), config=sgd)
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
        teacher, teacher_ref = teachers[student_dir if model_dir == teacher_dir else teacher_dir]
        for _ in range(2):
            for model, t in ((reference, teacher_ref), (engine.module, teacher)):
                loss = batch_loss(LossConfig(kind=kind), model, LocalTeacher(t) if kind != "ce" else None, batch,
                                  bf16=bf16, vocab=vocab, fused=fused).loss
                if model is reference:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                else:
                    engine.backward(loss)
                    engine.step()
        state, what = trainable_state(engine.module), f"{model_dir} {kind} fused={fused} bf16={bf16}"
        moved = max((state[n] - p0).abs().max().item() for n, p0 in AutoModelForCausalLM.from_pretrained(
            model_dir).named_parameters())
        assert moved > 1e-3, f"{what}: the weights did not move"
        for n, p in reference.named_parameters():
            assert torch.allclose(state[n], p.detach(), atol=1e-5), f"{what}: {n} {(state[n] - p).abs().max()}"


teacher_dir, student_dir = sys.argv[3:5]
for i, model_dir in enumerate((teacher_dir, student_dir)):
    check(model_dir, os.path.join(sys.argv[2], str(i)))
check_training(teacher_dir, student_dir)
print("zero3 ok")
