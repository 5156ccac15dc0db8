"""The Triton kernels (run by the interpreter on the CPU) against the float64 reference.

Shapes are small and randomized: vocabularies that are not a multiple of the block, token counts
that are not a multiple of the chunk, ignored tokens, non-contiguous inputs, unequal hidden and
vocabulary sizes. Tolerances per input dtype, for the loss (relative) and the gradients
(relative Frobenius error): fp32 1e-5, fp16 2e-3, bf16 1e-2; bf16/fp16 gradients are rounded to
the input dtype once, as autograd's would be.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill import chunked_loss, losses
from distill.kernels import divergence as kdiv
from distill.losses import KINDS, divergence, fused_linear_divergence

pytestmark = pytest.mark.skipif(not kdiv.INTERPRETED, reason="needs TRITON_INTERPRET=1 before import (conftest)")

CASES = [(k, b) for k in KINDS for b in ([0.0, 0.1, 0.5, 0.9, 1.0] if k == "gjsd" else [0.5])]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def fused_inputs(seed: int, dtype: torch.dtype, bias: bool = True):
    """Student H=24, V=300 (block 512 covers it with a masked tail); teacher H=40, V=310 (10 padding
    rows); 2 x 27 tokens with 9 ignored; student hidden is a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    s_h = r(27, 2, 24).transpose(0, 1)  # non-contiguous [2, 27, 24]
    t = dict(s_h=s_h, s_w=r(300, 24, scale=0.4), s_b=r(300, scale=0.2) if bias else None,
             t_h=r(2, 27, 40), t_w=r(310, 40, scale=0.4), t_b=r(310, scale=0.2) if bias else None)
    labels = torch.randint(0, 300, (2, 27), generator=g)
    labels[0, :6] = -100
    labels[1, -3:] = -100
    return t, labels


def run_fused(t, labels, wide: bool = False, **kw):
    """Loss and student gradients: the kernel path, or (wide) the float64 reference on the same values."""
    def leaf(name, v):  # student tensors get gradients; float64 copies for the reference
        v = v.detach().double() if wide else v.detach()
        return v.requires_grad_(name.startswith("s"))

    leaves = {k: None if v is None else leaf(k, v) for k, v in t.items()}
    if wide:
        loss = chunked_loss.reference(leaves["s_h"], leaves["s_w"], leaves["t_h"], leaves["t_w"], labels,
                                      student_bias=leaves["s_b"], teacher_bias=leaves["t_b"], **kw)
    else:
        loss = fused_linear_divergence(leaves["s_h"], leaves["s_w"], leaves["t_h"], leaves["t_w"], labels,
                                       student_bias=leaves["s_b"], teacher_bias=leaves["t_b"], backend="triton",
                                       chunk_size=20, **kw)
    keys = [k for k in ("s_h", "s_w", "s_b") if leaves[k] is not None]
    return loss, dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys]), strict=True))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind,beta", CASES)
def test_fused_linear_divergence_matches_reference(kind, beta, dtype, tol):
    t, labels = fused_inputs(zlib.crc32(repr((kind, beta)).encode()) % 997, dtype)  # fixed across runs
    kw = dict(kind=kind, beta=beta, alpha=0.25, temperature=1.5)
    loss, grads = run_fused(t, labels, **kw)
    ref_loss, ref_grads = run_fused(t, labels, wide=True, **kw)
    assert loss.dtype == torch.float32
    # fp32 logits from the rounded inputs: the loss is exact to fp32 in every dtype; gradients are rounded.
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()) + 1e-7
    for k, ref in ref_grads.items():
        assert grads[k].dtype == dtype and grads[k].shape == ref.shape
        assert rel(grads[k], ref) < tol, (k, rel(grads[k], ref))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind,beta", CASES)
def test_divergence_kernel_on_given_logits(kind, beta, dtype, tol):
    """The non-fused entry point: logits given, vocabulary padding, all three reductions."""
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(3, 11, 300, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 11, 305, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 300, (3, 11), generator=g)
    labels[1] = -100
    kw = dict(kind=kind, beta=beta, alpha=0.25, temperature=0.7)
    for reduction in ("mean", "sum", "none"):
        a, b = s.clone().requires_grad_(), s.double().requires_grad_()
        out = divergence(a, t, labels, backend="triton", reduction=reduction, **kw)
        ref = divergence(b, t.double(), labels, backend="torch", reduction=reduction, **kw)
        assert rel(out, ref) < 1e-5  # fp32 inside the kernel whatever the input dtype
        weights = torch.rand(ref.shape, generator=g, dtype=torch.float64)  # any upstream gradient
        (ga,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), a)
        (gb,) = torch.autograd.grad((ref * weights).sum(), b)
        assert ga.dtype == dtype and rel(ga, gb) < tol, (reduction, rel(ga, gb))


@pytest.mark.parametrize("kind,beta", CASES)
def test_several_vocabulary_blocks_and_row_tiles(kind, beta):
    """Blocks of 64 over V = 300 (4 full blocks and a partial one); 13 rows in tiles of 8."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(13, 300, generator=g) * 4, torch.randn(13, 300, generator=g) * 4
    a, b = s.clone().requires_grad_(), s.double().requires_grad_()
    out = kdiv.TritonDivergence.apply(a, t, kind, beta, 0.4, 1.3, 64)
    ref = kdiv.reference(b, t.double(), kind=kind, beta=beta, alpha=0.4, temperature=1.3)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(out.sum(), a)
    (gb,) = torch.autograd.grad(ref.sum(), b)
    assert rel(ga, gb) < 1e-5


@pytest.mark.parametrize("kind,beta", CASES)
def test_tokens_masked_in_both_models_stay_finite(kind, beta):
    """-inf on the same tokens in both models (student through its bias, teacher logits given):
    finite loss, finite gradients, zero gradient on the masked tokens, and the reference's value."""
    g = torch.Generator().manual_seed(5)
    s_h, s_w = torch.randn(9, 16, generator=g), torch.randn(200, 16, generator=g) * 0.5
    s_b = torch.zeros(200)
    s_b[[3, 50, 199]] = -float("inf")
    z_t = torch.randn(9, 200, generator=g) * 2
    z_t[:, [3, 50, 199]] = -float("inf")
    leaves = [x.clone().requires_grad_() for x in (s_h, s_w)]
    kw = dict(kind=kind, beta=beta, alpha=0.3)
    loss = fused_linear_divergence(leaves[0], leaves[1], z_t, None, student_bias=s_b, backend="triton", **kw)
    ref = divergence(s_h.double() @ s_w.double().T + s_b.double(), z_t.double(), **kw)
    assert torch.isfinite(loss) and abs(loss.item() - float(ref)) < 1e-5 * abs(float(ref)) + 1e-7
    grad_h, grad_w = torch.autograd.grad(loss, leaves)
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert (grad_w[[3, 50, 199]] == 0).all()


def test_precomputed_teacher_logits_and_no_teacher_gradient():
    t, labels = fused_inputs(1, torch.float32)
    teacher_h = t["t_h"].clone().requires_grad_()
    z_t = teacher_h @ t["t_w"].T + t["t_b"]  # [2, 27, 310], carries a graph
    s_h = t["s_h"].clone().requires_grad_()
    via_logits = fused_linear_divergence(s_h, t["s_w"], z_t, None, labels, student_bias=t["s_b"], kind="tvd",
                                         backend="triton")
    via_hidden = fused_linear_divergence(t["s_h"], t["s_w"], t["t_h"], t["t_w"], labels, student_bias=t["s_b"],
                                         teacher_bias=t["t_b"], kind="tvd", backend="triton")
    assert abs(float(via_logits) - float(via_hidden)) < 1e-6
    via_logits.backward()
    assert teacher_h.grad is None and s_h.grad is not None


def test_chunking_reductions_and_hinton_scale():
    t, labels = fused_inputs(2, torch.float32)
    kw = dict(kind="gjsd", beta=0.3, temperature=2.0)
    counted = int((labels != -100).sum())
    base, grads = None, None
    for chunk in (1, 7, 64, 10_000):
        s_w = t["s_w"].clone().requires_grad_()
        loss = fused_linear_divergence(t["s_h"], s_w, t["t_h"], t["t_w"], labels, chunk_size=chunk, backend="triton",
                                       reduction="sum", **kw)
        (g,) = torch.autograd.grad(loss, s_w)
        if base is None:
            base, grads = loss, g
        assert abs(loss.item() - float(base)) < 1e-5 * float(base) and rel(g, grads) < 1e-5
    mean = fused_linear_divergence(t["s_h"], t["s_w"], t["t_h"], t["t_w"], labels, backend="triton",
                                   hinton_scale=True, **kw)
    assert abs(float(mean) - 4.0 * float(base) / counted) < 1e-5 * float(mean)


@pytest.mark.parametrize("addmm", [True, False])
def test_tensor_core_path_emulated(monkeypatch, addmm):
    """The CUDA code path (half-precision weights used as they are, fp32 results from the matmuls,
    a half-precision gradient, dW accumulated in fp32 by addmm or in slices) with the fp32-output
    matmuls emulated on the CPU."""
    monkeypatch.setattr(chunked_loss, "_mm_out_fp32", lambda device: True)
    monkeypatch.setattr(chunked_loss, "_addmm_into_fp32", lambda device: addmm)
    monkeypatch.setattr(chunked_loss, "_half_mm", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(chunked_loss, "_half_addmm_", lambda acc, a, b: acc.add_(a.float() @ b.float()))
    monkeypatch.setattr(chunked_loss, "DW_SLICE", 64)  # several slices over V = 300
    t, labels = fused_inputs(4, torch.bfloat16)
    for kind in ("fkl", "gjsd"):
        loss, grads = run_fused(t, labels, kind=kind)
        ref_loss, ref_grads = run_fused(t, labels, wide=True, kind=kind)
        assert abs(loss.item() - ref_loss.item()) < 1e-2 * float(ref_loss)
        for k in ref_grads:
            assert grads[k].dtype == torch.bfloat16 and rel(grads[k], ref_grads[k]) < 1e-2, k


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.bytes = max(self.bytes, x.numel() * x.element_size())
        return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_never_holds_tokens_by_vocab_logits(backend):
    """Forward and backward over N = 600 tokens with chunks of 32: no tensor anywhere is larger
    than a chunk's fp32 logits (the [N x V] logits would be 19x larger)."""
    g = torch.Generator().manual_seed(0)
    n, h, v, chunk = 600, 8, 257, 32  # the hidden states (N x H) are smaller than a chunk's logits
    s_h = torch.randn(n, h, generator=g).requires_grad_()
    s_w = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    t_h, t_w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    with LargestTensor() as probe:
        loss = fused_linear_divergence(s_h, s_w, t_h, t_w, kind="gjsd", chunk_size=chunk, backend=backend)
        loss.backward()
    assert probe.bytes <= chunk * v * 4 < n * v * 4


def test_dispatch_rules():
    cpu = torch.device("cpu")
    assert losses.use_triton("auto", cpu, torch.float32) is False  # the interpreter is for tests only
    assert losses.use_triton("torch", cpu, torch.float32) is False
    assert losses.use_triton("triton", cpu, torch.float32) is True  # interpreter on (conftest)
    with pytest.raises(ValueError, match="backend"):
        losses.use_triton("cuda", cpu, torch.float32)
    assert "TRITON_INTERPRET" in losses._triton_unusable(torch.device("meta"))


def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter accepts code that the compiler rejects: compile every variant to an sm_90
    cubin with Triton's own toolchain (no GPU needed) in a process without the interpreter."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from distill.kernels.divergence import divergence_rows_kernel
        sig = {"s_ptr": "*bf16", "s_stride": "i64", "t_ptr": "*fp32", "t_stride": "i64", "g_ptr": "*bf16",
               "g_stride": "i64", "loss_ptr": "*fp32", "n_rows": "i32", "V": "i32", "inv_temp": "fp32",
               "w": "fp32", "log_w": "fp32", "log_1mw": "fp32", "KIND": "constexpr",
               "WRITE_GRAD": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"}
        for kind in range(6):
            for write_grad, block_r, block_v in ((True, 1, 4096), (False, 8, 512)):
                src = ASTSource(fn=divergence_rows_kernel, signature=sig, constexprs={
                    "KIND": kind, "WRITE_GRAD": write_grad, "BLOCK_R": block_r, "BLOCK_V": block_v})
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
                assert len(compiled.asm["cubin"]) > 0
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
