"""What an image goes through before the network: resize, the training augmentations, and the
normalisation of the input spec (docs/method.md section 1; utils/backbones/input_spec.py says
which bands, in which order, and their mean and std)."""
import torch
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """mean/std: the backbone's pretrained normalisation (the input spec)."""
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class SelectBands(torch.nn.Module):
    """The file's bands at `order`, in that order (the order pretrained weights expect)."""

    def __init__(self, order):
        super().__init__()
        self.order = list(order)

    def forward(self, x):
        return x[self.order]


def multiband_train_transform(size, mean, std, band_order=None):
    """Multispectral training: resize (antialiased), horizontal flip, per-band normalisation.
    The colour augmentations of the RGB pipeline have no meaning for 13 bands and are left out.
    band_order: the file bands the network takes, in its order (None: all, as read); mean/std
    are then per selected band (e.g. the weights' own scaling)."""
    select = [SelectBands(band_order)] if band_order is not None else []
    return transforms.Compose(select + [
        transforms.Resize((size, size), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.Normalize(mean, std),
    ])


def multiband_eval_transform(size, mean, std, band_order=None):
    select = [SelectBands(band_order)] if band_order is not None else []
    return transforms.Compose(select + [
        transforms.Resize((size, size), antialias=True),
        transforms.Normalize(mean, std),
    ])


def transforms_for(size, bands, mean=None, std=None, band_order=None):
    """(train, eval) transforms at size x size. RGB (bands 3): normalised with mean/std, ImageNet's
    when None. Multi-band: the file bands at band_order (None: all, as read), normalised per band
    with mean/std (the weights' own scaling, or the train split's band statistics)."""
    if bands == 3:
        mean, std = (mean, std) if mean is not None else (IMAGENET_MEAN, IMAGENET_STD)
        return train_transform(size, mean, std), eval_transform(size, mean, std)
    return (multiband_train_transform(size, mean, std, band_order),
            multiband_eval_transform(size, mean, std, band_order))


def eval_transform_for(config):
    """The eval transform of a checkpoint's config: its recorded input (bands, order, normalisation);
    checkpoints from before it was recorded: ImageNet's for RGB, the band statistics otherwise."""
    spec, bands = config.get("input") or {}, config.get("in_channels", 3)
    if bands == 3 or spec.get("mean") is not None:
        mean, std, order = spec.get("mean"), spec.get("std"), spec.get("band_order") if bands != 3 else None
    else:
        mean, std, order = config["band_mean"], config["band_std"], None
    return transforms_for(config["img_size"], bands, mean, std, order)[1]
