"""Hashing network (docs/method.md section 2): a trunk (the paper's torchvision ResNets, or any
timm model: utils/backbones/), FC1 to L bits, FC2 to the classes."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.backbones import build_backbone

# The head options a method may ask for (utils/method.py Method.head; docs/method.md section 5), with
# the values that give the paper's head: FC1 and FC2 with biases, Kaiming-normal weights, no BatchNorm,
# no codewords.
HEAD_DEFAULTS = {"fc1_bias": True, "fc1_bn": False, "fc1_init": "kaiming", "fc2_bias": True, "codewords": False}


def head_options(head):
    """Every option of a head dict (None: the paper's head) with the defaults filled in."""
    head = dict(head or {})
    unknown = sorted(set(head) - set(HEAD_DEFAULTS))
    if unknown:  # a method's class attribute: a programming error, not a user's
        raise ValueError(f"unknown head option(s) {unknown}; known: {sorted(HEAD_DEFAULTS)}")
    head = {**HEAD_DEFAULTS, **head}
    init = head["fc1_init"]
    if not (init == "kaiming" or (isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0)):
        raise ValueError(f"head fc1_init must be 'kaiming' or a positive std, got {init!r}")
    return head


class HashingNet(nn.Module):
    """forward(x) -> (f, e, logits): relaxed codes f = FC1(pool(x)), embedding
    e = f / ||f||, class logits FC2(f). Hash bit k is 1 iff f_k > 0.

    `head` (a method's Method.head, recorded in the checkpoint's config["head"]) changes the head:
    fc1_bias / fc2_bias False drop a bias, fc1_init a float std draws FC1's weights from N(0, std^2)
    with a zero bias, fc1_bn puts BatchNorm1d(L) after FC1 (f = BN(FC1(x))), and codewords holds a
    buffer `codewords` (classes x L, +-1, zeros until the method fills it): in eval mode f is then the
    codeword of the predicted class, argmax FC2(FC1(x)). None: the paper's head, exactly (the same
    modules, initial draws and state_dict keys)."""

    def __init__(self, arch="resnet18", num_classes=10, dim=128, pretrained=True, in_channels=3, img_size=None,
                 head=None):
        super().__init__()
        self.arch = arch
        self.dim = dim
        h = head_options(head)
        # img_size matters to the models whose shape depends on it (transformers' position embeddings).
        self.backbone, feature_dim = build_backbone(arch, pretrained, in_channels, img_size)
        self.fc1 = nn.Linear(feature_dim, dim, bias=h["fc1_bias"])
        # No parameters unless asked for: the paper's state_dict keys stay what old checkpoints hold.
        self.fc1_bn = nn.BatchNorm1d(dim) if h["fc1_bn"] else None
        self.fc2 = nn.Linear(dim, num_classes, bias=h["fc2_bias"])
        if h["codewords"]:
            self.register_buffer("codewords", torch.zeros(num_classes, dim))
        else:
            self.codewords = None
        # Kaiming-normal weights (fan_in, gain sqrt(2)); biases keep nn.Linear's default init. The
        # draws come in this order whatever the options, so that the paper's head is drawn as before.
        if h["fc1_init"] == "kaiming":
            nn.init.kaiming_normal_(self.fc1.weight)
        else:  # the authors' N(0, std^2) weights and zero bias (e.g. OrthoHash's std 0.01)
            nn.init.normal_(self.fc1.weight, std=float(h["fc1_init"]))
            if self.fc1.bias is not None:
                nn.init.zeros_(self.fc1.bias)
        nn.init.kaiming_normal_(self.fc2.weight)

    def forward(self, x):
        f = self.fc1(self.backbone(x))
        if self.fc1_bn is not None:
            f = self.fc1_bn(f)
        # e before the logits, as the paper's network has always computed them: autograd sums the
        # gradients that reach f in the order of its uses, so another order moves the last digits.
        e = F.normalize(f.float(), dim=1)  # unit norm in float32, also under autocast
        logits = self.fc2(f)
        if self.codewords is not None and not self.training:
            # The classifier baseline: each image coded by its predicted class's codeword.
            f = self.codewords[logits.argmax(dim=1)].to(f.dtype)
            e = F.normalize(f.float(), dim=1)
        return f, e, logits


@dataclass(frozen=True)
class ModelSettings:
    """The network a run trains: backbone `arch` (--model), `dim` bits (--dim), at img_size
    (--img-size), starting from `pretrained` (True: the backbone's pretrained weights, False:
    random, or a --weights file / torchgeo:ENUM)."""

    arch: str
    dim: int
    img_size: int
    pretrained: bool | str = True
    head: dict | None = None  # the method's head options (HashingNet; None: the paper's head)


def network_for(model, num_classes, in_channels, pretrained=None):
    """The HashingNet of ModelSettings `model`, its trunk taking `in_channels` (the input spec's);
    pretrained overrides model.pretrained (a resumed run loads its own weights: False)."""
    return HashingNet(model.arch, num_classes, model.dim, model.pretrained if pretrained is None else pretrained,
                      in_channels, img_size=model.img_size, head=model.head)
