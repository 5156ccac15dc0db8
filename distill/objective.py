"""The objective of a batch: the models' forwards and the loss over its counted (response) tokens,
fused with the LM heads or on full logits. Training and validation both compute it here.

With a teacher (``loss.kind`` a divergence) the objective is ``(1 - ce_weight) * D +
ce_weight * CE`` per counted token (``loss.ce_weight`` 0 by default: distillation only); for
``loss.kind=ce`` it is the cross-entropy alone (SFT).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from distill.config import LossConfig
from distill.data import IGNORE_INDEX, Batch
from distill.fused_loss import LossTerms, fused_linear_loss
from distill.losses import cross_entropy, divergence
from distill.models import final_hidden, fp32_linear, fused_head_problem, head_forward, lm_logits, logit_transforms
from distill.top_k_loss import TopK, top_k_linear_loss

if TYPE_CHECKING:  # the teacher sits above the objective: the objective only calls its methods
    from distill.teacher import Teacher


def batch_loss(
    loss: LossConfig,
    student: PreTrainedModel,
    teacher: Teacher | None,
    batch: Batch,
    *,
    bf16: bool,
    vocab: int,
    fused: bool,
    measure_cross_entropy: bool = False,
    teacher_hidden: torch.Tensor | None = None,
) -> LossTerms:
    """The summed objective of ``batch`` and its terms. ``teacher`` is used where ``loss.kind`` is a
    divergence, or for the divergence alone (forward KL) where it is ``ce`` and ``teacher`` is given
    for reporting. ``fused``: the LM heads and the loss in one pass over token chunks, never the
    ``[tokens x vocab]`` logits (see ``fused_loss_problem``). Under ``torch.no_grad`` nothing
    is kept for a backward pass. ``teacher_hidden`` (``[B, T - 1, H_T]``, the teacher's final
    hidden states at the counted positions, e.g. from SKD's verification forwards) replaces the
    teacher's forward; refused for a teacher whose logits are not its head's output (soft-capping,
    scaling: ``logit_transforms``). ``teacher``: a ``distill.teacher.Teacher`` (``LocalTeacher``
    for a model in this process)."""
    if teacher_hidden is not None and teacher is not None and logit_transforms(teacher.config):
        raise ValueError(f"teacher_hidden: the teacher's logits are not its head's output "
                         f"({', '.join(logit_transforms(teacher.config))}); run its forward instead")
    labels = batch.labels[:, 1:]  # next-token targets: position i predicts token i + 1
    positions = labels != IGNORE_INDEX  # those the loss counts
    ids, mask = batch.input_ids, batch.attention_mask
    trains_kd = loss.kind != "ce"
    kd = loss.divergence_kwargs() if trains_kd else dict(kind="fkl")
    ce_weight = loss.ce_weight if trains_kd else 1.0
    top = None
    if teacher is not None and teacher_hidden is None:
        top = teacher.top_k(ids, mask, positions)
    if top is not None:  # a compact cache: the divergence over the teacher's top-k buckets
        return _top_k_terms(loss, student, batch, top, bf16=bf16, vocab=vocab, fused=fused, ce_weight=ce_weight,
                            measure_cross_entropy=measure_cross_entropy, kd=kd)
    if fused:
        h_s = final_hidden(student, ids, mask, bf16)
        h_t = teacher_hidden
        if teacher is not None and h_t is None:
            with torch.no_grad():
                h_t = teacher.hidden_states(ids, mask, bf16=bf16, positions=positions)

        def head_loss(head: torch.nn.Module, h_s: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            b_s = None if head.bias is None else head.bias[:vocab]
            with teacher_head(teacher, vocab) as (w_t, b_t):
                terms = fused_linear_loss(
                    h_s, head.weight[:vocab], labels, teacher_hidden=h_t, teacher_weight=w_t, student_bias=b_s,
                    teacher_bias=b_t, ce_weight=ce_weight, measure_cross_entropy=measure_cross_entropy,
                    reduction="sum", chunk_size=loss.chunk_size, backend=loss.backend, **kd,
                )
            return terms.loss, terms.divergence, terms.cross_entropy

        # As the student head's forward: its gradient reaches a sharded head in the backward pass.
        with head_forward(student, head_loss) as head:
            return LossTerms(*head(h_s))
    s = lm_logits(student, ids, mask, bf16, vocab)
    ce = None
    if ce_weight > 0 or measure_cross_entropy:
        ce = cross_entropy(s, labels, reduction="sum", backend=loss.backend)
    div = None
    trains_div = trains_kd and ce_weight < 1
    if teacher is not None:
        with torch.no_grad():
            if teacher_hidden is None:
                t = teacher.logits(ids, mask, bf16=bf16, vocab=vocab, positions=positions)
            else:  # the teacher's fp32 head on the given hidden states
                with teacher.head(vocab) as (w_t, b_t):
                    t = fp32_linear(teacher_hidden, w_t, b_t)
        div = divergence(s if trains_div else s.detach(), t, labels, reduction="sum", backend=loss.backend, **kd)
    if div is None or not trains_div:
        objective = ce
    else:
        objective = div if ce_weight == 0 else (1 - ce_weight) * div + ce_weight * ce
    if div is not None and kd.get("hinton_scale"):
        div = div / loss.temperature**2  # the term is reported unscaled, as the fused path does
    return LossTerms(objective, None if div is None else div.detach(), None if ce is None else ce.detach())


def _top_k_terms(loss: LossConfig, student: PreTrainedModel, batch: Batch, top: TopK, *, bf16: bool, vocab: int,
                 fused: bool, ce_weight: float, measure_cross_entropy: bool, kd: dict) -> LossTerms:
    """``batch_loss`` against a teacher known by its top-k log-probabilities (``distill.top_k_loss``)."""
    labels = batch.labels[:, 1:]
    # hinton_scale is 1 at the only temperature a top-k teacher has (1).
    args = {k: v for k, v in kd.items() if k != "hinton_scale"} | dict(
        ce_weight=ce_weight, measure_cross_entropy=measure_cross_entropy, chunk_size=loss.chunk_size)
    if not fused:
        s = lm_logits(student, batch.input_ids, batch.attention_mask, bf16, vocab)
        return top_k_linear_loss(s, None, labels, top, **args)

    def head_loss(head: torch.nn.Module, h_s: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        b_s = None if head.bias is None else head.bias[:vocab]
        terms = top_k_linear_loss(h_s, head.weight[:vocab], labels, top, student_bias=b_s, **args)
        return terms.loss, terms.divergence, terms.cross_entropy

    with head_forward(student, head_loss) as head:
        return LossTerms(*head(final_hidden(student, batch.input_ids, batch.attention_mask, bf16)))


def teacher_head(teacher: Teacher | None, vocab: int) -> AbstractContextManager:
    """The teacher's LM head (weight, bias) inside the block; (None, None) without a teacher."""
    return nullcontext((None, None)) if teacher is None else teacher.head(vocab)


def fused_loss_problem(
    student: PreTrainedModel, teacher: Teacher | None, vocab: int, device: torch.device
) -> str | None:
    """Why the fused loss cannot stand in for full logits with these models (None when it can)."""
    probe = torch.arange(min(vocab, 16), device=device)[None]  # any valid ids will do
    mask = torch.ones_like(probe)
    if problem := fused_head_problem(student, probe, mask):
        return f"student: {problem}"
    if teacher is not None and (problem := teacher.head_problem(probe, mask)):
        return f"teacher: {problem}"
    return None


def objective_name(loss: LossConfig) -> str:
    """The objective in words, for the report: ``fkl``, ``ce`` or ``0.7 * fkl + 0.3 * ce``."""
    if loss.kind == "ce":  # the cross-entropy on the labels: no temperature
        return "ce"
    kd = loss.kind + (f"(beta={loss.beta})" if loss.kind == "gjsd" else "") + \
        (f"(alpha={loss.alpha})" if loss.kind.startswith("skew") else "")
    if loss.temperature != 1.0:
        kd += f" at temperature {loss.temperature}" + (" (x T^2)" if loss.hinton_scale else "")
    if loss.ce_weight == 0:
        return kd
    return f"{1 - loss.ce_weight:g} * {kd} + {loss.ce_weight:g} * ce"
