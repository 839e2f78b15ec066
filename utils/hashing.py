"""Unsupervised hashing of fixed features: random projections (LSH) and PCA-ITQ.

Both fit a projection on the train split's features x (n x d) and give codes
b = sign((x - mu) W), mu the train-split mean, W (d x L):

* LSH (Charikar, "Similarity estimation techniques from rounding algorithms", STOC 2002):
  W has i.i.d. N(0, 1) entries from a generator seeded with `seed`.
* PCA-ITQ (Gong and Lazebnik, "Iterative quantization", CVPR 2011 / TPAMI 2013):
  P = the top-L principal directions of the centred features, V = (X - mu) P, and
  R an orthogonal L x L rotation found by alternating B = sign(V R) with the
  orthogonal Procrustes step R = S S_hat^T, where V^T B = S Omega S_hat^T (SVD).
  W = P R. Each step minimises ||B - V R||_F^2 over one of B, R, so it never increases.

Sign rule, as for the network's codes (docs/method.md): +1 where the value is > 0, else -1.
Computed in float64 on the CPU; returned as float32 on the features' device.
"""
import torch

from utils.errors import UserError


def sign(x):
    """+1 where x > 0, else -1 (0 gives -1, like bit k = [f_k > 0])."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)


def _out(features, *tensors):
    return tuple(t.to(device=features.device, dtype=torch.float32) for t in tensors)


def fit_lsh(features, bits, seed=0):
    """(mean, W): codes = sign((x - mean) @ W), W (d x bits) i.i.d. N(0, 1)."""
    x = features.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(x.shape[1], int(bits), generator=g, dtype=torch.float64)
    return _out(features, x.mean(0), w)


def _itq(features, bits, iterations, seed):
    x = features.detach().to("cpu", torch.float64)
    n, d = x.shape
    bits = int(bits)
    if bits > d:
        raise UserError(f"--dim {bits} is more than the {d} feature dimensions; ITQ needs bits <= feature "
                        f"dimension: use --dim {d} or less")
    mean = x.mean(0)
    xc = x - mean
    # PCA: eigenvectors of the covariance with the largest eigenvalues (d x d, cheaper than an SVD of X).
    evals, evecs = torch.linalg.eigh(xc.t() @ xc / max(n - 1, 1))
    p = evecs[:, torch.argsort(evals, descending=True)[:bits]]
    v = xc @ p
    g = torch.Generator().manual_seed(int(seed))
    r = torch.linalg.qr(torch.randn(bits, bits, generator=g, dtype=torch.float64))[0]  # random rotation R0
    history = []
    for _ in range(int(iterations)):
        b = sign(v @ r)  # the best B for fixed R
        s, _, s_hat_t = torch.linalg.svd(v.t() @ b)  # V^T B = S Omega S_hat^T
        r = s @ s_hat_t  # the best orthogonal R for fixed B (orthogonal Procrustes)
        history.append((b - v @ r).square().sum().item())
    return mean, p, r, history


def fit_itq(features, bits, iterations=50, seed=0):
    """(mean, P R): codes = sign((x - mean) @ (P R)), P the top-`bits` principal directions,
    R the ITQ rotation after `iterations` steps from a random rotation seeded with `seed`."""
    mean, p, r, _ = _itq(features, bits, iterations, seed)
    return _out(features, mean, p @ r)


def itq_objective_history(features, bits, iterations=50, seed=0):
    """||B - V R||_F^2 after each ITQ iteration (non-increasing) and the final rotation R."""
    _, _, r, history = _itq(features, bits, iterations, seed)
    return history, r
