"""The Triton kernels against the float64 reference: in the interpreter on the CPU, or compiled on
a GPU with DISTILL_TEST_DEVICE=cuda (``make gpu-check``).

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
from references import full_logits_cross_entropy, full_logits_divergence, row_cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode

from distill import fused_loss, losses
from distill.fused_loss import fused_linear_divergence, fused_linear_loss
from distill.kernels import cross_entropy as kce
from distill.kernels import divergence as kdiv
from distill.losses import KINDS, cross_entropy, divergence, token_divergence

DEVICE = torch.device(os.environ.get("DISTILL_TEST_DEVICE", "cpu"))
pytestmark = pytest.mark.skipif(
    not (kdiv.INTERPRETED if DEVICE.type == "cpu" else torch.cuda.is_available()),
    reason="the kernels need TRITON_INTERPRET=1 before import (conftest) on the CPU, or a CUDA device",
)

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
    return {k: None if v is None else v.to(DEVICE) for k, v in t.items()}, labels.to(DEVICE)


def run_fused(t, labels, wide: bool = False, **kw):
    """Loss and student gradients: the kernel path, or (wide) the float64 reference on the same values."""
    def leaf(name, v):  # student tensors get gradients; float64 copies for the reference
        v = v.detach().double() if wide else v.detach()
        return v.requires_grad_(name.startswith("s"))

    leaves = {k: None if v is None else leaf(k, v) for k, v in t.items()}
    if wide:
        loss = full_logits_divergence(leaves["s_h"], leaves["s_w"], leaves["t_h"], leaves["t_w"], labels,
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
    s = (torch.randn(3, 11, 300, generator=g) * 3).to(DEVICE, dtype)
    t = (torch.randn(3, 11, 305, generator=g) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, 300, (3, 11), generator=g).to(DEVICE)
    labels[1] = -100
    kw = dict(kind=kind, beta=beta, alpha=0.25, temperature=0.7)
    for reduction in ("mean", "sum", "none"):
        a, b = s.clone().requires_grad_(), s.double().requires_grad_()
        out = divergence(a, t, labels, backend="triton", reduction=reduction, **kw)
        ref = divergence(b, t.double(), labels, backend="torch", reduction=reduction, **kw)
        assert rel(out, ref) < 1e-5  # fp32 inside the kernel whatever the input dtype
        weights = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)  # any upstream gradient
        (ga,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), a)
        (gb,) = torch.autograd.grad((ref * weights).sum(), b)
        assert ga.dtype == dtype and rel(ga, gb) < tol, (reduction, rel(ga, gb))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_cross_entropy_on_given_logits(dtype, tol):
    """The non-fused entry point with backend="triton": labels with ignored positions, reductions."""
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(3, 11, 300, generator=g) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, 300, (3, 11), generator=g).to(DEVICE)
    labels[1, 4:] = -100
    for reduction in ("mean", "sum", "none"):
        a, b = z.clone().requires_grad_(), z.double().requires_grad_()
        out = cross_entropy(a, labels, backend="triton", reduction=reduction)
        ref = cross_entropy(b, labels, backend="torch", reduction=reduction)
        assert rel(out, ref) < 1e-5
        (ga,) = torch.autograd.grad(out.sum(), a)
        (gb,) = torch.autograd.grad(ref.sum(), b)
        assert ga.dtype == dtype and rel(ga, gb) < tol, (reduction, rel(ga, gb))


@pytest.mark.parametrize("kind,beta", CASES)
def test_several_vocabulary_blocks_and_row_tiles(kind, beta):
    """Blocks of 64 over V = 300 (4 full blocks and a partial one); 13 rows in tiles of 8."""
    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(13, 300, generator=g).to(DEVICE) * 4 for _ in range(2))
    a, b = s.clone().requires_grad_(), s.double().requires_grad_()
    out = kdiv.TritonDivergence.apply(a, t, kind, beta, 0.4, 1.3, 64)
    ref = token_divergence(b, t.double(), kind=kind, beta=beta, alpha=0.4, temperature=1.3)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(out.sum(), a)
    (gb,) = torch.autograd.grad(ref.sum(), b)
    assert rel(ga, gb) < 1e-5


@pytest.mark.parametrize("kind,beta", CASES)
def test_tokens_masked_in_both_models_stay_finite(kind, beta):
    """-inf on the same tokens in both models (student through its bias, teacher logits given):
    finite loss, finite gradients, zero gradient on the masked tokens, and the reference's value."""
    g = torch.Generator().manual_seed(5)
    s_h, s_w = torch.randn(9, 16, generator=g).to(DEVICE), torch.randn(200, 16, generator=g).to(DEVICE) * 0.5
    s_b = torch.zeros(200, device=DEVICE)
    s_b[[3, 50, 199]] = -float("inf")
    z_t = torch.randn(9, 200, generator=g).to(DEVICE) * 2
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
def test_tensor_core_path(monkeypatch, addmm):
    """The CUDA code path: half-precision weights used as they are, fp32 results from the matmuls, a
    half-precision gradient, dW accumulated in fp32 by addmm or in slices. On a GPU the real cuBLAS
    calls; on the CPU the fp32-output matmuls are emulated."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(fused_loss, "_mm_out_fp32", lambda device: True)
        monkeypatch.setattr(fused_loss, "_half_mm", lambda a, b: a.float() @ b.float())
        monkeypatch.setattr(fused_loss, "_half_addmm_", lambda acc, a, b: acc.add_(a.float() @ b.float()))
        monkeypatch.setattr(fused_loss, "_addmm_into_fp32", lambda device: addmm)
    elif not addmm:
        monkeypatch.setattr(fused_loss, "_addmm_into_fp32", lambda device: False)
    else:
        assert fused_loss._mm_out_fp32(DEVICE) and fused_loss._addmm_into_fp32(DEVICE)
    monkeypatch.setattr(fused_loss, "DW_SLICE", 64)  # several slices over V = 300
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


@pytest.mark.parametrize("mode", ["kd", "sft", "mixed", "validation"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_never_holds_tokens_by_vocab_logits(backend, mode):
    """Forward and backward over N = 600 tokens with chunks of 32, for distillation, SFT, the mixed
    objective and validation (no_grad, both terms): no tensor anywhere is larger than a chunk's
    fp32 logits (the [N x V] logits would be 19x larger)."""
    g = torch.Generator().manual_seed(0)
    n, h, v, chunk = 600, 8, 257, 32  # the hidden states (N x H) are smaller than a chunk's logits
    s_h = torch.randn(n, h, generator=g).to(DEVICE).requires_grad_()
    s_w = (torch.randn(v, h, generator=g) * 0.3).to(DEVICE).requires_grad_()
    t_h, t_w = torch.randn(n, h, generator=g).to(DEVICE), torch.randn(v, h, generator=g).to(DEVICE) * 0.3
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    teacher = {} if mode == "sft" else dict(teacher_hidden=t_h, teacher_weight=t_w)
    kw = dict(kind="gjsd", chunk_size=chunk, backend=backend, ce_weight=0.3 if mode == "mixed" else 0.0,
              measure_cross_entropy=mode == "validation", **teacher)
    with LargestTensor() as probe:
        if mode == "validation":
            with torch.no_grad():
                out = fused_linear_loss(s_h, s_w, labels, **kw)
            assert out.divergence is not None and out.cross_entropy is not None
        else:
            fused_linear_loss(s_h, s_w, labels, **kw).loss.backward()
    assert probe.bytes <= chunk * v * 4 < n * v * 4


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("ce_weight", [None, 0.4])
def test_fused_cross_entropy_and_mixed_objective(dtype, tol, ce_weight):
    """SFT (no teacher) and (1 - w) gjsd + w CE through the Triton kernels, against float64 full logits."""
    t, labels = fused_inputs(17, dtype)
    targets = torch.where(labels == -100, labels, labels % 300)

    def run(wide: bool):
        leaves = {k: None if v is None else (v.detach().double() if wide else v.detach()) for k, v in t.items()}
        for k in ("s_h", "s_w", "s_b"):
            leaves[k].requires_grad_()
        if wide:
            ce = full_logits_cross_entropy(leaves["s_h"], leaves["s_w"], targets, bias=leaves["s_b"])
            if ce_weight is None:
                loss = ce
            else:
                div = full_logits_divergence(leaves["s_h"], leaves["s_w"], leaves["t_h"], leaves["t_w"], targets,
                                             student_bias=leaves["s_b"], teacher_bias=leaves["t_b"], kind="gjsd")
                loss = (1 - ce_weight) * div + ce_weight * ce
        else:
            teacher = {} if ce_weight is None else dict(teacher_hidden=leaves["t_h"], teacher_weight=leaves["t_w"],
                                                         teacher_bias=leaves["t_b"], ce_weight=ce_weight)
            loss = fused_linear_loss(leaves["s_h"], leaves["s_w"], targets, student_bias=leaves["s_b"], kind="gjsd",
                                     backend="triton", chunk_size=20, **teacher).loss
        keys = ("s_h", "s_w", "s_b")
        return loss, dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys]), strict=True))

    (loss, grads), (ref, ref_grads) = run(False), run(True)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for k, want in ref_grads.items():
        assert grads[k].dtype == dtype and rel(grads[k], want) < tol, (k, rel(grads[k], want))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU's dispatch")
def test_dispatch_rules():
    cpu = torch.device("cpu")
    assert losses.use_triton("auto", cpu, torch.float32) is False  # the interpreter is for tests only
    assert losses.use_triton("torch", cpu, torch.float32) is False
    assert losses.use_triton("triton", cpu, torch.float32) is True  # interpreter on (conftest)
    with pytest.raises(ValueError, match="backend"):
        losses.use_triton("cuda", cpu, torch.float32)
    assert "TRITON_INTERPRET" in losses._triton_unusable(torch.device("meta"))


@pytest.mark.slow
def test_kernel_self_check_finds_a_wrong_kernel(monkeypatch):
    """The check run before the kernels' first use on a CUDA device: it passes the real kernels
    and names a kernel that is 1% off, or one that raises."""
    check = losses.triton_problem_on.__wrapped__  # uncached
    assert check(DEVICE) is None
    real = kdiv.divergence_rows
    monkeypatch.setattr(kdiv, "divergence_rows", lambda *a, **k: real(*a, **k) * 1.01)
    assert "fkl divergence: the kernel differs from PyTorch" in check(DEVICE)
    monkeypatch.setattr(kdiv, "divergence_rows", real)
    real_ce = kce.cross_entropy_rows
    monkeypatch.setattr(kce, "cross_entropy_rows", lambda *a, **k: real_ce(*a, **{**k, "accumulate": False}))
    assert "divergence + cross-entropy gradient: the kernel differs" in check(DEVICE)  # the mixed gradient
    monkeypatch.setattr(kce, "cross_entropy_rows", real_ce)
    assert check(DEVICE, torch.bfloat16) is None  # a bf16 gradient buffer
    monkeypatch.setattr(kdiv, "divergence_rows", lambda *a, **k: 1 / 0)
    assert check(DEVICE) == "ZeroDivisionError: division by zero"


def test_auto_falls_back_to_pytorch_when_the_check_fails(monkeypatch):
    monkeypatch.setattr(losses, "_triton_unusable", lambda device: None)
    planted = "tvd divergence: the kernel differs (planted)"
    monkeypatch.setattr(losses, "triton_problem_on", lambda device, dtype: planted)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match=r"check on cuda \(Fake GPU\), using PyTorch: tvd divergence"):
        assert losses.use_triton("auto", cuda, torch.bfloat16) is False
    with pytest.raises(RuntimeError, match=r"backend='triton': the Triton kernels fail their check on cuda"):
        losses.use_triton("triton", cuda, torch.bfloat16)
    monkeypatch.setattr(losses, "triton_problem_on", lambda device, dtype: None)
    assert losses.use_triton("auto", cuda, torch.bfloat16) is True


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter accepts code that the compiler rejects: compile every variant to an sm_90
    cubin with Triton's own toolchain (no GPU needed) in a process without the interpreter; the
    cross-entropy kernel with and without the gradient, overwriting and accumulating into bf16, with
    and without per-row weights."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from distill.kernels.cross_entropy import cross_entropy_rows_kernel
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
        ce_sig = {"z_ptr": "*bf16", "z_stride": "i64", "y_ptr": "*i64", "y_stride": "i64", "g_ptr": "*bf16",
                  "g_stride": "i64", "loss_ptr": "*fp32", "n_rows": "i32", "V": "i32", "scale": "fp32",
                  "w_ptr": "*fp32", "WRITE_GRAD": "constexpr", "ROW_SCALE": "constexpr", "ACCUMULATE": "constexpr",
                  "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"}
        for write_grad, accumulate, block_r, block_v, row_scale in (
            (True, False, 1, 4096, False), (True, True, 1, 4096, False), (True, True, 8, 512, False),
            (False, False, 8, 512, False), (True, True, 1, 4096, True), (True, False, 8, 512, True)
        ):
            src = ASTSource(fn=cross_entropy_rows_kernel, signature=ce_sig, constexprs={
                "WRITE_GRAD": write_grad, "ACCUMULATE": accumulate, "BLOCK_R": block_r, "BLOCK_V": block_v,
                "ROW_SCALE": row_scale})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            assert len(compiled.asm["cubin"]) > 0
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def ce_inputs(seed: int, rows: int, vocab: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE, dtype)
    return z, torch.randint(0, vocab, (rows,), generator=g).to(DEVICE), g


def ce_reference_grad(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 per-row CE and its gradient for a unit upstream gradient per row."""
    w = z.detach().double().requires_grad_()
    ref = row_cross_entropy(w, y)
    (grad,) = torch.autograd.grad(ref.sum(), w)
    return ref.detach(), grad


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_cross_entropy_kernel_matches_reference(dtype, tol):
    """V = 300 (block 512 covers it with a masked tail), 7 rows, a non-contiguous row stride; and
    through the autograd Function with a random upstream per-row gradient."""
    z, y, g = ce_inputs(11, 7, 300, dtype)
    z = torch.cat([z, z[:, :20]], dim=1)[:, :300]  # row stride 320
    ref, ref_grad = ce_reference_grad(z, y)
    grad = torch.full_like(z, float("nan"))
    out = kce.cross_entropy_rows(z, y, grad)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-5  # fp32 inside the kernel
    assert grad.dtype == dtype and rel(grad, ref_grad) < tol, rel(grad, ref_grad)
    assert torch.equal(kce.cross_entropy_rows(z, y, None), out)
    a, b = z.clone().requires_grad_(), z.double().requires_grad_()
    out = kce.TritonCrossEntropy.apply(a, y)
    ref = row_cross_entropy(b, y)
    weights = torch.rand(7, generator=g, dtype=torch.float64).to(DEVICE)
    (ga,) = torch.autograd.grad((out * weights.float()).sum(), a)
    (gb,) = torch.autograd.grad((ref * weights).sum(), b)
    assert rel(out.detach(), ref.detach()) < 1e-5 and ga.dtype == dtype and rel(ga, gb) < tol, rel(ga, gb)
    assert kce.cross_entropy_rows(z[:0], y[:0], z[:0]).shape == (0,)


def test_cross_entropy_several_vocabulary_blocks_and_row_tiles():
    """Blocks of 64 over V = 300 (4 full blocks and a partial one); 13 rows in tiles of 8."""
    z, y, _ = ce_inputs(12, 13, 300)
    y[0], y[1] = 0, 299  # first and last column
    ref, ref_grad = ce_reference_grad(z, y)
    grad = torch.empty_like(z)
    out = kce.cross_entropy_rows(z, y, grad, block_v=64)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert rel(grad, ref_grad) < 1e-5


def test_cross_entropy_masked_vocabulary():
    """-inf on some columns (targets elsewhere): finite loss, gradient exactly 0 on the masked columns,
    the reference's values on the unmasked sub-vocabulary; a -inf target gives +inf without NaN."""
    z, _, g = ce_inputs(13, 9, 200)
    masked = torch.tensor([0, 3, 50, 130, 199], device=DEVICE)
    keep = torch.ones(200, dtype=torch.bool, device=DEVICE)
    keep[masked] = False
    z[:, masked] = -float("inf")
    y = keep.nonzero().squeeze(1)[torch.randint(0, int(keep.sum()), (9,), generator=g).to(DEVICE)]
    grad = torch.empty_like(z)
    out = kce.cross_entropy_rows(z, y, grad, block_v=64)
    sub_y = keep.cumsum(0)[y] - 1  # target index within the unmasked columns
    ref, ref_grad = ce_reference_grad(z[:, keep], sub_y)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    assert (grad[:, masked] == 0).all() and rel(grad[:, keep], ref_grad) < 1e-5
    z[0, y[0]] = -float("inf")  # a masked target
    z[1] = -float("inf")  # a row masked everywhere
    out = kce.cross_entropy_rows(z, y, grad, block_v=64)
    assert out[0] == float("inf") and out[1] == float("inf") and torch.isfinite(out[2:]).all()
    assert not grad.isnan().any() and (grad[:, masked] == 0).all()


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_cross_entropy_accumulates_and_aliases(dtype, tol):
    """accumulate=True adds scale * dL/dz to what the buffer holds (bf16/fp16 buffers rounded once at
    the store); an fp32 buffer that is the logits themselves receives the plain gradient."""
    z, y, g = ce_inputs(14, 5, 300)
    ref, ref_grad = ce_reference_grad(z, y)
    preload = (torch.randn(z.shape, generator=g) * 0.05).to(DEVICE, dtype)  # about as large as the CE gradient
    buf = preload.clone()
    out = kce.cross_entropy_rows(z, y, buf, scale=0.3, accumulate=True, block_v=128)
    assert rel(out, ref) < 1e-5
    assert rel(buf, preload.double() + 0.3 * ref_grad) < tol
    buf = preload.clone()
    kce.cross_entropy_rows(z, y, buf, scale=0.3, block_v=128)  # overwrite
    assert rel(buf, 0.3 * ref_grad) < tol
    out = kce.cross_entropy_rows(z, y, z, block_v=128)  # in place: every tile is read before it is written
    assert rel(out, ref) < 1e-5 and rel(z, ref_grad) < 1e-5
