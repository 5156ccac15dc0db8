"""The loss against a teacher known only by its top k tokens and the mass of the rest (the compact
offline cache, ``teacher.cache_top_k``).

For a counted token whose teacher distribution is given as the ids ``I`` of its k most likely
tokens, their log-probabilities ``log p_i`` and the log of the tail's mass ``log p_tail``
(``log(1 - sum_I p_i)``), the student's logits ``z`` (over the whole vocabulary) are bucketed alike:

    log q_i    = z_i - lse(z)                   for i in I
    log q_tail = lse(z over the tokens not in I) - lse(z)

and the divergence ``D`` (any of ``distill.losses.token_divergence``) is taken between the two
distributions over these k + 1 buckets. With k = V - 1 the tail is one token and ``D`` is the exact
full-vocabulary divergence; below that it lower-bounds forward and reverse KL (the data processing
inequality: merging tokens loses information). The cross-entropy on the labels uses the full
``lse(z)`` and is exact.

The logits are formed in chunks of tokens from the student's hidden states and LM head, and each
chunk recomputes its logits in the backward pass (``torch.utils.checkpoint``), so no more than one
chunk's ``[rows x V]`` logits exist at a time. The teacher's log-probabilities are renormalised
over the buckets (they are stored rounded), and a tail mass that underflowed to 0 is taken as the
smallest fp32 normal number, so that no divergence is infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from distill.fused_loss import CHUNK_BUDGET_BYTES, LossTerms, auto_chunk_size
from distill.losses import check_loss_args, counted_positions, token_divergence

TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)


@dataclass
class TopK:
    """The teacher at N counted tokens: ``ids`` ``[N, k]``, ``logprobs`` ``[N, k]`` and ``tail`` ``[N]``."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor

    def to(self, device: torch.device) -> TopK:
        return TopK(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))


def bucket_logprobs(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[n, k + 1]`` of logits ``z`` ``[n, V]`` over the buckets: each of the
    ``ids`` ``[n, k]``, then the rest."""
    lse = z.logsumexp(-1, keepdim=True)
    top = z.gather(-1, ids) - lse
    tail = z.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - lse
    return torch.cat([top, tail], dim=-1)


def _chunk(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, ids: torch.Tensor,
           teacher: torch.Tensor, targets: torch.Tensor | None, kd: dict, kd_weight: float, ce_weight: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's summed objective, divergence and cross-entropy (0 where not asked for)."""
    with torch.autocast(x.device.type, enabled=False):
        z = x.float() if weight is None else torch.nn.functional.linear(
            x.float(), weight.float(), None if bias is None else bias.float())
        div = token_divergence(bucket_logprobs(z, ids), teacher, **kd).sum()
        ce = torch.zeros((), device=z.device)
        if targets is not None:
            ce = (z.logsumexp(-1) - z.gather(-1, targets[:, None])[:, 0]).sum()
    return kd_weight * div + ce_weight * ce, div.detach(), ce.detach()


def top_k_linear_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TopK,
    *,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    measure_cross_entropy: bool = False,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    reduction: str = "sum",
    chunk_size: int | None = None,
) -> LossTerms:
    """``(1 - ce_weight) * D + ce_weight * CE`` per counted token, D over the teacher's top-k
    buckets (module docstring). ``student_hidden`` ``[..., H]`` with ``student_weight`` ``[V, H]``,
    or the student's logits ``[..., V]`` themselves when ``student_weight`` is None; ``labels``
    aligned with them (no shift). ``teacher`` holds one row per counted position, in order."""
    check_loss_args(kind, beta, alpha, temperature)
    if temperature != 1.0:
        raise ValueError("a top-k teacher is stored at temperature 1; its tail at another temperature is unknown "
                         f"(loss.temperature={temperature})")
    mask = counted_positions(student_hidden, labels, ignore_index)
    x, y = student_hidden[mask], labels[mask]
    if teacher.ids.shape[0] != x.shape[0]:
        raise ValueError(f"the top-k teacher has {teacher.ids.shape[0]} rows for {x.shape[0]} counted tokens")
    vocab = x.shape[-1] if student_weight is None else student_weight.shape[0]
    if teacher.ids.numel() and int(teacher.ids.max()) >= vocab:
        raise ValueError(f"the top-k teacher names token {int(teacher.ids.max())}, outside the vocabulary ({vocab})")
    t = torch.cat([teacher.logprobs.float(), teacher.tail.float().clamp_min(TAIL_FLOOR)[:, None]], dim=-1)
    t = t.log_softmax(-1).to(x.device)
    ids = teacher.ids.long().to(x.device)
    with_ce = ce_weight > 0 or measure_cross_entropy
    kd = dict(kind=kind, beta=beta, alpha=alpha)
    if chunk_size is None:  # the chunk's fp32 logits and the divergence's temporaries over the vocabulary
        chunk_size = auto_chunk_size(x.shape[0], vocab, 4 * 4, CHUNK_BUDGET_BYTES["cuda" if x.is_cuda else "cpu"])
    params = (x, student_weight, student_bias)
    trains = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    total = div = ce = torch.zeros((), device=x.device)
    for a in range(0, x.shape[0], chunk_size):
        b = a + chunk_size
        args = (x[a:b], student_weight, student_bias, ids[a:b], t[a:b], y[a:b] if with_ce else None, kd,
                1.0 - ce_weight, ce_weight)
        part = checkpoint(_chunk, *args, use_reentrant=False) if trains else _chunk(*args)
        total, div, ce = total + part[0], div + part[1], ce + part[2]
    n = max(int(mask.sum()), 1)
    scale = 1.0 if reduction == "sum" else 1.0 / n
    return LossTerms(total * scale, div * scale, ce * scale if with_ce else None)
