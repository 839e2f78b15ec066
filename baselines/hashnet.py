"""HashNet: deep learning to hash by continuation (Cao, Long, Wang and Yu, ICCV 2017), as its
authors' PyTorch code has it (docs/method.md section 8).

Source: github.com/thuml/HashNet at 85387b814fcf95daff887bd325cbaa0e8def7323 (2019-08-02):
`pytorch/src/loss.py` lines 6-23 (`pairwise_loss`, the one `train.py` calls), `pytorch/src/network.py`
lines 48-85 (`ResNetFc`: the hash layer and the continuation), `pytorch/src/train.py` lines 160-276
(optimiser, schedule, the two batches), `pytorch/src/lr_schedule.py` (`step_lr_scheduler`).

With h = tanh(beta u), u = FC1(x), s_ij = 1 for images of one class and x_ij = alpha h_i . h_j:

    l_ij = softplus(x_ij) - s_ij x_ij
    L    = (w sum_{s_ij = 1} l_ij + sum_{s_ij = 0} l_ij) / (w n_similar + n_dissimilar)

over the ordered pairs i != j of the (global) batch: a mean in which similar pairs weigh
w = --class-num and dissimilar ones 1. alpha = --sigmoid-param / L = 10 / L (train.py's
`sigmoid_param`). beta is the continuation: beta = (1 + 0.005 t)^0.5, recomputed only when t is a
multiple of 200, t the number of the step's forward pass counted from 1 (network.py: `iter_num`
is incremented before the check), so beta = 1 for steps 1-199, sqrt(2) from step 200, sqrt(3)
from 400, ... The step count is the buffer `steps` (steps taken): checkpoints carry it and a
resumed run goes on with the same beta. Codes are sign(u) = sign(h). No classifier (FC2 frozen),
no quantisation term (train.py's `q_weight` is 0 and unused). Head: FC1 weights N(0, 0.01^2),
bias 0 (network.py lines 64-66).

The authors' overflow guard (l_ij = x_ij (1 - s_ij) where x_ij > 15) is never taken with tanh
codes, |x_ij| <= alpha L = 10; softplus is computed stably instead (the two agree to 3e-7 there).

w: the authors' code takes `--class_num` on the command line with no default and defines it as
|S| / |S_1| of the train set's similarity matrix (caffe/models/train/README.md: all pairs over the
similar ones; the maintainer gives 10 for CIFAR-10, thuml/HashNet issue #28). Our default computes
exactly that from the train split's labels, N^2 / sum_c n_c^2 (pairs i = j included: n_c^2 per
class), which is the number of classes on a balanced split (10 on digits, 21 on UCMerced, 45 on
NWPU-RESISC45) and stays the authors' ratio on an unbalanced one (EuroSAT: 9.85).

Optimiser and schedule (train.py lines 166-172, 260-262): SGD, momentum 0.9, Nesterov, weight
decay 5e-4 on every parameter; the trunk at the base rate and the hash layer at 10x it; the rate
halved every 2000 of the 10000 iterations. Here --lr is the hash layer's rate and
--backbone-lr-mult 0.1 the trunk's share, so the default --lr 0.003 is 10x the README's base rate
0.0003 (the trunk trains at 0.0003, FC1 at 0.003, as theirs). The halving counts optimiser steps as
theirs does (--lr-step 2000 --lr-step-unit step: step k trains at lr 0.5^(k // 2000), k from 0, their
`step_lr_scheduler`), so the schedule stays in step with the continuation, which counts steps too. In
epochs it depends on the dataset and the batch: at -b 256 a 130-epoch EuroSAT run takes about 9,600
steps (4 halvings, as their 10,000 iterations) and NWPU-RESISC45 about 11,300 (5); the digits demo's
3 epochs of 11 steps none. By the fraction of training instead (a fifth: --lr-step 26 epochs of 130)
it would be the same halvings on every dataset but at other step counts than theirs.

Deviations from their code:
* pairs within one (global) batch, not between two independently drawn batches of 36 (train.py
  lines 194-215: 36 x 36 cross pairs); a pair of an image with itself is left out (their two
  batches pair an image with itself only by chance);
* the table's batch size (-b) and epochs, shared by every method, not their 72 images x 10000
  iterations;
* FC1 on the shared trunk (ResNet-18 by default, ImageNet weights); their hash layer sits on
  ResNet-50 (their AlexNet and VGG variants do not run: network.py lines 19 and 101);
* their test script evaluates without model.eval() (BatchNorm in training mode); we evaluate in
  eval mode as every method here; their weight decay and 10x also reach the hash layer's bias, ours
  too (no per-bias multiplier).
"""
import math

import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.method import Method

STEP_SIZE, GAMMA, POWER = 200, 0.005, 0.5  # network.py lines 68-71: the continuation's constants


def continuation_scale(forward):
    """beta at the `forward`-th training forward pass (1-based), as network.py lines 80-83: the value
    (1 + 0.005 t)^0.5 of the last t <= forward that is a multiple of 200 (1 before the first)."""
    t = forward // STEP_SIZE * STEP_SIZE
    return math.pow(1.0 + GAMMA * t, POWER)


def similar_pair_weight(train_labels):
    """|S| / |S_1| of the train split's similarity matrix: N^2 / sum_c n_c^2 (i = j included)."""
    counts = torch.bincount(torch.as_tensor(train_labels).long().cpu()).double()
    return float(counts.sum() ** 2 / counts.square().sum())


def hashnet_loss(h, labels, alpha, weight):
    """The weighted mean over ordered pairs i != j of softplus(x_ij) - s_ij x_ij, x_ij = alpha h_i . h_j,
    similar pairs weighing `weight`, dissimilar ones 1 (loss.py lines 6-23)."""
    x = alpha * h @ h.t()
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    off = ~torch.eye(len(h), dtype=torch.bool, device=h.device)
    w = torch.where(same, weight, 1.0) * off
    terms = F.softplus(x) - same.float() * x
    return (w * terms).sum() / w.sum()


class HashNet(Method):
    """HashNet's weighted pairwise likelihood on tanh(beta u) within the (global) batch, beta
    raised every 200 steps (the continuation); no classifier, no quantisation term."""

    name = "HashNet"
    uses_logits = False
    defaults = {"optimizer": "sgd", "lr": 0.003, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                "backbone_lr_mult": 0.1, "lr_step": 2000, "lr_step_unit": "step", "lr_gamma": 0.5}
    head = {"fc1_init": 0.01}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.alpha = float(args.sigmoid_param) / args.dim
        self.weight = similar_pair_weight(train_labels) if args.class_num is None else float(args.class_num)
        if not self.weight > 0:
            raise UserError(f"--class-num must be positive, got {args.class_num}")
        # Steps taken so far (the authors' iter_num less the current forward): a buffer, so that a
        # checkpoint carries it and a resumed run continues with the same beta.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--class-num", dest="class_num", type=float, default=None,
                            help="weight w of the similar pairs (the authors' class_num); default: |S| / |S_1| "
                                 "of the train split, N^2 / sum_c n_c^2 (the number of classes when balanced)")
        parser.add_argument("--sigmoid-param", dest="sigmoid_param", type=float, default=10.0,
                            help="alpha * L: the pairs' inner products are scaled by alpha = this / L")

    def scale(self):
        """beta of the coming step: its forward pass is the (steps + 1)-th."""
        return continuation_scale(int(self.steps) + 1)

    def losses(self, batch):
        # The pairs of the whole global batch on every rank (the same loss everywhere).
        h = torch.tanh(self.scale() * batch.gather_with_grad("f").float())
        loss = hashnet_loss(h, batch.gather("label"), self.alpha, self.weight)
        return {"pairwise": loss, "total": loss}

    def after_step(self, model):
        self.steps += 1
