"""The splits of a run and how they are batched: one epoch's order comes from (seed, epoch)."""
import copy
import os

import torch
from torch.utils.data import DataLoader, Dataset

from utils import distributed as dist
from utils.data.digits import make_digits
from utils.data.image_check import check_images
from utils.data.loader_workers import ignore_stop_signals, sample_seed  # noqa: F401 - also used by the cached pipeline
from utils.data.multiband import band_statistics
from utils.data.pipeline import choose_pipeline
from utils.data.scenes import SceneDataset
from utils.data.split_files import check_split_sizes, lists_sha256, relative_lists
from utils.data.transforms import transforms_for
from utils.errors import UserError


class EpochBatches:
    """Index batches of one epoch: a permutation drawn from (seed, epoch), cut into
    global batches of B (the last partial one kept), each split across the ranks.

    The same seed gives the same global batches whatever the number of processes,
    and a run resumed mid-epoch can skip the batches it has done. A last batch that
    would leave a rank fewer than `min_per_rank` samples joins the one before it:
    BatchNorm in training mode cannot take one sample when its feature maps are 1x1.
    """

    def __init__(self, n, batch_size, shuffle, seed=0, rank=0, world_size=1, min_per_rank=1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.bounds = list(range(0, n, batch_size)) + [n]
        if len(self.bounds) > 2 and n - self.bounds[-2] < min_per_rank * world_size:
            del self.bounds[-2]

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def order(self):
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __len__(self):
        return max(0, len(self.bounds) - 1 - self.start)

    def __iter__(self):
        order = self.order()
        for b in range(self.start, len(self.bounds) - 1):
            batch = order[self.bounds[b]:self.bounds[b + 1]]
            yield batch.tensor_split(self.world_size)[self.rank].tolist()


class PerSampleAugmentation(Dataset):
    """A split whose random transform draws from (seed, epoch, sample index) alone, so that a
    run is the same with any number of loader workers or processes, and resumes exactly
    mid-epoch. Set `epoch` before each epoch's loader is made."""

    def __init__(self, dataset, transform, seed):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's global RNG
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            item["img"] = self.transform(item["img"])
        return item


def _loader(dataset, batches, loader, epoch=0):
    # Own generator: worker seeds follow from (seed, epoch, rank), and the global RNG is not consumed.
    g = torch.Generator().manual_seed(loader.seed * 7919 + epoch + 1_000_003 * dist.rank())
    return DataLoader(dataset, batch_sampler=batches, num_workers=loader.num_workers, generator=g,
                      pin_memory=loader.device.type == "cuda", worker_init_fn=ignore_stop_signals)


class Splits:
    """The train, val and test splits of a run, the database (the train split with the eval
    transform), their batchers and the input pipeline.

    data: DataSettings; loader: LoaderSettings; input_spec: what the network takes (bands, their
    order, normalisation: utils/backbones/input_spec.py). band_stats: a resumed multi-band run's
    own per-band statistics. After construction `pipeline` is the one chosen and `split_sha256`
    the hash of the lists (the run records both)."""

    def __init__(self, data, loader, input_spec, band_stats=None):
        if data.dataset == "digits":
            # Every rank meets the barrier: a rank that looked after rank 0 made the folder must too.
            if dist.is_main() and not os.path.isdir(data.folder):
                print(f"creating the digits demo dataset in {data.folder}")
                make_digits(data.root)
            dist.barrier()
        S, bands = data.img_size, data.bands
        self.loader = loader
        self.input = input_spec
        self.train, self.val, self.test = (SceneDataset(data.root, data.dataset, split, data.ext, bands=bands,
                                                        split_file=data.split_file) for split in ("train", "val", "test"))
        self.db = copy.copy(self.train)  # the same samples as the database, with the eval transform
        self.classes = self.train.classes
        # Before anything is trained or written: every image opened once, every split usable.
        bad = check_images([self.train, self.db, self.val, self.test], skip=data.skip_bad_images)
        if bad and dist.is_main():
            for path in bad[:20]:
                print(f"warning: skipping unreadable image {path}")
            print(f"skipped {len(bad)} unreadable image(s)" + (" (first 20 listed)" if len(bad) > 20 else ""))
        check_split_sizes(self.train, self.val, self.test, warn=print if dist.is_main() else lambda _: None)
        self.split_sha256 = lists_sha256(relative_lists((self.train, self.val, self.test), data.folder))
        self.band_stats = None
        mean, std = input_spec.mean, input_spec.std
        if bands != 3 and mean is None:
            # Per-band statistics from the train split, once; a resumed run keeps its own.
            self.band_stats = band_stats or band_statistics(self.train)
            mean, std = self.band_stats
        train_tf, eval_tf = transforms_for(S, bands, mean, std, input_spec.band_order)
        self.train_augmented = PerSampleAugmentation(self.train, train_tf, loader.seed)
        for ds in (self.db, self.val, self.test):
            ds.transform = eval_tf
        rank, world = dist.rank(), dist.world_size()
        # ResNet's last feature maps are 1x1 below 64x64 input: BatchNorm then needs 2 samples.
        need = (2 if S < 64 else 1) * world
        if loader.batch_size < need:
            raise UserError(f"--batch-size {loader.batch_size} gives some GPU/process fewer than "
                            f"{need // world} sample(s) per step; use -b {need} or more")
        self.train_batches = EpochBatches(len(self.train), loader.batch_size, True, loader.seed, rank, world,
                                          min_per_rank=2 if S < 64 else 1)
        # Rank 0 decides for all: free memory differs from rank to rank as their caches fill.
        n_images = len(self.train) + len(self.val) + len(self.test)
        choice = [choose_pipeline(loader.pipeline, loader.device, n_images, bands, S)]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(choice, src=0)
        self.pipeline, why = choice[0]
        if dist.is_main():
            print(f"input pipeline: {self.pipeline} ({why})")
        self.cache = {}
        if self.pipeline == "cached":
            from utils.data.cached import CachedImages
            for split in ("train", "val", "test"):
                self.cache[split] = CachedImages(getattr(self, split), S, num_workers=loader.num_workers,
                                                 mean=input_spec.mean, std=input_spec.std)

    def train_loader(self, epoch, start=0):
        self.train_batches.set_epoch(epoch, start)
        loader = self.loader
        if "train" in self.cache:
            from utils.data.cached import CachedBatches
            return CachedBatches(self.cache["train"], self.train_batches, loader.device, augment=True,
                                 num_workers=loader.num_workers, seed=loader.seed, epoch=epoch)
        self.train_augmented.epoch = epoch
        return _loader(self.train_augmented, self.train_batches, loader, epoch)

    def eval_loader(self, split):
        ds = {"train": self.db, "val": self.val, "test": self.test}[split]
        batches = EpochBatches(len(ds), self.loader.batch_size, False, 0, dist.rank(), dist.world_size())
        if split in self.cache:
            from utils.data.cached import CachedBatches
            return CachedBatches(self.cache[split], batches, self.loader.device, augment=False)
        return _loader(ds, batches, self.loader)
