"""Scene datasets in class folders, the per-class split (docs/method.md, section 1), and the transforms."""
import os
import random

import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.data.image_check import check_images
from utils.data.image_files import refuse_multiband, rgb_read_failure
from utils.data.multiband import read_multiband
from utils.data.split_files import classes_of, read_split_file
from utils.errors import UserError

SPLITS = ("train", "val", "test")


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


def _found_extensions(dirs):
    """The file extensions directly in the folders, e.g. [".jpg", ".txt"]."""
    exts = set()
    for d in dirs:
        exts.update(os.path.splitext(f.name)[1].lower() for f in os.scandir(d) if f.is_file())
    return sorted(e for e in exts if e)


def _subdirs(folder):
    return sorted(d.path for d in os.scandir(folder) if d.is_dir())


def _no_images_error(folder, classes, class_dir, ext):
    """The UserError for a class folder without .<ext> files. Unzipping often leaves the dataset one
    level too deep (<data>/AID/AID/<class>/...): the fix is then the folder, not --imgEXT."""
    # Folders such as __MACOSX or .ipynb_checkpoints are not where a dataset's classes are.
    real = [os.path.join(folder, c) for c in classes if not c.startswith((".", "__"))]
    if real and not any(list_images(d, ext) for d in real):
        nested = [d for d in real if _subdirs(d)]
        deeper = [s for d in nested for s in _subdirs(d)]
        holds_ext = any(list_images(s, ext) for s in deeper)
        if len(nested) == 1 and (holds_ext or len(real) == 1) and len(deeper) >= 2:
            return _too_deep_error(folder, nested[0], ext, holds_ext)
        if len(nested) >= 2 and holds_ext:
            example = next(s for s in deeper if list_images(s, ext))
            return UserError(f"the .{ext} images in {folder} are one level too deep: the class folders keep them "
                             f"in sub-folders (e.g. {example}); move them up into the class folders "
                             f"(<data>/<dataset>/<class>/<image>.{ext})")
    found = _found_extensions([os.path.join(folder, c) for c in classes])
    name = os.path.basename(class_dir)
    if not found:
        return UserError(f"class folder {class_dir} has no files; put the images of class {name} there "
                         f"as <image>.{ext}, or remove the folder")
    if "." + ext.lower().lstrip(".") in found:  # other classes have them: this folder is the odd one out
        return UserError(f"class folder {class_dir} has no .{ext} files, unlike the other class folders; put "
                         f"the .{ext} images of class {name} there, or remove the folder")
    return UserError(f"class folder {class_dir} has no .{ext} files (extensions found in the dataset: "
                     f"{', '.join(found)}); pass the right one with --imgEXT")


def _too_deep_error(folder, inner, ext, holds_ext):
    name, classes = os.path.basename(inner), _subdirs(inner)
    shown = ", ".join(os.path.basename(c) for c in classes[:3]) + (", ..." if len(classes) > 3 else "")
    found = [] if holds_ext else _found_extensions(classes)
    if len(found) == 1:
        also = f"; the images are {found[0]}: add --imgEXT {found[0][1:]}"
    elif found:
        also = f"; the images are {', '.join(found)}, not .{ext}: add the right --imgEXT"
    else:
        also = ""
    return UserError(f"the dataset in {folder} is one level too deep: its folder {name} holds the "
                     f"{len(classes)} class folders ({shown}); pass --data {folder} --dataset {name}, "
                     f"or move the class folders from {inner} up into {folder}{also}")


def read_rgb(path):
    """An image file as an 8-bit RGB Pillow image. A multi-band TIFF is refused: Pillow would read
    its first page, or fail on more than 4 samples per pixel, and training on one page would look
    like any other run. (tifffile's look at the header is left to TIFFs of several pages and to
    failures: for every read it would cost a quarter of the time of reading a UC Merced image.)"""
    try:
        with Image.open(path) as img:
            refuse_multiband(img, path)
            img.load()
            return to_rgb8(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise rgb_read_failure(path, err) from None


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
    if bands == 3:
        return read_rgb(path)
    return read_multiband(path, bands)


class SceneDataset(Dataset):
    """One split of <root>/<dataset>/<class>/<image>.<ext>.

    Item i is {"img", "label", "idx": i}; idx is the memory row the sample owns.
    """

    def __init__(self, root, dataset, split, ext="tif", transform=None, bands=3, split_file=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = os.path.join(root, dataset)
        self.root, self.dataset, self.split, self.ext = root, dataset, split, ext
        self.transform, self.bands = transform, bands
        if split_file:  # the lists of the file (utils/data/split_files.py), in its order
            lists = read_split_file(split_file, folder)
            self.classes = classes_of(lists)
            label = {name: i for i, name in enumerate(self.classes)}
            self.samples = [(os.path.join(folder, *rel.split("/")), label[rel.split("/", 1)[0]])
                            for rel in lists[split]]
            self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.long)
            return
        self.classes = list_classes(folder)
        class_dirs = [os.path.join(folder, c) for c in self.classes]
        self.samples = []
        for label, class_dir in enumerate(class_dirs):
            files = list_images(class_dir, ext)
            if not files:
                raise _no_images_error(folder, self.classes, class_dir, ext)
            if int(0.7 * len(files)) == 0:
                raise UserError(f"class folder {class_dir} has only {len(files)} .{ext} file(s), too few for a "
                                "non-empty train split; it needs at least 2")
            self.samples += [(path, label) for path in split_files(files, split)]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = read_image(path, self.bands)
        if self.transform is not None:
            img = self.transform(img)
        return {"img": img, "label": label, "idx": i}


def remove_unreadable(datasets):
    """Drop the samples whose image cannot be read from each dataset, in place (for
    --skip-bad-images); returns the unreadable paths (utils/data/image_check.py says what is checked
    and refused)."""
    return check_images(datasets, skip=True)
