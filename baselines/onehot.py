"""The classifier baseline of Sablayrolles, Douze, Usunier and Jegou, "How should we evaluate
supervised hashing?" (ICASSP 2017): train a classifier and code each image by its predicted class
(docs/method.md section 8).

Source: github.com/facebookresearch/supervised-hashing-baselines at
c18efcc25d42b8c92e06dc39684aa58f6b28e698 (2018-10-11): `main.py` lines 75-101 (`getmAP`: the
encodings; `--code onehot`), 140-170 (the classifier, its C chosen on val mAP); `run.sh`.

Training: the cross-entropy of the classifier FC2(FC1(x)) (their classifier is a logistic
regression on RBF features of GIST; ours is the network's head on the shared trunk), mean over the
batch. Codes: in evaluation the network returns f = codewords[argmax FC2(FC1(x))] (HashingNet's
`codewords` head, utils/models.py), so every image, query or database, is coded by its predicted
class's codeword and ranked by Hamming distance as every method here.

The codewords (C x L, +-1), filled at construction: as far apart as we can make them.
* 2L >= C and L a power of two (every --dim of the table: 16, 32, 64, 128 with 10 to 45 classes,
  NWPU-RESISC45 at 16 bits apart): the first C rows of H_L (C <= L) or of [H_L; -H_L] (C <= 2L),
  H_L the Sylvester-Hadamard matrix, as CSQ's hash centres (Yuan et al., CVPR 2020): the same rows,
  from baselines/csq.py's `hadamard_centres`. Any two rows of H_L differ in L/2 bits, a row and its negation in L: the
  minimum distance is L/2, the most possible once C > L/2 + 1 (Plotkin's bound on the mean
  distance, L C / (2 (C - 1)); digits at 64 bits: 32 where 35 would be allowed).
* otherwise (2L < C, or L not a power of two): a seeded (--seed) greedy farthest-point choice from
  a pool of words (all 2^L words when L <= 16, else 2^16 random ones): each codeword the word
  farthest, in minimum Hamming distance, from those chosen so far. Minimum distances it reaches:
  6 for 45 classes at 16 bits (Plotkin allows 8), 4 for 45 at 12, 5 for 100 at 16, 12 for 100 at
  32, 20 for 45 at 48, whatever the seed of 0-2; `min_distance` holds the run's.
  More classes than 2^L words is refused. (CSQ's fallback, the authors' balanced random rows, stays
  CSQ's: balanced rows are an even distance apart, 4 at best for 45 classes at 16 bits.)

Why codewords and not their one-hot code: one-hot needs L = C bits (their code has no L: 10 bits
for CIFAR-10), so it cannot fill the table's L bits (16 bits with 21 to 45 classes), and two one-hot
codes differ in 2 bits only. With the codewords of C <= L all other classes sit at one distance
L/2, as with one-hot (where it is 2): the ranking is theirs, same predicted class first, the rest
tied. The distance itself changes no ranking of exact codewords; it keeps the code's classes
apart under a Hamming radius (the precision-recall curves) and is the choice CSQ's authors make
for the same problem.

Deviations from their code:
* their queries are not binarised: a query's class probabilities p_q score a database image j by
  p_q[class of j] (an asymmetric search: the database ranked class by class in the order of the
  query's probabilities); ours codes the query like the database (Hamming ranking of binary codes
  is what the table compares), so all classes other than the predicted one tie;
* their database images with known labels are coded by the true label (`getmAP` overwrites those
  rows); our database is the train split, whose labels are all known, so that rule would code it
  by its labels; we code every image by the network's prediction, as every other method codes the
  database with the trained network;
* their classifier is sklearn's LogisticRegression with C chosen on val mAP (2^-5 ... 2^12); ours is
  FC1 + FC2 on the trunk, trained with the harness's optimiser (docs/method.md section 5: their code
  has no optimiser to follow), its learning rate chosen on val by the table's --lr-grid;
* the table's batch size and epochs.
"""
import torch
import torch.nn.functional as F

from baselines.csq import hadamard_centres, is_power_of_two
from utils.errors import UserError
from utils.method import Method

POOL_BITS = 16  # the fallback's pool: every word up to 16 bits, 2^16 random words beyond


def farthest_point_codewords(num_classes, bits, seed):
    """num_classes words of `bits` bits (+-1), chosen greedily from a seeded pool: each the word of the
    pool farthest (in minimum Hamming distance) from those already chosen, the first on ties."""
    g = torch.Generator().manual_seed(seed)
    if bits <= POOL_BITS:
        words = torch.randperm(2 ** bits, generator=g)
        pool = ((words.unsqueeze(1) >> torch.arange(bits)) & 1).float() * 2 - 1
    else:
        pool = torch.randint(0, 2, (2 ** POOL_BITS, bits), generator=g).float() * 2 - 1
    chosen = [0]
    nearest = (bits - pool @ pool[0]) / 2  # Hamming distance of every pool word to the nearest chosen
    for _ in range(num_classes - 1):
        k = int(nearest.argmax())
        chosen.append(k)
        nearest = torch.minimum(nearest, (bits - pool @ pool[k]) / 2)
    return pool[chosen]


def class_codewords(num_classes, bits, seed=0):
    """C codewords of L bits as far apart as docs/method.md section 8 says: Hadamard rows when 2L >= C
    and L is a power of two, else the seeded farthest-point choice."""
    if bits < 63 and 2 ** bits < num_classes:
        raise UserError(f"--dim {bits} gives {2 ** bits} distinct codes, fewer than the {num_classes} classes; "
                        f"use --dim {(num_classes - 1).bit_length()} or more")
    if is_power_of_two(bits) and 2 * bits >= num_classes:
        return hadamard_centres(num_classes, bits)
    return farthest_point_codewords(num_classes, bits, seed)


def min_distance(codewords):
    """The smallest Hamming distance between two of the +-1 rows."""
    if len(codewords) < 2:
        return codewords.shape[1]
    d = (codewords.shape[1] - codewords @ codewords.t()) / 2
    return int(d.masked_fill(torch.eye(len(d), dtype=torch.bool), float("inf")).min())


class OneHot(Method):
    """Cross-entropy of the classifier; every image coded by its predicted class's codeword."""

    name = "OneHot"
    head = {"codewords": True}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        num_classes = int(torch.as_tensor(train_labels).max()) + 1 if model is None else model.fc2.out_features
        self.register_buffer("codewords", class_codewords(num_classes, args.dim, args.seed), persistent=False)
        self.min_distance = min_distance(self.codewords)
        if model is not None:
            # The network's buffer: saved in its checkpoints, so retrieval codes with the same words.
            model.codewords.copy_(self.codewords)

    def losses(self, batch):
        ce = F.cross_entropy(batch.logits.float(), batch.label)
        return {"ce": ce, "total": ce}
