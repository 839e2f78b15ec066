"""What CDNE(MU) and CDNE(MB) share: the three loss terms and the memory they are scored
against (docs/method.md sections 3 and 4). The variants differ only in what writes the
memory's rows: train/main.py (a key encoder) and train_MB/main.py (the network itself).
"""
import torch.nn.functional as F

from utils.losses import CDNELoss, QuantizationLoss, chunked_cdne_loss, use_chunked_loss
from utils.method import Method


class CDNE(Method):
    """L = lambda L_cdne(e, memory) + w_ce CE(logits, y) + w_q mean (|f| - 1)^2.
    Subclasses create `self.memory` and say what its rows are replaced or mixed with."""

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.cdne = CDNELoss(train_labels, args.margin, args.temperature)
        self.quant = QuantizationLoss()

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--temperature", type=float, default=0.05, help="T of the memory scores")
        parser.add_argument("--margin", type=float, default=0.0, help="m of the CDNE loss")
        parser.add_argument("--lambda_", type=float, default=1.0, help="weight of the CDNE loss")
        parser.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy term")
        parser.add_argument("--quant-weight", type=float, default=1.0, help="weight of the quantisation term")

    def cdne_loss(self, e, idx):
        rows = self.memory.rows
        if use_chunked_loss(e.shape[0], rows.shape[0]):  # no B x N temporaries for large memories
            return chunked_cdne_loss(e, rows, self.cdne.labels, idx, self.args.temperature, self.args.margin)
        return self.cdne(self.memory(e), idx)

    def losses(self, batch):
        terms = {"cdne": self.cdne_loss(batch.e, batch.idx), "ce": F.cross_entropy(batch.logits, batch.label),
                 "quant": self.quant(batch.f)}
        a = self.args
        terms["total"] = a.lambda_ * terms["cdne"] + a.ce_weight * terms["ce"] + a.quant_weight * terms["quant"]
        return terms

    def memory_targets(self, batch):
        """What the global batch's memory rows are updated with."""
        raise NotImplementedError

    def after_backward(self, batch):
        # Every rank updates from the whole global batch, so the memories stay identical.
        self.memory.update(self.memory_targets(batch), batch.gather("idx"))

    def synced_buffers(self):
        return [self.memory.rows]
