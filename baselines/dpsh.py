"""DPSH: deep pairwise-supervised hashing (Li, Wang and Kang, "Feature learning based deep
supervised hashing with pairwise labels", IJCAI 2016), as defined in docs/method.md."""
import torch
import torch.nn.functional as F

from utils.method import Method


def pairwise_loss(u, v, s):
    """Mean over (i, j) of softplus(theta_ij) - s_ij theta_ij, theta_ij = u_i . v_j / 2:
    the negative log-likelihood of the pairwise labels s (1 same class, 0 not)."""
    theta = u @ v.t() / 2
    return (F.softplus(theta) - s * theta).mean()


def quantization_loss(u):
    """Mean over entries of (b - u)^2 with b = sign(u) a constant (+1 where u > 0, else -1)."""
    b = torch.where(u.detach() > 0, 1.0, -1.0)
    return (b - u).square().mean()


class DPSH(Method):
    """Pairwise likelihood of the batch against every training image's latest code u
    (the buffer U), plus eta times the quantisation loss. No classification head."""

    name = "DPSH"
    uses_logits = False

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.eta = float(args.eta)
        self.register_buffer("labels", torch.as_tensor(train_labels, dtype=torch.long).clone(), persistent=False)
        self.register_buffer("U", torch.zeros(len(train_labels), args.dim))  # latest u of each image, 0 at first

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--eta", type=float, default=0.1, help="weight of the quantisation loss")

    def losses(self, batch):
        u = batch.f.float()
        # As in the authors' code, the batch's detached codes are written into U first, the
        # whole global batch's on every rank (so U stays the same everywhere); U is then a
        # constant: theta_ij = u_i . U_j / 2 trains u_i only. Each term is a mean over this
        # rank's rows i, so the trainer's weighting gives the global batch's mean.
        with torch.no_grad():
            self.U[batch.gather("idx")] = batch.gather("f").float()
        s = (batch.label.unsqueeze(1) == self.labels.unsqueeze(0)).float()
        terms = {"pairwise": pairwise_loss(u, self.U, s), "quant": quantization_loss(u)}
        terms["total"] = terms["pairwise"] + self.eta * terms["quant"]
        return terms

    def synced_buffers(self):
        return [self.U]
