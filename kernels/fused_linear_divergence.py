"""LM head fused with the token divergence: the logits of a chunk of tokens are formed, consumed
and turned into gradients before the next chunk, so ``[tokens x vocab]`` logits never exist.

For each chunk of C counted tokens, student hidden X [C, H_S] and weight W_S [V, H_S]:

    Z_S = X W_S^T (+ b_S)                    fp32 output, fp32 accumulation
    Z_T = X_T W_T^T (+ b_T), or given        fp32 output (the teacher's own hidden size H_T)
    L, G = divergence_rows(Z_S, Z_T)         G = dL/dZ_S (Triton, ``kernels/divergence.py``)
    dX = G W_S     dW_S += G^T X (fp32 accumulator)     db_S += sum_rows G

Cost: 2 N H_S V + 2 N H_T V FLOPs forward and 4 N H_S V for the gradients, all tensor-core
matmuls in the input dtype; the row kernel is memory-bound (at most three reads of the two fp32
chunks and one write of G). The weights are read once per chunk, so a chunk's arithmetic
intensity is about C FLOP/byte: chunks of >= 1024 rows keep the matmuls compute-bound, and the
chunk is capped by a memory budget for its C x V buffers. Peak extra memory is therefore
O(C x V + V x H), independent of N. The gradient is produced in the forward pass; backward only
scales it by the upstream gradient.

The plain-PyTorch reference is ``reference`` below: full logits, then
``distill.losses.divergence``.
"""

from __future__ import annotations

import functools

import torch

from distill.kernels.divergence import divergence_rows

HALF = (torch.bfloat16, torch.float16)
# Rows of dW formed per matmul when accumulating in fp32: bounds the fp32 temporary to
# DW_SLICE x H while keeping each matmul large.
DW_SLICE = 16384


@functools.cache
def _mm_out_fp32(device: torch.device) -> bool:
    """Whether ``torch.mm(half, half, out_dtype=torch.float32)`` (fp32 output from tensor cores)
    works on this device; torch builds without it take the slower widened matmul."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
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


def _half_addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for half-precision a, b, in one cuBLAS call."""
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _native(weight: torch.Tensor) -> bool:
    """Half-precision weights whose matmuls can write fp32 directly."""
    return weight.dtype in HALF and _mm_out_fp32(weight.device)


def _half_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half-precision a @ b on tensor cores with an fp32 result (no rounding to the input dtype)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result; ``b`` is either native half precision or
    already widened to fp32 by the caller."""
    if b.dtype in HALF:
        return _half_mm(a.to(b.dtype), b)
    return torch.mm(a.to(b.dtype), b)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    z = _mm_fp32(hidden, weight.T)
    return z if bias is None else z.add_(bias.float())


class FusedLinearDivergence(torch.autograd.Function):
    """Sum over the given rows of D(h_S W_S^T + b_S, teacher logits); gradients for h_S, W_S, b_S
    computed in the forward pass; none for the teacher."""

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
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        block_v: int | None,
    ) -> torch.Tensor:
        rows = s_hidden.shape[0]
        vocab = min(s_weight.shape[0], t_weight.shape[0] if t_weight is not None else t_hidden.shape[-1])
        # Rows beyond the shared vocabulary are padding: excluded on both sides, no gradient.
        w_s = s_weight.detach()[:vocab]
        if not _native(w_s):
            w_s = w_s.float()  # widened once per call, not per chunk
        b_s = None if s_bias is None else s_bias.detach()[:vocab]
        w_t = None if t_weight is None else t_weight.detach()[:vocab]
        if w_t is not None and not _native(w_t):
            w_t = w_t.float()
        b_t = None if t_bias is None else t_bias.detach()[:vocab]

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and s_bias is not None
        grad_h = torch.empty(s_hidden.shape, dtype=w_s.dtype, device=s_hidden.device) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(s_weight.shape[0], dtype=torch.float32, device=s_weight.device) if need_b else None
        writes_grad = need_h or need_w or need_b
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            x = s_hidden.detach()[start:stop].to(w_s.dtype)
            z_s = _logits(x, w_s, b_s)
            if w_t is None:
                z_t = t_hidden.detach()[start:stop, :vocab]  # given logits; the kernel widens them
            else:
                z_t = _logits(t_hidden.detach()[start:stop], w_t, b_t)
            # fp32 weights: the gradient overwrites the student logits in place.
            g = (z_s if w_s.dtype == torch.float32 else torch.empty_like(z_s, dtype=w_s.dtype)) if writes_grad else None
            per_row = divergence_rows(
                z_s, z_t.contiguous() if z_t.stride(-1) != 1 else z_t, g,
                kind=kind, beta=beta, alpha=alpha, temperature=temperature, block_v=block_v,
            )
            total += per_row.sum()
            del z_s, z_t
            if grad_h is not None:
                torch.mm(g, w_s, out=grad_h[start:stop])
            if grad_w is not None:
                _accumulate_grad_weight(grad_w[:vocab], g, x)
            if grad_b is not None:
                grad_b[:vocab] += g.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        scaled = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            if g is None:
                scaled.append(None)
                continue
            if grad_total.item() != 1.0:  # the mean's 1/count, or a caller's weight
                g = g.mul_(grad_total.to(g.dtype))
            scaled.append(g.to(dtype))
        return (*scaled, None, None, None, None, None, None, None, None, None)


def _accumulate_grad_weight(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc (fp32) += g^T x, with fp32 accumulation also for half-precision g and x."""
    if g.dtype in HALF and _addmm_into_fp32(g.device):
        _half_addmm_(acc, g.T, x)
    elif g.dtype in HALF:  # fp32 products of DW_SLICE rows at a time, added to the accumulator
        for v0 in range(0, g.shape[1], DW_SLICE):
            acc[v0: v0 + DW_SLICE] += _half_mm(g[:, v0: v0 + DW_SLICE].T, x)
    else:
        acc.addmm_(g.T, x.float())


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
    """Plain PyTorch: the full logits, then ``distill.losses.divergence`` (float64 in the tests)."""
    from distill.losses import divergence

    z_s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    z_t = teacher_hidden if teacher_weight is None else torch.nn.functional.linear(
        teacher_hidden, teacher_weight, teacher_bias
    )
    return divergence(z_s, z_t.detach(), labels, **loss_kwargs)
