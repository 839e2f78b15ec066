"""What the network sees, resolved once from the backbone, its weights, the bands read and the
dataset (as timm's resolve_data_config turns a model's config into input settings): which file
bands in which order, how many channels, and the per-channel normalisation.

The data pipeline is given it as plain values; every checkpoint records it (config["input"]),
so retrieval reads images the way training did.
"""
from dataclasses import asdict, dataclass

from utils import distributed as dist
from utils.backbones.timm_models import TORCHVISION_NAMES, normalization
from utils.backbones.torchgeo_weights import band_order, is_torchgeo, scaling, torchgeo_entry
from utils.errors import UserError


@dataclass(frozen=True)
class InputSpec:
    """source: where the normalisation comes from ("imagenet", "timm:NAME", "torchgeo:ENUM" or
    "band statistics"); band_order: the file bands the network takes, in its order (None: all,
    as read); channels: how many it takes; mean/std: per channel (None for multi-band input
    without weights of its own: the train split's band statistics are used)."""

    source: str
    band_order: list | None
    channels: int
    mean: list | None
    std: list | None

    def as_dict(self):
        """The record of checkpoints and results (config["input"])."""
        return asdict(self)


def resolve_input(model, weights, bands, dataset):
    """The InputSpec of a run of backbone `model` (resnet18, resnet50 or a timm name) started from
    `weights` (None, a file, or torchgeo:ENUM), reading `bands` bands of `dataset`'s files."""
    if is_torchgeo(weights):
        name, entry = torchgeo_entry(weights)
        if model != entry["arch"]:
            raise UserError(f"torchgeo:{name} holds {entry['arch']} weights; pass --model {entry['arch']}")
        if bands == 3:
            raise UserError(f"torchgeo:{name} takes Sentinel-2 reflectances ({' '.join(entry['bands'])}), "
                            "not 8-bit RGB images; read the 13-band TIFFs with --bands 13 (e.g. --dataset "
                            "EuroSAT_MS): the weights' bands are picked from them in the weights' order")
        order, note = band_order(dataset, bands, entry["bands"])
        if note and dist.is_main():
            print(note)
        mean, std = scaling(entry["steps"], len(order))
        return InputSpec(f"torchgeo:{name}", order, len(order), mean, std)
    if bands != 3:
        return InputSpec("band statistics", None, bands, None, None)
    mean, std = normalization(model)
    source = "imagenet" if model in TORCHVISION_NAMES else f"timm:{model}"
    return InputSpec(source, None, 3, list(mean), list(std))


def model_channels(config):
    """The input channels of a checkpoint's network (fewer than the files' bands where weights take some)."""
    return (config.get("input") or {}).get("channels", config.get("in_channels", 3))
