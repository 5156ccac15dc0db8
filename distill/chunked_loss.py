"""LM head + divergence in token chunks, in plain PyTorch: the portable path of
``distill.losses.fused_linear_divergence`` and the baseline its Triton kernels are checked against.

For each chunk of C counted tokens the student logits z_S = h_S W_S^T (+ b_S) and teacher logits
z_T = h_T W_T^T (+ b_T) (or the given teacher logits) are formed in fp32, the per-token divergence
D(z_S, z_T) and its gradient g = dD/dz_S are taken from the reference (``token_divergence``), and
the parameter gradients are accumulated in the same pass:

    dL/dh_S[chunk] = g W_S        dL/dW_S += g^T h_S[chunk]        dL/db_S += sum_rows g

so the extra memory is O(C x V) whatever the number of tokens. Ignored positions are dropped
before any matmul. The teacher gets no gradient.
"""

from __future__ import annotations

import torch

from distill.losses import token_divergence


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 operands are widened, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    z = _wide(hidden) @ weight.T  # fp32 (or wider) accumulation and logits
    return z if bias is None else z + bias


class ChunkedLinearDivergence(torch.autograd.Function):
    """Sum over the given rows of D(h_S W_S^T + b_S, teacher logits); gradients for h_S, W_S, b_S."""

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
        loss_kwargs: dict,
    ) -> torch.Tensor:
        w_s = _wide(s_weight)
        b_s = None if s_bias is None else _wide(s_bias)
        w_t = None if t_weight is None else _wide(t_weight.detach())
        b_t = None if t_bias is None else _wide(t_bias.detach())
        vocab = min(w_s.shape[0], w_t.shape[0] if w_t is not None else t_hidden.shape[-1])
        needs = ctx.needs_input_grad
        grad_h = torch.zeros_like(_wide(s_hidden)) if needs[0] else None
        grad_w = torch.zeros_like(w_s) if needs[1] else None
        grad_b = torch.zeros_like(b_s) if (b_s is not None and needs[2]) else None
        total = torch.zeros((), dtype=w_s.dtype, device=s_hidden.device)
        for start in range(0, s_hidden.shape[0], chunk_size):
            h = s_hidden[start: start + chunk_size]
            with torch.no_grad():
                z_t = _wide(t_hidden[start: start + chunk_size]) if w_t is None else _logits(
                    t_hidden[start: start + chunk_size], w_t, b_t
                )
            with torch.enable_grad():
                z_s = _logits(h.detach(), w_s, b_s).requires_grad_()
                loss = token_divergence(z_s, z_t, **loss_kwargs).sum()
                (g,) = torch.autograd.grad(loss, z_s)
            total += loss.detach()
            g = g[:, :vocab]  # rows beyond the shared vocabulary get no gradient
            if grad_h is not None:
                grad_h[start: start + chunk_size] = g @ w_s[:vocab]
            if grad_w is not None:
                grad_w[:vocab] += g.T @ _wide(h)
            if grad_b is not None:
                grad_b[:vocab] += g.sum(0)
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b))
        )
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads = [
            (g * grad_out).to(dtype) if present else None
            for g, dtype, present in zip(ctx.saved_tensors, ctx.dtypes, ctx.present, strict=True)
        ]
        return grads[0], grads[1], grads[2], None, None, None, None, None
