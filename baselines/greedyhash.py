"""GreedyHash (Su, Zhang, Tang and Tian, "Greedy hash: towards fast optimization for accurate hash coding
in CNN", NeurIPS 2018), after the authors' public code and defined in docs/method.md section 8.

Source: ssppp/GreedyHash at commit e5089b2354b8f283d662bb0584f1b006faf2c2db, cifar1.py (CIFAR-10, their
first setting): lines 14-20 (hyper-parameters), 121-136 (the hash layer: sign forward, identity
backward), 139-155 (fc_plus = Linear(4096, L) with bias; the classifier fc = Linear(L, C, bias=False)
on the code), 163-170 (SGD, the schedule), 185-190 (the loss).

With h = batch.f (FC1, with bias: their fc_plus) and b = sign(h) with the straight-through gradient
(db/dh = identity, no clipping), the classifier FC2 (no bias) is applied to b, not to h:

    L = CE(FC2(b), y) + alpha * mean over the batch's B x L entries of | |h| - 1 |^3    alpha = --alpha 0.1

(alpha is their CIFAR value; imagenet.py has 1). The logits are computed here from the network's FC2, so
FC2 is trained and in the optimiser (uses_logits stays True): the fault of DeepHash-pytorch's port before
its PR #32, whose classifier was left out of the optimiser and stayed at its random init.

Deviations from the authors' code (see docs/method.md section 8):
* the shared trunk (a ResNet; theirs AlexNet's features and fc6-fc7), FC1's and FC2's Kaiming init
  (theirs: PyTorch's default), and the shared batch size, epochs, augmentation and split (theirs: batch
  32, 50 epochs, no augmentation for CIFAR, the final model evaluated); their lr * 0.1^(epoch // 30)
  is --lr-step 30 --lr-gamma 0.1 (with more than 60 epochs it steps again at 60, 90, ..., as theirs would);
* codes are bit = 1 iff h > 0 (theirs: sign(h), 0 at h = 0 exactly).
"""
import torch
import torch.nn.functional as F

from utils.method import Method


class SignSTE(torch.autograd.Function):
    """sign(x) forward, the incoming gradient unchanged backward (their `hash` Function)."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def cubic_loss(h):
    """mean | |h| - 1 |^3: h pushed towards +-1 (their loss2)."""
    return (h.abs() - 1).abs().pow(3).mean()


class GreedyHash(Method):
    """Cross-entropy of the bias-free classifier FC2 on the straight-through sign codes, plus alpha
    times the cubic quantisation loss."""

    name = "GreedyHash"
    uses_logits = True  # FC2 is trained, on sign(h) (see losses)
    # cifar1.py 14-20, 163-170: SGD over cnn.parameters() (one group: no trunk multiplier, the classifier
    # included), lr 1e-3, momentum 0.9 (not Nesterov), weight decay 5e-4; lr x 0.1 every 30 epochs.
    defaults = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
                "backbone_lr_mult": 1.0, "lr_step": 30, "lr_gamma": 0.1}
    # cifar1.py 145: the classifier on the code has no bias; fc_plus keeps its bias (the shared FC1).
    head = {"fc2_bias": False}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.alpha = float(args.alpha)
        # The network's FC2, held outside the module tree: it is the network's parameter (trained by the
        # optimiser, saved with the network), not part of the method's state.
        self._fc2 = (model.fc2,) if model is not None else None

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--alpha", type=float, default=0.1,
                            help="weight of the cubic loss mean | |h| - 1 |^3 (the authors' CIFAR value; ImageNet: 1)")

    def classifier(self):
        return self._fc2[0]

    def losses(self, batch):
        h = batch.f.float()
        logits = self.classifier()(SignSTE.apply(h))
        # Means over this rank's samples: the trainer's weighting gives the global batch's.
        terms = {"ce": F.cross_entropy(logits.float(), batch.label), "cubic": cubic_loss(h)}
        terms["total"] = terms["ce"] + self.alpha * terms["cubic"]
        return terms
