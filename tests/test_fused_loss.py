"""The fused losses (chunked LM head + divergence, cross-entropy or their mix) against the
reference on full logits."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from references import full_logits_cross_entropy, full_logits_divergence
from torch.utils._python_dispatch import TorchDispatchMode

from distill import fused_loss
from distill.fused_loss import fused_linear_cross_entropy, fused_linear_divergence, fused_linear_loss
from distill.losses import KINDS, cross_entropy

# DISTILL_TEST_DEVICE=cuda (make gpu-check): the same tests on the GPU, where the chunk loop takes
# its CUDA branches (fp32-output matmuls) and backend "auto" the compiled kernels.
DEVICE = torch.device(os.environ.get("DISTILL_TEST_DEVICE", "cpu"))
CASES = [(k, b) for k in KINDS for b in ([0.0, 0.1, 0.5, 0.9, 1.0] if k == "gjsd" else [0.5])]


def make(seed: int, dtype=torch.float64, bias: bool = True):
    """Unequal hidden sizes, teacher with 3 padding rows, N not a multiple of the chunk."""
    g = torch.Generator().manual_seed(seed)
    B, T, H_s, H_t, V_s, V_t = 3, 7, 12, 20, 41, 44

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    t = dict(
        s_h=r(B, T, H_s), s_w=r(V_s, H_s, scale=0.5), s_b=r(V_s) if bias else None,
        t_h=r(B, T, H_t), t_w=r(V_t, H_t, scale=0.5), t_b=r(V_t) if bias else None,
    )
    labels = torch.randint(0, V_s, (B, T), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return {k: None if v is None else v.to(DEVICE) for k, v in t.items()}, labels.to(DEVICE)


def reference(t, labels, **kw):
    """Full float64 logits, then the reference divergence."""
    return full_logits_divergence(t["s_h"], t["s_w"], t["t_h"], t["t_w"], labels, student_bias=t["s_b"],
                                  teacher_bias=t["t_b"], **kw)


def grads(loss, t):
    keys = [k for k in ("s_h", "s_w", "s_b") if t[k] is not None]
    return dict(zip(keys, torch.autograd.grad(loss, [t[k] for k in keys]), strict=True))


def leaf(t):
    out = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    return out


@pytest.mark.parametrize("kind,beta", CASES)
def test_matches_reference_float64(kind, beta):
    t, labels = make(zlib.crc32(repr((kind, beta)).encode()) % 1000)  # fixed across runs, unlike hash()
    kw = dict(kind=kind, beta=beta, alpha=0.2, temperature=1.7)
    a, b = leaf(t), leaf(t)
    fused = fused_linear_divergence(a["s_h"], a["s_w"], a["t_h"], a["t_w"], labels, student_bias=a["s_b"],
                                    teacher_bias=a["t_b"], chunk_size=4, **kw)
    ref = reference(b, labels, **kw)
    assert torch.allclose(fused, ref, rtol=1e-10, atol=1e-12)
    gf, gr = grads(fused, a), grads(ref, b)
    for k in gr:
        assert torch.allclose(gf[k], gr[k], rtol=1e-8, atol=1e-12), k


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("kind", ["fkl", "gjsd", "tvd"])
def test_low_precision_inputs(dtype, tol, kind):
    t, labels = make(3, dtype=dtype)
    a = leaf(t)
    fused = fused_linear_divergence(a["s_h"], a["s_w"], a["t_h"], a["t_w"], labels, student_bias=a["s_b"],
                                    teacher_bias=a["t_b"], kind=kind, chunk_size=5)
    assert fused.dtype == torch.float32
    # Reference: the same (rounded) inputs, in float64. The logits are formed and kept in fp32,
    # so the loss is as exact in every dtype; only the gradients are rounded to the input dtype.
    b = leaf({k: (v.double() if v is not None else None) for k, v in t.items()})
    ref = reference(b, labels, kind=kind)
    assert torch.allclose(fused.double(), ref, rtol=1e-5, atol=1e-7)
    gf, gr = grads(fused, a), grads(ref, b)
    for k in gr:
        assert gf[k].dtype == dtype
        err = (gf[k].double() - gr[k]).norm() / gr[k].norm()
        assert err < tol, (k, float(err))


def test_precomputed_teacher_logits_and_no_teacher_grad():
    t, labels = make(5)
    a = leaf(t)
    teacher_h = t["t_h"].clone().requires_grad_()
    z_t = teacher_h @ t["t_w"].T + t["t_b"]
    via_logits = fused_linear_divergence(a["s_h"], a["s_w"], z_t, None, labels, student_bias=a["s_b"], kind="rkl")
    b = leaf(t)
    via_hidden = fused_linear_divergence(b["s_h"], b["s_w"], b["t_h"], b["t_w"], labels, student_bias=b["s_b"],
                                         teacher_bias=b["t_b"], kind="rkl")
    assert torch.allclose(via_logits, via_hidden, rtol=1e-12)
    via_logits.backward()
    assert teacher_h.grad is None


def test_chunk_size_does_not_change_the_result():
    t, labels = make(9)
    values = []
    for chunk in (1, 3, 16, 1000):
        a = leaf(t)
        loss = fused_linear_divergence(a["s_h"], a["s_w"], a["t_h"], a["t_w"], labels, student_bias=a["s_b"],
                                       teacher_bias=a["t_b"], kind="gjsd", chunk_size=chunk)
        values.append((loss, grads(loss, a)["s_w"]))
    for loss, gw in values[1:]:
        assert torch.allclose(loss, values[0][0], rtol=1e-12)
        assert torch.allclose(gw, values[0][1], rtol=1e-10, atol=1e-14)


def test_non_contiguous_inputs_sum_and_hinton():
    t, labels = make(11, bias=False)
    s_h = t["s_h"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # non-contiguous view
    assert not s_h.is_contiguous()
    kw = dict(kind="skew_rkl", alpha=0.3, temperature=2.0, hinton_scale=True, reduction="sum")
    fused = fused_linear_divergence(s_h, t["s_w"], t["t_h"], t["t_w"], labels, **kw)
    ref = reference(dict(t, s_h=s_h), labels, **kw)
    assert torch.allclose(fused, ref, rtol=1e-10)


def test_bad_arguments():
    t, labels = make(1)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_divergence(t["s_h"], t["s_w"], t["t_h"], t["t_w"], labels, beta=2.0)
    with pytest.raises(ValueError, match="token dims"):
        fused_linear_divergence(t["s_h"], t["s_w"], t["t_h"][:, :-1], t["t_w"], labels)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_divergence(t["s_h"], t["s_w"], t["t_h"], t["t_w"], labels, reduction="none")


def reference_ce(t, labels):
    return full_logits_cross_entropy(t["s_h"], t["s_w"], labels, bias=t["s_b"])


def test_cross_entropy_matches_reference_float64():
    """SFT through the chunk loop: value and every student gradient equal full logits + CE."""
    t, labels = make(21)
    a, b = leaf(t), leaf(t)
    fused = fused_linear_cross_entropy(a["s_h"], a["s_w"], labels, bias=a["s_b"], chunk_size=4)
    ref = reference_ce(b, labels)
    assert torch.allclose(fused, ref, rtol=1e-10, atol=1e-12)
    gf, gr = grads(fused, a), grads(ref, b)
    for k in gr:
        assert torch.allclose(gf[k], gr[k], rtol=1e-8, atol=1e-12), k


@pytest.mark.parametrize("ce_weight", [0.3, 1.0])
@pytest.mark.parametrize("hinton", [False, True])
def test_mixed_objective_and_its_terms(ce_weight, hinton):
    """(1 - w) D + w CE with both gradients in one pass (the gradient buffer must not overwrite the
    logits the second term still reads), and the unweighted terms reported beside it."""
    t, labels = make(22)
    kw = dict(kind="gjsd", beta=0.3, temperature=2.0, hinton_scale=hinton)
    a, b = leaf(t), leaf(t)
    out = fused_linear_loss(a["s_h"], a["s_w"], labels, teacher_hidden=a["t_h"], teacher_weight=a["t_w"],
                            student_bias=a["s_b"], teacher_bias=a["t_b"], ce_weight=ce_weight, chunk_size=5, **kw)
    div, ce = reference(b, labels, **kw), reference_ce(b, labels)
    ref = (1 - ce_weight) * div + ce_weight * ce
    assert torch.allclose(out.loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.divergence, div.detach() / (4.0 if hinton else 1.0), rtol=1e-10)
    assert torch.allclose(out.cross_entropy, ce.detach(), rtol=1e-10)
    gf, gr = grads(out.loss, a), grads(ref, b)
    for k in gr:
        assert torch.allclose(gf[k], gr[k], rtol=1e-8, atol=1e-12), k


def test_evaluation_terms_without_gradient_buffers():
    """Under no_grad: the divergence and the cross-entropy from one pass, equal to the references,
    and no buffer of a gradient's shape is created."""
    t, labels = make(23)
    shapes = []

    class Shapes(TorchDispatchMode):  # the shapes of new buffers (factory functions)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("empty", "zeros", "empty_like", "zeros_like", "new_zeros", "new_empty"):
                shapes.append(tuple(out.shape))
            return out

    s_h, s_w, s_b = (t[k].clone().requires_grad_() for k in ("s_h", "s_w", "s_b"))
    with torch.no_grad(), Shapes():
        out = fused_linear_loss(s_h, s_w, labels, teacher_hidden=t["t_h"], teacher_weight=t["t_w"], student_bias=s_b,
                                teacher_bias=t["t_b"], kind="fkl", measure_cross_entropy=True, chunk_size=4)
    want = reference(t, labels, kind="fkl")
    assert torch.allclose(out.loss, want, rtol=1e-10) and torch.allclose(out.divergence, want, rtol=1e-10)
    assert torch.allclose(out.cross_entropy, reference_ce(t, labels), rtol=1e-10)
    counted = int((labels != -100).sum())
    grad_shapes = {tuple(s_w.shape), tuple(s_b.shape), (counted, s_h.shape[-1])}
    assert not grad_shapes & set(shapes), grad_shapes & set(shapes)


def test_autocast_does_not_lower_the_precision():
    """Inside bf16 autocast the chunk matmuls stay fp32 for fp32 inputs (autocast would run them in
    bf16: about 1e-4 relative error instead of 1e-7)."""
    t, labels = make(24, dtype=torch.float32)
    wide = {k: v.double() for k, v in t.items()}
    for kw in (dict(kind="fkl"), dict(kind="gjsd", ce_weight=0.5)):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got = fused_linear_loss(t["s_h"], t["s_w"], labels, teacher_hidden=t["t_h"], teacher_weight=t["t_w"],
                                    student_bias=t["s_b"], teacher_bias=t["t_b"], **kw).loss
        w = kw.get("ce_weight", 0.0)
        want = (1 - w) * reference(wide, labels, kind=kw["kind"]) + w * reference_ce(wide, labels)
        assert abs(float(got) - float(want)) < 1e-6 * abs(float(want)), kw


def test_cross_entropy_arguments():
    t, labels = make(25)
    with pytest.raises(ValueError, match="ce_weight"):
        fused_linear_loss(t["s_h"], t["s_w"], labels, teacher_hidden=t["t_h"], teacher_weight=t["t_w"], ce_weight=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_loss(t["s_h"], t["s_w"])
    # A label past the shared vocabulary (a padding row, or no row at all) is refused, not read.
    bad = labels.clone()
    bad[0, 3] = t["s_w"].shape[0]
    with pytest.raises(ValueError, match=rf"label {t['s_w'].shape[0]} is outside the vocabulary"):
        fused_linear_loss(t["s_h"], t["s_w"], bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy(t["s_h"] @ t["s_w"].T, bad, backend="torch")


def test_fp16_gradient_buffer_with_a_large_ce_share(monkeypatch):
    """CUDA's half-precision path (fp16 weights, fp32-output matmuls, an fp16 gradient buffer),
    emulated on the CPU: with ce_weight = 0.99999 folding w_ce / w_kd = 1e5 into the fp16 buffer
    would overflow (inf gradients); the loop scales the divergence's gradient instead."""
    if DEVICE.type != "cpu":
        pytest.skip("emulates the CUDA branch on the CPU")
    monkeypatch.setattr(fused_loss, "_mm_out_fp32", lambda device: True)
    monkeypatch.setattr(fused_loss, "_addmm_into_fp32", lambda device: False)
    monkeypatch.setattr(fused_loss, "_half_mm", lambda a, b: torch.mm(a.float(), b.float()))
    t, labels = make(31)
    w = 0.99999
    a, b = leaf({k: None if v is None else v.half() for k, v in t.items()}), leaf(t)
    out = fused_linear_loss(a["s_h"], a["s_w"], labels, teacher_hidden=a["t_h"], teacher_weight=a["t_w"],
                            student_bias=a["s_b"], teacher_bias=a["t_b"], kind="fkl", ce_weight=w,
                            chunk_size=8, backend="torch").loss
    ref = (1 - w) * reference(b, labels, kind="fkl") + w * reference_ce(b, labels)
    gf, gr = grads(out, a), grads(ref, b)
    for k in gr:
        assert torch.isfinite(gf[k]).all(), k
        assert (gf[k].double() - gr[k]).norm() / gr[k].norm() < 1e-2, k
