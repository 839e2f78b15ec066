"""CDNELoss against a direct implementation of the formula of docs/method.md section 4."""
import math

import pytest
import torch

from utils.losses import CDNELoss, QuantizationLoss


def direct_cdne(scores, labels, idx, margin, temperature):
    """Section 4 written out row by row, in float64."""
    B, N = scores.shape
    total = 0.0
    for i in range(B):
        E = torch.exp(scores[i].double())
        E = torch.cat([E[:idx[i]], E.new_zeros(1), E[idx[i] + 1:]])  # not its own neighbour
        same = (labels == labels[idx[i]]).double()
        P = (same * E).sum()
        Z = E.sum()
        if P > 0:
            Pm = P * math.exp(-margin / temperature)
            total = total + torch.log(Pm / (Z - P + Pm))
    return -total / B


def case(seed=0, B=6, N=20, C=4, L=8, T=0.05):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[5] = C  # a class with exactly one sample: row for idx 5 has no same-class neighbour
    memory = torch.nn.functional.normalize(torch.randn(N, L, generator=g), dim=1)
    e = torch.nn.functional.normalize(torch.randn(B, L, generator=g), dim=1).requires_grad_()
    idx = torch.tensor([0, 5, 7, 12, 3, 19])[:B]
    return labels, memory, e, idx, T


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
def test_value_and_gradient_match_the_formula(margin):
    labels, memory, e, idx, T = case()
    scores = e @ memory.t() / T
    ours = CDNELoss(labels, margin, T)(scores, idx)
    g_ours, = torch.autograd.grad(ours, e)
    e64 = e.detach().double().requires_grad_()
    ref = direct_cdne(e64 @ memory.double().t() / T, labels, idx, margin, T)
    g_ref, = torch.autograd.grad(ref, e64)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_row_without_same_class_neighbour_is_skipped_but_counts_in_divisor():
    labels, memory, e, idx, T = case()
    scores = e.detach() @ memory.t() / T
    loss = CDNELoss(labels, 0.0, T)
    full = loss(scores, idx)
    # Removing the lonely row (idx 5) changes the sum by nothing, the divisor by one.
    keep = torch.tensor([0, 2, 3, 4, 5])
    partial = loss(scores[keep], idx[keep])
    assert full.item() == pytest.approx(partial.item() * 5 / 6, rel=1e-6)


def test_large_margin_stays_finite_where_direct_exp_underflows():
    labels, memory, e, idx, T = case()
    scores = e.detach() @ memory.t() / T
    value = CDNELoss(labels, margin=6.0, temperature=T)(scores, idx)
    # exp(-6/0.05) = exp(-120) underflows float32; log space keeps it: each valid row adds about 120 / B.
    assert torch.isfinite(value) and value.item() > 5 * 120 / 6 * 0.9


def test_quantization_loss():
    f = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    assert QuantizationLoss()(f).item() == pytest.approx((0 + 0 + 1 + 1) / 4)
