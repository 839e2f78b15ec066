"""Multi-band input (e.g. EuroSAT's 13-band Sentinel-2 GeoTIFFs): reading, per-band statistics
and the transforms (docs/method.md, section 1)."""
import os

import torch
from PIL import Image

from utils.data.image_files import broken_image as _broken
from utils.data.image_files import is_tiff as _is_tiff
from utils.data.image_files import unreadable
from utils.errors import UserError

MULTIBAND_FIX = ("--bands other than 3 reads multi-band .tif files: pass --bands 3 for RGB images, "
                 "or point --imgEXT/--dataset at the multi-band .tif files")


def _band_count(shape, bands):
    """Bands of an H x W (1), H x W x C or C x H x W array (C: the axis that matches `bands`,
    else the shorter end one), else None."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        return bands if bands in (shape[0], shape[-1]) else min(shape[0], shape[-1])
    return None


def read_multiband(path, bands):
    """A multi-band image (e.g. EuroSAT's 13-band Sentinel-2 GeoTIFF) as a float tensor C x H x W."""
    import numpy as np
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as err:  # noqa: BLE001 - sorted out below: wrong kind of file, or a damaged one
        raise _multiband_read_error(path, err) from None
    n = _band_count(arr.shape, bands)
    if n != bands:
        if n is None:
            raise unreadable(f"image {path} has array shape {arr.shape}, not {bands} bands "
                             "(H x W x bands or bands x H x W)", MULTIBAND_FIX, broken=False)
        fix = MULTIBAND_FIX if n == 3 else (f"pass --bands {n} if every image has {n}, or point "
                                            f"--imgEXT/--dataset at the {bands}-band .tif files")
        raise unreadable(f"image {path} has {n} band{'s' * (n != 1)} (array shape {arr.shape}), "
                         f"not {bands} bands", fix, broken=False)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.shape[-1] == bands and arr.shape[0] != bands:
        arr = arr.transpose(2, 0, 1)  # H x W x C (the usual GeoTIFF layout) -> C x H x W
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32))


def _multiband_read_error(path, err):
    """A file tifffile cannot read: an image of another kind (PNG, JPEG, ...), a TIFF that needs a
    codec, or a damaged file; only the last is a case for --skip-bad-images."""
    if _is_tiff(path):
        if "imagecodecs" in str(err):
            return unreadable(f"cannot decode the compressed TIFF {path} ({err})",
                              "install the codecs with `pip install imagecodecs`", broken=False)
        return _broken(path, f"{type(err).__name__}: {err}")
    try:
        with Image.open(path) as img:
            kind = img.format
    except Exception:  # noqa: BLE001 - neither a TIFF nor any image Pillow knows: damaged
        kind = None
    if kind is None:
        return _broken(path, f"{type(err).__name__}: {err}")
    return unreadable(f"image {path} is a {kind} image, not a multi-band TIFF", MULTIBAND_FIX, broken=False)


def band_statistics(dataset):
    """Per-band mean and standard deviation over the pixels of a split (read once; stored with
    the checkpoint so that later runs and evaluation normalise alike)."""
    from tqdm import tqdm

    if not dataset.samples:
        raise UserError(f"the {dataset.split} split of {os.path.join(dataset.root, dataset.dataset)} has no "
                        f"images, so there are no band statistics to compute; check --data, --dataset and --imgEXT")
    total = total_sq = None
    count = 0
    for path, _ in tqdm(dataset.samples, desc="band statistics", leave=False):
        x = read_multiband(path, dataset.bands).double().flatten(1)
        total = x.sum(1) if total is None else total + x.sum(1)
        total_sq = x.square().sum(1) if total_sq is None else total_sq + x.square().sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp(min=0).sqrt().clamp(min=1e-6)
    return mean.tolist(), std.tolist()
