"""Triplet-loss deep hashing with hardest negatives, quantisation and bit balance, as in
MiLaN (Roy, Sangineto, Demir and Sebe, "Metric-learning-based deep hashing network for
content-based retrieval of remote sensing images", IEEE GRSL 2020); see docs/method.md."""
import torch
import torch.nn.functional as F

from utils.losses import QuantizationLoss
from utils.method import Method


def triplet_loss(h, labels, margin=0.5):
    """Mean over every anchor-positive pair (a != p, same class) of
    relu(margin + ||h_a - h_p||^2 / L - ||h_a - h_n||^2 / L), n the anchor's hardest negative:
    the other-class row nearest to the anchor in that distance (the first on ties). Anchors
    without a negative are skipped; with no triplet at all the loss is 0 (and still
    differentiable)."""
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=h.device)
    with torch.no_grad():  # the choice of negative is not differentiated
        # Differences, not the |a|^2 + |b|^2 - 2ab expansion: equal distances stay equal (ties).
        distance = torch.cdist(h, h, compute_mode="donot_use_mm_for_euclid_dist")
        hardest = torch.where(same, float("inf"), distance).argmin(1)  # argmin: the first minimum
        a, p = torch.nonzero(pos & (~same).any(1, keepdim=True), as_tuple=True)
    if len(a) == 0:
        return h.sum() * 0
    n, dim = hardest[a], h.shape[1]
    d_ap = (h[a] - h[p]).square().sum(1) / dim
    d_an = (h[a] - h[n]).square().sum(1) / dim
    return F.relu(margin + d_ap - d_an).mean()


def balance_loss(h):
    """Mean over bits of (mean over the batch of h)^2: each bit +1 about half the time."""
    return h.mean(0).square().mean()


class Triplet(Method):
    """Triplet loss on h = tanh(u) within the (global) batch + w_q quantisation + w_b bit balance.
    Keeps no state; codes are sign(u) as for every method."""

    name = "Triplet"
    uses_logits = False

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.margin = float(args.triplet_margin)
        self.quant_weight = float(args.quant_weight)
        self.balance_weight = float(args.balance_weight)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--triplet-margin", dest="triplet_margin", type=float, default=0.5,
                            help="margin m of the triplet loss (distances are divided by L)")
        parser.add_argument("--quant-weight", dest="quant_weight", type=float, default=0.1,
                            help="weight w_q of the quantisation loss mean (|tanh u| - 1)^2")
        parser.add_argument("--balance-weight", dest="balance_weight", type=float, default=0.1,
                            help="weight w_b of the bit-balance loss")

    def losses(self, batch):
        # Triplets, mining, bit balance (and the quantisation mean) over the whole global batch.
        h = torch.tanh(batch.gather_with_grad("f").float())
        terms = {"triplet": triplet_loss(h, batch.gather("label"), self.margin),
                 "quant": QuantizationLoss()(h), "balance": balance_loss(h)}
        terms["total"] = terms["triplet"] + self.quant_weight * terms["quant"] + self.balance_weight * terms["balance"]
        return terms
