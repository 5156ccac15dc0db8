"""Per-row cross-entropy over given logits, with the logit gradient in the same launch (Triton).

One program handles a tile of rows (tokens). With z = fp32(logits) (whatever the input dtype, no
temperature) and target y:

    L = lse(z) - z_y,   lse(z) = log sum_v exp(z_v)
    dL/dz = softmax(z) - onehot(y),   softmax(z)_v = exp(z_v - lse(z))

The launch writes ``scale * w_r * dL/dz`` into the gradient buffer (``w_r`` a per-row weight, 1
without ``row_scale``: the policy-gradient term weighs each token by its sample's advantage), or
adds it to the buffer's contents (``accumulate``: a KD + CE objective adds the CE gradient to the
divergence gradient already there).

Passes over the vocabulary per row: (1) online log-sum-exp (the target logit is one extra load);
(2) only when the gradient is asked for: softmax - onehot, read-modify-write when accumulating.
Each tile is read before it is written, so the gradient buffer may be the logits themselves.

-inf logits (a masked vocabulary) are skipped by the log-sum-exp and get probability exactly 0,
so their gradient is exactly 0 and nothing is NaN, even in a row that is -inf everywhere. A row
whose target logit is -inf has L = +inf (the correct value); its target column keeps the
gradient p_y - 1 = -1, as autograd of the reference gives.

The plain-PyTorch reference is ``reference`` below (``torch.nn.functional.cross_entropy``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distill.kernels.divergence import _online_lse, launch_config


@triton.jit
def cross_entropy_rows_kernel(
    z_ptr, z_stride,  # logits [rows, >= V], any float dtype
    y_ptr, y_stride,  # targets [rows], integer, each in [0, V)
    g_ptr, g_stride,  # gradient [rows, >= V], any float dtype (may alias z_ptr when fp32)
    loss_ptr,  # [rows] fp32, per-row L
    n_rows,
    V,
    scale,  # multiplies the gradient written or added
    w_ptr,  # [rows] fp32 per-row weights of the gradient (read when ROW_SCALE)
    WRITE_GRAD: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to g's contents instead of overwriting them
    BLOCK_R: tl.constexpr,  # rows per program: 1 on GPUs at LLM vocabularies, more for small V
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows_in = row_ok[:, None]
    z_rows = z_ptr + rows[:, None] * z_stride
    g_rows = g_ptr + rows[:, None] * g_stride
    offs = tl.arange(0, BLOCK_V)[None, :]

    # Pass 1: log-sum-exp; the target logit by one gather (before any store: g may alias z).
    lse = _online_lse(z_rows, rows_in, V, 1.0, BLOCK_V)
    y = tl.load(y_ptr + rows * y_stride, mask=row_ok, other=0).to(tl.int64)
    z_y = tl.load(z_ptr + rows * z_stride + y, mask=row_ok, other=0.0).to(tl.float32)
    # A -inf target is +inf even where the whole row is -inf (lse - z_y would be NaN there).
    loss = tl.where(z_y == -float("inf"), float("inf"), lse - z_y)
    tl.store(loss_ptr + rows, loss, mask=row_ok)

    # Pass 2: scale * w_r * (softmax - onehot), written or added.
    if WRITE_GRAD:
        row_scale = tl.full((BLOCK_R,), 1.0, tl.float32) * scale
        if ROW_SCALE:
            row_scale *= tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inside = rows_in & (cols < V)
            z = tl.load(z_rows + cols, mask=inside, other=-float("inf")).to(tl.float32)
            # -inf logits: probability exactly 0 (exp(-inf - -inf) would be NaN in an all -inf row).
            p = tl.where(z == -float("inf"), 0.0, tl.exp(z - lse[:, None]))
            grad = (p - tl.where(cols == y[:, None], 1.0, 0.0)) * row_scale[:, None]
            if ACCUMULATE:
                grad += tl.load(g_rows + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(g_rows + cols, grad.to(g_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_out: torch.Tensor | None,
    *,
    scale: float = 1.0,
    accumulate: bool = False,
    row_scale: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the row kernel on 2-D logits ``[rows, V]`` with targets ``[rows]`` (every value in
    ``[0, V)``: the caller has dropped ignored positions). Returns the per-row cross-entropy (fp32);
    when ``grad_out`` is given, writes ``scale * dL/dz`` into it (each row also times its
    ``row_scale``, ``[rows]``), or adds it with ``accumulate`` (``grad_out`` may be ``logits`` itself
    when fp32)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [rows, V], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"targets {tuple(targets.shape)} != ({rows},) for logits {(rows, vocab)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if grad_out is not None and grad_out.shape != logits.shape:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} != logits {(rows, vocab)}")
    for name, x in (("logits", logits), ("grad_out", grad_out)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along the vocabulary")
    if row_scale is not None and row_scale.shape != (rows,):
        raise ValueError(f"row_scale {tuple(row_scale.shape)} != ({rows},)")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    g = grad_out if grad_out is not None else logits  # not touched when WRITE_GRAD is off
    launch = launch_config(vocab, rows, logits.is_cuda, block_v)
    cross_entropy_rows_kernel[launch.pop("grid")](
        logits, logits.stride(0),
        targets, targets.stride(0),
        g, g.stride(0),
        loss,
        rows,
        vocab,
        float(scale),
        loss if row_scale is None else row_scale.float().contiguous(),  # any pointer where ROW_SCALE is off
        WRITE_GRAD=grad_out is not None,
        ROW_SCALE=row_scale is not None,
        ACCUMULATE=grad_out is not None and accumulate,
        **launch,
    )
    return loss


class TritonCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of given logits ``[rows, V]`` with targets ``[rows]``; the gradient for
    the logits is computed in the forward pass and scaled by the upstream per-row gradient in backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, block_v: int | None = None) -> torch.Tensor:
        z = logits.detach()
        z = z if z.stride(-1) == 1 else z.contiguous()
        grad = torch.empty(z.shape, dtype=z.dtype, device=z.device) if ctx.needs_input_grad[0] else None
        per_row = cross_entropy_rows(z, targets, grad, block_v=block_v)
        ctx.save_for_backward(grad)
        return per_row

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        return grad * grad_rows[:, None].to(grad.dtype), None, None
