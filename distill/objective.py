"""The objective of a batch: the models' forwards and the loss over its counted (response) tokens,
fused with the LM heads or on full logits. Training and validation both compute it here.

With a teacher (``loss.kind`` a divergence) the objective is ``(1 - ce_weight) * D +
ce_weight * CE`` per counted token (``loss.ce_weight`` 0 by default: distillation only); for
``loss.kind=ce`` it is the cross-entropy alone (SFT). On the student's own samples with a reward
(``reward.alpha``) each token adds ``alpha * A * CE``, ``A`` its sample's advantage: minus alpha
times the policy-gradient (REINFORCE) surrogate of the expected reward, normalised by the same
token count as the divergence (``distill.rewards``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import PreTrainedModel

from distill.config import LossConfig, RewardConfig
from distill.data import IGNORE_INDEX, Batch
from distill.fused_loss import LossTerms, fused_linear_loss
from distill.losses import cross_entropy, divergence
from distill.models import final_hidden, fp32_linear, fused_head_problem, head_forward, lm_logits, logit_transforms
from distill.top_k_loss import TopK, top_k_linear_loss

if TYPE_CHECKING:  # the teacher sits above the objective: the objective only calls its methods
    from distill.teacher import Teacher, Teachers



class Part(NamedTuple):
    """One teacher's share of a batch's objective (``Teacher.parts``): its name among several ("" for
    the only one), its weight, and the batch rows it teaches (None: every row)."""

    name: str
    teacher: Teacher | None
    weight: float
    rows: torch.Tensor | None


def batch_loss(
    loss: LossConfig,
    student: PreTrainedModel,
    teacher: Teacher | Teachers | None,
    batch: Batch,
    *,
    bf16: bool,
    vocab: int,
    fused: bool,
    measure_cross_entropy: bool = False,
    teacher_hidden: torch.Tensor | None = None,
    pg_weights: torch.Tensor | None = None,
) -> LossTerms:
    """The summed objective of ``batch`` and its terms. ``teacher`` is used where ``loss.kind`` is a
    divergence, or for the divergence alone (forward KL) where it is ``ce`` and ``teacher`` is given
    for reporting. ``fused``: the LM heads and the loss in one pass over token chunks, never the
    ``[tokens x vocab]`` logits (see ``fused_loss_problem``). Under ``torch.no_grad`` nothing
    is kept for a backward pass. ``teacher_hidden`` (``[B, T - 1, H_T]``, the teacher's final
    hidden states at the counted positions, e.g. from SKD's verification forwards) replaces the
    teacher's forward; refused for a teacher whose logits are not its head's output (soft-capping,
    scaling: ``logit_transforms``). ``teacher``: a ``distill.teacher.Teacher`` (``LocalTeacher``
    for a model in this process), or ``Teachers``: each part it names (``Part``) adds its weighted
    terms, and ``LossTerms.by_teacher`` holds each one's divergence. ``pg_weights`` (``[B]``, alpha
    times each sequence's advantage) adds the policy-gradient term; None leaves the objective as it is."""
    if teacher_hidden is not None and teacher is not None and logit_transforms(teacher.config):
        raise ValueError(f"teacher_hidden: the teacher's logits are not its head's output "
                         f"({', '.join(logit_transforms(teacher.config))}); run its forward instead")
    labels = batch.labels[:, 1:]  # next-token targets: position i predicts token i + 1
    positions = labels != IGNORE_INDEX  # those the loss counts
    ids, mask = batch.input_ids, batch.attention_mask
    trains_kd = loss.kind != "ce"
    kd = loss.divergence_kwargs() if trains_kd else dict(kind="fkl")
    ce_weight = loss.ce_weight if trains_kd else 1.0
    # Each teacher with its weight and the rows it teaches (None: all); one for a single teacher.
    parts = [Part("", None, 1.0, None)] if teacher is None else teacher.parts(ids, mask, positions)
    pg = _pg_per_part(parts, pg_weights, labels)
    # A teacher that runs elsewhere computes its side while the student's decoder runs here (a
    # teacher here runs first, so its forward's buffers are gone before the student's activations).
    early = fused and teacher is not None and teacher.prefetches and teacher_hidden is None
    student_hidden = final_hidden(student, ids, mask, bf16) if early else None
    with torch.no_grad():  # the teachers' side of each part: hidden states, logits or top-k
        seen = [_teacher_side(p, ids, mask, positions, bf16=bf16, vocab=vocab, fused=fused, given=teacher_hidden)
                for p in parts]
    args = dict(ce_weight=ce_weight, measure_cross_entropy=measure_cross_entropy, chunk_size=loss.chunk_size)
    if fused:
        def head_loss(head: torch.nn.Module, h_s: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            b_s = None if head.bias is None else head.bias[:vocab]
            terms = []
            for p, t, w in zip(parts, seen, pg, strict=True):
                if _idle(p):  # no rows here; its head is gathered as on the ranks that have some
                    with teacher_head(p.teacher, vocab):
                        continue
                h, lab = _rows(h_s, p.rows), _rows(labels, p.rows)
                if isinstance(t, TopK):
                    if w is not None:
                        raise ValueError("reward: a compact (top-k) teacher cache answers dataset batches only")
                    terms.append(top_k_linear_loss(h, head.weight[:vocab], lab, t, student_bias=b_s,
                                                   **_top_k_kwargs(kd), **args))
                    continue
                with teacher_head(p.teacher, vocab) as (w_t, b_t):
                    terms.append(fused_linear_loss(h, head.weight[:vocab], lab, teacher_hidden=t, teacher_weight=w_t,
                                                   student_bias=b_s, teacher_bias=b_t, reduction="sum",
                                                   backend=loss.backend, ce_row_weights=w, **kd, **args))
            return _combined(_busy(parts), terms, h_s)

        # As the student head's forward: its gradient reaches a sharded head in the backward pass.
        if student_hidden is None:
            student_hidden = final_hidden(student, ids, mask, bf16)
        with head_forward(student, head_loss) as head:
            return _with_breakdown(_busy(parts), positions, *head(student_hidden))
    s = lm_logits(student, ids, mask, bf16, vocab)
    terms = []
    for p, t, w in zip(parts, seen, pg, strict=True):
        if _idle(p):
            continue
        s_p, lab = _rows(s, p.rows), _rows(labels, p.rows)
        if isinstance(t, TopK):
            if w is not None:
                raise ValueError("reward: a compact (top-k) teacher cache answers dataset batches only")
            terms.append(top_k_linear_loss(s_p, None, lab, t, **_top_k_kwargs(kd), **args))
        else:
            terms.append(_logit_terms(loss, s_p, t, lab, kd, ce_weight, measure_cross_entropy, w))
    return _with_breakdown(_busy(parts), positions, *_combined(_busy(parts), terms, s))


def _teacher_side(part: Part, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *, bf16: bool,
                  vocab: int, fused: bool, given: torch.Tensor | None) -> torch.Tensor | TopK | None:
    """What the loss needs of ``part``'s teacher on its rows: its top-k (a compact cache), else its
    final hidden states (fused; ``given`` where a source kept them) or its fp32 logits."""
    t = part.teacher
    if t is None:
        return None
    # A part with no rows on this rank: the same call on one row, its answer unused (collective forwards).
    rows = torch.zeros(1, dtype=torch.long, device=ids.device) if _idle(part) else part.rows
    ids, mask, positions = _rows(ids, rows), _rows(mask, rows), _rows(positions, rows)
    if given is None and (top := t.top_k(ids, mask, positions)) is not None:
        return top
    if fused:
        return given if given is not None else t.hidden_states(ids, mask, bf16=bf16, positions=positions)
    if given is None:
        return t.logits(ids, mask, bf16=bf16, vocab=vocab, positions=positions)
    with t.head(vocab) as (w_t, b_t):  # the teacher's fp32 head on the given hidden states
        return fp32_linear(given, w_t, b_t)


def _pg_per_part(parts: list[Part], pg_weights: torch.Tensor | None, labels: torch.Tensor
                 ) -> list[torch.Tensor | None]:
    """Each part's per-position CE weights of the policy-gradient term (``[rows, T - 1]``), divided
    by the part's weight, so that the weighted parts add the term once: all of it on the first part
    where each part sees every row (combine=sum), each part its rows' share where they split them."""
    if pg_weights is None:
        return [None] * len(parts)
    per_position = pg_weights[:, None].expand(labels.shape)
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(parts):
        carries = p.rows is not None or i == 0
        out.append(_rows(per_position, p.rows) / p.weight if carries else None)
    return out


def _logit_terms(loss: LossConfig, s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, kd: dict,
                 ce_weight: float, measure_cross_entropy: bool, pg: torch.Tensor | None = None) -> LossTerms:
    """The terms on full logits: the student's ``s`` against the teacher's ``t`` (None: CE alone);
    ``pg``: per-position weights of a further CE term (the policy gradient's)."""
    trains_kd = loss.kind != "ce"
    ce = None
    weighted = None
    if pg is not None:
        per_position = cross_entropy(s, labels, reduction="none", backend=loss.backend)
        weighted = (pg.to(per_position.dtype) * per_position).sum()
        ce = per_position.sum() if ce_weight > 0 or measure_cross_entropy else None
    elif ce_weight > 0 or measure_cross_entropy:
        ce = cross_entropy(s, labels, reduction="sum", backend=loss.backend)
    div = None
    trains_div = trains_kd and ce_weight < 1
    if t is not None:
        div = divergence(s if trains_div else s.detach(), t, labels, reduction="sum", backend=loss.backend, **kd)
    if div is None or not trains_div:
        objective = ce
    else:
        objective = div if ce_weight == 0 else (1 - ce_weight) * div + ce_weight * ce
    if weighted is not None:
        objective = weighted if objective is None else objective + weighted
    if div is not None and kd.get("hinton_scale"):
        div = div / loss.temperature**2  # the term is reported unscaled, as the fused path does
    return LossTerms(objective, None if div is None else div.detach(), None if ce is None else ce.detach())


def _top_k_kwargs(kd: dict) -> dict:
    # hinton_scale is 1 at the only temperature a top-k teacher has (1).
    return {k: v for k, v in kd.items() if k != "hinton_scale"}


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def _busy(parts: list[Part]) -> list[Part]:
    return [p for p in parts if not _idle(p)]


def _idle(part: Part) -> bool:
    """A part kept only so that this rank runs its teacher's collective calls: no rows here."""
    return part.rows is not None and part.rows.numel() == 0


def _combined(parts: list[Part], terms: list[LossTerms], anchor: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The parts' terms as one: the objective and divergence as their weighted sum; the
    cross-entropy summed over parts that split the rows, else the first's (each saw every row).
    Then each part's divergence, stacked. No parts (no counted row): zeros joined to ``anchor``'s graph."""
    if not terms:
        zero = anchor.sum() * 0.0
        return zero, None, None, None
    loss = sum(p.weight * t.loss for p, t in zip(parts, terms, strict=True))
    div = None if terms[0].divergence is None else sum(p.weight * t.divergence for p, t in zip(parts, terms,
                                                                                              strict=True))
    ce = terms[0].cross_entropy
    if ce is not None and parts[0].rows is not None:
        ce = sum(t.cross_entropy for t in terms)
    each = None if div is None else torch.stack([t.divergence for t in terms])
    return loss, div, ce, each


def _with_breakdown(parts: list[Part], positions: torch.Tensor, loss: torch.Tensor, div: torch.Tensor | None,
                    ce: torch.Tensor | None, each: torch.Tensor | None) -> LossTerms:
    """``LossTerms``, with each teacher's divergence sum and counted tokens where several teach."""
    by_teacher = None
    if each is not None and any(p.name for p in parts):
        by_teacher = {p.name: (d, int(_rows(positions, p.rows).sum())) for p, d in zip(parts, each, strict=True)}
    return LossTerms(loss, div, ce, by_teacher)


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


def objective_name(loss: LossConfig, reward: RewardConfig | None = None) -> str:
    """The objective in words, for the report: ``fkl``, ``ce``, ``0.7 * fkl + 0.3 * ce``, and with a
    reward ``fkl - 0.5 * policy gradient of E[reward] (...)``."""
    if loss.kind == "ce":  # the cross-entropy on the labels: no temperature
        name = "ce"
    else:
        kd = loss.kind + (f"(beta={loss.beta})" if loss.kind == "gjsd" else "") + \
            (f"(alpha={loss.alpha})" if loss.kind.startswith("skew") else "")
        if loss.temperature != 1.0:
            kd += f" at temperature {loss.temperature}" + (" (x T^2)" if loss.hinton_scale else "")
        name = kd if loss.ce_weight == 0 else f"{1 - loss.ce_weight:g} * {kd} + {loss.ce_weight:g} * ce"
    if reward is None or reward.alpha == 0:
        return name
    return (f"{name} - {reward.alpha:g} * policy gradient of E[reward] ({reward.fn or 'the task checkers'}; "
            f"{reward.group} samples per prompt, leave-one-out baseline; on the student's samples)")
