"""Retrieval with a trained checkpoint: index images, query an index, evaluate a split.

    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --dataset UCMerced --out ucm.index
    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --folder my_images/ --out mine.index
    python -m utils.retrieve query    --index ucm.index path/to/image.tif [more images] --topk 10 --grid grid.png
    python -m utils.retrieve evaluate --checkpoint runs/X/checkpoint_best.pth --dataset UCMerced --split test

An index holds ±1 codes, labels where known, image paths and the checkpoint's configuration;
it is read with weights_only=True like the checkpoints.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt_io
from .data import SceneDataset, eval_transform, multiband_eval_transform, read_image, remove_unreadable
from .engine import REPO_ROOT, encode, image_extension, score, select_device
from .errors import UserError, exit_on_user_error
from .models import HashingNet
from .search import hamming_topk
from .visualize import retrieval_grid

INDEX_FORMAT = "cdne-index"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# What must agree between the checkpoint that built an index and the one that queries it.
CODE_KEYS = ("arch", "dim", "in_channels", "img_size")


class ImageFiles(Dataset):
    """Image paths (and labels, -1 where unknown) as items {"img", "label", "idx"}."""

    def __init__(self, paths, labels, transform, bands=3):
        self.paths, self.labels, self.transform, self.bands = list(paths), labels, transform, bands

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        img = read_image(path, self.bands)
        label = int(self.labels[i]) if self.labels is not None else -1
        return {"img": self.transform(img), "label": label, "idx": i}


def load_model(path, device):
    """The network of a checkpoint (never the key encoder) and the checkpoint's configuration."""
    ckpt = ckpt_io.load_checkpoint(path)
    config = ckpt["config"]
    model = HashingNet(config["arch"], config["num_classes"], config["dim"], pretrained=False,
                       in_channels=config.get("in_channels", 3))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def transform_of(config):
    size = config["img_size"]
    if config.get("in_channels", 3) == 3:
        return eval_transform(size)
    return multiband_eval_transform(size, config["band_mean"], config["band_std"])


def encode_files(model, config, paths, labels, device, batch_size, num_workers):
    ds = ImageFiles(paths, labels, transform_of(config), config.get("in_channels", 3))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return encode(model, loader, len(ds), config["dim"], device, nullcontext, "encode")


def list_folder(folder):
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; pass a folder of images with --folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f"folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def split_of(args, config):
    ds = SceneDataset(args.data, args.dataset, args.split, image_extension(args.dataset, args.imgEXT),
                      bands=config.get("in_channels", 3))
    if args.skip_bad_images:
        bad = remove_unreadable([ds])
        if bad:
            print(f"skipped {len(bad)} unreadable image(s) of the {args.split} split, e.g. {bad[0]}")
    if len(ds.classes) != config["num_classes"]:
        raise UserError(f"{args.dataset} has {len(ds.classes)} classes but the checkpoint was trained on "
                        f"{config['num_classes']}; pass the dataset it was trained on")
    return ds


def load_index(path):
    index = ckpt_io.safe_load(path, what="index")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise UserError(f"{path} is not an index file; build one with `python -m utils.retrieve index`")
    return index


def check_compatible(index_config, config, index_path, ckpt_path):
    diffs = [f"{k} {index_config.get(k)!r} vs {config.get(k)!r}" for k in CODE_KEYS
             if index_config.get(k) != config.get(k)]
    if diffs:
        raise UserError(f"index {index_path} was built with another kind of checkpoint than {ckpt_path} "
                        f"({', '.join(diffs)}); query it with the checkpoint that built it or rebuild the index")


# ----------------------------------------------------------------------------- commands

def cmd_index(args, device):
    model, config = load_model(args.checkpoint, device)
    if args.folder:
        paths, labels, classes = list_folder(args.folder), None, None
    else:
        ds = split_of(args, config)
        paths, labels, classes = [p for p, _ in ds.samples], ds.labels, ds.classes
    codes = encode_files(model, config, paths, labels, device, args.batch_size, args.num_workers)
    index = {"format": INDEX_FORMAT, "version": 1, "codes": torch.where(codes > 0, 1, -1).to(torch.int8).cpu(),
             "labels": labels, "paths": [os.path.abspath(p) for p in paths], "classes": classes,
             "config": config, "checkpoint": os.path.abspath(args.checkpoint)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ckpt_io.atomic_save(index, args.out)
    print(f"indexed {len(paths)} images with {config['dim']}-bit codes into {args.out}")


def cmd_query(args, device):
    index = load_index(args.index)
    ckpt_path = args.checkpoint or index["checkpoint"]
    model, config = load_model(ckpt_path, device)
    check_compatible(index["config"], config, args.index, ckpt_path)
    for path in args.images:
        if not os.path.isfile(path):
            raise UserError(f"query image {path} does not exist")
    codes = encode_files(model, config, args.images, None, device, args.batch_size, 0)
    dist, idx = hamming_topk(codes, index["codes"].float().to(device), args.topk)
    classes, labels = index.get("classes"), index.get("labels")
    relevant = None
    if classes and labels is not None:
        # A query inside a class folder of the indexed dataset has a known class.
        q_labels = [classes.index(os.path.basename(os.path.dirname(os.path.abspath(p))))
                    if os.path.basename(os.path.dirname(os.path.abspath(p))) in classes else None
                    for p in args.images]
        if all(q is not None for q in q_labels):
            relevant = [[int(labels[j]) == q for j in row] for row, q in zip(idx.tolist(), q_labels)]
    for qi, path in enumerate(args.images):
        print(f"query {path}")
        for rank, (d, j) in enumerate(zip(dist[qi].tolist(), idx[qi].tolist()), 1):
            cls = f"  {classes[int(labels[j])]}" if classes and labels is not None else ""
            print(f"  {rank:3d}  d={d:3d}  {index['paths'][j]}{cls}")
    if args.grid:
        grid = retrieval_grid(args.images, [[index["paths"][j] for j in row] for row in idx.tolist()],
                              relevant, dist.tolist(), bands=config.get("in_channels", 3))
        grid.save(args.grid)
        print(f"grid written to {args.grid}")


def cmd_evaluate(args, device):
    model, config = load_model(args.checkpoint, device)
    db = split_of(argparse.Namespace(**{**vars(args), "split": "train"}), config)
    queries = split_of(args, config)
    db_codes = encode_files(model, config, [p for p, _ in db.samples], db.labels, device, args.batch_size,
                            args.num_workers)
    q_codes = encode_files(model, config, [p for p, _ in queries.samples], queries.labels, device,
                           args.batch_size, args.num_workers)
    metrics = score(q_codes, queries.labels.to(device), db_codes, db.labels.to(device), args.topk)
    print(f"{args.dataset} {args.split} queries ({len(queries)}) against the train split ({len(db)}), "
          f"{config['dim']} bits")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:10s} {v:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset,
                       "split": args.split, "metrics": metrics}, fh, indent=2)
        print(f"metrics written to {args.json}")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m utils.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, checkpoint_required=True):
        q.add_argument("--checkpoint", required=checkpoint_required, help="a checkpoint_*.pth of a run")
        q.add_argument("--device", default="auto")
        q.add_argument("-b", "--batch-size", type=int, default=128)
        q.add_argument("--num_workers", type=int, default=2)

    def dataset(q):
        q.add_argument("--data", default=os.path.join(REPO_ROOT, "data"))
        q.add_argument("--dataset", default=None)
        q.add_argument("--imgEXT", default=None)
        q.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out")

    q = sub.add_parser("index", help="encode a split or a folder of images into an index file")
    common(q)
    dataset(q)
    q.add_argument("--split", default="train", choices=("train", "val", "test"))
    q.add_argument("--folder", default=None, help="index every image under this folder instead")
    q.add_argument("--out", required=True, help="index file to write")
    q = sub.add_parser("query", help="the top-k database images of one or more image files")
    common(q, checkpoint_required=False)
    q.add_argument("--index", required=True)
    q.add_argument("images", nargs="+")
    q.add_argument("--topk", type=int, default=10)
    q.add_argument("--grid", default=None, help="write a picture of the results here (.png)")
    q = sub.add_parser("evaluate", help="the metric table of a checkpoint on a split")
    common(q)
    dataset(q)
    q.add_argument("--split", default="test", choices=("train", "val", "test"))
    q.add_argument("--topk", type=int, default=100)
    q.add_argument("--json", default=None, help="also write the metrics here")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("index", "evaluate") and not args.dataset and not getattr(args, "folder", None):
        raise UserError(f"{args.command} needs --dataset (or, for index, --folder)")
    if getattr(args, "topk", 1) <= 0 or args.batch_size <= 0:
        raise UserError("--topk and --batch-size must be positive")
    device = select_device(args.device)
    {"index": cmd_index, "query": cmd_query, "evaluate": cmd_evaluate}[args.command](args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
