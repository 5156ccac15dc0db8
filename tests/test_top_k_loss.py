"""The loss against a top-k teacher: values and gradients against a float64 reference, exact at
k = V - 1, chunking invisible, one chunk's logits at a time."""

from __future__ import annotations

import pytest
import torch

from distill.losses import divergence, token_divergence
from distill.top_k_loss import TopK, top_k_linear_loss

KINDS = ["fkl", "rkl", "gjsd", "tvd", "skew_fkl", "skew_rkl"]


def _problem(n=10, h=6, v=17, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    counted = int((labels != -100).sum())
    teacher = torch.randn(counted, v, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)
    logp, ids = teacher.topk(k, dim=-1)
    tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return x, w, labels, teacher, TopK(ids, logp, tail)


def _reference(x, w, labels, top: TopK, kind, ce_weight):
    """Bucket both distributions in float64 and take the divergence over the k + 1 buckets."""
    z = (x @ w.T)[labels != -100]
    logq = z.log_softmax(-1)
    q = torch.cat([logq.gather(-1, top.ids), logq.scatter(-1, top.ids, float("-inf")).logsumexp(-1, keepdim=True)],
                  -1)
    p = torch.cat([top.logprobs, top.tail[:, None]], -1)
    d = token_divergence(q, p, kind=kind, beta=0.3, alpha=0.2).sum()
    ce = -logq.gather(-1, labels[labels != -100][:, None]).sum()
    return (1 - ce_weight) * d + ce_weight * ce


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_top_k_loss_and_gradients_match_the_float64_reference(kind, ce_weight):
    x, w, labels, _, top = _problem()
    got = []
    for fn in (lambda a, b: top_k_linear_loss(a, b, labels, top, kind=kind, beta=0.3, alpha=0.2,
                                              ce_weight=ce_weight, chunk_size=3).loss,
               lambda a, b: _reference(a, b, labels, top, kind, ce_weight)):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xa, wa)
        loss.backward()
        got.append((loss.detach(), xa.grad, wa.grad))
    (l1, gx1, gw1), (l2, gx2, gw2) = got
    assert torch.allclose(l1, l2.float(), rtol=1e-6)
    assert torch.allclose(gx1, gx2, rtol=1e-5, atol=1e-6) and torch.allclose(gw1, gw2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_top_v_minus_one_is_the_exact_divergence(kind):
    """With one token left in the tail, the buckets are the vocabulary: the full divergence."""
    x, w, labels, teacher, _ = _problem(v=9, k=8)
    logp, ids = teacher.topk(8, dim=-1)
    tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    got = top_k_linear_loss(x, w, labels, TopK(ids, logp, tail), kind=kind, beta=0.3, alpha=0.2).loss
    t = torch.zeros(2, x.shape[1], 9, dtype=torch.float64)
    t[labels != -100] = teacher
    want = divergence(x @ w.T, t, labels, kind=kind, beta=0.3, alpha=0.2, reduction="sum", backend="torch")
    assert torch.allclose(got, want.float(), rtol=1e-6)


def test_chunks_and_logits_input_change_nothing_and_no_full_logits_are_kept():
    x, w, labels, _, top = _problem(n=40, v=50, k=5)
    whole = top_k_linear_loss(x, w, labels, top, kind="gjsd", ce_weight=0.3, measure_cross_entropy=True)
    chunked = top_k_linear_loss(x, w, labels, top, kind="gjsd", ce_weight=0.3, chunk_size=7,
                                measure_cross_entropy=True)
    logits = top_k_linear_loss(x @ w.T, None, labels, top, kind="gjsd", ce_weight=0.3, measure_cross_entropy=True)
    for a, b in ((whole, chunked), (whole, logits)):
        assert torch.allclose(a.loss, b.loss) and torch.allclose(a.divergence, b.divergence)
        assert torch.allclose(a.cross_entropy, b.cross_entropy)
    # What autograd keeps for backward: per chunk its inputs, never its [rows x V] logits.
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t

    xg = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        top_k_linear_loss(xg, w, labels, top, kind="gjsd", chunk_size=7)
    assert max(kept) < 7 * 50


def test_a_temperature_is_refused():
    x, w, labels, _, top = _problem()
    with pytest.raises(ValueError, match="temperature 1"):
        top_k_linear_loss(x, w, labels, top, temperature=2.0)
