"""CSQ: central similarity quantization (Yuan, Wang, Zhang, Tay, Xie and Feng, "Central similarity
quantization for efficient image and video retrieval", CVPR 2020), after the authors' public code
and defined in docs/method.md section 8.

Source: yuanli2333/Hadamard-Matrix-for-hashing at commit 55cab0092813728c43b0a828e484d0dccb2751a7:
train.py lines 110-146 (label -> centre, the loss), 76-80 (Adam, two parameter groups), 182-190 (the
schedule); options.py (the defaults); my_pairwise_loss.py lines 6-14 (the optional pairwise term);
"Tutorial_ hash_center_generation.ipynb" cells 3 and 6 (Hadamard centres) and 18 (random centres).

With h = tanh(u) (u = batch.f) and c_i = centers[y_i], each a +-1 row:

    L = lambda0 * BCE((h + 1) / 2, (c + 1) / 2)      mean over the batch's B x L entries, lambda0 = 1
      + lambda1 * pairwise(first half, second half)  off: lambda1 = 0 (every README command of theirs)
      + lambda2 * mean((|h| - 1)^2)                  lambda2 = 0.05 (their ResNet-50 value)

pairwise(h1, h2) = mean over (i, j) of log(1 + exp(d_ij)) - s_ij d_ij with d_ij = (10 / L) h1_i . h2_j
and s_ij = 1 for the same class: the first half of the (global) batch against its second half, 0 on a
batch shorter than -b (their rule for the last batch).

The centres (buffer `centers`, C x L, one per class, fixed):
* L a power of 2 and C <= 2L: the first C rows of H_L when C <= L, else of [H_L; -H_L] (H_L the
  Sylvester-Hadamard matrix, scipy's; row 0 all +1 kept, as in their ImageNet files). Any two are L/2
  apart, or L for the pairs h, -h.
* otherwise (C > 2L, or L not a power of 2, where scipy's hadamard refuses): their random rule, rows
  with exactly round(L/2) entries -1 (their cell 18: balanced rows, despite its "Bernoulli" title),
  the whole C x L matrix redrawn up to 10,000 times until the smallest Hamming distance between two
  centres is >= t(L) and the mean >= L/2. Their t is 20 and written for 64 bits only (shipped files:
  t = 2 at 16 bits, 8 at 32): we take t(L) = ceil(20 L / 64), theirs at 64 bits, and when no draw
  meets it (45 classes at 16 bits cannot: t = 5 and balanced rows are an even distance apart) the
  draw with the largest smallest distance, then the largest mean (theirs keeps the last draw
  silently). Two classes with the same centre are refused (a larger --dim helps).
  Drawn from a generator seeded with --seed (theirs is unseeded).

Deviations from the authors' code (see docs/method.md section 8):
* the shared head: FC1 (d -> L, with bias, Kaiming init) on the shared trunk, where theirs is a
  3-layer MLP (2048-2048-L, ReLU, dropout 0.5) ending in tanh: a fair table shares the trunk and head;
* the shared batch size, epochs, augmentation and split (theirs: batch 64, 90 epochs, test-set model
  selection every 5 epochs); their schedule lr * 0.7^(epoch // 10) is --lr-step 10 --lr-gamma 0.7;
* the random centres' threshold and best-draw rule above, and the seed;
* codes are bit = 1 iff u > 0 (theirs: tanh(u) >= 0): they differ only at u = 0 exactly;
* single-label only (their multi-label centres, sign of the mean of a label set's centres, are not needed).
"""
import math

import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.method import Method

RANDOM_TRIES = 10000  # their cell 18's `for j in range(10000)`


def is_power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


def hadamard(n):
    """The Sylvester-Hadamard matrix H_n (n a power of 2), as scipy.linalg.hadamard builds it."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_centres(num_classes, bits):
    """Their cells 3 and 6: H_L's first C rows when C <= L, else [H_L; -H_L]'s (C <= 2L)."""
    h = hadamard(bits)
    rows = h if num_classes <= bits else torch.cat([h, -h], 0)
    return rows[:num_classes].clone()


def pairwise_distances(codes):
    """Hamming distances between the rows of each +-1 matrix of codes (..., C, L): (..., C, C)."""
    return (codes.shape[-1] - codes @ codes.transpose(-1, -2)) / 2


def random_centres(num_classes, bits, generator, tries=RANDOM_TRIES, chunk=250):
    """Their cell 18 with a threshold for every L (module docstring): the first of up to `tries`
    draws of balanced rows whose smallest distance is >= ceil(20 L / 64) and whose mean is >= L/2,
    else the draw with the largest smallest distance (then mean). Returns (centres, min, mean)."""
    threshold, minus = math.ceil(20 * bits / 64), round(bits / 2)
    off = ~torch.eye(num_classes, dtype=torch.bool)
    best, best_key = None, None
    for start in range(0, tries, chunk):
        n = min(chunk, tries - start)
        # Balanced rows: the `minus` positions of the smallest uniform keys are -1 (random.sample's draw).
        order = torch.rand(n, num_classes, bits, generator=generator).argsort(-1)
        draws = torch.ones(n, num_classes, bits).scatter_(-1, order[..., :minus], -1.0)
        d = pairwise_distances(draws)[:, off].reshape(n, -1)
        smallest, mean = d.min(1).values, d.mean(1)
        passing = torch.nonzero((smallest >= threshold) & (mean >= bits / 2))
        if len(passing):
            k = int(passing[0])
            return draws[k], float(smallest[k]), float(mean[k])
        k = int(torch.argmax(smallest * 4 * bits + mean))  # largest smallest distance, then mean (both <= L)
        key = (float(smallest[k]), float(mean[k]))
        if best_key is None or key > best_key:
            best, best_key = draws[k], key
    return best, best_key[0], best_key[1]


def csq_centres(num_classes, bits, seed, tries=RANDOM_TRIES):
    """The C x L centres of docs/method.md section 8 (module docstring): Hadamard when L is a power of
    2 and C <= 2L, else the seeded random rule."""
    if is_power_of_two(bits) and num_classes <= 2 * bits:
        return hadamard_centres(num_classes, bits)
    if num_classes < 2:
        return torch.ones(num_classes, bits)
    centres, smallest, _ = random_centres(num_classes, bits, torch.Generator().manual_seed(seed), tries)
    if smallest == 0:
        raise UserError(f"CSQ found no {bits}-bit centres that differ for all {num_classes} classes in {tries} "
                        "draws; use a larger --dim")
    return centres


def pairwise_term(h, label, batch_size):
    """my_pairwise_loss.py on the first half of the batch against its second half, d = (10 / L) h1 . h2;
    0 on a batch shorter than `batch_size` (their last batch)."""
    if len(h) < batch_size or len(h) < 2:
        return h.sum() * 0
    half = len(h) // 2
    d = (10.0 / h.shape[1]) * h[:half] @ h[half:2 * half].t()
    s = (label[:half].unsqueeze(1) == label[half:2 * half].unsqueeze(0)).float()
    return (F.softplus(d) - s * d).mean()  # softplus(d) = log(1 + exp(d)), theirs written out


class CSQ(Method):
    """Binary cross-entropy of (tanh u + 1) / 2 against each image's class centre (+1 -> 1, -1 -> 0),
    plus lambda2 times the quantisation term. No classification head."""

    name = "CSQ"
    uses_logits = False
    # train.py 76-80 and 182-190, options.py: Adam (betas 0.9, 0.999), no weight decay, lr 1e-3, the trunk
    # at 0.01 x lr (their --multi_lr), lr x 0.7 every 10 epochs.
    defaults = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False,
                "backbone_lr_mult": 0.01, "lr_step": 10, "lr_gamma": 0.7}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.lambda0, self.lambda1, self.lambda2 = float(args.lambda0), float(args.lambda1), float(args.lambda2)
        self.batch_size = int(getattr(args, "batch_size", 0))
        classes = model.fc2.out_features if model is not None else int(train_labels.max()) + 1
        self.register_buffer("centers", csq_centres(classes, int(args.dim), int(args.seed)))

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--lambda0", type=float, default=1.0, help="weight of the central (BCE) loss")
        parser.add_argument("--lambda1", type=float, default=0.0,
                            help="weight of the pairwise term between the batch's two halves (the authors' "
                                 "README commands: 0)")
        parser.add_argument("--lambda2", type=float, default=0.05,
                            help="weight of the quantisation loss mean (|tanh u| - 1)^2")

    def losses(self, batch):
        h = torch.tanh(batch.f.float())
        c = self.centers[batch.label]
        # Both terms are means over this rank's entries: the trainer's weighting gives the global batch's.
        terms = {"center": F.binary_cross_entropy((h + 1) / 2, (c + 1) / 2),
                 "quant": (h.abs() - 1).square().mean()}
        terms["total"] = self.lambda0 * terms["center"] + self.lambda2 * terms["quant"]
        if self.lambda1:
            # Halves of the global batch, as one process holding it would split it.
            pair = pairwise_term(torch.tanh(batch.gather_with_grad("f").float()), batch.gather("label"),
                                 self.batch_size)
            terms["pairwise"] = pair
            terms["total"] = terms["total"] + self.lambda1 * pair
        return terms

    def synced_buffers(self):
        return [self.centers]
