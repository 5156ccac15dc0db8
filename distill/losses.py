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
BACKENDS = ("auto", "triton", "torch")
Backend = Literal["auto", "triton", "torch"]
# Memory for one chunk's [rows x vocab] buffers in fused_linear_divergence when chunk_size is not
# given: on a GPU it allows chunks of about 2048 rows at a 128K vocabulary with bf16 weights.
CHUNK_BUDGET_BYTES = {"cuda": 5 << 29, "cpu": 1 << 28}


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


def _triton_unusable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    try:
        from distill.kernels import divergence as kernel
    except ImportError as e:  # no triton on this platform
        return f"Triton cannot be imported ({e})"
    if device.type == "cuda" or (device.type == "cpu" and kernel.INTERPRETED):
        return None
    return (
        f"the Triton kernels run on CUDA tensors, or on the CPU when TRITON_INTERPRET=1 is set before "
        f"distill.kernels is imported; these tensors are on {device}"
    )


def use_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The dispatch: ``triton`` insists on the kernels (and says why they cannot run), ``torch`` is
    the plain-PyTorch path, ``auto`` takes the kernels for fp32/bf16/fp16 CUDA tensors whenever
    Triton imports, and the reference path otherwise (the CPU interpreter is for tests: far slower
    than PyTorch on a CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"loss backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return False
    reason = _triton_unusable(device)
    if backend == "triton":
        if reason:
            raise RuntimeError(f"backend='triton': {reason}")
        return True
    return reason is None and device.type == "cuda" and dtype != torch.float64


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
    backend: Backend = "auto",
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
        backend: ``auto`` (Triton kernel on CUDA, PyTorch otherwise), ``triton`` or ``torch``; see
            ``use_triton``. The kernel computes the gradient in the forward pass.
    """
    check_loss_args(kind, beta, alpha, temperature)
    mask = _counted(student_logits, labels, ignore_index)
    # Only counted positions are computed: cheaper, and an ignored position whose divergence is
    # infinite (say the teacher puts -inf where the student has mass) cannot send 0 * inf = NaN
    # into the gradient.
    s, t = align_vocab(student_logits[mask], teacher_logits[mask])
    if use_triton(backend, s.device, s.dtype):
        from distill.kernels.divergence import TritonDivergence

        per_token = TritonDivergence.apply(s, t, kind, beta, alpha, temperature, None)
    else:
        per_token = token_divergence(s, t, kind=kind, beta=beta, alpha=alpha, temperature=temperature)
    if hinton_scale:
        per_token = per_token * temperature**2
    return _reduce(per_token, mask, reduction)


def auto_chunk_size(rows: int, vocab: int, bytes_per_entry: int, budget_bytes: int) -> int:
    """Rows per chunk: as many as the budget allows for ``bytes_per_entry`` per logit (at least 128),
    then evened out so that the last chunk is not a sliver. Multiples of 64 rows."""
    cap = max(128, budget_bytes // (bytes_per_entry * max(vocab, 1)) // 64 * 64)
    n_chunks = -(-rows // cap)
    even = -(-rows // max(n_chunks, 1))
    return max(1, min(cap, -(-even // 64) * 64))


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
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``divergence(student_hidden @ student_weight.T (+ student_bias), teacher logits, labels, ...)``
    without holding the ``[tokens x vocab]`` logits: computed in chunks of counted tokens, with the
    gradients for ``student_hidden``, ``student_weight`` and ``student_bias`` produced in the same
    pass (none for the teacher).

    The teacher logits are ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``, or
    ``teacher_hidden`` itself when ``teacher_weight`` is None (precomputed logits). Student and
    teacher hidden sizes may differ; vocabulary rows present in one model only are excluded.
    Logits are formed with fp32 accumulation and kept fp32, from bf16, fp16 or fp32 inputs.

    Args:
        chunk_size: counted tokens per chunk; by default as many as fit ``CHUNK_BUDGET_BYTES``
            for the chunk's logits (large chunks re-read the weights less often).
        backend: ``auto`` (Triton on CUDA, the PyTorch chunked path otherwise), ``triton`` or
            ``torch``; see ``use_triton``.
    """
    check_loss_args(kind, beta, alpha, temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student and teacher disagree on the token dims: {tuple(student_hidden.shape[:-1])} "
            f"vs {tuple(teacher_hidden.shape[:-1])}"
        )
    pairs = (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight))
    for name, hidden, weight in pairs:
        if weight is not None and hidden.shape[-1] != weight.shape[-1]:
            raise ValueError(f"{name} hidden size {hidden.shape[-1]} != {name} weight columns {weight.shape[-1]}")
    mask = _counted(student_hidden, labels, ignore_index)
    s_rows, t_rows = student_hidden[mask], teacher_hidden[mask]
    vocab = min(student_weight.shape[0], teacher_weight.shape[0] if teacher_weight is not None else t_rows.shape[-1])
    triton_path = use_triton(backend, s_rows.device, student_weight.dtype)
    if chunk_size is None:
        # Per logit entry: fp32 student and teacher logits, plus a half-precision gradient buffer
        # (Triton; an fp32 gradient overwrites the student logits in place), or the autograd
        # temporaries of the reference divergence (PyTorch path: about 15 fp32 buffers of a
        # chunk's size, benchmarks/results/fused_loss_cpu.md).
        half = student_weight.dtype in (torch.float16, torch.bfloat16)
        per_entry = 4 + 4 + (student_weight.element_size() if half else 0) if triton_path else 15 * 4
        budget = CHUNK_BUDGET_BYTES["cuda" if s_rows.is_cuda else "cpu"]
        chunk_size = auto_chunk_size(s_rows.shape[0], vocab, per_entry, budget)
    from distill.chunked_loss import ChunkedLinearDivergence, torch_rows

    if triton_path:
        from distill.kernels.divergence import divergence_rows as rows
    else:
        rows = torch_rows
    total = ChunkedLinearDivergence.apply(
        s_rows, student_weight, student_bias, t_rows, teacher_weight, teacher_bias,
        chunk_size, rows, dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature),
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
