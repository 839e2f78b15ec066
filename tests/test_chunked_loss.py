"""chunked_cdne_loss against CDNELoss on the full memory scores: values and gradients w.r.t. e."""
import pytest
import torch
import torch.nn.functional as F

from utils.losses import CDNELoss, chunked_cdne_loss, use_chunked_loss

T = 0.05


def case(seed=0, B=12, N=203, C=5, L=16, one_class=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(N, dtype=torch.long) if one_class else torch.randint(0, C, (N,), generator=g)
    memory = F.normalize(torch.randn(N, L, generator=g), dim=1)
    e = F.normalize(torch.randn(B, L, generator=g), dim=1).requires_grad_()
    idx = torch.randperm(N, generator=g)[:B]
    if not one_class:
        labels[idx[0]] = C  # the only sample of its class: row 0 has no same-class neighbour
    return e, memory, labels, idx


def reference(e, memory, labels, idx, margin):
    loss = CDNELoss(labels, margin, T)(e.float() @ memory.t() / T, idx)
    (grad,) = torch.autograd.grad(loss, e)
    return loss.detach(), grad


def chunked(e, memory, labels, idx, margin, chunk_size):
    loss = chunked_cdne_loss(e, memory, labels, idx, temperature=T, margin=margin, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, e)
    return loss.detach(), grad


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 100, 203, 1000])
def test_value_and_gradient_match_cdne_loss(margin, chunk_size):
    e, memory, labels, idx = case()
    ref_loss, ref_grad = reference(e, memory, labels, idx, margin)
    loss, grad = chunked(e, memory, labels, idx, margin, chunk_size)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_row_without_same_class_neighbour_is_skipped_but_counted_in_b():
    e, memory, labels, idx = case()
    loss, grad = chunked(e, memory, labels, idx, 0.0, 50)
    assert torch.all(grad[0] == 0)  # the skipped row gets no gradient
    # The other rows' mean, times (B - 1) / B: the divisor is B, not the number of valid rows.
    rest, _ = chunked(e[1:].detach().requires_grad_(), memory, labels, idx[1:], 0.0, 50)
    assert torch.allclose(loss, rest * (len(idx) - 1) / len(idx), rtol=1e-5, atol=1e-6)


def test_own_memory_row_is_excluded():
    e, memory, labels, idx = case()
    memory = memory.clone()
    memory[idx] = e.detach()  # the sample's own row would dominate its positives if counted
    ref_loss, ref_grad = reference(e, memory, labels, idx, 0.0)
    loss, grad = chunked(e, memory, labels, idx, 0.0, 16)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_single_class_has_no_negatives(margin):
    # p_i = 1 for every row (log p = 0 at margin 0), and the gradient vanishes.
    e, memory, labels, idx = case(one_class=True)
    ref_loss, ref_grad = reference(e, memory, labels, idx, margin)
    loss, grad = chunked(e, memory, labels, idx, margin, 30)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)


def test_large_margin_stays_finite():
    # exp(-m/T) underflows float32 at m = 5, T = 0.05; the log-space forms must not.
    e, memory, labels, idx = case()
    ref_loss, ref_grad = reference(e, memory, labels, idx, 5.0)
    loss, grad = chunked(e, memory, labels, idx, 5.0, 40)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_unnormalised_embeddings_and_memory():
    # Scores far from the [-1/T, 1/T] range of unit vectors: the running log-sum-exp must hold.
    e, memory, labels, idx = case(seed=3)
    e = (e.detach() * 3).requires_grad_()
    ref_loss, ref_grad = reference(e, memory * 2, labels, idx, 0.1)
    loss, grad = chunked(e, memory * 2, labels, idx, 0.1, 33)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-4)


def test_grad_scales_with_upstream_gradient_and_keeps_dtype():
    e, memory, labels, idx = case()
    loss = chunked_cdne_loss(e, memory, labels, idx, T, 0.0, 50)
    (g1,) = torch.autograd.grad(loss, e)
    loss = chunked_cdne_loss(e, memory, labels, idx, T, 0.0, 50)
    (g3,) = torch.autograd.grad(3 * loss, e)
    assert torch.allclose(g3, 3 * g1, rtol=1e-6, atol=1e-8)
    e64 = e.detach().double().requires_grad_()
    chunked_cdne_loss(e64, memory, labels, idx, T, 0.0, 50).backward()
    assert e64.grad.dtype == torch.float64
    assert torch.allclose(e64.grad.float(), g1, rtol=1e-5, atol=1e-6)


def test_memory_is_not_a_gradient_target_and_in_place_update_before_backward_is_caught():
    e, memory, labels, idx = case()
    memory.requires_grad_(False)
    loss = chunked_cdne_loss(e, memory, labels, idx, T)
    memory[idx] = 0.0  # the memory update belongs after the backward pass
    with pytest.raises(RuntimeError):
        loss.backward()


def test_use_chunked_loss_threshold():
    assert not use_chunked_loss(256, 1000)
    assert not use_chunked_loss(256, 2 ** 16)  # exactly 2**24 scores
    assert use_chunked_loss(256, 2 ** 16 + 1)
    assert use_chunked_loss(256, 400_000)
