"""CDNE(MB): deep hashing with a memory bank of the network's own embeddings.

    python train_MB/main.py --dataset UCMerced --dim 64
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.engine import Variant, build_parser, run  # noqa: E402
from utils.memory import MemoryBank  # noqa: E402


class MemoryBankVariant(Variant):
    """Rows are momentum averages of the embeddings: M[i] <- normalize(mu M[i] + (1 - mu) e_i)."""

    name = "MB"

    def __init__(self, args, model, num_samples):
        super().__init__(args, model, num_samples)
        self.memory = MemoryBank(num_samples, args.dim, args.temperature, args.memory_momentum)

    def start_epoch(self, epoch):
        # The published schedule: the flag's momentum, then fixed 0.8 from epoch 80 and 0.9 from epoch 120.
        if epoch >= 120:
            self.memory.momentum = 0.9
        elif epoch >= 80:
            self.memory.momentum = 0.8
        else:
            self.memory.momentum = self.args.memory_momentum


def parser():
    p = build_parser("Train CDNE(MB): class-discriminated neighbourhood embedding with a memory bank.")
    p.add_argument("--memory-momentum", "--m-mementum", dest="memory_momentum", type=float, default=0.5,
                   help="momentum mu of the memory bank for epochs 0-79")
    return p


if __name__ == "__main__":
    sys.exit(run(MemoryBankVariant, parser()))
