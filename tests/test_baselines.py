"""The comparison methods: each loss against a loop-by-loop reading of its definition (value
and gradient), DPSH's code buffer, and the LSH / ITQ projections."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.dhcnn import DHCNN
from baselines.dpsh import DPSH
from baselines.triplet import Triplet, triplet_loss
from utils.errors import UserError
from utils.hashing import fit_itq, fit_lsh, itq_objective_history
from utils.method import StepBatch

torch.set_default_dtype(torch.float32)


def make_args(method, dim, **overrides):
    p = argparse.ArgumentParser()
    method.add_arguments(p)
    args = p.parse_args([])
    args.dim = dim
    vars(args).update(overrides)
    return args


def make_batch(u, label, idx, logits=None):
    return StepBatch(img=None, label=label, idx=idx, f=u, e=F.normalize(u, dim=1), logits=logits)


def sgn(x):
    return 1.0 if x > 0 else -1.0


def grad(loss, u):
    return torch.autograd.grad(loss, u, retain_graph=True)[0]


def check(value, ref, u):
    """value and ref are scalar losses of the leaf u: equal values and gradients."""
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(value, u), grad(ref, u), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- DPSH


def test_dpsh_defaults():
    args = make_args(DPSH, 8)
    assert args.eta == 0.1 and DPSH.name == "DPSH"


def dpsh_reference(u, idx, U_before, train_labels, eta):
    """docs/method.md section 8 read loop by loop: the batch's detached u written into U first, then
    theta_ij = u_i . U_j / 2 over (i in batch, j in train set) with U a constant."""
    U = U_before.clone()
    for i in range(len(idx)):
        U[int(idx[i])] = u[i].detach()
    bsz, (n, dim) = len(idx), U.shape
    pair = 0
    for i in range(bsz):
        for j in range(n):
            theta = sum(u[i, k] * U[j, k] for k in range(dim)) / 2
            s = float(train_labels[idx[i]] == train_labels[j])
            pair = pair + torch.log(1 + torch.exp(theta)) - s * theta
    pair = pair / (bsz * n)
    quant = sum((sgn(u[i, k].item()) - u[i, k]) ** 2 for i in range(bsz) for k in range(dim)) / (bsz * dim)
    return pair, quant, U


def test_dpsh_writes_u_first_and_trains_u_i_only():
    torch.manual_seed(0)
    n, bsz, dim, eta = 10, 4, 6, 0.1
    train_labels = torch.randint(0, 3, (n,))
    method = DPSH(make_args(DPSH, dim), None, train_labels)
    method.U.copy_(torch.randn(n, dim))
    before = method.U.clone()
    idx = torch.tensor([7, 2, 5, 0])
    u = torch.randn(bsz, dim, requires_grad=True)
    terms = method.losses(make_batch(u, train_labels[idx], idx))
    pair, quant, written = dpsh_reference(u, idx, before, train_labels, eta)
    check(terms["pairwise"], pair, u)
    check(terms["quant"], quant, u)
    check(terms["total"], pair + eta * quant, u)
    # U holds the batch's codes before the loss, as a constant (no graph, no gradient).
    assert torch.equal(method.U, written) and not method.U.requires_grad
    # The gradient is not the one of the same loss with the batch's rows live on both sides.
    both_sides = method.U.index_copy(0, idx, u)
    s = (train_labels[idx].unsqueeze(1) == train_labels.unsqueeze(0)).float()
    theta = u @ both_sides.t() / 2
    two_sided = (F.softplus(theta) - s * theta).mean()
    assert not torch.allclose(grad(two_sided, u), grad(terms["pairwise"], u), rtol=1e-3, atol=0)
    # Calling it again with the same batch rewrites the same rows: same value.
    torch.testing.assert_close(method.losses(make_batch(u, train_labels[idx], idx))["total"], terms["total"])


def test_dpsh_buffer_update():
    torch.manual_seed(1)
    labels = torch.arange(6) % 2
    method = DPSH(make_args(DPSH, 4), None, labels)
    assert torch.equal(method.U, torch.zeros(6, 4))
    idx = torch.tensor([4, 1])
    u = torch.randn(2, 4, requires_grad=True)
    batch = make_batch(u, labels[idx], idx)
    method.losses(batch)["total"].backward()  # the whole step: nothing after backward writes U
    expected = torch.zeros(6, 4)
    expected[idx] = u.detach()
    assert torch.equal(method.U, expected)
    assert method.synced_buffers()[0] is method.U
    assert "U" in method.state_dict()


def test_dpsh_state_dict_between_steps_is_all_it_needs():
    """What a checkpoint holds after a step (U) gives the next step exactly: a resumed run
    continues as the straight one."""
    torch.manual_seed(4)
    labels = torch.arange(12) % 3
    steps = [(torch.tensor([3, 7, 0, 9]), torch.randn(4, 5)), (torch.tensor([1, 3, 11, 6]), torch.randn(4, 5))]
    straight = DPSH(make_args(DPSH, 5), None, labels)
    cut = DPSH(make_args(DPSH, 5), None, labels)
    for method in (straight, cut):
        idx, u = steps[0]
        method.losses(make_batch(u, labels[idx], idx))["total"]
    resumed = DPSH(make_args(DPSH, 5), None, labels)
    resumed.load_state_dict(cut.state_dict())
    idx, u = steps[1]
    u = u.requires_grad_()
    check(resumed.losses(make_batch(u, labels[idx], idx))["total"], straight.losses(make_batch(u, labels[idx], idx))["total"], u)
    assert torch.equal(resumed.U, straight.U)


# --------------------------------------------------------------------------- Triplet


def triplet_reference(u, labels, margin):
    h = torch.tanh(u)
    n, dim = h.shape
    hinges = []
    for a in range(n):
        negatives = [j for j in range(n) if labels[j] != labels[a]]
        if not negatives:
            continue
        def distance(j):
            return sum((h[a, k] - h[j, k]).item() ** 2 for k in range(dim))
        best = negatives[0]
        for j in negatives:  # the nearest; strictly nearer replaces it, so the first on ties
            if distance(j) < distance(best):
                best = j
        for p in range(n):
            if p != a and labels[p] == labels[a]:
                d_ap = sum((h[a, k] - h[p, k]) ** 2 for k in range(dim)) / dim
                d_an = sum((h[a, k] - h[best, k]) ** 2 for k in range(dim)) / dim
                hinges.append(torch.clamp(margin + d_ap - d_an, min=0))
    trip = sum(hinges) / len(hinges) if hinges else u.sum() * 0
    quant = sum((abs(h[i, k]) - 1) ** 2 for i in range(n) for k in range(dim)) / (n * dim)
    bal = sum((sum(h[i, k] for i in range(n)) / n) ** 2 for k in range(dim)) / dim
    return trip, quant, bal


def test_triplet_defaults():
    args = make_args(Triplet, 8)
    assert (args.triplet_margin, args.quant_weight, args.balance_weight) == (0.5, 0.1, 0.1)


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 0, 2, 3], [0, 0, 1, 1, 2]])
def test_triplet_loss_matches_loops(labels):
    torch.manual_seed(2)
    labels = torch.tensor(labels)
    u = (2 * torch.randn(len(labels), 5)).requires_grad_()
    method = Triplet(make_args(Triplet, 5), None, labels)
    terms = method.losses(make_batch(u, labels, torch.arange(len(labels))))
    trip, quant, bal = triplet_reference(u, labels, 0.5)
    assert trip.item() > 0
    check(terms["triplet"], trip, u)
    check(terms["quant"], quant, u)
    check(terms["balance"], bal, u)
    check(terms["total"], trip + 0.1 * quant + 0.1 * bal, u)


def atanh_rows(rows):
    return torch.atanh(torch.tensor(rows)).requires_grad_()


def test_triplet_negative_is_the_nearest_not_the_largest_dot_product():
    # Anchor 0 (class 0), positive 1; negatives 2 (largest h_a . h_n, but far: its term is 0)
    # and 3 (small dot product, but near: it violates the margin).
    u = atanh_rows([[0.5, 0.5], [-0.5, 0.6], [0.99, 0.99], [0.5, 0.3]])
    labels = torch.tensor([0, 0, 1, 2])
    h = torch.tanh(u)
    assert (h[0] @ h[2]).item() > (h[0] @ h[3]).item()
    assert (h[0] - h[3]).square().sum().item() < (h[0] - h[2]).square().sum().item()
    loss = triplet_loss(h, labels, 0.5)
    trip, _, _ = triplet_reference(u, labels, 0.5)
    check(loss, trip, u)
    # Anchor 0's term uses negative 3: with negative 2 the gradient would not reach row 3
    # through that anchor; here row 3 gets a gradient, and the loss exceeds the dot-product choice.
    dim = 2
    with_nearest = F.relu(0.5 + (h[0] - h[1]).square().sum() / dim - (h[0] - h[3]).square().sum() / dim)
    with_dot = F.relu(0.5 + (h[0] - h[1]).square().sum() / dim - (h[0] - h[2]).square().sum() / dim)
    assert with_nearest.item() > with_dot.item()


def test_triplet_ties_take_the_first_negative():
    # Negatives 2 and 3 (two classes, no positive each) are the same point, the nearest to
    # both anchors; the first (2) is taken, which shows in the gradient: row 3 gets none.
    u = atanh_rows([[0.2, -0.4, 0.6], [0.3, -0.1, 0.5], [0.1, 0.1, 0.4], [0.1, 0.1, 0.4]])
    labels = torch.tensor([0, 0, 1, 2])
    h = torch.tanh(u)
    loss = triplet_loss(h, labels, 0.5)
    trip, _, _ = triplet_reference(u, labels, 0.5)
    check(loss, trip, u)
    g = grad(loss, u)
    assert g[2].abs().sum() > 0 and torch.equal(g[3], torch.zeros(3))


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [2, 2, 2]], ids=["no-positive", "no-negative"])
def test_triplet_without_triplets_is_zero(labels):
    labels = torch.tensor(labels)
    u = torch.randn(len(labels), 4, requires_grad=True)
    loss = triplet_loss(torch.tanh(u), labels, 0.5)
    assert loss.item() == 0
    assert torch.equal(grad(loss, u), torch.zeros_like(u))
    terms = Triplet(make_args(Triplet, 4), None, labels).losses(make_batch(u, labels, torch.arange(len(labels))))
    _, quant, bal = triplet_reference(u, labels, 0.5)
    check(terms["total"], 0.1 * quant + 0.1 * bal, u)


# --------------------------------------------------------------------------- DHCNN


def test_dhcnn_loss_matches_loops():
    # --pairs batch: the in-batch definition (the authors' buffer definition: tests/test_methods_b.py).
    torch.manual_seed(3)
    bsz, dim, classes = 5, 6, 3
    args = make_args(DHCNN, dim, pairs="batch")
    assert (args.ce_weight, args.eta) == (1.0, 0.1)
    labels = torch.tensor([0, 2, 0, 1, 2])
    u = torch.randn(bsz, dim, requires_grad=True)
    fc2 = torch.randn(classes, dim)
    logits = u @ fc2.t()
    terms = DHCNN(args, None, labels).losses(make_batch(u, labels, torch.arange(bsz), logits))

    pair = 0
    for i in range(bsz):
        for j in range(bsz):
            theta = (u[i] * u[j]).sum() / 2
            pair = pair + torch.log(1 + torch.exp(theta)) - float(labels[i] == labels[j]) * theta
    pair = pair / bsz ** 2
    ce = sum(-logits[i, labels[i]] + torch.log(sum(torch.exp(logits[i, c]) for c in range(classes)))
             for i in range(bsz)) / bsz
    quant = sum((sgn(u[i, k].item()) - u[i, k]) ** 2 for i in range(bsz) for k in range(dim)) / (bsz * dim)
    check(terms["pairwise"], pair, u)
    check(terms["ce"], ce, u)
    check(terms["quant"], quant, u)
    check(terms["total"], pair + ce + 0.1 * quant, u)


# --------------------------------------------------------------------------- LSH and ITQ


def features(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3


def test_lsh():
    x = features()
    mean, w = fit_lsh(x, 12, seed=5)
    assert mean.dtype == w.dtype == torch.float32 and w.shape == (16, 12)
    torch.testing.assert_close(mean, x.mean(0))
    mean2, w2 = fit_lsh(x, 12, seed=5)
    assert torch.equal(w, w2) and torch.equal(mean, mean2)
    assert not torch.allclose(w, fit_lsh(x, 12, seed=6)[1])
    assert ((x - mean) @ w).sign().shape == (200, 12)
    assert abs(w.mean().item()) < 0.3 and abs(w.std().item() - 1) < 0.3  # N(0, 1) entries


def test_itq_objective_and_rotation():
    x = features()
    history, r = itq_objective_history(x, 8, iterations=50, seed=1)
    assert len(history) == 50
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + 1e-9)
    assert history[-1] < history[0]
    torch.testing.assert_close(r @ r.t(), torch.eye(8, dtype=r.dtype), rtol=0, atol=1e-5)


def test_itq_projection():
    x = features()
    mean, proj = fit_itq(x, 8, seed=1)
    assert proj.shape == (16, 8) and proj.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(0))
    # P R has orthonormal columns spanning the top principal directions: V R keeps V's energy.
    torch.testing.assert_close(proj.t() @ proj, torch.eye(8), rtol=0, atol=1e-5)
    xc = (x - x.mean(0)).double()
    top = torch.linalg.eigvalsh(xc.t() @ xc).flip(0)[:8].sum()
    assert math.isclose((xc @ proj.double()).square().sum().item(), top.item(), rel_tol=1e-4)
    same_mean, same_proj = fit_itq(x, 8, seed=1)
    assert torch.equal(proj, same_proj) and torch.equal(mean, same_mean)
    assert not torch.allclose(proj, fit_itq(x, 8, seed=2)[1])
    assert ((x - mean) @ proj).sign().shape == (200, 8)


def test_itq_refuses_more_bits_than_dimensions():
    with pytest.raises(UserError, match="--dim 32 .* 16 feature dimensions"):
        fit_itq(features(), 32)
    mean, proj = fit_itq(features(), 16, iterations=3)  # bits = d is fine
    assert proj.shape == (16, 16)
