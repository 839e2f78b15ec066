"""The splits of a run and how they are batched: one epoch's order comes from (seed, epoch)."""
import copy
import os

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist
from .data import SceneDataset, eval_transform, train_transform
from .image_check import check_images
from .multiband import band_statistics, multiband_eval_transform, multiband_train_transform
from .weights import input_spec
from .digits import make_digits
from .errors import UserError
from .flags import choose_pipeline
from .loader_workers import ignore_stop_signals, sample_seed  # noqa: F401 - also used by the cached pipeline
from .split_lists import check_split_sizes, lists_sha256, relative_lists


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


def _loader(dataset, batches, args, epoch=0):
    # Own generator: worker seeds follow from (seed, epoch, rank), and the global RNG is not consumed.
    g = torch.Generator().manual_seed(args.seed * 7919 + epoch + 1_000_003 * dist.rank())
    return DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, generator=g,
                      pin_memory=args.device_obj.type == "cuda", worker_init_fn=ignore_stop_signals)


class Splits:
    """The train, val and test splits of a run, the database (the train split with the eval
    transform), their batchers and the chosen input pipeline."""

    def __init__(self, args, band_stats=None):
        if args.dataset == "digits":
            # Every rank meets the barrier: a rank that looked after rank 0 made the folder must too.
            if dist.is_main() and not os.path.isdir(os.path.join(args.data, "digits")):
                print(f"creating the digits demo dataset in {os.path.join(args.data, 'digits')}")
                make_digits(args.data)
            dist.barrier()
        S, ext, bands = args.img_size, args.imgEXT, args.bands
        self.args = args
        # What the network takes (bands, their order, normalisation): from the backbone and its weights.
        self.input = input_spec(args)
        split_file = getattr(args, "split_file", None)
        self.train, self.val, self.test = (SceneDataset(args.data, args.dataset, split, ext, bands=bands,
                                                        split_file=split_file) for split in ("train", "val", "test"))
        self.db = copy.copy(self.train)  # the same samples as the database, with the eval transform
        self.classes = self.train.classes
        # Before anything is trained or written: every image opened once, every split usable.
        bad = check_images([self.train, self.db, self.val, self.test], skip=args.skip_bad_images)
        if bad and dist.is_main():
            for path in bad[:20]:
                print(f"warning: skipping unreadable image {path}")
            print(f"skipped {len(bad)} unreadable image(s)" + (" (first 20 listed)" if len(bad) > 20 else ""))
        check_split_sizes(self.train, self.val, self.test, warn=print if dist.is_main() else lambda _: None)
        self.split_sha256 = self._check_split(args, split_file)
        self.band_stats = None
        spec = self.input
        if bands == 3:
            train_tf, eval_tf = (tf(S, spec["mean"], spec["std"]) for tf in (train_transform, eval_transform))
        elif spec["mean"] is not None:  # the weights' own scaling of the bands they take (torchgeo)
            train_tf = multiband_train_transform(S, spec["mean"], spec["std"], spec["band_order"])
            eval_tf = multiband_eval_transform(S, spec["mean"], spec["std"], spec["band_order"])
        else:
            # Per-band statistics from the train split, once; a resumed run keeps its own.
            self.band_stats = band_stats or band_statistics(self.train)
            train_tf = multiband_train_transform(S, *self.band_stats)
            eval_tf = multiband_eval_transform(S, *self.band_stats)
        self.train_augmented = PerSampleAugmentation(self.train, train_tf, args.seed)
        for ds in (self.db, self.val, self.test):
            ds.transform = eval_tf
        rank, world = dist.rank(), dist.world_size()
        # ResNet's last feature maps are 1x1 below 64x64 input: BatchNorm then needs 2 samples.
        need = (2 if args.img_size < 64 else 1) * world
        if args.batch_size < need:
            raise UserError(f"--batch-size {args.batch_size} gives some GPU/process fewer than "
                            f"{need // world} sample(s) per step; use -b {need} or more")
        self.train_batches = EpochBatches(len(self.train), args.batch_size, True, args.seed, rank, world,
                                          min_per_rank=2 if args.img_size < 64 else 1)
        # Rank 0 decides for all: free memory differs from rank to rank as their caches fill.
        choice = [choose_pipeline(args, args.device_obj, len(self.train) + len(self.val) + len(self.test))]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(choice, src=0)
        args.pipeline, why = choice[0]
        if dist.is_main():
            print(f"input pipeline: {args.pipeline} ({why})")
        self.cache = {}
        if args.pipeline == "cached":
            from .fast_data import CachedImages
            for split in ("train", "val", "test"):
                ds = getattr(self, split)
                self.cache[split] = CachedImages(ds, S, num_workers=args.num_workers, mean=spec["mean"],
                                                 std=spec["std"])

    def _check_split(self, args, split_file):
        """The sha256 of the lists this run uses, recorded in its flags (args.json, checkpoints);
        a resumed run whose recorded split differs is refused."""
        folder = os.path.join(args.data, args.dataset)
        digest = lists_sha256(relative_lists((self.train, self.val, self.test), folder))
        recorded = getattr(args, "split_sha256", None)
        if args.resume and recorded and recorded != digest:
            source = f"split file {split_file}" if split_file else "the 70/10/20 split per class of the folder"
            raise UserError(f"checkpoint {args.resume} was trained on another split (sha256 {recorded[:12]}...) than "
                            f"{source} gives now ({digest[:12]}...); resume with the run's own split file and "
                            "dataset folder, or start a new run")
        args.split_sha256 = digest
        return digest

    def train_loader(self, epoch, start=0):
        self.train_batches.set_epoch(epoch, start)
        if "train" in self.cache:
            from .fast_data import CachedBatches
            return CachedBatches(self.cache["train"], self.train_batches, self.args.device_obj, augment=True,
                                 num_workers=self.args.num_workers, seed=self.args.seed, epoch=epoch)
        self.train_augmented.epoch = epoch
        return _loader(self.train_augmented, self.train_batches, self.args, epoch)

    def eval_loader(self, split):
        ds = {"train": self.db, "val": self.val, "test": self.test}[split]
        batches = EpochBatches(len(ds), self.args.batch_size, False, 0, dist.rank(), dist.world_size())
        if split in self.cache:
            from .fast_data import CachedBatches
            return CachedBatches(self.cache[split], batches, self.args.device_obj, augment=False)
        return _loader(ds, batches, self.args)
