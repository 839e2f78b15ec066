"""Hashing network (docs/method.md section 2): a ResNet trunk, FC1 to L bits, FC2 to the classes."""
import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .errors import UserError

# Both backbones use the V1 ImageNet weights, as the published code did
# (torchvision's ResNet-50 "DEFAULT" is V2).
ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048),
}
# Where the weights come from; a table so that tests can point it at a local server.
WEIGHT_URLS = {name: weights.url for name, (_, weights, _) in ARCHS.items()}


def _download_imagenet_weights(arch):
    url = WEIGHT_URLS[arch]
    try:
        # check_hash verifies the sha256 prefix that torchvision puts in the file name.
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, map_location="cpu")
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise UserError(
            f"could not download the ImageNet weights for {arch} from {url} ({err}); on a machine without "
            "network, train from scratch with --no-pretrained, or pass a local torchvision state_dict "
            "with --weights PATH") from None


def load_backbone_state(path):
    """A torchvision ResNet state_dict saved with torch.save (weights only)."""
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist; pass a torchvision ResNet state_dict saved with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise UserError(f"could not read weights file {path} ({type(err).__name__}); "
                        "pass a torchvision ResNet state_dict saved with torch.save") from None
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} is not a state_dict; pass a torchvision ResNet state_dict")
    return state


def build_backbone(arch="resnet18", pretrained=True, in_channels=3):
    """ResNet up to global average pooling, flattened; returns (module, feature_dim).

    With in_channels != 3 (multispectral input) the first convolution is replaced by a
    new one with that many input channels; the rest keeps its (pretrained) weights.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    builder, _, feature_dim = ARCHS[arch]
    net = builder(weights=None)
    if pretrained is True:
        net.load_state_dict(_download_imagenet_weights(arch))
    elif pretrained:  # a path to a torchvision state_dict
        state = load_backbone_state(pretrained)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier is dropped
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError:  # shapes differ: another architecture
            missing, unexpected = ["(shape mismatch)"], []
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise UserError(f"weights file {pretrained} does not fit {arch} "
                            f"({len(missing)} missing, {len(unexpected)} unexpected keys); pass a {arch} state_dict")
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    net.fc = nn.Identity()  # keep conv trunk + global average pool + flatten
    return net, feature_dim


class HashingNet(nn.Module):
    """forward(x) -> (f, e, logits): relaxed codes f = FC1(pool(x)), embedding
    e = f / ||f||, class logits FC2(f). Hash bit k is 1 iff f_k > 0."""

    def __init__(self, arch="resnet18", num_classes=10, dim=128, pretrained=True, in_channels=3):
        super().__init__()
        self.arch = arch
        self.dim = dim
        self.backbone, feature_dim = build_backbone(arch, pretrained, in_channels)
        self.fc1 = nn.Linear(feature_dim, dim)
        self.fc2 = nn.Linear(dim, num_classes)
        # Kaiming-normal weights (fan_in, gain sqrt(2)); biases keep nn.Linear's default init.
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)

    def forward(self, x):
        f = self.fc1(self.backbone(x))
        e = F.normalize(f.float(), dim=1)  # unit norm in float32, also under autocast
        return f, e, self.fc2(f)

