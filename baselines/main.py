"""The paper's comparison methods, trained and evaluated like CDNE (same split, flags,
run folder, checkpoints, resume and results.json).

    python baselines/main.py --method dpsh    --dataset UCMerced --dim 64
    python baselines/main.py --method itq     --dataset EuroSAT --dim 32
    torchrun --nproc_per_node=4 baselines/main.py --method dhcnn --dataset NWPU-RESISC45

lsh and itq train nothing: they hash the ImageNet backbone's features (baselines/features.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.csq import CSQ  # noqa: E402
from baselines.dch import DCH  # noqa: E402
from baselines.dhcnn import DHCNN  # noqa: E402
from baselines.dpn import DPN  # noqa: E402
from baselines.dpsh import DPSH  # noqa: E402
from baselines.features import ITQ, LSH, run_features  # noqa: E402
from baselines.greedyhash import GreedyHash  # noqa: E402
from baselines.hashnet import HashNet  # noqa: E402
from baselines.onehot import OneHot  # noqa: E402
from baselines.orthohash import OrthoHash  # noqa: E402
from baselines.triplet import Triplet  # noqa: E402
from utils.training.flags import ArgumentParser  # noqa: E402
from utils.training.trainer import run  # noqa: E402

METHODS = {"lsh": LSH, "itq": ITQ, "dpsh": DPSH, "triplet": Triplet, "dhcnn": DHCNN,
           "csq": CSQ, "orthohash": OrthoHash, "dpn": DPN, "greedyhash": GreedyHash,
           "hashnet": HashNet, "dch": DCH, "onehot": OneHot}
DESCRIPTIONS = {
    "lsh": "CNN+LSH: random projections of ImageNet features (no training)",
    "itq": "CNN+PCA-ITQ: iterative quantisation of PCA-reduced ImageNet features (no training)",
    "dpsh": "DPSH: deep pairwise-supervised hashing",
    "triplet": "Triplet: deep hashing with a triplet loss on hardest negatives",
    "dhcnn": "DHCNN: pairwise loss against a buffer of the train set's codes plus a classifier (authors' code)",
    "csq": "CSQ: central similarity quantisation, BCE to Hadamard class centres (Yuan et al. 2020)",
    "orthohash": "OrthoHash: cosine-margin cross-entropy against a fixed +-1 codebook (Hoe et al. 2021)",
    "dpn": "DPN: deep polarized network, hinge of each bit against class targets (Fan et al. 2020)",
    "greedyhash": "GreedyHash: classifier on straight-through sign codes (Su et al. 2018)",
    "hashnet": "HashNet: weighted pairwise likelihood on tanh(beta u), beta raised by continuation (Cao et al. 2017)",
    "dch": "DCH: weighted Cauchy cross-entropy of the batch's pairs (Cao et al. 2018)",
    "onehot": "Classifier baseline: each image coded by its predicted class's codeword (Sablayrolles et al. 2017)",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pick = ArgumentParser(add_help=False)
    pick.add_argument("--method", choices=sorted(METHODS))
    chosen, _ = pick.parse_known_args(argv)
    if chosen.method is None:
        usage = "python baselines/main.py --method {" + ",".join(METHODS) + "} [flags]"
        print(f"usage: {usage}\n\n" + "\n".join(f"  {k:10s} {v}" for k, v in DESCRIPTIONS.items())
              + "\n\nerror: --method is required; `--method dpsh --help` lists a method's flags", file=sys.stderr)
        return 2

    def add_method_flag(parser):
        parser.add_argument("--method", choices=sorted(METHODS), required=True, help="the comparison method")

    method_cls = METHODS[chosen.method]
    train = run_features if chosen.method in ("lsh", "itq") else None
    return run(method_cls, DESCRIPTIONS[chosen.method], argv, script=f"baselines/main.py --method {chosen.method}",
               add_flags=add_method_flag, train=train)


if __name__ == "__main__":
    sys.exit(main())
