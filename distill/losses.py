"""Token-level divergences between a student and a teacher: the reference implementation.

Conventions (``shared/reference/algorithms.md``): teacher p = softmax(z_T / tau), student
q = softmax(z_S / tau), computed in fp32 from log-probabilities; gradients reach the student
only; ``labels[..., i]`` decides whether position i counts (the caller shifts for next-token
prediction); the mean is over non-ignored positions.

| kind       | per-position value                                   |
|------------|------------------------------------------------------|
| `fkl`      | KL(p || q)                                           |
| `rkl`      | KL(q || p)                                           |
| `gjsd`     | beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q; beta=0 is `fkl`, beta=1 `rkl` |
| `tvd`      | 1/2 sum |p - q|                                      |
| `skew_fkl` | KL(p || alpha p + (1-alpha) q)                       |
| `skew_rkl` | KL(q || alpha q + (1-alpha) p)                       |

Note on `gjsd`: for 0 < beta < 1 the value tends to 0 as beta goes to 0 or 1 (it behaves like
beta * FKL and (1-beta) * RKL), while the endpoints are defined as FKL and RKL themselves, as in
TRL and Liger-Kernel. The function of beta is therefore discontinuous at 0 and 1.

Terms with zero probability contribute 0 (0 log 0 = 0), so a vocabulary entry masked with -inf
in both models gives a finite loss and finite gradients.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

KINDS = ("fkl", "rkl", "gjsd", "tvd", "skew_fkl", "skew_rkl")
Reduction = Literal["mean", "sum", "none"]


def check_loss_args(kind: str, beta: float, alpha: float, temperature: float) -> None:
    """Raise ValueError naming the argument when a loss hyper-parameter is out of range."""
    if kind not in KINDS:
        raise ValueError(f"loss.kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"loss.beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL); got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"loss.alpha (skew) must lie in [0, 1); got {alpha}")
    if not temperature > 0.0:
        raise ValueError(f"loss.temperature must be > 0; got {temperature}")


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop vocabulary rows that exist in one model only (padding rows, excluded on both sides)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 logits are never rounded before the softmax); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a (log a - log b) over the last dim, with 0 log 0 = 0 and no NaN in the gradient."""
    a = log_a.exp()
    # Where a == 0 the term is 0; the where() also keeps (-inf) - (-inf) out of the gradient.
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1-w) q) by log-sum-exp, finite-gradient where both are -inf."""
    a = log_p + math.log(w) if w > 0 else torch.full_like(log_p, -math.inf)
    b = log_q + math.log1p(-w) if w < 1 else torch.full_like(log_q, -math.inf)
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    # Double where: feed finite values into logsumexp where the result is -inf anyway,
    # because its backward is exp(x - lse) = exp(nan) there.
    safe_a = torch.where(both_zero, torch.zeros_like(a), a)
    safe_b = torch.where(both_zero, torch.zeros_like(b), b)
    lse = torch.logaddexp(safe_a, safe_b)
    return torch.where(both_zero, torch.full_like(lse, -math.inf), lse)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "gjsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence of shape ``logits.shape[:-1]``, computed in (at least) fp32."""
    check_loss_args(kind, beta, alpha, temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    log_q = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=-1)
    if kind == "fkl" or (kind == "gjsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if kind == "rkl" or (kind == "gjsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if kind == "gjsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if kind == "skew_fkl":
        return _kl(log_p, _log_mix(log_p, log_q, alpha))
    # skew_rkl
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def _counted(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Boolean mask of the positions that count, shaped like ``logits.shape[:-1]`` (or hidden states')."""
    if labels is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape without vocab {tuple(logits.shape[:-1])}")
    return labels != ignore_index


def _reduce(counted_values: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Reduce the values of the counted positions (``counted_values`` = per_token[mask], or their
    sum already, for ``sum`` and ``mean``)."""
    if reduction == "none":
        out = counted_values.new_zeros(mask.shape)
        out[mask] = counted_values
        return out
    total = counted_values.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "gjsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hinton_scale: bool = False,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Divergence between student and teacher logits ``[..., V]``, reduced over counted positions.

    Args:
        student_logits: student logits; gradients flow into these.
        teacher_logits: teacher logits; detached. Vocab sizes may differ (padding rows are dropped).
        labels: aligned with the logits (no shift); positions equal to ``ignore_index`` do not count.
        kind: one of ``fkl``, ``rkl``, ``gjsd``, ``tvd``, ``skew_fkl``, ``skew_rkl``.
        beta: ``gjsd`` interpolation in [0, 1]; 0 is exactly ``fkl`` and 1 exactly ``rkl``.
        alpha: skew in [0, 1) for ``skew_fkl`` / ``skew_rkl``.
        temperature: distillation temperature applied to both models.
        hinton_scale: multiply by temperature**2 (Hinton et al.); off by default.
        reduction: ``mean`` over counted positions, ``sum``, or ``none`` (per position, 0 where ignored).
    """
    mask = _counted(student_logits, labels, ignore_index)
    # Only counted positions are computed: cheaper, and an ignored position whose divergence is
    # infinite (say the teacher puts -inf where the student has mass) cannot send 0 * inf = NaN
    # into the gradient.
    per_token = token_divergence(
        student_logits[mask], teacher_logits[mask], kind=kind, beta=beta, alpha=alpha, temperature=temperature
    )
    if hinton_scale:
        per_token = per_token * temperature**2
    return _reduce(per_token, mask, reduction)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "gjsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    hinton_scale: bool = False,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``divergence(student_hidden @ student_weight.T (+ student_bias), teacher logits, labels, ...)``
    without holding the ``[tokens x vocab]`` logits: computed in chunks of ``chunk_size`` counted
    tokens, with the gradients for ``student_hidden``, ``student_weight`` and ``student_bias``
    produced in the same pass (none for the teacher).

    The teacher logits are ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``, or
    ``teacher_hidden`` itself when ``teacher_weight`` is None (precomputed logits). Student and
    teacher hidden sizes may differ; vocabulary rows present in one model only are excluded.
    Logits are formed with fp32 accumulation from bf16, fp16 or fp32 inputs.
    """
    from distill.chunked_loss import ChunkedLinearDivergence

    check_loss_args(kind, beta, alpha, temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student and teacher disagree on the token dims: {tuple(student_hidden.shape[:-1])} "
            f"vs {tuple(teacher_hidden.shape[:-1])}"
        )
    mask = _counted(student_hidden, labels, ignore_index)
    total = ChunkedLinearDivergence.apply(
        student_hidden[mask], student_weight, student_bias, teacher_hidden[mask], teacher_weight, teacher_bias,
        chunk_size, dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature),
    )
    if hinton_scale:
        total = total * temperature**2
    return _reduce(total, mask, reduction)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy in fp32 with labels aligned to the logits (the SFT loss)."""
    mask = _counted(logits, labels, ignore_index)
    per_token = F.cross_entropy(_upcast(logits[mask]), labels[mask], reduction="none")
    return _reduce(per_token, mask, reduction)


def count_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Number of positions that count towards a loss."""
    return int((labels != ignore_index).sum())
