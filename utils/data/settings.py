"""The settings the data package takes, resolved once from the flags at the door
(utils/training/settings.py) and passed down as plain values."""
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataSettings:
    """Where a run's images are and how they are read: <root>/<dataset>/<class>/<image>.<ext>,
    split 70/10/20 per class or as a split file lists them, `bands` bands at img_size x img_size."""

    root: str                       # --data
    dataset: str                    # --dataset ("digits": the offline demo, made on first use)
    ext: str                        # --imgEXT as resolved: the dataset's own extension by default
    bands: int = 3                  # --bands: 3 reads RGB, another number multi-band TIFFs
    img_size: int = 256             # --img-size
    split_file: str | None = None   # --split-file
    skip_bad_images: bool = False   # --skip-bad-images

    @property
    def folder(self):
        return os.path.join(self.root, self.dataset)


@dataclass(frozen=True)
class LoaderSettings:
    """How a run's batches are made: the global batch (split across processes), loader workers,
    the seed of batch order and augmentation, the training device and the input pipeline asked
    for (auto, pil or cached: utils/data/pipeline.py)."""

    batch_size: int
    num_workers: int
    seed: int
    device: torch.device
    pipeline: str = "auto"
