"""LM head fused with the token divergence, in chunks of tokens: the ``[tokens x vocab]`` logits
never exist. One loop serves both backends of ``distill.losses.fused_linear_divergence``; only the
per-row step differs (the Triton kernel ``distill.kernels.divergence.divergence_rows``, or
``torch_rows``: the reference ``token_divergence`` and autograd).

For each chunk of C counted tokens, student hidden X [C, H_S] and weight W_S [V, H_S]:

    Z_S = X W_S^T (+ b_S)                    fp32 output, fp32 accumulation (float64 stays float64)
    Z_T = X_T W_T^T (+ b_T), or given        the teacher's own hidden size H_T
    L, G = rows(Z_S, Z_T)                    G = dL/dZ_S
    dX = G W_S     dW_S += G^T X (fp32 accumulator)     db_S += sum_rows G

Cost: 2 N H_S V + 2 N H_T V FLOPs forward and 4 N H_S V for the gradients, all matmuls in the
input dtype (on CUDA, half-precision matmuls write fp32 directly: ``torch.mm(out_dtype=...)``).
The weights are read once per chunk, so a chunk's arithmetic intensity is about C FLOP/byte:
chunks of >= 1024 rows keep the matmuls compute-bound, and a memory budget for the chunk's C x V
buffers caps them. Peak extra memory is O(C x V + V x H), independent of N. The gradient is made
in the forward pass; backward only scales it. Vocabulary rows present in one model only are
padding: excluded on both sides, no gradient. The teacher gets no gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from distill.losses import _upcast, token_divergence

HALF = (torch.bfloat16, torch.float16)
# Rows of dW formed per matmul when accumulating in fp32 without addmm(out_dtype): bounds the fp32
# temporary to DW_SLICE x H while keeping each matmul large.
DW_SLICE = 16384

# rows(z_s, z_t, g, **loss_kwargs) -> per-row divergence; writes dL/dz_S into g unless g is None.
Rows = Callable[..., torch.Tensor]


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
    return _upcast(weight)


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


def torch_rows(z_s: torch.Tensor, z_t: torch.Tensor, g: torch.Tensor | None, **loss_kwargs) -> torch.Tensor:
    """The plain-PyTorch row step: the reference divergence, its gradient by autograd."""
    with torch.enable_grad():
        z = z_s.detach().requires_grad_(g is not None)
        per_row = token_divergence(z, z_t, **loss_kwargs)
        if g is not None:
            (grad,) = torch.autograd.grad(per_row.sum(), z)
            g.copy_(grad)  # g may be z_s itself: written only after autograd is done with it
    return per_row.detach()


class ChunkedLinearDivergence(torch.autograd.Function):
    """Sum over the given rows of D(h_S W_S^T + b_S, teacher logits); gradients for h_S, W_S and
    b_S computed in the forward pass; none for the teacher."""

    @staticmethod
    def forward(
        ctx,
        s_hidden: torch.Tensor,  # [N, H_S], counted rows only
        s_weight: torch.Tensor,  # [V_S, H_S]
        s_bias: torch.Tensor | None,
        t_hidden: torch.Tensor,  # [N, H_T], or teacher logits [N, V_T] when t_weight is None
        t_weight: torch.Tensor | None,
        t_bias: torch.Tensor | None,
        chunk_size: int,
        rows: Rows,
        loss_kwargs: dict,
    ) -> torch.Tensor:
        n = s_hidden.shape[0]
        vocab = min(s_weight.shape[0], t_weight.shape[0] if t_weight is not None else t_hidden.shape[-1])
        w_s = _operand(s_weight[:vocab])
        w_t = None if t_weight is None else _operand(t_weight[:vocab])
        b_s = None if s_bias is None else s_bias.detach()[:vocab]
        b_t = None if t_bias is None else t_bias.detach()[:vocab]
        acc_dtype = torch.promote_types(w_s.dtype, torch.float32)

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and s_bias is not None
        device = s_hidden.device
        grad_h = torch.empty(s_hidden.shape, dtype=w_s.dtype, device=device) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=device) if need_w else None
        grad_b = torch.zeros(s_weight.shape[0], dtype=acc_dtype, device=device) if need_b else None
        total = torch.zeros((), dtype=acc_dtype, device=device)
        for start in range(0, n, chunk_size):
            x = s_hidden.detach()[start: start + chunk_size].to(w_s.dtype)
            z_s = _logits(x, w_s, b_s)
            t = t_hidden.detach()[start: start + chunk_size]
            z_t = t[:, :vocab] if w_t is None else _logits(t, w_t, b_t)  # given logits are widened by rows()
            z_t = z_t if z_t.stride(-1) == 1 else z_t.contiguous()
            g = None
            if need_h or need_w or need_b:
                # With wide weights the gradient overwrites the student logits in place.
                g = z_s if z_s.dtype == w_s.dtype else torch.empty_like(z_s, dtype=w_s.dtype)
            total += rows(z_s, z_t, g, **loss_kwargs).sum()
            del z_s, z_t
            if grad_h is not None:
                torch.mm(g, w_s, out=grad_h[start: start + chunk_size])
            if grad_w is not None:
                _accumulate_grad_weight(grad_w[:vocab], g, x)
            if grad_b is not None:
                grad_b[:vocab] += g.sum(0, dtype=acc_dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        # grad_total is the mean's 1/count or a caller's weight; no .item(): no host sync per step.
        grads = [
            None if g is None else (g * grad_total.to(g.dtype)).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None, None)


def reference(
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
    """Plain PyTorch on full logits, then ``distill.losses.divergence`` (float64 in the tests)."""
    from distill.losses import divergence

    z_s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    z_t = teacher_hidden if teacher_weight is None else torch.nn.functional.linear(
        teacher_hidden, teacher_weight, teacher_bias
    )
    return divergence(z_s, z_t.detach(), labels, backend="torch", **loss_kwargs)
