"""CDNE loss (class-discriminated neighbourhood embedding) and quantisation loss (docs/method.md section 4)."""

import torch
import torch.nn as nn


def _cdne_log_terms(scores, labels, idx, margin, temperature):
    """Per-row log p_i and a mask of the rows that have a same-class neighbour.

    scores: B x N memory scores s = e M^T / T; labels: N training labels;
    idx: the batch's memory rows. Works in log space so that no exp overflows
    or underflows (the published code took exp directly and dropped such rows).
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    same = labels.unsqueeze(0) == labels[idx].unsqueeze(1)  # B x N
    not_self = torch.ones_like(same)
    not_self[rows, idx] = False  # a sample is not its own neighbour
    neg_inf = scores.new_tensor(float("-inf"))
    log_pos = torch.logsumexp(torch.where(same & not_self, scores, neg_inf), dim=1)  # log P_i
    log_neg = torch.logsumexp(torch.where(~same, scores, neg_inf), dim=1)  # log (Z_i - P_i)
    return _log_p(log_pos, log_neg, margin, temperature), torch.isfinite(log_pos)


def _log_p(log_pos, log_neg, margin, temperature):
    """log p_i from log P_i and log N_i = log(Z_i - P_i)."""
    log_pos_margin = log_pos - margin / temperature  # log P'_i
    # log p_i = log P'_i - log(P'_i + Z_i - P_i)
    return log_pos_margin - torch.logaddexp(log_pos_margin, log_neg)


class CDNELoss(nn.Module):
    """L = -(1/B) sum_{i: P_i > 0} log p_i, with p_i the margin-penalised share of
    same-class neighbours among all memory neighbours of sample i.

    labels: LongTensor of all N training labels (the memory's rows).
    """

    def __init__(self, labels, margin=0.0, temperature=0.05):
        super().__init__()
        # Data, not state: moved with the module, not saved in checkpoints.
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long).clone(), persistent=False)
        self.margin = float(margin)
        self.temperature = float(temperature)

    def forward(self, scores, idx):
        labels = self.labels.to(scores.device)
        log_p, valid = _cdne_log_terms(scores.float(), labels, idx.to(scores.device), self.margin, self.temperature)
        # Rows without a same-class neighbour are skipped, but the divisor stays B.
        return -torch.where(valid, log_p, torch.zeros_like(log_p)).sum() / scores.shape[0]


class QuantizationLoss(nn.Module):
    """Mean over batch and bits of (|f| - 1)^2: pulls relaxed codes towards +-1."""

    def forward(self, f):
        return (f.float().abs() - 1).pow(2).mean()


# ---------------------------------------------------------------------------
# Memory-efficient CDNE loss for large memories.
#
# CDNELoss needs the B x N score matrix and autograd keeps several B x N
# temporaries alive (scores, masks, the masked copies). With N in the hundreds
# of thousands that is gigabytes. The chunked version streams over the memory,
# keeps a running log-sum-exp of the positives and of the negatives of every
# row, and recomputes each chunk's scores in the backward pass, so it only ever
# holds B x chunk_size temporaries. Measured on a 2-core CPU, forward + backward at
# B = 256, L = 128 (docs/benchmarks.md section 4.3): the same time as CDNELoss, and
# peak memory 150-180 MB against 0.4 GB at N = 2^16 + 1 (where the engine switches),
# 2.2 GB at N = 400,000 and 5.4 GB at N = 10^6.

# Elements of one B x chunk temporary that chunk_size=None aims for; a pass holds a handful
# of them. 16 MiB of float32 on the CPU; 64 MiB on a GPU, where each chunk costs a few dozen
# kernel launches and too small a chunk leaves the GPU waiting on them.
CHUNK_ELEMENTS = {"cpu": 2 ** 22, "cuda": 2 ** 24}
# Above this many scores (B * N) the training engine switches to the chunked loss.
CHUNKED_LOSS_THRESHOLD = 2 ** 24


def use_chunked_loss(batch_size, num_samples):
    """True when the B x N score matrix is large enough (> 2**24 elements, 64 MiB in
    float32, several times that with autograd's temporaries) for the chunked loss to pay."""
    return batch_size * num_samples > CHUNKED_LOSS_THRESHOLD


def _chunk_scores(e, memory, labels, y, idx, start, stop, temperature):
    """Scores of one memory chunk (B x C, the sample's own entry at -inf so that E_i,j0 = 0)
    and the same-class mask."""
    s = e @ memory[start:stop].float().t() / temperature  # the same expression as MemoryBank.forward
    # -inf at each row's own column when it lies in this chunk. A scatter that rewrites the other
    # rows' values unchanged, rather than indexing the rows found, which would make a GPU wait.
    col = (idx - start).clamp(0, s.shape[1] - 1).unsqueeze(1)
    own = ((idx >= start) & (idx < start + s.shape[1])).unsqueeze(1)
    s.scatter_(1, col, torch.where(own, float("-inf"), s.gather(1, col)))
    same = labels[start:stop].unsqueeze(0) == y.unsqueeze(1)
    return s, same


def _split_logsumexp(s, same):
    """Row-wise log-sum-exp of s over the same-class entries and over the others (-inf for
    none). One exp pass: each entry is shifted by the maximum of its own group, so neither
    group can underflow because of the other. Overwrites s."""
    neg_inf = s.new_tensor(float("-inf"))
    max_pos = torch.where(same, s, neg_inf).amax(dim=1, keepdim=True)
    max_neg = torch.where(same, neg_inf, s).amax(dim=1, keepdim=True)
    max_pos = torch.where(torch.isfinite(max_pos), max_pos, 0.0)  # empty group: avoid -inf - -inf
    max_neg = torch.where(torch.isfinite(max_neg), max_neg, 0.0)
    exp = s.sub_(torch.where(same, max_pos, max_neg)).exp_()
    log_pos = torch.where(same, exp, 0.0).sum(dim=1).log_() + max_pos.squeeze(1)
    log_neg = torch.where(same, 0.0, exp).sum(dim=1).log_() + max_neg.squeeze(1)
    return log_pos, log_neg


class _ChunkedCDNE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, memory, labels, idx, temperature, margin, chunk_size):
        e32 = e.float()
        y = labels[idx]
        log_pos = e32.new_full((e.shape[0],), float("-inf"))  # running log P_i
        log_neg = e32.new_full((e.shape[0],), float("-inf"))  # running log N_i = log(Z_i - P_i)
        for start in range(0, memory.shape[0], chunk_size):
            s, same = _chunk_scores(e32, memory, labels, y, idx, start, start + chunk_size, temperature)
            chunk_pos, chunk_neg = _split_logsumexp(s, same)
            log_pos = torch.logaddexp(log_pos, chunk_pos)
            log_neg = torch.logaddexp(log_neg, chunk_neg)
        log_p = _log_p(log_pos, log_neg, margin, temperature)
        valid = torch.isfinite(log_pos)  # rows without a same-class neighbour are skipped...
        loss = -torch.where(valid, log_p, torch.zeros_like(log_p)).sum() / e.shape[0]  # ...but B stays the divisor

        # Per-row shifts for the backward pass. With D_i = P'_i + N_i:
        #   same class, j != self:  d log p_i / d s_ij = (E_ij / P_i) (1 - p_i) = exp(s_ij - a_i),
        #                           a_i = log P_i - log(1 - p_i) = log P_i - (log N_i - log D_i)
        #   other class:            d log p_i / d s_ij = -E_ij / D_i = -exp(s_ij - log D_i)
        # Invalid rows get +inf shifts (zero gradient), as does a_i when a row has no negatives (p_i = 1).
        log_d = torch.logaddexp(log_pos - margin / temperature, log_neg)
        pos_shift = torch.where(valid, log_pos - (log_neg - log_d), float("inf"))
        neg_shift = torch.where(valid, log_d, float("inf"))
        ctx.save_for_backward(e32, memory, labels, idx, pos_shift, neg_shift)
        ctx.temperature, ctx.chunk_size, ctx.e_dtype = temperature, chunk_size, e.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        e32, memory, labels, idx, pos_shift, neg_shift = ctx.saved_tensors
        T, chunk_size = ctx.temperature, ctx.chunk_size
        y = labels[idx]
        grad_e = torch.zeros_like(e32)
        with torch.autocast(e32.device.type, enabled=False):
            for start in range(0, memory.shape[0], chunk_size):
                s, same = _chunk_scores(e32, memory, labels, y, idx, start, start + chunk_size, T)
                # d log p / d s for this chunk, in place over s (own entries: exp(-inf) = 0).
                g = s.sub_(torch.where(same, pos_shift.unsqueeze(1), neg_shift.unsqueeze(1))).exp_()
                g = torch.where(same, g, g.neg())
                grad_e.addmm_(g, memory[start:start + chunk_size].float())
        # loss = -(1/B) sum log p_i and ds/de = M / T.
        grad_e.mul_(-grad_loss / (e32.shape[0] * T))
        return grad_e.to(ctx.e_dtype), None, None, None, None, None, None


def chunked_cdne_loss(e, memory, labels, idx, temperature=0.05, margin=0.0, chunk_size=None):
    """CDNE loss of embeddings e (B x L) against the memory (N x L), equal in value and in
    its gradient w.r.t. e to CDNELoss(labels, margin, temperature)(e.float() @ memory.T / temperature, idx),
    but computed over memory chunks of chunk_size rows so that no B x N tensor is ever made.

    labels: the N training labels; idx: the batch's memory rows. The memory gets no gradient and
    must not be modified between this call and the backward pass (autograd checks this).
    chunk_size=None picks CHUNK_ELEMENTS[device type] / B rows.
    """
    if chunk_size is None:
        budget = CHUNK_ELEMENTS.get(e.device.type, CHUNK_ELEMENTS["cpu"])
        chunk_size = max(1, budget // max(1, e.shape[0]))
    labels = torch.as_tensor(labels).to(device=e.device, dtype=torch.long)
    idx = torch.as_tensor(idx).to(device=e.device, dtype=torch.long)
    with torch.autocast(e.device.type, enabled=False):  # float32 scores even under AMP
        return _ChunkedCDNE.apply(e, memory.detach(), labels, idx, float(temperature), float(margin),
                                  int(chunk_size))
