"""Hashing network (docs/method.md section 2): a trunk (the paper's torchvision ResNets, or any
timm model: utils/backbones.py), FC1 to L bits, FC2 to the classes."""
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .backbones import build_timm, check_keys, read_state_dict
from .errors import UserError
from .weights import download_torchgeo, is_torchgeo

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
    """A state_dict file (torch.save or .safetensors) as a dict of tensors."""
    return read_state_dict(path)


def build_backbone(arch="resnet18", pretrained=True, in_channels=3, img_size=None):
    """The trunk up to global average pooling, flattened; returns (module, feature_dim).

    arch: resnet18 / resnet50 (torchvision, the paper's) or any timm model name.
    pretrained: True (ImageNet V1 weights for the ResNets, timm's default tag otherwise), False
    (random), a state_dict file (torch.save or .safetensors, timm's or torchvision's key names;
    a classifier in it is dropped), or "torchgeo:ENUM" (utils/weights.py).
    With in_channels != 3 a file whose first layer takes in_channels bands keeps it; otherwise
    the ResNets' first convolution is replaced by a new one with that many input channels.
    """
    state, source = None, None
    if isinstance(pretrained, str):
        source = pretrained
        state = download_torchgeo(pretrained) if is_torchgeo(pretrained) else load_backbone_state(pretrained)
    if arch not in ARCHS:
        return build_timm(arch, pretrained is True, state, source, in_channels, img_size)
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



def network_for(args, splits, pretrained):
    """The HashingNet of a run: --model and --dim, a trunk taking the channels the splits feed
    it (splits.input, utils/weights.py) at --img-size."""
    spec = getattr(splits, "input", None) or {}
    return HashingNet(args.model, len(splits.classes), args.dim, pretrained, spec.get("channels", args.bands),
                      img_size=args.img_size)
