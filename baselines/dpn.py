"""DPN: deep polarized network (Fan, Ng, Hu, Chan, Li and Wang, "Deep polarized network for supervised
learning of accurate binary hashing codes", IJCAI 2020), after the paper's second author's public
re-implementation ("all the hyperparameters are the default parameters to get the performance in the
paper", its README) and defined in docs/method.md section 8.

Source: kamwoh/DPN at commit b4d721e0e164188399307a4b5944c0a655882c3c: scripts/train_hashing.py lines
128-152 (calculate_loss), 179-181 (the regulariser and the total), 343-358 (optimiser and the targets),
models/alexnet.py lines 21-26 (hash_fc = Linear without bias, normal(0, 0.01) init; no BatchNorm, no
tanh), main.py lines 17-95 and configs.py lines 46-79 (the defaults).

With v = batch.f (FC1 without bias: the raw codes) and the fixed per-class targets t (buffer `targets`,
C x L, +-1; their --centroid-method N: sign of a standard Gaussian, i.e. each bit +-1 with probability
1/2, no distance check, drawn from a generator seeded with --seed):

    L = mean over the batch of sum over bits k of relu(m - v_ik t_{y_i k})     m = --margin 1
      + reg * mean(v^2)                                                       reg = --reg 0

Deviations from the authors' code (see docs/method.md section 8):
* the shared trunk (a ResNet; theirs AlexNet's features and fc6-fc7) and the shared batch size, epochs,
  augmentation and split (theirs: batch 256 with drop_last, 200 epochs, test-set selection every 10
  epochs); their StepLR(int(0.5 * epochs) = 100, 0.1) is --lr-step 100 --lr-gamma 0.1 whatever --epochs;
* their cross-entropy head (weight --ce 0 by default, a classifier on the trunk's feature beside the
  hash layer), the target update (--centroid-update-time 0 by default: never), the target methods B
  (same distribution) and O (greedy rejection of close rows) and the multi-label loss are not implemented.

CISiPLab/cisip-FIRe (commit e8826c4d9ef914c4060a9d9c36b1ccacfa15577f, functions/loss/dpn.py, configs/
templates/dpn.yaml) has the same loss but other defaults: reg 0.1, Bernoulli targets, Adam lr 1e-4 with
weight decay 5e-4, the trunk at 0.1 x lr, StepLR at 0.8 x 100 epochs, batch 64 and a hash layer with
PyTorch's default init. We follow kamwoh/DPN, whose README claims the paper's settings.
"""
import torch

from utils.method import Method


def polarization_loss(v, t, margin):
    """mean_i sum_k relu(m - v_ik t_ik): each bit pushed past +-m on its target's side."""
    return torch.relu(margin - v * t).sum(1).mean()


class DPN(Method):
    """Hinge ("polarisation") loss of each bit of v against its class's fixed +-1 target. No
    classification head."""

    name = "DPN"
    uses_logits = False
    # main.py 65-79, train_hashing.py 343: SGD over model.parameters() (one group: no trunk multiplier),
    # lr 1e-4, momentum 0.9 (not Nesterov), weight decay 5e-4; StepLR(0.5 x 200 epochs = 100, 0.1).
    defaults = {"optimizer": "sgd", "lr": 1e-4, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
                "backbone_lr_mult": 1.0, "lr_step": 100, "lr_gamma": 0.1}
    # models/alexnet.py 22-24: Linear(d, L, bias=False) with normal(0, 0.01) weights.
    head = {"fc1_bias": False, "fc1_init": 0.01}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.margin, self.reg = float(args.margin), float(args.reg)
        classes = model.fc2.out_features if model is not None else int(train_labels.max()) + 1
        g = torch.Generator().manual_seed(int(args.seed))
        self.register_buffer("targets", torch.randn(classes, int(args.dim), generator=g).sign())

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--margin", type=float, default=1.0, help="margin m of the polarisation loss")
        parser.add_argument("--reg", type=float, default=0.0, help="weight of the regulariser mean(v^2)")

    def losses(self, batch):
        v = batch.f.float()
        # Means over this rank's samples: the trainer's weighting gives the global batch's.
        terms = {"polarization": polarization_loss(v, self.targets[batch.label], self.margin),
                 "reg": v.square().mean()}
        terms["total"] = terms["polarization"] + self.reg * terms["reg"]
        return terms

    def synced_buffers(self):
        return [self.targets]
