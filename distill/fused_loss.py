"""The fused loss: the LM head fused with the token loss, in chunks of tokens, so the
``[tokens x vocab]`` logits never exist. One loop serves every fused loss (divergence,
cross-entropy, their mix) and both backends; only the per-row steps differ (the Triton kernels
``distill.kernels.divergence.divergence_rows`` and ``distill.kernels.cross_entropy.cross_entropy_rows``,
or ``distill.losses.torch_rows`` / ``torch_ce_rows``: the references and autograd).

For each chunk of C counted tokens, student hidden X [C, H_S] and weight W_S [V, H_S]:

    Z_S = X W_S^T (+ b_S)                    fp32 output, fp32 accumulation (float64 stays float64)
    Z_T = X_T W_T^T (+ b_T), or given        the teacher's own hidden size H_T
    L = w_kd D(Z_S, Z_T) + (w_ce + a_r) CE(Z_S, y)   per row; a term is computed only where asked for
                                              (a_r: an optional per-row weight, the policy-gradient
                                              term's alpha * advantage of the row's sample)
    G = dL/dZ_S / w_kd                       from the row steps, in the forward pass
    dX = G W_S     dW_S += G^T X (fp32 accumulator)     db_S += sum_rows G     (times w_kd in backward)

Cost: 2 N H_S V + 2 N H_T V FLOPs forward and 4 N H_S V for the gradients, all matmuls in the
input dtype (on CUDA, half-precision matmuls write fp32 directly: ``torch.mm(out_dtype=...)``).
The weights are read once per chunk, so a chunk's arithmetic intensity is about C FLOP/byte:
chunks of >= 1024 rows keep the matmuls compute-bound, and a memory budget for the chunk's C x V
buffers caps them. Peak extra memory is O(C x V + V x H), independent of N. The gradient is made
in the forward pass; backward only scales it, and without autograd (evaluation) no gradient
buffer is allocated. Vocabulary rows present in one model only are padding: excluded on both
sides, no gradient. The teacher gets no gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from distill.losses import (
    Backend,
    check_loss_args,
    check_targets,
    counted_positions,
    reduce_counted,
    torch_ce_rows,
    torch_rows,
    upcast,
    use_triton,
)

# Memory for one chunk's [rows x vocab] buffers in fused_linear_loss when chunk_size is not
# given: on a GPU it allows chunks of about 2048 rows at a 128K vocabulary with bf16 weights.
CHUNK_BUDGET_BYTES = {"cuda": 5 << 29, "cpu": 1 << 28}
HALF = (torch.bfloat16, torch.float16)
# Rows of dW formed per matmul when accumulating in fp32 without addmm(out_dtype): bounds the fp32
# temporary to DW_SLICE x H while keeping each matmul large.
DW_SLICE = 16384

# divergence rows(z_s, z_t, g, **loss_kwargs) -> per-row divergence; writes dD/dz_S into g unless g is None.
# cross-entropy rows(z_s, y, g, scale=, accumulate=) -> per-row CE; writes (or adds) scale * dCE/dz_S into g.
Rows = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """What a row contributes: ``kd_weight * D(z_S, z_T) + ce_weight * CE(z_S, y)``.

    The divergence is computed when teacher inputs are given, the cross-entropy when targets are;
    a term with weight 0 is still computed (for reporting) but sends no gradient."""

    divergence_rows: Rows | None = None
    ce_rows: Rows | None = None
    loss_kwargs: dict = field(default_factory=dict)  # kind, beta, alpha, temperature of the divergence
    kd_weight: float = 1.0
    ce_weight: float = 0.0


@functools.cache
def _mm_out_fp32(device: torch.device) -> bool:
    """Whether ``torch.mm(half, half, out_dtype=torch.float32)`` (fp32 output from tensor cores)
    works on this device; torch builds without it take the slower widened matmul."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return _half_mm(a, a).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


@functools.cache
def _addmm_into_fp32(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc_fp32, half, half, out_dtype=torch.float32, out=acc_fp32)`` works:
    dW then accumulates inside the matmul's epilogue, with no fp32 temporary."""
    if device.type != "cuda":
        return False
    try:
        acc = torch.ones(2, 2, device=device)
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        _half_addmm_(acc, a, a)
        return bool((acc == 3).all())
    except (RuntimeError, TypeError):
        return False


def _half_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half-precision a @ b on tensor cores with an fp32 result (no rounding to the input dtype)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _half_addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for half-precision a, b, in one cuBLAS call."""
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the matmuls take it: half precision as it is where its matmuls can write fp32,
    otherwise widened once per call (not per chunk) to fp32, or kept float64."""
    weight = weight.detach()
    if weight.dtype in HALF and _mm_out_fp32(weight.device):
        return weight
    return upcast(weight)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight^T (+ bias) with an fp32 (or float64) result; ``weight`` from ``_operand``."""
    x = hidden.to(weight.dtype)
    z = _half_mm(x, weight.T) if weight.dtype in HALF else torch.mm(x, weight.T)
    return z if bias is None else z.add_(bias.to(z.dtype))


def _accumulate_grad_weight(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc (fp32 or float64) += g^T x, with fp32 accumulation also for half-precision g and x."""
    if g.dtype in HALF and _addmm_into_fp32(g.device):
        _half_addmm_(acc, g.T, x)
    elif g.dtype in HALF:  # fp32 products of DW_SLICE rows at a time, added to the accumulator
        for v0 in range(0, g.shape[1], DW_SLICE):
            acc[v0: v0 + DW_SLICE] += _half_mm(g[:, v0: v0 + DW_SLICE].T, x)
    else:
        acc.addmm_(g.T, x.to(acc.dtype))


class ChunkedLinearLoss(torch.autograd.Function):
    """Sum over the given rows of the ``Objective`` of ``h_S W_S^T + b_S``; gradients for h_S, W_S
    and b_S computed in the forward pass; none for the teacher. Returns the objective's sum and,
    as a second output without gradient, the sums of its terms ``[D, CE]`` (0 where not computed)."""

    @staticmethod
    def forward(
        ctx,
        s_hidden: torch.Tensor,  # [N, H_S], counted rows only
        s_weight: torch.Tensor,  # [V_S, H_S]
        s_bias: torch.Tensor | None,
        t_hidden: torch.Tensor | None,  # [N, H_T], teacher logits [N, V_T] when t_weight is None, or no teacher
        t_weight: torch.Tensor | None,
        t_bias: torch.Tensor | None,
        targets: torch.Tensor | None,  # [N] token ids for the cross-entropy, or None
        chunk_size: int,
        objective: Objective,
        ce_row_weights: torch.Tensor | None = None,  # [N] added to the CE weight per row (may be < 0)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = s_hidden.shape[0]
        vocab = s_weight.shape[0]
        if t_hidden is not None:
            vocab = min(vocab, t_weight.shape[0] if t_weight is not None else t_hidden.shape[-1])
        w_s = _operand(s_weight[:vocab])
        w_t = None if t_weight is None else _operand(t_weight[:vocab])
        b_s = None if s_bias is None else s_bias.detach()[:vocab]
        b_t = None if t_bias is None else t_bias.detach()[:vocab]
        acc_dtype = torch.promote_types(w_s.dtype, torch.float32)

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and s_bias is not None
        with_kd, with_ce = t_hidden is not None, targets is not None
        # Terms that send a gradient; a chunk's gradient buffer may overwrite its student logits
        # unless a second gradient term still has to read them.
        grad_kd = (need_h or need_w or need_b) and with_kd and objective.kd_weight != 0
        grad_ce = (need_h or need_w or need_b) and with_ce and (objective.ce_weight != 0 or ce_row_weights is not None)
        # g holds dD/dz + (w_ce / w_kd) dCE/dz and the backward multiplies by w_kd: no pass over g for
        # the weight. An fp16 buffer cannot hold w_ce / w_kd near its range: there D's gradient is scaled.
        fold = grad_kd and not (w_s.dtype == torch.float16 and objective.ce_weight > 1e3 * objective.kd_weight)
        g_scale = objective.kd_weight if fold else 1.0
        device = s_hidden.device
        new = torch.empty if grad_kd or grad_ce else torch.zeros  # without a gradient term no row is written
        grad_h = new(s_hidden.shape, dtype=w_s.dtype, device=device) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=device) if need_w else None
        grad_b = torch.zeros(s_weight.shape[0], dtype=acc_dtype, device=device) if need_b else None
        kd_total = torch.zeros((), dtype=acc_dtype, device=device)
        ce_total = torch.zeros((), dtype=acc_dtype, device=device)
        weighted_total = torch.zeros((), dtype=acc_dtype, device=device)  # sum of a_r CE_r
        for start in range(0, n, chunk_size):
            x = s_hidden.detach()[start: start + chunk_size].to(w_s.dtype)
            z_s = _logits(x, w_s, b_s)
            z_t = None
            if with_kd:
                t = t_hidden.detach()[start: start + chunk_size]
                z_t = t[:, :vocab] if w_t is None else _logits(t, w_t, b_t)  # given logits are widened by rows()
                z_t = z_t if z_t.stride(-1) == 1 else z_t.contiguous()
            y = None if targets is None else targets[start: start + chunk_size]
            a = None if ce_row_weights is None else ce_row_weights[start: start + chunk_size]
            g = None
            if grad_kd or grad_ce:
                alias = z_s.dtype == w_s.dtype and not (grad_kd and grad_ce)
                g = z_s if alias else torch.empty_like(z_s, dtype=w_s.dtype)
            # Terms without gradient first: they read z_s before a gradient may overwrite it.
            ce = objective.ce_rows(z_s, y, None) if with_ce and not grad_ce else None
            if with_kd and not grad_kd:
                kd_total += objective.divergence_rows(z_s, z_t, None, **objective.loss_kwargs).sum()
            if grad_kd:
                kd_total += objective.divergence_rows(z_s, z_t, g, **objective.loss_kwargs).sum()
                if not fold:
                    g.mul_(objective.kd_weight)
            if grad_ce:  # with row weights each row's gradient is scaled by w_ce + a_r
                row_scale = None if a is None else objective.ce_weight + a.to(acc_dtype)
                ce = objective.ce_rows(z_s, y, g, scale=(objective.ce_weight if a is None else 1.0) / g_scale,
                                       accumulate=grad_kd, row_scale=row_scale)
            if ce is not None:
                ce_total += ce.sum()
                if a is not None:
                    weighted_total += (a.to(ce.dtype) * ce).sum()
            del z_s, z_t
            if g is None:
                continue
            if grad_h is not None:
                torch.mm(g, w_s, out=grad_h[start: start + chunk_size])
            if grad_w is not None:
                _accumulate_grad_weight(grad_w[:vocab], g, x)
            if grad_b is not None:
                grad_b[:vocab] += g.sum(0, dtype=acc_dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        ctx.g_scale = g_scale
        terms = torch.stack([kd_total, ce_total])
        ctx.mark_non_differentiable(terms)
        total = objective.kd_weight * kd_total + objective.ce_weight * ce_total + weighted_total
        return total, terms

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, grad_terms: torch.Tensor | None = None):
        # grad_total is the mean's 1/count or a caller's weight; no .item(): no host sync per step.
        scale = grad_total * ctx.g_scale if ctx.g_scale != 1.0 else grad_total
        grads = [
            None if g is None else (g * scale.to(g.dtype)).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None, None, None)


def chunk_entry_bytes(triton_path: bool, weight_dtype: torch.dtype, with_kd: bool, mixed: bool) -> int:
    """Bytes per logit entry of a chunk's buffers: fp32 student (and teacher) logits, plus a gradient
    buffer where it cannot overwrite the student logits (Triton: half-precision weights, or both
    terms sending a gradient: ``mixed``), or the autograd temporaries of the reference divergence
    (PyTorch path: about 15 fp32 buffers of a chunk's size, benchmarks/results/full/fused_loss_cpu.md)."""
    if not triton_path:
        return 15 * 4
    own_grad = weight_dtype in (torch.float16, torch.bfloat16) or (with_kd and mixed)
    return 4 + 4 * with_kd + (weight_dtype.itemsize if own_grad else 0)


def auto_chunk_size(rows: int, vocab: int, bytes_per_entry: int, budget_bytes: int) -> int:
    """Rows per chunk: as many as the budget allows for ``bytes_per_entry`` per logit (at least 128),
    then evened out so that the last chunk is not a sliver. Multiples of 64 rows."""
    cap = max(128, budget_bytes // (bytes_per_entry * max(vocab, 1)) // 64 * 64)
    n_chunks = -(-rows // cap)
    even = -(-rows // max(n_chunks, 1))
    return max(1, min(cap, -(-even // 64) * 64))


@dataclass
class LossTerms:
    """What ``fused_linear_loss`` returns: the objective (differentiable) and its terms, detached,
    unweighted and reduced like the objective (None where a term was not computed)."""

    loss: torch.Tensor
    divergence: torch.Tensor | None
    cross_entropy: torch.Tensor | None
    # Several teachers (``distill.objective.batch_loss``): each one's divergence sum and counted tokens.
    by_teacher: dict[str, tuple[torch.Tensor, int]] | None = None


def fused_linear_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    kind: str = "gjsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    hinton_scale: bool = False,
    ce_weight: float = 0.0,
    measure_cross_entropy: bool = False,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: int | None = None,
    backend: Backend = "auto",
    ce_row_weights: torch.Tensor | None = None,
) -> LossTerms:
    """The LM head fused with the training loss, without holding the ``[tokens x vocab]`` logits:
    computed in chunks of counted tokens, with the gradients for ``student_hidden``,
    ``student_weight`` and ``student_bias`` produced in the same pass (none for the teacher, and no
    gradient buffers at all under ``torch.no_grad``).

    The student logits are ``student_hidden @ student_weight.T (+ student_bias)``; the teacher's
    ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``, or ``teacher_hidden`` itself when
    ``teacher_weight`` is None (precomputed logits). Hidden sizes may differ; vocabulary rows
    present in one model only are excluded. Logits are formed with fp32 accumulation and kept fp32,
    from bf16, fp16 or fp32 inputs, also inside ``torch.autocast`` (which is turned off here).

    The objective per counted token: with a teacher, ``(1 - ce_weight) * D + ce_weight * CE``
    (D the divergence ``kind``, times temperature**2 with ``hinton_scale``; CE the next-token
    cross-entropy against ``labels`` at temperature 1); without a teacher, CE alone (SFT). With
    ``measure_cross_entropy`` the CE is computed (and reported in the terms) also where its weight
    is 0. ``labels`` are aligned with the hidden states (no shift); ``ignore_index`` positions do
    not count. ``ce_row_weights`` (shaped like ``labels``) adds a weight of its own to each
    position's CE, negative ones too: with ``alpha * advantage`` of each position's sample it is the
    policy-gradient term ``-alpha * A * log p(y)`` (``distill.rewards``); the reported CE stays unweighted.

    Args:
        chunk_size: counted tokens per chunk; by default as many as fit ``CHUNK_BUDGET_BYTES``
            for the chunk's logits (large chunks re-read the weights less often).
        backend: ``auto`` (Triton on CUDA, the PyTorch chunked path otherwise), ``triton`` or
            ``torch``; see ``use_triton``.
    """
    with_kd = teacher_hidden is not None
    if with_kd:
        check_loss_args(kind, beta, alpha, temperature)
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must lie in [0, 1] (0: distillation only, 1: cross-entropy only); got {ce_weight}")
    with_ce = not with_kd or ce_weight > 0 or measure_cross_entropy or ce_row_weights is not None
    if with_ce and labels is None:
        raise ValueError("the cross-entropy needs labels (the next-token targets)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if with_kd and student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student and teacher disagree on the token dims: {tuple(student_hidden.shape[:-1])} "
            f"vs {tuple(teacher_hidden.shape[:-1])}"
        )
    pairs = (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight))
    for name, hidden, weight in pairs:
        if weight is not None and hidden.shape[-1] != weight.shape[-1]:
            raise ValueError(f"{name} hidden size {hidden.shape[-1]} != {name} weight columns {weight.shape[-1]}")
    if not torch.is_grad_enabled():  # evaluation: the chunk loop then allocates no gradient buffers
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    mask = counted_positions(student_hidden, labels, ignore_index)
    s_rows = student_hidden[mask]
    t_rows = teacher_hidden[mask] if with_kd else None
    targets = labels[mask] if with_ce else None
    row_weights = None if ce_row_weights is None else ce_row_weights.detach()[mask]
    vocab = student_weight.shape[0]
    if with_kd:
        vocab = min(vocab, teacher_weight.shape[0] if teacher_weight is not None else t_rows.shape[-1])
    if with_ce:
        check_targets(targets, vocab)
    triton_path = use_triton(backend, s_rows.device, student_weight.dtype)
    if chunk_size is None:
        per_entry = chunk_entry_bytes(triton_path, student_weight.dtype, with_kd, with_ce and 0 < ce_weight < 1)
        budget = CHUNK_BUDGET_BYTES["cuda" if s_rows.is_cuda else "cpu"]
        chunk_size = auto_chunk_size(s_rows.shape[0], vocab, per_entry, budget)
    if triton_path:
        from distill.kernels.cross_entropy import cross_entropy_rows as ce_rows
        from distill.kernels.divergence import divergence_rows as div_rows
    else:
        ce_rows, div_rows = torch_ce_rows, torch_rows
    hinton = temperature**2 if hinton_scale else 1.0
    objective = Objective(
        divergence_rows=div_rows, ce_rows=ce_rows,
        loss_kwargs=dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature),
        kd_weight=(1.0 - ce_weight) * hinton if with_kd else 0.0, ce_weight=ce_weight if with_kd else 1.0,
    )
    # Autocast would run the chunk matmuls in bf16 (1e-4 relative error instead of 1e-7 in fp32):
    # the precision here is chosen by the inputs' dtypes.
    with torch.autocast(s_rows.device.type, enabled=False):
        total, terms = ChunkedLinearLoss.apply(
            s_rows, student_weight, student_bias, t_rows, teacher_weight, teacher_bias, targets, chunk_size, objective,
            row_weights,
        )
    return LossTerms(
        loss=reduce_counted(total, mask, reduction),
        divergence=reduce_counted(terms[0], mask, reduction) if with_kd else None,
        cross_entropy=reduce_counted(terms[1], mask, reduction) if with_ce else None,
    )


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``divergence(student_hidden @ student_weight.T (+ student_bias), teacher logits, labels, ...)``
    without holding the ``[tokens x vocab]`` logits; the teacher logits are
    ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``, or ``teacher_hidden`` itself when
    ``teacher_weight`` is None. Keyword arguments as ``fused_linear_loss`` (``ce_weight`` mixes in
    the cross-entropy against ``labels``)."""
    return fused_linear_loss(student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
                             teacher_weight=teacher_weight, **kwargs).loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T (+ bias), labels)`` without holding the ``[tokens x vocab]``
    logits (SFT); keyword arguments as ``fused_linear_loss``."""
    return fused_linear_loss(hidden, weight, labels, student_bias=bias, **kwargs).loss
