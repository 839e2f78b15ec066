"""What the hashing network is built on: a trunk by name, its weights, and the input it expects.

    resnets.py           the paper's torchvision ResNet-18/50 (ImageNet V1 weights)
    timm_models.py       any other --model: a timm trunk by name, its pretrained normalisation
    weight_files.py      state_dict files (torch.save, safetensors) and the check that they fit
    torchgeo_weights.py  torchgeo's Sentinel-2 weights: registry, download, band order, scaling
    input_spec.py        InputSpec: the bands, their order and normalisation a run's network sees

`build_backbone` is the one door to every trunk. Nothing here imports the data pipeline: the
input spec says what the network sees, and the data package is given it as plain values.
"""
from utils.backbones.resnets import ARCHS, build_resnet
from utils.backbones.timm_models import build_timm
from utils.backbones.torchgeo_weights import download_torchgeo, is_torchgeo
from utils.backbones.weight_files import read_state_dict


def build_backbone(arch="resnet18", pretrained=True, in_channels=3, img_size=None):
    """The trunk up to global average pooling, flattened; returns (module, feature_dim).

    arch: resnet18 / resnet50 (torchvision, the paper's) or any timm model name.
    pretrained: True (ImageNet V1 weights for the ResNets, timm's default tag otherwise), False
    (random), a state_dict file (torch.save or .safetensors, timm's or torchvision's key names;
    a classifier in it is dropped), or "torchgeo:ENUM" (torchgeo_weights.py).
    With in_channels != 3 a file whose first layer takes in_channels bands keeps it; otherwise
    the first convolution is replaced by a new one with that many input channels.
    img_size matters to the models whose shape depends on it (transformers' position embeddings).
    """
    state, source = None, None
    if isinstance(pretrained, str):
        source = pretrained
        state = download_torchgeo(pretrained) if is_torchgeo(pretrained) else read_state_dict(pretrained)
    if arch not in ARCHS:
        return build_timm(arch, pretrained is True, state, source, in_channels, img_size)
    return build_resnet(arch, pretrained is True, state, source, in_channels)
