"""Plain-PyTorch references on full logits, for the fused loss's tests (float64 there)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses import cross_entropy, divergence


def full_logits_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """The logits formed whole, then ``distill.losses.divergence`` on the PyTorch path."""
    z_s = F.linear(student_hidden, student_weight, student_bias)
    z_t = teacher_hidden if teacher_weight is None else F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return divergence(z_s, z_t.detach(), labels, backend="torch", **loss_kwargs)


def full_logits_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits formed whole, then ``distill.losses.cross_entropy`` on the PyTorch path."""
    return cross_entropy(F.linear(hidden, weight, bias), labels, backend="torch")


def row_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in at least fp32 (the kernel's reference)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
