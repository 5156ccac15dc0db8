"""Token divergences over given logits, with the student gradient in the same pass (Triton).

One program handles one row (token). With a = z_S / tau, b = z_T / tau (fp32, whatever the
input dtype), log q = a - lse(a), log p = b - lse(b), each kind's per-row value L and its
gradient follow from r_v = dL/d(log q_v):

    dL/da = r - q * R,   R = sum_v r_v        (softmax chain rule)
    dL/dz_S = (r - q * R) / tau

| kind       | L                                  | r_v                                  |
|------------|------------------------------------|--------------------------------------|
| `fkl`      | sum p (log p - log q)              | -p_v  (R = -1, so dL/da = q - p)     |
| `rkl`      | sum q (log q - log p)              | q_v (log q_v - log p_v)              |
| `gjsd` (b) | b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q | (1-b) q_v (log q_v - log m_v) |
| `tvd`      | 1/2 sum |p - q|                    | 1/2 sign(q_v - p_v) q_v              |
| `skew_fkl` (a) | KL(p || a p + (1-a) q)         | -(1-a) p_v q_v / m_v                 |
| `skew_rkl` (a) | KL(q || a q + (1-a) p)         | q_v (log q_v - log m_v) - a q_v^2 / m_v |

(For `rkl` and `skew_rkl` a term q_v was dropped from r: adding c q to r changes R by c and
leaves r - q R unchanged.) log m is a log-sum-exp of the two weighted log-probabilities.
Terms with zero probability are 0, so tokens that both models mask with -inf give finite
values and zero gradient.

Passes over the vocabulary per row: (1) online log-sum-exp of a and b; (2) L, and for `fkl`
the gradient q - p directly; (3) the gradient for the kinds whose r - q R needs the row sum R.
The gjsd endpoints (beta 0 and 1) and the skews with a = 0 are exactly `fkl` / `rkl` and are
mapped to them before launch.

The plain-PyTorch reference is ``reference`` below (``distill.losses.token_divergence``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Kind codes of the kernel (constexpr): one compiled variant each.
FKL, RKL, MIX_JSD, TVD, SKEW_FKL, SKEW_RKL = range(6)


def kernel_kind(kind: str, beta: float, alpha: float) -> tuple[int, float]:
    """The kernel's kind code and mixture weight w on p (m = w p + (1 - w) q) for a loss kind."""
    if kind == "fkl" or (kind == "gjsd" and beta == 0.0) or (kind == "skew_fkl" and alpha == 0.0):
        return FKL, 0.0
    if kind == "rkl" or (kind == "gjsd" and beta == 1.0) or (kind == "skew_rkl" and alpha == 0.0):
        return RKL, 0.0
    if kind == "gjsd":
        return MIX_JSD, beta
    if kind == "tvd":
        return TVD, 0.0
    if kind == "skew_fkl":
        return SKEW_FKL, alpha
    if kind == "skew_rkl":
        return SKEW_RKL, 1.0 - alpha  # m = a q + (1 - a) p
    raise ValueError(f"unknown divergence kind {kind!r}")


@triton.jit
def _load_scaled(ptrs, cols, inside, inv_temp):
    """fp32(x) * inv_temp for a tile; -inf outside the rows and the vocabulary."""
    return tl.load(ptrs + cols, mask=inside, other=-float("inf")).to(tl.float32) * inv_temp


@triton.jit
def _online_lse(ptrs, rows_in, V, inv_temp, BLOCK_V: tl.constexpr):
    """Row-wise log-sum-exp of fp32(x) * inv_temp over a [BLOCK_R, BLOCK_V] tile of row pointers,
    in one pass over the vocabulary; -inf entries are skipped."""
    offs = tl.arange(0, BLOCK_V)[None, :]
    run_max = tl.full([ptrs.shape[0]], -float("inf"), tl.float32)
    run_sum = tl.zeros([ptrs.shape[0]], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = _load_scaled(ptrs, cols, rows_in & (cols < V), inv_temp)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        # While everything so far is -inf, shift by 0 instead (exp(-inf - -inf) would be NaN).
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    return run_max + tl.log(run_sum)


@triton.jit
def _log_mix(log_p, log_q, log_w, log_1mw):
    """log(w p + (1 - w) q) by log-sum-exp; -inf where both are -inf."""
    x = log_p + log_w
    y = log_q + log_1mw
    big = tl.maximum(x, y)
    shift = tl.where(big == -float("inf"), 0.0, big)
    return shift + tl.log(tl.exp(x - shift) + tl.exp(y - shift))


@triton.jit
def _row_terms(a, b, lse_q, lse_p, w, log_w, log_1mw, KIND: tl.constexpr):
    """Per-entry loss term and r_v (see the module docstring) for one tile of rows."""
    log_q = a - lse_q[:, None]
    log_p = b - lse_p[:, None]
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    zero = tl.zeros_like(q)
    if KIND == 0:  # fkl
        term = tl.where(p > 0, p * (log_p - log_q), zero)
        r = -p
    elif KIND == 1:  # rkl
        term = tl.where(q > 0, q * (log_q - log_p), zero)
        r = term
    elif KIND == 2:  # gjsd, interior beta = w
        log_m = _log_mix(log_p, log_q, log_w, log_1mw)
        q_term = tl.where(q > 0, q * (log_q - log_m), zero)
        term = w * tl.where(p > 0, p * (log_p - log_m), zero) + (1.0 - w) * q_term
        r = (1.0 - w) * q_term
    elif KIND == 3:  # tvd
        diff = q - p
        term = 0.5 * tl.abs(diff)
        r = 0.5 * q * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KIND == 4:  # skew_fkl: m = w p + (1 - w) q, w = alpha
        log_m = _log_mix(log_p, log_q, log_w, log_1mw)
        term = tl.where(p > 0, p * (log_p - log_m), zero)
        r = tl.where((p > 0) & (q > 0), -(1.0 - w) * tl.exp(log_p + log_q - log_m), zero)
    else:  # skew_rkl: m = w p + (1 - w) q, w = 1 - alpha
        log_m = _log_mix(log_p, log_q, log_w, log_1mw)
        term = tl.where(q > 0, q * (log_q - log_m), zero)
        r = term - tl.where(q > 0, (1.0 - w) * tl.exp(2.0 * log_q - log_m), zero)
    return term, r, q, p


@triton.jit
def divergence_rows_kernel(
    s_ptr, s_stride,  # student logits [rows, >= V], any float dtype
    t_ptr, t_stride,  # teacher logits [rows, >= V]
    g_ptr, g_stride,  # gradient out [rows, >= V] (may alias s_ptr when fp32)
    loss_ptr,  # [rows] fp32, per-row L
    n_rows,
    V,
    inv_temp,  # 1 / tau: scales the logits, and dL/dz_S by the chain rule
    w, log_w, log_1mw,  # mixture weight on p and its logs (unused by fkl, rkl, tvd)
    KIND: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program: 1 on GPUs at LLM vocabularies, more for small V
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_in = (rows < n_rows)[:, None]
    s_rows = s_ptr + rows[:, None] * s_stride
    t_rows = t_ptr + rows[:, None] * t_stride
    g_rows = g_ptr + rows[:, None] * g_stride
    offs = tl.arange(0, BLOCK_V)[None, :]

    lse_q = _online_lse(s_rows, rows_in, V, inv_temp, BLOCK_V)
    lse_p = _online_lse(t_rows, rows_in, V, inv_temp, BLOCK_V)

    # Pass 2: each row's value, the row sums R of r, and (fkl) the gradient.
    loss = tl.zeros([BLOCK_R], tl.float32)
    r_sum = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = rows_in & (cols < V)
        a = _load_scaled(s_rows, cols, inside, inv_temp)
        b = _load_scaled(t_rows, cols, inside, inv_temp)
        term, r, q, p = _row_terms(a, b, lse_q, lse_p, w, log_w, log_1mw, KIND)
        loss += tl.sum(term, axis=1)
        if KIND == 0:
            if WRITE_GRAD:
                tl.store(g_rows + cols, ((q - p) * inv_temp).to(g_ptr.dtype.element_ty), mask=inside)
        else:
            r_sum += tl.sum(r, axis=1)
    tl.store(loss_ptr + rows, loss, mask=rows < n_rows)

    # Pass 3: dL/da = r - q R for the kinds that need R.
    if KIND != 0 and WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inside = rows_in & (cols < V)
            a = _load_scaled(s_rows, cols, inside, inv_temp)
            b = _load_scaled(t_rows, cols, inside, inv_temp)
            term, r, q, p = _row_terms(a, b, lse_q, lse_p, w, log_w, log_1mw, KIND)
            grad = (r - q * r_sum[:, None]) * inv_temp
            tl.store(g_rows + cols, grad.to(g_ptr.dtype.element_ty), mask=inside)


# True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then run
# on CPU tensors (numerically real, slow); otherwise they need CUDA tensors.
INTERPRETED = isinstance(divergence_rows_kernel, InterpretedFunction)


def launch_config(vocab: int, rows: int, on_cuda: bool, block_v: int | None = None) -> dict:
    """Grid and tile of a row kernel: one row and up to 4096 vocabulary entries per program at LLM
    vocabularies (8 warps on a GPU from 8192 entries), several rows of a small vocabulary sharing a
    tile of about 4096 entries. ``block_v`` overrides the tile width (tests)."""
    default_v = min(4096, triton.next_power_of_2(vocab))
    block_r = max(1, 4096 // default_v)
    return dict(grid=(triton.cdiv(rows, block_r),), BLOCK_R=block_r, BLOCK_V=block_v or default_v,
                num_warps=8 if on_cuda and vocab >= 8192 else 4)


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    grad_out: torch.Tensor | None,
    *,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the row kernel on 2-D logits ``[rows, V]`` (the shared vocabulary: the caller has
    dropped padding columns). Returns the per-row divergence (fp32); when ``grad_out`` is given,
    writes ``dL/dz_S`` into it (it may be ``student_logits`` itself when fp32)."""
    rows, vocab = student_logits.shape
    if teacher_logits.shape != (rows, vocab):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits {(rows, vocab)}")
    for name, x in (("student", student_logits), ("teacher", teacher_logits), ("grad", grad_out)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} logits must be contiguous along the vocabulary")
    code, w = kernel_kind(kind, beta, alpha)
    loss = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return loss
    g = grad_out if grad_out is not None else student_logits  # not written when WRITE_GRAD is off
    mix = 0.0 < w < 1.0
    launch = launch_config(vocab, rows, student_logits.is_cuda, block_v)
    divergence_rows_kernel[launch.pop("grid")](
        student_logits, student_logits.stride(0),
        teacher_logits, teacher_logits.stride(0),
        g, g.stride(0),
        loss,
        rows,
        vocab,
        1.0 / temperature,
        w, math.log(w) if mix else 0.0, math.log1p(-w) if mix else 0.0,
        KIND=code,
        WRITE_GRAD=grad_out is not None,
        **launch,
    )
    return loss


class TritonDivergence(torch.autograd.Function):
    """Per-row divergence of given logits ``[rows, V]``; the gradient for the student logits is
    computed in the forward pass and scaled by the upstream per-row gradient in backward."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        block_v: int | None,
    ) -> torch.Tensor:
        s = student_logits.detach()
        s = s if s.stride(-1) == 1 else s.contiguous()
        t = teacher_logits.detach()
        t = t if t.stride(-1) == 1 else t.contiguous()
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if ctx.needs_input_grad[0] else None
        per_row = divergence_rows(
            s, t, grad, kind=kind, beta=beta, alpha=alpha, temperature=temperature, block_v=block_v
        )
        ctx.save_for_backward(grad)
        return per_row

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 7
        return grad * grad_rows[:, None].to(grad.dtype), None, None, None, None, None, None
