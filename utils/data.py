"""Scene datasets in class folders, the SPEC section-1 split, and the transforms."""
import os
import random

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .errors import UserError

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_classes(folder):
    """Class names: the sub-folders, sorted by name (label = position)."""
    if not os.path.isdir(folder):
        raise UserError(f"dataset folder {folder} does not exist; put the dataset there as "
                        "<data>/<dataset>/<class>/<image> or pass --data/--dataset")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise UserError(f"dataset folder {folder} has no class folders; expected <class name>/<image> inside it")
    return classes


def list_images(class_dir, ext):
    """Files directly in the class folder whose name ends in .<ext> (any case), sorted by full path."""
    suffix = "." + ext.lower().lstrip(".")
    return sorted(os.path.join(class_dir, f.name) for f in os.scandir(class_dir)
                  if f.is_file() and f.name.lower().endswith(suffix))


def split_files(files, split, seed=42):
    """The per-class split: shuffle with Python's random after random.seed(seed), then
    70% train, 10% val, 20% test, boundaries int(0.7 n) and int(0.8 n) in floating point."""
    files = list(files)
    random.Random(seed).shuffle(files)  # = random.seed(seed); random.shuffle(files), without the global side effect
    n = len(files)
    a, b = int(0.7 * n), int(0.8 * n)
    return {"train": files[:a], "val": files[a:b], "test": files[b:]}[split]


def _found_extensions(class_dirs):
    exts = set()
    for d in class_dirs:
        exts.update(os.path.splitext(f.name)[1].lower() for f in os.scandir(d) if f.is_file())
    return ", ".join(sorted(e for e in exts if e)) or "none"


def read_rgb(path):
    """An image file as an 8-bit RGB Pillow image."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb8(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({err}); replace or remove the file, "
                        "or pass --skip-bad-images to leave unreadable files out") from None


def to_rgb8(img):
    """Grayscale, palette, RGBA and 16-bit images as 8-bit RGB.

    16-bit images are scaled from 0..65535 to 0..255 (Pillow's own conversion would clip at
    255). 32-bit integer images ("I") are read the same way when they hold values above 255,
    and as 8-bit values otherwise.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max() > 255:
            arr = arr / 65535.0 * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def read_image(path, bands=3):
    """An 8-bit RGB Pillow image (bands == 3), else a float C x H x W tensor of the bands."""
    return read_rgb(path) if bands == 3 else read_multiband(path, bands)


class SceneDataset(Dataset):
    """One split of <root>/<dataset>/<class>/<image>.<ext>.

    Item i is {"img", "label", "idx": i}; idx is the memory row the sample owns.
    """

    def __init__(self, root, dataset, split, ext="tif", transform=None, bands=3):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = os.path.join(root, dataset)
        self.root, self.dataset, self.split, self.ext = root, dataset, split, ext
        self.classes = list_classes(folder)
        class_dirs = [os.path.join(folder, c) for c in self.classes]
        self.samples = []
        for label, class_dir in enumerate(class_dirs):
            files = list_images(class_dir, ext)
            if not files:
                raise UserError(
                    f"class folder {class_dir} has no .{ext} files (extensions found in the dataset: "
                    f"{_found_extensions(class_dirs)}); pass the right one with --imgEXT")
            if int(0.7 * len(files)) == 0:
                raise UserError(f"class folder {class_dir} has only {len(files)} .{ext} file(s), too few for a "
                                "non-empty train split; it needs at least 2")
            self.samples += [(path, label) for path in split_files(files, split)]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.transform = transform
        self.bands = bands

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = read_image(path, self.bands)
        if self.transform is not None:
            img = self.transform(img)
        return {"img": img, "label": label, "idx": i}


def train_transform(size=256):
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size=256):
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def remove_unreadable(datasets):
    """Drop the samples whose image cannot be read from each dataset, in place
    (for --skip-bad-images); returns the unreadable paths. Indices are re-numbered,
    so memory rows still run 0..N-1."""
    from tqdm import tqdm

    paths = sorted({path for ds in datasets for path, _ in ds.samples})
    bad = set()
    for path in tqdm(paths, desc="checking images", leave=False):
        try:
            read_image(path, datasets[0].bands)
        except UserError:
            bad.add(path)
    for ds in datasets:
        ds.samples = [(p, y) for p, y in ds.samples if p not in bad]
        ds.labels = torch.tensor([y for _, y in ds.samples], dtype=torch.long)
    return sorted(bad)


# ----------------------------------------------------------------------------- multispectral

def read_multiband(path, bands):
    """A multi-band image (e.g. EuroSAT's 13-band Sentinel-2 GeoTIFF) as a float tensor C x H x W."""
    import numpy as np
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); replace or remove the file, "
                        "or pass --skip-bad-images to leave unreadable files out") from None
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] == bands and arr.shape[0] != bands:
        arr = arr.transpose(2, 0, 1)  # H x W x C (the usual GeoTIFF layout) -> C x H x W
    if arr.ndim != 3 or arr.shape[0] != bands:
        raise UserError(f"image {path} has shape {arr.shape}, not {bands} bands; pass the right --bands")
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32))


def band_statistics(dataset):
    """Per-band mean and standard deviation over the pixels of a split (read once; stored with
    the checkpoint so that later runs and evaluation normalise alike)."""
    from tqdm import tqdm

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


def multiband_train_transform(size, mean, std):
    """Multispectral training: resize (antialiased), horizontal flip, per-band normalisation.
    The colour augmentations of the RGB pipeline have no meaning for 13 bands and are left out."""
    return transforms.Compose([
        transforms.Resize((size, size), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.Normalize(mean, std),
    ])


def multiband_eval_transform(size, mean, std):
    return transforms.Compose([
        transforms.Resize((size, size), antialias=True),
        transforms.Normalize(mean, std),
    ])
