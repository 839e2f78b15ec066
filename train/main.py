"""CDNE(MU): deep hashing with a memory unit filled by a momentum key encoder.

    python train/main.py --dataset UCMerced --dim 64
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import distributed as dist  # noqa: E402
from utils.engine import Variant, build_parser, run  # noqa: E402
from utils.memory import MemoryUnit  # noqa: E402

KEY_MOMENTUM = 0.999


class MemoryUnitVariant(Variant):
    """Rows are replaced by a key encoder's embeddings; the key encoder is an
    exponential moving average of the network (parameters only), as in MoCo."""

    name = "MU"

    def __init__(self, args, model, num_samples):
        super().__init__(args, model, num_samples)
        self.memory = MemoryUnit(num_samples, args.dim, args.temperature)
        self.key_encoder = copy.deepcopy(model)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def keys(self, img):
        """Key embeddings of the global batch, in gathered order, with shuffled BN:
        the batch is permuted (across all ranks) before encoding so that BatchNorm
        statistics do not leak which sample is which."""
        self.key_encoder.eval()
        for m in self.key_encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()  # batch statistics, running stats updated
        sizes = dist.all_gather(torch.tensor([len(img)], device=img.device)).tolist()
        x_all = dist.all_gather(img)
        perm = dist.broadcast(torch.randperm(len(x_all), device=img.device))
        start = sum(sizes[:dist.rank()])
        _, k, _ = self.key_encoder(x_all[perm][start:start + len(img)])
        k_all = dist.all_gather(k.float())
        return k_all[torch.argsort(perm)]

    @torch.no_grad()
    def after_step(self, model):
        for pk, pq in zip(self.key_encoder.parameters(), model.parameters()):
            pk.mul_(KEY_MOMENTUM).add_(pq.detach(), alpha=1 - KEY_MOMENTUM)

    def state_dict(self):
        return {"memory": self.memory.state_dict(), "key_encoder": self.key_encoder.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])
        self.key_encoder.load_state_dict(state["key_encoder"])


def parser():
    return build_parser("Train CDNE(MU): class-discriminated neighbourhood embedding with a memory unit "
                        "and a momentum key encoder.")


if __name__ == "__main__":
    sys.exit(run(MemoryUnitVariant, parser()))
