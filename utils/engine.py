"""Training machinery shared by CDNE(MU) (train/main.py) and CDNE(MB) (train_MB/main.py).

A script supplies a `Variant`: the memory, what fills it, and any per-step extra
(the key encoder of MU). Everything else — flags, device, seeding, data, the
epoch loop, evaluation, checkpoints, TensorBoard, distributed training — lives here once.
"""
import argparse
import copy
import json
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import distributed as dist
from .data import (SceneDataset, band_statistics, eval_transform, multiband_eval_transform,
                   multiband_train_transform, remove_unreadable, train_transform)
from .digits import make_digits
from .errors import UserError, exit_on_user_error
from .losses import CDNELoss, QuantizationLoss, chunked_cdne_loss, use_chunked_loss
from .metrics import retrieval_metrics
from .models import HashingNet
from .search import hamming_topk
from .visualize import bit_balance, retrieval_grid, to_chw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# File extension of each dataset as prepared by data/prepare.py (data/catalog.py; a test keeps
# the two in step); others default to tif.
DATASET_EXTENSIONS = {"digits": "png", "UCMerced": "tif", "EuroSAT": "jpg", "EuroSAT_MS": "tif",
                      "AID": "jpg", "NWPU-RESISC45": "jpg"}


def image_extension(dataset, ext=None):
    """--imgEXT as given (without a leading dot), else the dataset's own, else tif."""
    return (ext or DATASET_EXTENSIONS.get(dataset, "tif")).lstrip(".")


# ----------------------------------------------------------------------------- flags

def build_parser(description):
    """The flags of the published scripts (same names and defaults) and our additions."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data"), help="folder holding the datasets")
    p.add_argument("--dataset", default="UCMerced", help="dataset folder under --data (digits: the offline demo)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="global batch size (split across GPUs)")
    p.add_argument("--num_workers", type=int, default=4, help="data-loading worker processes")
    p.add_argument("--epochs", type=int, default=130)
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.1, help="initial learning rate")
    p.add_argument("--resume", default="", metavar="PATH", help="checkpoint to continue from")
    p.add_argument("--dim", type=int, default=128, help="hash code length L in bits")
    p.add_argument("--imgEXT", default=None, help="image file extension (default: the dataset's own, else tif)")
    p.add_argument("--temperature", type=float, default=0.05, help="T of the memory scores")
    p.add_argument("--margin", type=float, default=0.0, help="m of the CDNE loss")
    p.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50"), help="backbone")
    p.add_argument("--lambda_", type=float, default=1.0, help="weight of the CDNE loss")
    # Additions.
    p.add_argument("--img-size", type=int, default=256, help="images are resized to S x S")
    p.add_argument("--bands", type=int, default=3,
                   help="input bands: 3 reads RGB images; another number reads multi-band TIFFs "
                        "(e.g. 13 for EuroSAT_MS) with per-band normalisation")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs"), help="root folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: variant_dataset_model_bits_time)")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation instead of ImageNet weights")
    p.add_argument("--weights", default=None, metavar="PATH", help="local torchvision ResNet state_dict to start from")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate on val every N epochs (and after the last)")
    p.add_argument("--topk", type=int, default=100, help="R of mAP@R, the model-selection score")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 where supported, else float16)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="check every image first and leave out unreadable ones (with a warning and a count)")
    p.add_argument("--pipeline", default="pil", choices=("pil", "cached"),
                   help="pil: decode with Pillow per image per epoch; cached: decode once into RAM, "
                        "augment whole batches as tensors on the training device")
    return p


def check_args(args):
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--dim": args.dim,
                "--temperature": args.temperature, "--lr": args.lr, "--img-size": args.img_size,
                "--eval-every": args.eval_every, "--topk": args.topk, "--bands": args.bands}
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.margin < 0:
        raise UserError(f"--margin must be 0 or more, got {args.margin}")
    momentum = getattr(args, "memory_momentum", None)
    if momentum is not None and not 0 <= momentum <= 1:
        raise UserError(f"--memory-momentum must be in [0, 1], got {momentum}")
    if args.bands != 3 and args.pipeline == "cached":
        raise UserError("--pipeline cached reads RGB images only; use --pipeline pil with --bands")
    if args.no_pretrained and args.weights:
        raise UserError("--no-pretrained and --weights contradict each other; pass one of them")
    args.imgEXT = image_extension(args.dataset, args.imgEXT)


def select_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but MPS is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank())
    return device


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- variants

class Variant:
    """What differs between CDNE(MU) and CDNE(MB). Subclasses set `self.memory`."""

    name = "?"

    def __init__(self, args, model, num_samples):
        self.args = args

    def start_epoch(self, epoch):
        """Called at the start of every epoch (0-based)."""

    def keys(self, img):
        """Embeddings that replace memory rows, for the global batch (all ranks); None: use the network's own."""
        return None

    def after_step(self, model):
        """Called after the optimiser step."""

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])


# ----------------------------------------------------------------------------- data

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


def _loader(dataset, batches, args, epoch=0):
    # Own generator: worker seeds follow from (seed, epoch, rank), and the global RNG is not consumed.
    g = torch.Generator().manual_seed(args.seed * 7919 + epoch + 1_000_003 * dist.rank())
    return DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, generator=g,
                      pin_memory=args.device_obj.type == "cuda")


class Data:
    """The splits, their batchers, and the chosen input pipeline."""

    def __init__(self, args, band_stats=None):
        if args.dataset == "digits" and not os.path.isdir(os.path.join(args.data, "digits")):
            if dist.is_main():
                print(f"creating the digits demo dataset in {os.path.join(args.data, 'digits')}")
                make_digits(args.data)
            dist.barrier()
        S, ext, bands = args.img_size, args.imgEXT, args.bands
        self.args = args
        self.train, self.val, self.test = (SceneDataset(args.data, args.dataset, split, ext, bands=bands)
                                           for split in ("train", "val", "test"))
        self.db = copy.copy(self.train)  # the same samples as the database, with the eval transform
        self.classes = self.train.classes
        if len(self.val) == 0 and dist.is_main():
            print("warning: the val split is empty (classes of fewer than 10 images); the best epoch "
                  "cannot be chosen and stays the first evaluated one")
        if args.skip_bad_images:
            bad = remove_unreadable([self.train, self.db, self.val, self.test])
            if dist.is_main():
                for path in bad[:20]:
                    print(f"warning: skipping unreadable image {path}")
                print(f"skipped {len(bad)} unreadable image(s)" + (" (first 20 listed)" if len(bad) > 20 else ""))
        self.band_stats = None
        if bands == 3:
            train_tf, eval_tf = train_transform(S), eval_transform(S)
        else:
            # Per-band statistics from the train split, once; a resumed run keeps its own.
            self.band_stats = band_stats or band_statistics(self.train)
            train_tf = multiband_train_transform(S, *self.band_stats)
            eval_tf = multiband_eval_transform(S, *self.band_stats)
        self.train.transform = train_tf
        for ds in (self.db, self.val, self.test):
            ds.transform = eval_tf
        rank, world = dist.rank(), dist.world_size()
        # ResNet's last feature maps are 1x1 below 64x64 input: BatchNorm then needs 2 samples.
        self.train_batches = EpochBatches(len(self.train), args.batch_size, True, args.seed, rank, world,
                                          min_per_rank=2 if args.img_size < 64 else 1)
        self.cache = {}
        if args.pipeline == "cached":
            from .fast_data import CachedImages
            for split in ("train", "val", "test"):
                ds = getattr(self, split)
                self.cache[split] = CachedImages(ds, S, num_workers=args.num_workers)

    def train_loader(self, epoch, start=0):
        self.train_batches.set_epoch(epoch, start)
        if "train" in self.cache:
            from .fast_data import CachedBatches
            return CachedBatches(self.cache["train"], self.train_batches, self.args.device_obj, augment=True,
                                 num_workers=self.args.num_workers)
        return _loader(self.train, self.train_batches, self.args, epoch)

    def eval_loader(self, split):
        ds = {"train": self.db, "val": self.val, "test": self.test}[split]
        batches = EpochBatches(len(ds), self.args.batch_size, False, 0, dist.rank(), dist.world_size())
        if split in self.cache:
            from .fast_data import CachedBatches
            return CachedBatches(self.cache[split], batches, self.args.device_obj, augment=False)
        return _loader(ds, batches, self.args)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def encode(model, loader, n, dim, device, amp_ctx, desc):
    """Relaxed codes f of a whole split, in dataset order, gathered from all ranks."""
    model.eval()
    local_idx, local_f = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not dist.is_main()):
        img = batch["img"].to(device, non_blocking=True)
        with amp_ctx():
            f, _, _ = model(img)
        local_idx.append(torch.as_tensor(batch["idx"], device=device))
        local_f.append(f.float())
    idx = dist.all_gather(torch.cat(local_idx)) if local_idx else torch.empty(0, dtype=torch.long, device=device)
    f = dist.all_gather(torch.cat(local_f)) if local_f else torch.empty(0, dim, device=device)
    codes = torch.zeros(n, dim, device=device)
    codes[idx] = f
    return codes


def evaluate(model, data, split, args, amp_ctx, return_codes=False):
    """Every metric of `split` queries against the train split as database (eval transform),
    the PR curve included; with return_codes also the (query, database) codes."""
    dim, device = args.dim, args.device_obj
    db_codes = encode(model, data.eval_loader("train"), len(data.db), dim, device, amp_ctx, "encode database")
    q = getattr(data, split)
    q_codes = encode(model, data.eval_loader(split), len(q), dim, device, amp_ctx, f"encode {split}")
    metrics = score(q_codes, q.labels.to(device), db_codes, data.db.labels.to(device), args.topk)
    return (metrics, q_codes, db_codes) if return_codes else metrics


def score(q_codes, q_labels, db_codes, db_labels, topk):
    """Every metric, mAP@R and P@K for R, K in 20, 100 and --topk, and the PR curve."""
    return retrieval_metrics(q_codes, q_labels, db_codes, db_labels, topk=tuple(sorted({20, 100, topk})),
                             with_pr=True)


def log_test_pictures(writer, data, metrics, q_codes, db_codes, bands, step, n_queries=8, k=10):
    """TensorBoard pictures of the final test: PR curve, a retrieval grid, bit balance."""
    precision = torch.tensor(metrics["pr_precision"], dtype=torch.float64)
    recall = torch.tensor(metrics["pr_recall"], dtype=torch.float64)
    zeros = [0] * len(precision)
    # The PR plugin expects thresholds in rising order, i.e. falling recall: radius L first.
    writer.add_pr_curve_raw("test/pr_curve_hamming_radius", zeros, zeros, zeros, zeros,
                            precision.flip(0).tolist(), recall.flip(0).tolist(), step, len(precision))
    # A few queries spread over the classes, with their top-k.
    pick = torch.linspace(0, len(q_codes) - 1, min(n_queries, len(q_codes))).round().long().unique()
    dist_k, idx_k = hamming_topk(q_codes[pick], db_codes, k)
    q_labels, db_labels = data.test.labels[pick.cpu()], data.db.labels
    relevant = (db_labels[idx_k.cpu()] == q_labels[:, None]).tolist()
    grid = retrieval_grid([data.test.samples[i][0] for i in pick.tolist()],
                          [[data.db.samples[j][0] for j in row] for row in idx_k.tolist()],
                          relevant, dist_k.tolist(), bands=bands)
    writer.add_image("test/retrieval_top10", to_chw(grid), step)
    balance = bit_balance(db_codes).cpu()
    writer.add_histogram("test/bit_balance", balance.numpy(), step, bins=20)
    for bit, value in enumerate(balance.tolist()):
        writer.add_scalar("test/bit_fraction_ones", value, bit)


# ----------------------------------------------------------------------------- training

class StopRequested(Exception):
    pass


class Trainer:
    def __init__(self, args, variant_cls, data=None):
        self.args = args
        self.device = args.device_obj
        resume = ckpt_io.load_checkpoint(args.resume) if args.resume else None
        band_stats = None
        if resume is not None and "band_mean" in resume["config"]:
            band_stats = (resume["config"]["band_mean"], resume["config"]["band_std"])
        self.data = data if data is not None else Data(args, band_stats)
        n_train = len(self.data.train)
        num_classes = len(self.data.classes)
        pretrained = args.weights or (not args.no_pretrained)

        # Identical initial weights and memory on every rank; DDP also broadcasts rank 0's.
        seed_everything(args.seed)
        model = HashingNet(args.model, num_classes, args.dim, pretrained, args.bands).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.variant = variant_cls(args, model, n_train)
        self.variant.memory.to(self.device)
        self.train_labels = self.data.train.labels.to(self.device)
        self.cdne = CDNELoss(self.train_labels, args.margin, args.temperature).to(self.device)
        self.quant = QuantizationLoss()
        self.net = model
        if dist.is_distributed():
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            seed_everything(args.seed + dist.rank())  # different augmentations on each rank
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4,
                                         nesterov=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=30, gamma=0.5)
        self.amp_dtype = None
        if args.amp:
            bf16 = self.device.type == "cpu" or (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.config = {"variant": variant_cls.name, "arch": args.model, "dim": args.dim,
                       "num_classes": num_classes, "in_channels": args.bands, "dataset": args.dataset,
                       "num_samples": n_train,
                       "img_size": args.img_size, "classes": self.data.classes}
        if getattr(self.data, "band_stats", None):
            self.config["band_mean"], self.config["band_std"] = self.data.band_stats
        self.epoch, self.step_in_epoch, self.epoch_sums = 0, 0, {}
        self.best = {"score": float("-inf"), "epoch": -1, "metrics": None}
        self.stop_signal = None
        self.run_dir = self._run_dir()
        self.ckpt_last = os.path.join(self.run_dir, "checkpoint_last.pth")
        self.ckpt_best = os.path.join(self.run_dir, "checkpoint_best.pth")
        if resume is not None:
            self._resume(resume, args.resume)

    # -- helpers
    def amp_ctx(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _run_dir(self):
        """The run folder, chosen and checked on rank 0; every rank gets the same folder or the same error."""
        answer = [self._make_run_dir() if dist.is_main() else None]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(answer, src=0)
        run_dir, error = answer[0]
        if error:
            raise UserError(error)
        return run_dir

    def _make_run_dir(self):
        """(run folder, None), or (None, the problem) without raising."""
        args = self.args
        if args.resume:
            run_dir = os.path.dirname(os.path.abspath(args.resume))
        else:
            name = args.name or (f"{self.variant.name}_{args.dataset}_{args.model}_{args.dim}bit_"
                                 + time.strftime("%Y%m%d-%H%M%S"))
            run_dir = os.path.join(args.out, name)
            if os.path.exists(os.path.join(run_dir, "checkpoint_last.pth")):
                return None, (f"run folder {run_dir} already holds a checkpoint; continue it with --resume "
                              f"{os.path.join(run_dir, 'checkpoint_last.pth')} or choose another --name")
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, ".write-test")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
        except OSError as err:
            return None, f"cannot write to the run folder {run_dir} ({err.strerror}); pass a writable --out"
        return run_dir, None

    def _resume(self, ckpt, path):
        ckpt_io.check_config(ckpt["config"], self.config, path)
        self.model.load_state_dict(ckpt["model"])
        self.variant.load_state_dict(ckpt["variant"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] and self.scaler.is_enabled():  # empty when the run had no float16 scaling
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step"]
        self.epoch_sums = ckpt["epoch_sums"]
        self.best = ckpt["best"]
        rng = ckpt["rng"]
        ckpt_io.set_rng_state(rng[dist.rank()] if isinstance(rng, list) and dist.rank() < len(rng) else rng[0])
        if dist.is_main():
            where = f"epoch {self.epoch}" + (f", step {self.step_in_epoch}" if self.step_in_epoch else "")
            print(f"resumed from {path} at {where}")

    def memory_fingerprint(self):
        """A few sums of the memory; equal on every rank when the ranks agree."""
        m = self.variant.memory.memory.double()
        weights = torch.arange(1, m.shape[0] + 1, device=m.device, dtype=torch.float64)
        return [m.sum().item(), m.square().sum().item(), (weights @ m).sum().item()]

    def state(self):
        # Each rank has its own augmentation RNG: keep them all.
        per_rank = {"rng": ckpt_io.rng_state(), "memory": self.memory_fingerprint()}
        gathered = [None] * dist.world_size()
        if dist.is_distributed():
            torch.distributed.all_gather_object(gathered, per_rank)
            if any(g["memory"] != gathered[0]["memory"] for g in gathered):
                raise RuntimeError(f"the memory differs between ranks: {[g['memory'] for g in gathered]}")
        else:
            gathered = [per_rank]
        rngs = [g["rng"] for g in gathered]
        return {"format": ckpt_io.FORMAT, "version": 1, "config": self.config, "args": vars_plain(self.args),
                "epoch": self.epoch, "step": self.step_in_epoch, "epoch_sums": self.epoch_sums,
                "model": self.model.state_dict(), "variant": self.variant.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "best": self.best, "rng": rngs,
                "memory_fingerprints": [g["memory"] for g in gathered]}

    def save(self, best=False):
        state = self.state()  # collective in distributed runs: every rank takes part
        if dist.is_main():
            ckpt_io.atomic_save(state, self.ckpt_last)
            if best:
                ckpt_io.atomic_save(state, self.ckpt_best)

    # -- one step
    def cdne_loss(self, e, idx):
        memory = self.variant.memory
        if use_chunked_loss(e.shape[0], memory.memory.shape[0]):
            return chunked_cdne_loss(e, memory.memory, self.train_labels, idx, self.args.temperature,
                                     self.args.margin)
        return self.cdne(memory(e, idx), idx)

    def train_step(self, batch):
        img = batch["img"].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            img = img.contiguous(memory_format=torch.channels_last)
        label = torch.as_tensor(batch["label"], device=self.device)
        idx = torch.as_tensor(batch["idx"], device=self.device)
        with self.amp_ctx():
            f, e, logits = self.net(img)
        # Memory scores and losses in float32 whatever the autocast dtype.
        f, e, logits = f.float(), e.float(), logits.float()
        losses = {"cdne": self.cdne_loss(e, idx), "ce": F.cross_entropy(logits, label), "quant": self.quant(f)}
        losses["total"] = self.args.lambda_ * losses["cdne"] + losses["ce"] + losses["quant"]
        with self.amp_ctx():
            keys = self.variant.keys(img)
        total = losses["total"]
        if dist.is_distributed():
            # DDP averages the ranks' gradients; weight each rank by its share of the global
            # batch so that the result is the mean over the whole batch, even when uneven.
            n_all = dist.all_reduce_sum(torch.tensor([float(len(idx))], device=self.device))
            total = total * (len(idx) * dist.world_size() / n_all[0])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        # Every rank applies the same update from the whole global batch, so memories stay identical.
        idx_all = dist.all_gather(idx)
        x_all = keys.float() if keys is not None else dist.all_gather(e.detach())
        self.variant.memory.update(x_all, idx_all)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.variant.after_step(self.model)
        return {k: v.detach() for k, v in losses.items()}, len(idx)

    def train_epoch(self, writer):
        epoch, args = self.epoch, self.args
        self.variant.start_epoch(epoch)
        self.net.train()
        loader = self.data.train_loader(epoch, self.step_in_epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs} train", disable=not dist.is_main())
        for batch in bar:
            losses, n = self.train_step(batch)
            if not torch.isfinite(losses["total"]):
                kept = (f"the last good checkpoint is kept at {self.ckpt_last}" if os.path.exists(self.ckpt_last)
                        else "no checkpoint had been written yet")
                raise UserError(f"the loss became {losses['total'].item()} at epoch {epoch} step "
                                f"{self.step_in_epoch}; {kept}; lower --lr (or drop --amp) and resume or restart")
            for k, v in losses.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v.item() * n
            self.epoch_sums["n"] = self.epoch_sums.get("n", 0) + n
            self.step_in_epoch += 1
            bar.set_postfix(loss=f"{losses['total'].item():.3f}")
            if self._stop_now():
                raise StopRequested
        # Totals over all ranks' samples for the log.
        sums = torch.tensor([self.epoch_sums.get(k, 0.0) for k in ("cdne", "ce", "quant", "total", "n")],
                            dtype=torch.float64, device=self.device)
        sums = dist.all_reduce_sum(sums)
        if writer is not None:
            for k, v in zip(("cdne", "ce", "quant", "total"), sums[:4] / sums[4].clamp(min=1)):
                writer.add_scalar(f"train/loss_{k}", v.item(), epoch)
            writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], epoch)

    def _stop_now(self):
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device)
        return dist.all_reduce_sum(flag).item() > 0 if dist.is_distributed() else bool(self.stop_signal)

    # -- the whole run
    def fit(self):
        args = self.args
        writer = None
        if dist.is_main():
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
            with open(os.path.join(self.run_dir, "args.json"), "w") as fh:
                json.dump(vars_plain(args), fh, indent=2)
            print(f"run folder:   {self.run_dir}\n"
                  f"  tensorboard: tensorboard --logdir {os.path.join(self.run_dir, 'tensorboard')}\n"
                  f"  checkpoints: {self.ckpt_last}, {self.ckpt_best}\n"
                  f"  results:     {os.path.join(self.run_dir, 'results.json')}")
        handlers = self._install_signal_handlers()
        try:
            while self.epoch < args.epochs:
                started = time.perf_counter()
                self.train_epoch(writer)
                seconds = time.perf_counter() - started
                if writer is not None:
                    writer.add_scalar("train/epoch_seconds", seconds, self.epoch)
                self.scheduler.step()
                epoch = self.epoch
                self.epoch, self.step_in_epoch, self.epoch_sums = epoch + 1, 0, {}
                improved = False
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                    improved = self.validate(writer, epoch, f"  (training {seconds:.1f} s)")
                self.save(best=improved)
            if self.best["epoch"] < 0:
                # Resumed with no more epochs to train before any evaluation: evaluate now.
                self.save(best=self.validate(writer, self.epoch - 1))
            results = self.final_test(writer)
        except StopRequested:
            self.save()
            if dist.is_main():
                print(f"stopped by {self.stop_signal} at epoch {self.epoch} step {self.step_in_epoch}; "
                      f"continue with --resume {self.ckpt_last}")
            return 128 + (signal.SIGINT if self.stop_signal == "SIGINT" else signal.SIGTERM)
        finally:
            self._restore_signal_handlers(handlers)
            if writer is not None:
                writer.close()  # also on errors: the events so far are kept
        if dist.is_main():
            with open(os.path.join(self.run_dir, "results.json"), "w") as fh:
                json.dump(results, fh, indent=2)
            key = f"mAP@{args.topk}"
            print(f"best epoch {results['best_epoch'] + 1}: val {key} {results['val'][key]:.4f}; "
                  f"test {key} {results['test'][key]:.4f}  P@20 {results['test']['P@20']:.4f}\n"
                  f"results written to {os.path.join(self.run_dir, 'results.json')}")
        return 0

    def validate(self, writer, epoch, note=""):
        """Val metrics of the network as it is now; True when they beat the best so far
        (the earliest best is kept)."""
        key = f"mAP@{self.args.topk}"
        metrics = evaluate(self.model, self.data, "val", self.args, self.amp_ctx)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float):
                    writer.add_scalar(f"val/{tb_tag(k)}", v, epoch)
            print(f"epoch {epoch + 1}: val {key} {metrics[key]:.4f}  P@20 {metrics['P@20']:.4f}{note}")
        if metrics[key] > self.best["score"]:
            self.best = {"score": metrics[key], "epoch": epoch, "metrics": metrics}
            return True
        return False

    def final_test(self, writer=None):
        """Test-split metrics of the best checkpoint (database = train split), and pictures."""
        best = ckpt_io.load_checkpoint(self.ckpt_best) if dist.is_main() else None
        if dist.is_distributed():
            holder = [best["model"] if best else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            self.model.load_state_dict(holder[0])
            best_info = self.best
        else:
            self.model.load_state_dict(best["model"])
            best_info = best["best"]
        test, q_codes, db_codes = evaluate(self.model, self.data, "test", self.args, self.amp_ctx, return_codes=True)
        if writer is not None:
            for k, v in test.items():
                if isinstance(v, float):
                    writer.add_scalar(f"test/{tb_tag(k)}", v, best_info["epoch"])
            log_test_pictures(writer, self.data, test, q_codes, db_codes, self.args.bands, best_info["epoch"])
        return {"variant": self.config["variant"], "dataset": self.args.dataset, "run_dir": self.run_dir,
                "best_epoch": best_info["epoch"], "val": best_info["metrics"], "test": test,
                "args": vars_plain(self.args)}

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(handlers):
        for s, h in handlers.items():
            signal.signal(s, h)


def tb_tag(metric):
    """TensorBoard tags allow neither '@' nor '<=': mAP@100 -> mAP_100, P@H<=2 -> P_H_le_2."""
    return metric.replace("@H<=", "_H_le_").replace("@", "_")


def vars_plain(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def run(variant_cls, parser, argv=None):
    """Parse flags, train, evaluate; the body of both scripts' main()."""

    @exit_on_user_error
    def _main():
        args = parser.parse_args(argv)
        check_args(args)
        args.device_obj = select_device(args.device)
        dist.init(args.device_obj.type)
        if args.device_obj.type == "cuda":
            torch.cuda.set_device(args.device_obj)
            torch.backends.cudnn.benchmark = True
        try:
            return Trainer(args, variant_cls).fit()
        finally:
            dist.cleanup()

    return _main()
