"""Non-parametric classifiers over the training set (docs/method.md section 3).

Both memories hold one L-dimensional row per training sample. Scores of a
batch are s = e M^T / T, computed against the memory as it was before this
step's update; the gradient flows to e only (the memory is a buffer).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Memory(nn.Module):
    def __init__(self, num_samples, dim, temperature=0.05):
        super().__init__()
        self.num_samples = int(num_samples)
        self.dim = int(dim)
        self.temperature = float(temperature)
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory", torch.rand(num_samples, dim).mul_(2 * bound).add_(-bound))

    @property
    def rows(self):
        """The N x L matrix, one row per training sample (the buffer is named `memory`)."""
        return self.memory

    def forward(self, e, idx=None):
        """Scores B x N. `idx` (the batch's rows) is not needed for the scores; it is accepted
        so that calls of the form memory(e, idx) keep working."""
        return e.float() @ self.memory.t() / self.temperature

    def extra_repr(self):
        return f"num_samples={self.num_samples}, dim={self.dim}, temperature={self.temperature}"


class MemoryBank(_Memory):
    """CDNE(MB): rows are momentum averages of the network's own embeddings,
    M[i] <- normalize(mu M[i] + (1 - mu) e_i)."""

    def __init__(self, num_samples, dim, temperature=0.05, momentum=0.5):
        super().__init__(num_samples, dim, temperature)
        self.momentum = float(momentum)

    @torch.no_grad()
    def update(self, x, idx):
        mixed = self.momentum * self.memory[idx] + (1 - self.momentum) * x.detach().float()
        self.memory[idx] = F.normalize(mixed, dim=1)


class MemoryUnit(_Memory):
    """CDNE(MU): rows are replaced by the key encoder's embeddings, M[i] <- e_hat_i."""

    @torch.no_grad()
    def update(self, x, idx):
        self.memory[idx] = x.detach().float()
