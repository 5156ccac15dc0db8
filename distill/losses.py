"""Token-level divergences between a student and a teacher: the reference implementation.

Conventions (``docs/algorithms.md``, "Divergences per position"): teacher p = softmax(z_T / tau), student
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

import functools
import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F

KINDS = ("fkl", "rkl", "gjsd", "tvd", "skew_fkl", "skew_rkl")
Reduction = Literal["mean", "sum", "none"]
BACKENDS = ("auto", "triton", "torch")
Backend = Literal["auto", "triton", "torch"]


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


@functools.cache
def triton_problem_on(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Run each Triton row kernel once on ``device`` as training uses it and compare it with the
    PyTorch row step (milliseconds); what went wrong, or None. Cached per device and dtype.

    The problem is shaped like the real one: a vocabulary above 8192 with a partial last block
    (the kernels' large-vocabulary launch: one row per program, 4096-wide blocks, 8 warps), the
    gradient written into a buffer of the weights' dtype, and the cross-entropy's scaled gradient
    added onto the divergence's (the mixed objective)."""
    try:
        from distill.kernels.cross_entropy import cross_entropy_rows
        from distill.kernels.divergence import divergence_rows

        gen = torch.Generator().manual_seed(0)
        z_s, z_t = ((torch.randn(4, 8200, generator=gen) * 3).to(device) for _ in range(2))
        y = torch.randint(0, 8200, (4,), generator=gen).to(device)
        grad_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        tol = 1e-4 if grad_dtype == torch.float32 else 1e-2  # relative, on the whole gradient

        def differs(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
            err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
            return f"{name}: the kernel differs from PyTorch by {err:.3g} (relative)" if err > rtol else None

        for kind in KINDS:
            args = dict(kind=kind, beta=0.3, alpha=0.2, temperature=1.3)
            got_g, want_g = torch.empty_like(z_s, dtype=grad_dtype), torch.empty_like(z_s)
            got, want = divergence_rows(z_s, z_t, got_g, **args), torch_rows(z_s, z_t, want_g, **args)
            got_ce = cross_entropy_rows(z_s, y, got_g, scale=0.5, accumulate=True)
            want_ce = torch_ce_rows(z_s, y, want_g, scale=0.5, accumulate=True)
            problem = (differs(f"{kind} divergence", got, want, 1e-5)
                       or differs("cross-entropy", got_ce, want_ce, 1e-5)
                       or differs(f"{kind} divergence + cross-entropy gradient", got_g, want_g, tol))
            if problem:
                return problem
    except Exception as e:  # a compiler or driver failure is a problem like a wrong value
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def use_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The dispatch: ``triton`` insists on the kernels (and says why they cannot run), ``torch`` is
    the plain-PyTorch path, ``auto`` takes the kernels for fp32/bf16/fp16 CUDA tensors whenever
    Triton imports, and the reference path otherwise (the CPU interpreter is for tests: far slower
    than PyTorch on a CPU). The first time the kernels would run on a CUDA device they are checked
    against PyTorch there (``triton_problem_on``); if they disagree, ``auto`` falls back to PyTorch
    with a warning naming the device and the error, and ``triton`` raises."""
    if backend not in BACKENDS:
        raise ValueError(f"loss backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return False
    reason = _triton_unusable(device)
    if backend == "triton" and reason:
        raise RuntimeError(f"backend='triton': {reason}")
    if backend == "auto" and (reason or device.type != "cuda" or dtype == torch.float64):
        return False
    if device.type == "cuda":
        problem = triton_problem_on(device, dtype)
        if problem:
            where = f"{device} ({torch.cuda.get_device_name(device)})"
            if backend == "triton":
                raise RuntimeError(f"backend='triton': the Triton kernels fail their check on {where}: {problem}")
            _warn_once(f"distill: the Triton loss kernels fail their check on {where}, using PyTorch: {problem}")
            return False
    return True


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop vocabulary rows that exist in one model only (padding rows, excluded on both sides)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def upcast(x: torch.Tensor) -> torch.Tensor:
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
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits.detach()) / temperature, dim=-1)
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


def counted_positions(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Boolean mask of the positions that count, shaped like ``logits.shape[:-1]`` (or hidden states')."""
    if labels is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape without vocab {tuple(logits.shape[:-1])}")
    return labels != ignore_index


def reduce_counted(counted_values: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
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
    mask = counted_positions(student_logits, labels, ignore_index)
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
    return reduce_counted(per_token, mask, reduction)


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Counted labels must index a logit (the kernels would read past the row). On an accelerator
    an asynchronous device assertion: no host sync per micro-batch."""
    bad = (targets < 0) | (targets >= vocab)
    if targets.device.type != "cpu":
        torch._assert_async(~bad.any(), f"a label is outside the vocabulary [0, {vocab})")
    elif targets.numel() and bool(bad.any()):
        raise ValueError(f"label {int(targets[bad][0])} is outside the vocabulary [0, {vocab})")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Next-token cross-entropy in (at least) fp32 with labels aligned to the logits (the SFT loss).
    ``backend`` as for ``divergence``: the Triton kernel computes the gradient in the forward pass."""
    mask = counted_positions(logits, labels, ignore_index)
    z, y = logits[mask], labels[mask]
    check_targets(y, z.shape[-1])
    if use_triton(backend, z.device, z.dtype):
        from distill.kernels.cross_entropy import TritonCrossEntropy

        per_token = TritonCrossEntropy.apply(z, y)
    else:
        per_token = F.cross_entropy(upcast(z), y, reduction="none")
    return reduce_counted(per_token, mask, reduction)


def count_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Number of positions that count towards a loss."""
    return int((labels != ignore_index).sum())


def torch_rows(z_s: torch.Tensor, z_t: torch.Tensor, g: torch.Tensor | None, **loss_kwargs) -> torch.Tensor:
    """The plain-PyTorch row step: the reference divergence, its gradient by autograd."""
    with torch.enable_grad():
        z = z_s.detach().requires_grad_(g is not None)
        per_row = token_divergence(z, z_t, **loss_kwargs)
        if g is not None:
            (grad,) = torch.autograd.grad(per_row.sum(), z)
            g.copy_(grad)  # g may be z_s itself: written only after autograd is done with it
    return per_row.detach()


def torch_ce_rows(z_s: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None, scale: float = 1.0,
                  accumulate: bool = False, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-PyTorch cross-entropy row step: ``F.cross_entropy`` in (at least) fp32, its
    gradient by autograd, scaled (each row also by its ``row_scale``), written into ``g`` or added to it."""
    with torch.enable_grad():
        z = z_s.detach().requires_grad_(g is not None)
        per_row = F.cross_entropy(upcast(z), y, reduction="none")
        if g is not None:
            (grad,) = torch.autograd.grad(per_row.sum(), z)
            grad = grad if scale == 1.0 else grad * scale
            if row_scale is not None:
                grad = grad * row_scale.to(grad.dtype)[:, None]
            g.add_(grad) if accumulate else g.copy_(grad)  # g may be z_s: written after autograd is done
    return per_row.detach()
