"""Where a run's images come from and how they reach the network.

    scenes.py        SceneDataset: <data>/<dataset>/<class>/<image>, the 70/10/20 split, transforms
    split_files.py   split files (--split-file), the split's sha256, the check that every split is usable
    image_files.py   TIFF layouts and the one-line read errors;  multiband.py: multi-band reading, band statistics
    image_check.py   every image opened once before training
    splits.py        the splits of a run and their batching (the Pillow pipeline)
    cached.py        the cached pipeline: decoded once, augmented as whole batches on the device
    loader_workers.py  per-sample augmentation seeds, loader workers and stop signals
    digits.py        the offline digits demo;  download.py: dataset archives with checksums

Nothing here imports the network, training, evaluation, retrieval or the table.
"""
from utils.data.scenes import SPLITS, SceneDataset, read_image, read_rgb
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SPLITS", "SceneDataset", "eval_transform", "read_image", "read_rgb",
           "train_transform"]
