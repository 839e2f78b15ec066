"""CDNE(MU): deep hashing with a memory unit filled by a momentum key encoder.

    python train/main.py --dataset UCMerced --dim 64
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import distributed as dist  # noqa: E402
from utils.cdne import CDNE  # noqa: E402
from utils.memory import MemoryUnit  # noqa: E402
from utils.training.trainer import run  # noqa: E402


class MemoryUnitCDNE(CDNE):
    """The memory's rows are replaced by a key encoder's embeddings of the same augmented
    images; the key encoder is an exponential moving average of the network's parameters
    (not its buffers), as in MoCo (docs/method.md section 3)."""

    name = "MU"

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.memory = MemoryUnit(len(train_labels), args.dim, args.temperature)
        self.key_encoder = copy.deepcopy(model)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)

    @staticmethod
    def add_arguments(parser):
        CDNE.add_arguments(parser)
        parser.add_argument("--key-momentum", type=float, default=0.999,
                            help="the key encoder follows theta_key <- m theta_key + (1 - m) theta")

    @torch.no_grad()
    def memory_targets(self, batch):
        """Key embeddings of the global batch, in gathered order, with shuffled BN: the batch
        is permuted across all ranks before encoding so that BatchNorm statistics cannot
        tell the key encoder which sample is which."""
        self.key_encoder.eval()
        for m in self.key_encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()  # batch statistics, running stats updated
        img = batch.img
        sizes = dist.all_gather(torch.tensor([len(img)], device=img.device)).tolist()
        x_all = batch.gather("img")
        perm = dist.broadcast(torch.randperm(len(x_all), device=img.device))
        start = sum(sizes[:dist.rank()])
        with batch.autocast():
            _, k, _ = self.key_encoder(x_all[perm][start:start + len(img)])
        k_all = dist.all_gather(k.float())
        return k_all[torch.argsort(perm)]

    @torch.no_grad()
    def after_step(self, model):
        m = self.args.key_momentum
        for pk, pq in zip(self.key_encoder.parameters(), model.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)


if __name__ == "__main__":
    sys.exit(run(MemoryUnitCDNE, "Train CDNE(MU): class-discriminated neighbourhood embedding with a memory "
                                 "unit and a momentum key encoder.", script="train/main.py"))
