"""OrthoHash: one loss for hashing with orthogonal codes (Hoe, Ng, Lim, Chan and Wang, "One loss for
all: deep hashing with a single cosine similarity based learning objective", NeurIPS 2021), after the
authors' public code and defined in docs/method.md section 8.

Source: kamwoh/orthohash at commit 94c4a0335e8b52d79d9896d7ba195b3ea426ff55: functions/loss/orthohash.py
lines 26-120 (OrthoHashLoss), models/alexnet.py lines 8-35 (CosSim) and 54-66 (hash_fc = Linear without
bias, normal(0, 0.01) init, then BatchNorm1d), scripts/train_hashing.py lines 257-266 (the codebook) and
272-276 (the trunk at 0.1 x lr), main.py lines 17-97 and configs.py lines 48-81 (the defaults).

The head is FC1 without bias, weights normal(0, 0.01), followed by BatchNorm1d(L) (Method.head), so
v = batch.f is the BatchNorm's output and bit k is 1 iff v_k > 0 (in evaluation the BatchNorm uses its
running statistics, as theirs). With the fixed codebook c (buffer `codebook`, C x L, +-1) and
cos_k = v . c_k / (||v|| ||c_k||):

    L = CE(s * (cos - m * onehot(y)), y)            s = --scale 8, m = --margin 0.2 (--margin-type cos)
      + quan * quantisation(v)                       quan = --quan 0 (their default: off)

--margin-type arc: s * cos(acos(clamp(cos, -0.99999, 0.99999)) + m * onehot(y)) instead.
quantisation (--quan-type): cs (theirs by default) mean_i (1 - cos(v_i, sign(v_i))), l1 mean |v - sign(v)|,
l2 mean (v - sign(v))^2, sign(v) a constant.

The codebook is their default --codebook-method B: i.i.d. Bernoulli(0.5) entries mapped to +-1, with no
distance check (two classes can share a row with probability about C^2 / 2^(L+1): 1.5 % for 45 classes
at 16 bits, as in theirs), drawn from a generator seeded with --seed (theirs: drawn from the run's seed,
random by default).

Deviations from the authors' code (see docs/method.md section 8):
* the shared trunk (a ResNet; theirs AlexNet's features and fc6-fc7) and the shared batch size, epochs,
  augmentation and split (theirs: batch 256 with drop_last, 100 epochs, test-set selection every 10
  epochs); their StepLR(int(0.8 * epochs) = 80, 0.1) is --lr-step 80 --lr-gamma 0.1 whatever --epochs;
* their codebook methods N (sign of a Gaussian: B's distribution) and O (greedy rejection of close rows)
  and the multi-label (NUS-WIDE) losses are not implemented;
* under several GPUs the BatchNorm normalises each GPU's share of the batch (no SyncBatchNorm; theirs
  is one GPU), and Adam's weight decay is the coupled L2 of torch.optim.Adam, as theirs.
"""
import torch
import torch.nn.functional as F

from utils.method import Method


def cosine_logits(v, codebook):
    """CosSim: cos(v_i, c_k) for every row of v and of the codebook (B x C)."""
    return F.normalize(v, dim=1) @ F.normalize(codebook, dim=1).t()


def margin_logits(cos, label, scale, margin, margin_type="cos"):
    """s (cos - m 1[k = y]) (cos), or s cos(acos(cos) + m 1[k = y]) (arc)."""
    onehot = F.one_hot(label, cos.shape[1]).to(cos.dtype) * margin
    if margin_type == "arc":
        return scale * torch.cos(torch.acos(cos.clamp(-0.99999, 0.99999)) + onehot)
    return scale * (cos - onehot)


def quantization(v, kind="cs"):
    target = v.detach().sign()
    if kind == "cs":
        return (1 - F.cosine_similarity(v, target, dim=1)).mean()
    if kind == "l1":
        return (v - target).abs().mean()
    return (v - target).square().mean()


class OrthoHash(Method):
    """Cross-entropy of the scaled, margin-reduced cosines between v and a fixed +-1 codebook with one
    row per class (+ an optional quantisation term). No classification head: the codebook is the classifier."""

    name = "OrthoHash"
    uses_logits = False
    # main.py and configs.py: Adam (betas 0.9, 0.999) lr 1e-4 with weight decay 5e-4, the trunk at 0.1 x lr
    # (train_hashing.py 272), StepLR(step 0.8 x 100 epochs = 80, gamma 0.1).
    defaults = {"optimizer": "adam", "lr": 1e-4, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
                "backbone_lr_mult": 0.1, "lr_step": 80, "lr_gamma": 0.1}
    # models/alexnet.py 61-66: Linear(d, L, bias=False) with normal(0, 0.01) weights, then BatchNorm1d(L).
    head = {"fc1_bias": False, "fc1_bn": True, "fc1_init": 0.01}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.scale, self.margin, self.margin_type = float(args.scale), float(args.margin), args.margin_type
        self.quan, self.quan_type = float(args.quan), args.quan_type
        classes = model.fc2.out_features if model is not None else int(train_labels.max()) + 1
        g = torch.Generator().manual_seed(int(args.seed))
        bits = torch.bernoulli(torch.full((classes, int(args.dim)), 0.5), generator=g)
        self.register_buffer("codebook", bits * 2 - 1)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--scale", type=float, default=8.0, help="scale s of the cosine logits")
        parser.add_argument("--margin", type=float, default=0.2, help="margin m taken off the true class's cosine")
        parser.add_argument("--margin-type", dest="margin_type", choices=("cos", "arc"), default="cos",
                            help="cos: s (cos - m); arc: s cos(acos + m)")
        parser.add_argument("--quan", type=float, default=0.0, help="weight of the quantisation term")
        parser.add_argument("--quan-type", dest="quan_type", choices=("cs", "l1", "l2"), default="cs",
                            help="quantisation term: cs 1 - cos(v, sign v), l1 |v - sign v|, l2 (v - sign v)^2")

    def losses(self, batch):
        v = batch.f.float()
        logits = margin_logits(cosine_logits(v, self.codebook), batch.label, self.scale, self.margin,
                               self.margin_type)
        # Means over this rank's samples: the trainer's weighting gives the global batch's.
        terms = {"ce": F.cross_entropy(logits, batch.label)}
        terms["total"] = terms["ce"]
        if self.quan:
            terms["quant"] = quantization(v, self.quan_type)
            terms["total"] = terms["total"] + self.quan * terms["quant"]
        return terms

    def synced_buffers(self):
        return [self.codebook]
