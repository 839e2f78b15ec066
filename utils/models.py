"""Hashing network (docs/method.md section 2): a trunk (the paper's torchvision ResNets, or any
timm model: utils/backbones/), FC1 to L bits, FC2 to the classes."""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from utils.backbones import build_backbone


class HashingNet(nn.Module):
    """forward(x) -> (f, e, logits): relaxed codes f = FC1(pool(x)), embedding
    e = f / ||f||, class logits FC2(f). Hash bit k is 1 iff f_k > 0."""

    def __init__(self, arch="resnet18", num_classes=10, dim=128, pretrained=True, in_channels=3, img_size=None):
        super().__init__()
        self.arch = arch
        self.dim = dim
        # img_size matters to the models whose shape depends on it (transformers' position embeddings).
        self.backbone, feature_dim = build_backbone(arch, pretrained, in_channels, img_size)
        self.fc1 = nn.Linear(feature_dim, dim)
        self.fc2 = nn.Linear(dim, num_classes)
        # Kaiming-normal weights (fan_in, gain sqrt(2)); biases keep nn.Linear's default init.
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)

    def forward(self, x):
        f = self.fc1(self.backbone(x))
        e = F.normalize(f.float(), dim=1)  # unit norm in float32, also under autocast
        return f, e, self.fc2(f)


@dataclass(frozen=True)
class ModelSettings:
    """The network a run trains: backbone `arch` (--model), `dim` bits (--dim), at img_size
    (--img-size), starting from `pretrained` (True: the backbone's pretrained weights, False:
    random, or a --weights file / torchgeo:ENUM)."""

    arch: str
    dim: int
    img_size: int
    pretrained: bool | str = True


def network_for(model, num_classes, in_channels, pretrained=None):
    """The HashingNet of ModelSettings `model`, its trunk taking `in_channels` (the input spec's);
    pretrained overrides model.pretrained (a resumed run loads its own weights: False)."""
    return HashingNet(model.arch, num_classes, model.dim, model.pretrained if pretrained is None else pretrained,
                      in_channels, img_size=model.img_size)
