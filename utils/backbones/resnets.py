"""The paper's trunks: torchvision's ResNet-18 and ResNet-50 with the ImageNet V1 weights the
published code used (torchvision's ResNet-50 "DEFAULT" is V2), up to global average pooling."""
import urllib.error

import torch
import torch.nn as nn
import torchvision

from utils.backbones.weight_files import check_keys
from utils.errors import UserError

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


def build_resnet(arch, pretrained=True, state=None, source=None, in_channels=3):
    """torchvision's `arch` without its classifier; returns (module, feature_dim). pretrained True:
    the ImageNet V1 weights; state: a state_dict read from `source` (a classifier in it is dropped).
    With in_channels != 3 a state whose first layer takes in_channels bands keeps it; otherwise
    the first convolution is replaced by a new one with that many input channels."""
    builder, _, feature_dim = ARCHS[arch]
    net = builder(weights=None)
    if pretrained is True:
        net.load_state_dict(_download_imagenet_weights(arch))
    keeps_first = state is not None and in_channels != 3 and _first_layer_bands(state) == in_channels
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier is dropped
        if keeps_first:
            net.conv1 = _new_conv1(net.conv1, in_channels)  # replaced by the file's own below
        elif _first_layer_bands(state) not in (None, 3):
            raise UserError(f"the first layer (conv1) of weights {source} takes {_first_layer_bands(state)} "
                            f"input bands, this run {in_channels}; pass --bands {_first_layer_bands(state)}, "
                            "or weights of a 3-band first layer")
        check_keys(state, net, arch, source, ignore=("fc.",))
        net.load_state_dict(state, strict=False)
    if in_channels != 3 and not keeps_first:
        net.conv1 = _new_conv1(net.conv1, in_channels)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    net.fc = nn.Identity()  # keep conv trunk + global average pool + flatten
    return net, feature_dim


def _first_layer_bands(state):
    w = state.get("conv1.weight")
    return int(w.shape[1]) if w is not None and w.ndim == 4 else None


def _new_conv1(old, in_channels):
    return nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
