"""The file lists of a run's splits: split files (--split-file, data/prepare.py split), the hash
that a run records of the lists it used, and the checks that every split can be used.

A split file is JSON: {"train": [...], "val": [...], "test": [...]}, each a list of image paths
relative to <data>/<dataset>, with "/" between folders, e.g. "beach/beach00.tif". A path's first
folder is its class (labels: the class names sorted, as for class folders); the order of a list
is the order of its split (a sample's index).
"""
import hashlib
import json
import os

from utils.errors import UserError

SPLITS = ("train", "val", "test")
SHOWN = 5  # paths named in one message; the rest are counted


def _shown(paths):
    return ", ".join(paths[:SHOWN]) + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def read_split_file(path, folder):
    """{split: [relative path, ...]} of a split file, every entry checked: relative, inside
    a class folder, named once, and present under `folder` (<data>/<dataset>)."""
    if not os.path.isfile(path):
        raise UserError(f"split file {path} does not exist; pass a JSON file of train/val/test lists "
                        "(write ours with data/prepare.py split --dataset D --out PATH)")
    try:
        with open(path, encoding="utf-8") as fh:
            lists = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"split file {path} is not readable JSON ({err}); expected "
                        '{"train": [...], "val": [...], "test": [...]} of paths relative to the dataset '
                        "folder") from None
    if not isinstance(lists, dict) or set(lists) != set(SPLITS) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in lists.values()):
        found = sorted(lists) if isinstance(lists, dict) else type(lists).__name__
        raise UserError(f"split file {path} must hold exactly the keys train, val and test, each a list of "
                        f"paths relative to the dataset folder (found: {found})")
    seen, bad, missing = {}, [], []
    for split in SPLITS:
        for rel in lists[split]:
            parts = rel.split("/")
            if os.path.isabs(rel) or "\\" in rel or len(parts) < 2 or "" in parts or ".." in parts or "." in parts:
                bad.append(rel)
            elif rel in seen:
                raise UserError(f"split file {path} names {rel} twice (in {seen[rel]} and in {split}); a file "
                                "belongs to one split only")
            else:
                seen[rel] = split
                if not os.path.isfile(os.path.join(folder, *parts)):
                    missing.append(rel)
    if bad:
        raise UserError(f"split file {path} has {len(bad)} path(s) that are not <class>/<image> relative to "
                        f"the dataset folder, with /: {_shown(bad)}")
    if missing:
        raise UserError(f"{len(missing)} of the {len(seen)} files named in split file {path} do not exist "
                        f"in {folder}: {_shown(missing)}; check --data/--dataset, or the split file")
    return lists


def classes_of(lists):
    """Class names of split lists: the first folders of the paths, sorted (label = position)."""
    return sorted({rel.split("/", 1)[0] for split in SPLITS for rel in lists[split]})


def relative_lists(datasets, folder):
    """{split: [relative path, ...]} of SceneDatasets (the order of their samples)."""
    return {ds.split: [os.path.relpath(p, folder).replace(os.sep, "/") for p, _ in ds.samples] for ds in datasets}


def lists_sha256(lists):
    """The hash a run records of its splits: sha256 of the lists as compact JSON (train, val, test)."""
    text = json.dumps({split: lists[split] for split in SPLITS}, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_split_file(path, lists):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({split: lists[split] for split in SPLITS}, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


def check_split_sizes(train, val, test, warn=print):
    """Refuse splits that cannot give a meaningful number (fewer than 2 classes, a split with no
    image) and warn, naming them, of classes too small to give every split an image."""
    folder = os.path.join(train.root, train.dataset)
    if len(train.classes) < 2:
        raise UserError(f"the dataset in {folder} has {len(train.classes)} class ({', '.join(train.classes)}); "
                        "retrieval by class needs at least 2 classes: add another class folder, or check "
                        "--data/--dataset")
    counts = {name: [0, 0, 0] for name in train.classes}
    for i, ds in enumerate((train, val, test)):
        for label in ds.labels.tolist():
            counts[train.classes[label]][i] += 1
    summary = ", ".join(f"{name} {sum(c)}" for name, c in list(counts.items())[:SHOWN]) + (
        ", ..." if len(counts) > SHOWN else "")
    for i, ds in enumerate((train, val, test)):
        if len(ds) == 0:
            raise UserError(f"the {ds.split} split of {folder} has no image (images per class: {summary}); "
                            "add images (10 or more per class give every split one) or pass a --split-file")
    for name, (n_train, n_val, n_test) in counts.items():
        if 0 in (n_train, n_val, n_test):
            warn(f"warning: class {name} has {n_train + n_val + n_test} image(s): {n_train} train, {n_val} val, "
                 f"{n_test} test; too few to give every split an image (10 or more always do)")
