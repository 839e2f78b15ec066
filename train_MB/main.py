"""CDNE(MB): deep hashing with a memory bank of the network's own embeddings.

    python train_MB/main.py --dataset UCMerced --dim 64
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cdne import CDNE  # noqa: E402
from utils.memory import MemoryBank  # noqa: E402
from utils.training.trainer import run  # noqa: E402


class MemoryBankCDNE(CDNE):
    """Rows are momentum averages of the embeddings, M[i] <- normalize(mu M[i] + (1 - mu) e_i),
    with mu raised at fixed epochs (docs/method.md section 3)."""

    name = "MB"

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.memory = MemoryBank(len(train_labels), args.dim, args.temperature, args.memory_momentum)

    @staticmethod
    def add_arguments(parser):
        CDNE.add_arguments(parser)
        parser.add_argument("--memory-momentum", "--m-mementum", dest="memory_momentum", type=float, default=0.5,
                            help="momentum mu of the memory bank until the first --momentum-epochs epoch")
        parser.add_argument("--momentum-epochs", type=int, nargs="*", default=[80, 120],
                            help="0-based epochs from which mu takes the --momentum-values, in order")
        parser.add_argument("--momentum-values", type=float, nargs="*", default=[0.8, 0.9],
                            help="mu from each of the --momentum-epochs on, whatever --memory-momentum")

    def start_epoch(self, epoch):
        self.memory.momentum = self.args.memory_momentum
        for start, value in zip(self.args.momentum_epochs, self.args.momentum_values):
            if epoch >= start:
                self.memory.momentum = value

    def memory_targets(self, batch):
        return batch.gather("e")


if __name__ == "__main__":
    sys.exit(run(MemoryBankCDNE, "Train CDNE(MB): class-discriminated neighbourhood embedding with a memory bank.",
                 script="train_MB/main.py"))
