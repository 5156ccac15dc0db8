"""The reference losses against float64 formulas written from the definitions, and gradcheck."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from distill.losses import KINDS, cross_entropy, divergence


def formula(z_s: torch.Tensor, z_t: torch.Tensor, kind: str, beta: float, alpha: float, tau: float) -> torch.Tensor:
    """Per-position divergence straight from the definitions, in float64 probability space."""
    q = torch.softmax(z_s.double() / tau, -1)
    p = torch.softmax(z_t.double() / tau, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "fkl" or (kind == "gjsd" and beta == 0):
        return kl(p, q)
    if kind == "rkl" or (kind == "gjsd" and beta == 1):
        return kl(q, p)
    if kind == "gjsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_fkl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, alpha * q + (1 - alpha) * p)


CASES = [(k, b) for k in KINDS for b in ([0.0, 0.1, 0.5, 0.9, 1.0] if k == "gjsd" else [0.5])]


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_float64_formula(kind, beta, tau):
    g = torch.Generator().manual_seed(zlib.crc32(repr((kind, beta, tau)).encode()))  # fixed across runs
    z_s = torch.randn(3, 5, 37, generator=g) * 3
    z_t = torch.randn(3, 5, 37, generator=g) * 3
    labels = torch.randint(0, 37, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    got = divergence(z_s, z_t, labels, kind=kind, beta=beta, alpha=0.2, temperature=tau)
    per = formula(z_s, z_t, kind, beta, 0.2, tau)
    keep = labels != -100
    want = per[keep].mean()
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (got, want)
    got64 = divergence(z_s.double(), z_t.double(), labels, kind=kind, beta=beta, alpha=0.2, temperature=tau)
    assert torch.allclose(got64, want, rtol=1e-10, atol=1e-12)
    # Sum and per-position reductions agree with the same formula.
    assert torch.allclose(divergence(z_s, z_t, labels, kind=kind, beta=beta, alpha=0.2, temperature=tau,
                                     reduction="sum").double(), per[keep].sum(), rtol=1e-5)
    none = divergence(z_s, z_t, labels, kind=kind, beta=beta, alpha=0.2, temperature=tau, reduction="none")
    assert torch.all(none[~keep] == 0)


@pytest.mark.parametrize("kind,beta", CASES)
def test_gradcheck(kind, beta):
    g = torch.Generator().manual_seed(7)
    z_s = (torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    z_t = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])

    keep = labels != -100

    def loss(z):
        return divergence(z, z_t, labels, kind=kind, beta=beta, alpha=0.3, temperature=1.5)

    assert torch.autograd.gradcheck(loss, (z_s,), eps=1e-6, atol=1e-6)
    # And the gradient equals that of the float64 formula.
    (grad,) = torch.autograd.grad(loss(z_s), z_s)
    (grad_ref,) = torch.autograd.grad(formula(z_s, z_t, kind, beta, 0.3, 1.5)[keep].mean(), z_s)
    assert torch.allclose(grad, grad_ref, rtol=1e-8, atol=1e-10)


def test_no_gradient_into_teacher():
    z_s = torch.randn(4, 9, requires_grad=True)
    z_t = torch.randn(4, 9, requires_grad=True)
    divergence(z_s, z_t, kind="gjsd").backward()
    assert z_t.grad is None and z_s.grad is not None


def test_gjsd_endpoints_are_exact_and_interior_tends_to_zero():
    z_s, z_t = torch.randn(6, 20), torch.randn(6, 20)
    fkl = divergence(z_s, z_t, kind="fkl")
    rkl = divergence(z_s, z_t, kind="rkl")
    assert divergence(z_s, z_t, kind="gjsd", beta=0.0) == fkl
    assert divergence(z_s, z_t, kind="gjsd", beta=1.0) == rkl
    # The documented discontinuity: near the ends the interior value is ~beta*FKL, ~(1-beta)*RKL.
    assert divergence(z_s, z_t, kind="gjsd", beta=1e-4) < 1e-3 * fkl
    assert divergence(z_s, z_t, kind="gjsd", beta=1 - 1e-4) < 1e-3 * rkl


@pytest.mark.parametrize("kind,beta", CASES)
def test_shared_neg_inf_is_finite(kind, beta):
    z_s = torch.randn(4, 16, dtype=torch.float64)
    z_t = torch.randn(4, 16, dtype=torch.float64)
    z_s[:, 10:] = -math.inf  # a vocabulary masked in both models
    z_t[:, 10:] = -math.inf
    z_s.requires_grad_()
    loss = divergence(z_s, z_t, kind=kind, beta=beta, alpha=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z_s.grad).all()
    assert torch.all(z_s.grad[:, 10:] == 0)
    # Same value as on the unmasked part of the vocabulary alone.
    ref = divergence(z_s[:, :10].detach(), z_t[:, :10], kind=kind, beta=beta, alpha=0.1)
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_padding_rows_dropped():
    """Rows present in one model only are excluded on both sides."""
    z_s, z_t = torch.randn(3, 30), torch.randn(3, 34)
    assert torch.allclose(divergence(z_s, z_t, kind="fkl"), divergence(z_s, z_t[:, :30], kind="fkl"))


def test_bf16_logits_are_upcast_before_softmax():
    z_s, z_t = torch.randn(5, 64) * 8, torch.randn(5, 64) * 8
    got = divergence(z_s.bfloat16(), z_t.bfloat16(), kind="rkl")
    want = formula(z_s.bfloat16().float(), z_t.bfloat16().float(), "rkl", 0.5, 0.1, 1.0).mean()
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_hinton_scale_and_empty_mask():
    z_s, z_t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    base = divergence(z_s, z_t, kind="fkl", temperature=2.0)
    assert torch.allclose(divergence(z_s, z_t, kind="fkl", temperature=2.0, hinton_scale=True), 4 * base)
    labels = torch.full((2, 3), -100)
    assert divergence(z_s, z_t, labels, kind="fkl") == 0


@pytest.mark.parametrize("bad", [dict(beta=-0.1), dict(beta=1.5), dict(alpha=1.0), dict(temperature=0.0),
                                 dict(kind="js")])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        divergence(torch.randn(2, 4), torch.randn(2, 4), **bad)


def test_cross_entropy_matches_formula():
    z = torch.randn(2, 4, 10, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 5, 9]])
    logp = torch.log_softmax(z, -1)
    keep = labels != -100
    want = -logp[keep].gather(-1, labels[keep][:, None]).mean()
    assert torch.allclose(cross_entropy(z, labels).double(), want, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_positions_send_no_nan_gradient(kind):
    """An ignored position with an infinite divergence must not poison the gradient."""
    z_s = torch.randn(2, 3, 8, requires_grad=True)
    z_t = torch.randn(2, 3, 8)
    z_t[0, 1, 2] = -math.inf  # teacher excludes a token the student likes, at an ignored position
    labels = torch.tensor([[1, -100, 2], [3, 4, 5]])
    loss = divergence(z_s, z_t, labels, kind=kind, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()
    assert torch.all(z_s.grad[0, 1] == 0)
