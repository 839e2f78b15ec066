"""Retrieval with a trained checkpoint: index images, query an index, evaluate a split.

    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --out ucm.index
    python -m utils.retrieve index    --checkpoint runs/X/checkpoint_best.pth --folder my_images/ --out mine.index
    python -m utils.retrieve query    --index ucm.index path/to/image.tif [more images] --topk 10 --grid grid.png
    python -m utils.retrieve query    --index ucm.index path/to/image.tif --exclude-self --json results.json
    python -m utils.retrieve evaluate --checkpoint runs/X/checkpoint_best.pth --split test

index and evaluate take the dataset, the data folder and the image extension from the flags
the checkpoint was trained with unless --dataset, --data or --imgEXT say otherwise.

An index holds ±1 codes, labels where known, image paths, the checkpoint's configuration and a
fingerprint of its weights (a query with a checkpoint of other weights is refused); it is read
with weights_only=True like the checkpoints.
"""
import argparse
import json
import os
import sys

import torch

from .. import checkpoint as ckpt_io
from ..data import SceneDataset, remove_unreadable
from ..evaluation import every_metric
from ..flags import REPO_ROOT, image_extension, select_device
from ..errors import UserError, exit_on_user_error
from ..visualize import retrieval_grid
from .index_file import INDEX_FORMAT, INDEX_VERSION, check_compatible, check_weights, load_index
from .network import Loaded, encode_files
from .search import hamming_topk

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_folder(folder):
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; pass a folder of images with --folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f"folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def resolve_dataset_flags(args, loaded):
    """--dataset, --data and --imgEXT as given, else as the checkpoint's run had them.

    Returns the names of the settings taken from the checkpoint."""
    run, taken = loaded.args, []
    if not args.dataset:
        args.dataset = run.get("dataset") or loaded.config.get("dataset")
        if not args.dataset:
            raise UserError(f"checkpoint {loaded.path} does not record its dataset; pass --dataset NAME "
                            f"(or, for index, --folder DIR)")
        taken.append("dataset")
    if not args.imgEXT and run.get("imgEXT") and args.dataset == run.get("dataset"):
        args.imgEXT = run["imgEXT"]  # the extension belongs to the run's dataset, not to another one
        taken.append("imgEXT")
    if not args.data:
        recorded = run.get("data")
        if recorded:
            if not os.path.isdir(recorded):
                raise UserError(f"the data folder recorded in checkpoint {loaded.path}, {recorded}, does not exist "
                                f"(moved, or another machine); pass --data DIR, the folder that holds "
                                f"{args.dataset}/")
            args.data = recorded
            taken.append("data")
        else:
            args.data = os.path.join(REPO_ROOT, "data")
    return taken


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


def query_label(path, index):
    """The class of a query image inside a class folder of the indexed dataset, else None."""
    classes = index.get("classes")
    if not classes or index.get("labels") is None or not index["paths"]:
        return None
    class_dir = os.path.dirname(os.path.abspath(path))
    dataset_name = os.path.basename(os.path.dirname(os.path.dirname(index["paths"][0])))
    if os.path.basename(os.path.dirname(class_dir)) != dataset_name:
        return None
    name = os.path.basename(class_dir)
    return name if name in classes else None


# ----------------------------------------------------------------------------- commands

def cmd_index(args, device):
    loaded = Loaded(args.checkpoint, device)
    model, config = loaded.model, loaded.config
    if args.folder:
        paths, labels, classes = list_folder(args.folder), None, None
    else:
        taken = resolve_dataset_flags(args, loaded)
        if taken:
            print(f"from the checkpoint's flags: {describe(args, taken)}")
        ds = split_of(args, config)
        paths, labels, classes = [p for p, _ in ds.samples], ds.labels, ds.classes
    codes = encode_files(model, config, paths, labels, device, args.batch_size, args.num_workers)
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
             "codes": torch.where(codes > 0, 1, -1).to(torch.int8).cpu(),
             "labels": labels, "paths": [os.path.abspath(p) for p in paths], "classes": classes,
             "config": config, "checkpoint": os.path.abspath(args.checkpoint),
             "weights_sha256": loaded.fingerprint}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ckpt_io.atomic_save(index, args.out)
    what = f"the {args.split} split of {args.dataset}" if not args.folder else args.folder
    print(f"indexed {len(paths)} images of {what} with {config['dim']}-bit codes into {args.out}")


def describe(args, taken):
    return ", ".join(f"--{k} {getattr(args, k)}" for k in taken)


def cmd_query(args, device):
    index = load_index(args.index)
    ckpt_path = args.checkpoint or index["checkpoint"]
    if not args.checkpoint and not os.path.isfile(ckpt_path):
        raise UserError(f"checkpoint {ckpt_path} does not exist; this path came from index {args.index} (the "
                        f"checkpoint that built it; was its run folder moved?): pass --checkpoint PATH to use "
                        f"another copy of it")
    loaded = Loaded(ckpt_path, device)
    config = loaded.config
    check_compatible(index["config"], config, args.index, ckpt_path)
    check_weights(index, loaded, args.index)
    for path in args.images:
        if not os.path.isfile(path):
            raise UserError(f"query image {path} does not exist")
    n_db = index["codes"].shape[0]
    codes = encode_files(loaded.model, config, args.images, None, device, args.batch_size, 0)
    # One more than asked for, in case the query itself is in the database and is left out.
    dist, idx = hamming_topk(codes, index["codes"].float().to(device), args.topk + int(args.exclude_self))
    classes, labels, paths = index.get("classes"), index.get("labels"), index["paths"]
    db_label = (lambda j: classes[int(labels[j])]) if classes and labels is not None else (lambda j: None)

    queries = []
    for qi, path in enumerate(args.images):
        own = os.path.abspath(path)
        label = query_label(path, index)
        results = []
        for d, j in zip(dist[qi].tolist(), idx[qi].tolist()):
            if args.exclude_self and paths[j] == own:
                continue
            result_label = db_label(j)
            relevant = None if label is None or result_label is None else result_label == label
            results.append({"rank": len(results) + 1, "distance": int(d), "path": paths[j], "label": result_label,
                            "relevant": relevant})
        queries.append({"path": own, "label": label, "results": results[:args.topk]})

    # With --json - the ranking goes to stdout for programs, and the table to stderr for people.
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"index {os.path.abspath(args.index)}: {n_db} database images, {index['config']['dim']} bits, "
          f"checkpoint {os.path.abspath(ckpt_path)}", file=out)
    for q in queries:
        print(f"query {q['path']}  class {q['label'] if q['label'] is not None else '(unknown)'}", file=out)
        for r in q["results"]:
            mark = "" if r["relevant"] is None else ("  relevant" if r["relevant"] else "  irrelevant")
            cls = f"  {r['label']}" if r["label"] is not None else ""
            print(f"  {r['rank']:3d}  d={r['distance']:3d}  {r['path']}{cls}{mark}", file=out)
    if args.json:
        ranking = {"index": os.path.abspath(args.index), "checkpoint": os.path.abspath(ckpt_path),
                   "bits": index["config"]["dim"], "queries": queries}
        if args.json == "-":
            json.dump(ranking, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            with open(args.json, "w") as fh:
                json.dump(ranking, fh, indent=2)
            print(f"ranking written to {args.json}", file=out)
    if args.grid:
        relevant = None
        if all(q["label"] is not None for q in queries) and labels is not None:
            relevant = [[r["relevant"] for r in q["results"]] for q in queries]
        grid = retrieval_grid([q["path"] for q in queries], [[r["path"] for r in q["results"]] for q in queries],
                              relevant, [[r["distance"] for r in q["results"]] for q in queries],
                              bands=config.get("in_channels", 3))
        grid.save(args.grid)
        print(f"grid written to {args.grid}", file=out)


def cmd_evaluate(args, device):
    loaded = Loaded(args.checkpoint, device)
    model, config = loaded.model, loaded.config
    taken = resolve_dataset_flags(args, loaded)
    if taken:
        print(f"from the checkpoint's flags: {describe(args, taken)}")
    db = split_of(argparse.Namespace(**{**vars(args), "split": "train"}), config)
    queries = split_of(args, config)
    db_codes = encode_files(model, config, [p for p, _ in db.samples], db.labels, device, args.batch_size,
                            args.num_workers)
    q_codes = encode_files(model, config, [p for p, _ in queries.samples], queries.labels, device,
                           args.batch_size, args.num_workers)
    metrics = every_metric(q_codes, queries.labels.to(device), db_codes, db.labels.to(device), args.topk)
    print(f"{args.dataset} {args.split} queries ({len(queries)}) against the train split ({len(db)}), "
          f"{config['dim']} bits")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:10s} {v:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset,
                       "data": os.path.abspath(args.data), "split": args.split, "metrics": metrics}, fh, indent=2)
        print(f"metrics written to {args.json}")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m utils.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, checkpoint_required=True):
        if checkpoint_required:
            q.add_argument("--checkpoint", required=True, help="a checkpoint_*.pth of a run")
        else:
            q.add_argument("--checkpoint", default=None,
                           help="a checkpoint_*.pth with the weights that built the index (default: the path "
                                "the index records; pass this when that run folder has moved)")
        q.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda, cuda:N, mps or cpu")
        q.add_argument("-b", "--batch-size", type=int, default=128, help="images encoded per batch (default 128)")
        q.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes (default 2)")

    def dataset(q):
        q.add_argument("--data", default=None,
                       help="folder holding the datasets (default: the checkpoint's --data, else the repo's data/)")
        q.add_argument("--dataset", default=None,
                       help="dataset folder under --data (default: the dataset the checkpoint was trained on)")
        q.add_argument("--imgEXT", default=None,
                       help="image file extension (default: the checkpoint's for its own dataset, else the "
                            "dataset's own, else tif)")
        q.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out")

    q = sub.add_parser("index", help="encode a split or a folder of images into an index file")
    common(q)
    dataset(q)
    q.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="split of the dataset to index (default train, the retrieval database)")
    q.add_argument("--folder", default=None, help="index every image under this folder instead")
    q.add_argument("--out", required=True, help="index file to write")
    q = sub.add_parser("query", help="the top-k database images of one or more image files")
    common(q, checkpoint_required=False)
    q.add_argument("--index", required=True, help="an index file written by `python -m utils.retrieve index`")
    q.add_argument("images", nargs="+", help="query image files")
    q.add_argument("--topk", type=int, default=10, help="results per query (default 10)")
    q.add_argument("--exclude-self", action="store_true",
                   help="leave a query's own image (same absolute path) out of its results")
    q.add_argument("--json", default=None, metavar="PATH",
                   help="also write the ranking as JSON here (- for stdout; the table then goes to stderr)")
    q.add_argument("--grid", default=None, help="write a picture of the results here (.png)")
    q = sub.add_parser("evaluate", help="the metric table of a checkpoint on a split")
    common(q)
    dataset(q)
    q.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split whose images are the queries (default test); the database is the train split")
    q.add_argument("--topk", type=int, default=100, help="R of mAP@R and K of P@K, besides 20 and 100 (default 100)")
    q.add_argument("--json", default=None, help="also write the metrics here")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "topk", 1) <= 0 or args.batch_size <= 0:
        raise UserError("--topk and --batch-size must be positive")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    device = select_device(args.device)
    {"index": cmd_index, "query": cmd_query, "evaluate": cmd_evaluate}[args.command](args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
