"""DHCNN: deep hashing convolutional neural network (Song, Li and Benediktsson, "Deep hashing
learning for visual and semantic retrieval of remote sensing images", IEEE TGRS 2021), as
defined in docs/method.md."""
import torch.nn.functional as F

from utils.method import Method

from .dpsh import pairwise_loss, quantization_loss


class DHCNN(Method):
    """DPSH's pairwise likelihood within the (global) batch + w_c * cross-entropy of the classifier FC2
    on u + eta * DPSH's quantisation loss. Keeps no state."""

    name = "DHCNN"

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.ce_weight = float(args.ce_weight)
        self.eta = float(args.eta)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--ce-weight", dest="ce_weight", type=float, default=1.0,
                            help="weight w_c of the classification (cross-entropy) loss")
        parser.add_argument("--eta", type=float, default=0.1, help="weight of the quantisation loss")

    def losses(self, batch):
        # Every term over the whole global batch (the same on every rank under DDP): all pairs
        # (i, j), i = j included (s_ii = 1), so the pairwise mean is over N^2 terms.
        u, label = batch.gather_with_grad("f").float(), batch.gather("label")
        s = (label.unsqueeze(1) == label.unsqueeze(0)).float()
        terms = {"pairwise": pairwise_loss(u, u, s),
                 "ce": F.cross_entropy(batch.gather_with_grad("logits").float(), label),
                 "quant": quantization_loss(u)}
        terms["total"] = terms["pairwise"] + self.ce_weight * terms["ce"] + self.eta * terms["quant"]
        return terms
