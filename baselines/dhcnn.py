"""DHCNN: deep hashing convolutional neural network (Song, Li and Benediktsson, "Deep hashing
learning for visual and semantic retrieval of remote sensing images", IEEE TGRS 2021), as its
authors' public PyTorch code has it by default (docs/method.md section 8).

Source: github.com/weiweisong415/Demo_DHCNN_for_TGRS2021 at 7e4dbbed518d011217fae789ad0c69f0c24f06a3
(2022-03-23): `DHCNN_Pytorch/DHCNN_UCMD21.py` lines 53-57 (the schedule), 73-78 (`Logtrick`),
150-219 (optimiser, buffers, the step), 283-292 (bit 16, lamda 10, eta 0.2);
`DHCNN_Pytorch/CNN_model.py` lines 34-70 (hash layer Linear(4096, L) without tanh, the
classifier Linear(L, classes) reading u).

--pairs buffer (the default: the authors' code). A buffer U holds the latest u of every train
image (zeros at first). Each step first writes the batch's detached u into its rows (the whole
global batch's under several GPUs, so U is the same everywhere: lines 200-202, before the loss), then,
with s_ij = 1 for images of one class, N the train split's size and B the batch's:

    theta_ij = u_i . U_j / 32                                     (line 206, their GPU branch)
    pairwise = - sum_{i in batch, j in train} (s_ij theta_ij - softplus(theta_ij)) / (N B)
    quant    = sum_{i, k} (sign(u_ik) - u_ik)^2 / (N B)           (sign a constant; sign(0) = 0)
    L        = (1 - m) (pairwise + lamda quant) + m CE(FC2(u), label)

lamda = --lamda = 10, m = --ce-mix = 0.2 (their `eta`), 32 = --theta-div (their CPU branch divides
by 2). U is a constant: the gradient reaches u_i only. Their buffer B = sign(U) is only logged
(`Totloss`, once per epoch) and not kept. The quantisation term is a sum over the batch's entries
divided by N B, so its weight per entry falls with the train split's size (L / N of a mean).

--pairs batch: the definition docs/method.md section 8 had before the authors' code was followed,
exactly: DPSH's pairwise term within the (global) batch, theta_ij = u_i . u_j / 2 with u live on
both sides, the mean over the B^2 pairs (i = j included) + w_c CE (w_c = --ce-weight = 1) + eta times
DPSH's quantisation mean (eta = --eta = 0.1). The flags --lamda, --ce-mix and --theta-div are read
by --pairs buffer only, --ce-weight and --eta by --pairs batch only. The optimiser defaults are the
authors' in both; the old runs used docs/method.md section 5's (--momentum 0.9 --nesterov
--weight-decay 1e-4 --lr-gamma 0.5).

Optimiser and schedule (lines 154-157, 53-57, 228): plain SGD (no momentum), lr 0.1 for every
layer, weight decay 1e-5; the rate x0.1 every 30 epochs.

Deviations from their code:
* the table's batch size and epochs (theirs: 50 and 100), augmentation (theirs: none, a centre
  crop 224 of the short side 256), trunk (theirs: ImageNet AlexNet fc6-fc7) and FC1/FC2 init
  (Kaiming-normal, docs/method.md section 2; theirs nn.Linear's default);
* their schedule sets the rate after each epoch e to 0.1 x 0.1^(e // 30), so 31 epochs run at 0.1
  before the first drop; ours (StepLR) drops after 30;
* their evaluation ranks the whole database with an unstable sort; ours is section 6's.
"""
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.method import Method

from .dpsh import pairwise_loss, quantization_loss

PAIRS = ("buffer", "batch")


class DHCNN(Method):
    """--pairs buffer (default, the authors' code): (1 - m)(pairwise against the buffer U of the train
    set, theta / 32, + lamda quantisation) + m cross-entropy. --pairs batch: DPSH's pairwise term within
    the (global) batch + w_c cross-entropy + eta quantisation (no state)."""

    name = "DHCNN"
    defaults = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 1e-5,
                "backbone_lr_mult": 1.0, "lr_step": 30, "lr_gamma": 0.1}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.pairs = args.pairs
        self.ce_weight = float(args.ce_weight)
        self.eta = float(args.eta)
        self.lamda = float(args.lamda)
        self.ce_mix = float(args.ce_mix)
        self.theta_div = float(args.theta_div)
        if not 0 <= self.ce_mix <= 1:
            raise UserError(f"--ce-mix must be in [0, 1], got {args.ce_mix}")
        if not self.theta_div > 0:
            raise UserError(f"--theta-div must be positive, got {args.theta_div}")
        if self.pairs == "buffer":
            self.register_buffer("labels", torch.as_tensor(train_labels, dtype=torch.long).clone(), persistent=False)
            self.register_buffer("U", torch.zeros(len(train_labels), args.dim))  # latest u of each image, 0 at first

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--pairs", choices=PAIRS, default="buffer",
                            help="buffer: the authors' code, the batch against a buffer U of the whole train set; "
                                 "batch: DPSH's pairwise term within the batch (the definition before issue 23)")
        parser.add_argument("--lamda", type=float, default=10.0,
                            help="--pairs buffer: weight of the quantisation sum (the authors' lamda)")
        parser.add_argument("--ce-mix", dest="ce_mix", type=float, default=0.2,
                            help="--pairs buffer: m in (1 - m) pairwise part + m cross-entropy (the authors' eta)")
        parser.add_argument("--theta-div", dest="theta_div", type=float, default=32.0,
                            help="--pairs buffer: theta_ij = u_i . U_j / this")
        parser.add_argument("--ce-weight", dest="ce_weight", type=float, default=1.0,
                            help="--pairs batch: weight w_c of the classification (cross-entropy) loss")
        parser.add_argument("--eta", type=float, default=0.1, help="--pairs batch: weight of the quantisation loss")

    def losses(self, batch):
        return self.buffer_losses(batch) if self.pairs == "buffer" else self.batch_losses(batch)

    def buffer_losses(self, batch):
        u = batch.f.float()
        # As in the authors' code, the batch's detached u are written into U first, the whole global
        # batch's on every rank (U stays the same everywhere); U is then a constant. Every term is a
        # mean over this rank's rows (the sums divided by N B), so the trainer's weighting of the
        # ranks gives the global batch's.
        with torch.no_grad():
            self.U[batch.gather("idx")] = batch.gather("f").float()
        s = (batch.label.unsqueeze(1) == self.labels.unsqueeze(0)).float()
        n, b = len(self.U), len(u)
        theta = u @ self.U.t() / self.theta_div
        terms = {"pairwise": (F.softplus(theta) - s * theta).mean(),  # sum / (N B) of the negated logloss
                 "quant": (torch.sign(u.detach()) - u).square().sum() / (n * b),
                 "ce": F.cross_entropy(batch.logits.float(), batch.label)}
        terms["total"] = ((1 - self.ce_mix) * (terms["pairwise"] + self.lamda * terms["quant"])
                          + self.ce_mix * terms["ce"])
        return terms

    def batch_losses(self, batch):
        # Every term over the whole global batch (the same on every rank under DDP): all pairs
        # (i, j), i = j included (s_ii = 1), so the pairwise mean is over N^2 terms.
        u, label = batch.gather_with_grad("f").float(), batch.gather("label")
        s = (label.unsqueeze(1) == label.unsqueeze(0)).float()
        terms = {"pairwise": pairwise_loss(u, u, s),
                 "ce": F.cross_entropy(batch.gather_with_grad("logits").float(), label),
                 "quant": quantization_loss(u)}
        terms["total"] = terms["pairwise"] + self.ce_weight * terms["ce"] + self.eta * terms["quant"]
        return terms

    def synced_buffers(self):
        return [self.U] if self.pairs == "buffer" else []
