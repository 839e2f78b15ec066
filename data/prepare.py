"""Get the scene datasets into the layout the training expects: <root>/<dataset>/<class>/<image>.

    python data/prepare.py download ucmerced|eurosat|eurosat-ms [--root DATA_DIR] [--remove-archive]
    python data/prepare.py check aid|nwpu|ucmerced|eurosat [--root DATA_DIR] [--path FOLDER]
    python data/prepare.py digits [--root DATA_DIR] [--size 32]
    python data/prepare.py split --dataset DATASET [--data DATA_DIR] [--imgEXT EXT] --out SPLIT.json

Archives are kept in <root>/downloads/ (git ignores it) unless --remove-archive is given, so
a dataset folder deleted by mistake is rebuilt without downloading again.
"""
import argparse
import concurrent.futures
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import catalog  # noqa: E402
from utils.data.download import download, extract  # noqa: E402
from utils.errors import UserError, exit_on_user_error  # noqa: E402

DEFAULT_ROOT = os.path.join(REPO, "data")
# Files that operating systems drop into folders; not part of any dataset, and ignored by training.
OS_CLUTTER = {"thumbs.db", "desktop.ini"}
CHECKABLE = ["aid", "nwpu", "ucmerced", "eurosat"]  # EuroSAT MS: Pillow cannot open 13-band TIFFs


def training_flags(folder, ext, bands=3):
    root, name = os.path.split(os.path.abspath(folder))
    return f"--data {root} --dataset {name} --imgEXT {ext}" + (f" --bands {bands}" if bands != 3 else "")


def print_where(folder, ext, bands=3):
    print(f"dataset: {os.path.abspath(folder)}")
    print(f"train with: python train/main.py {training_flags(folder, ext, bands)}   (or train_MB/main.py)")


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------

def _probe(path):
    """(path, error or None, size) after fully decoding the image."""
    try:
        with Image.open(path) as img:
            img.load()
            return path, None, img.size
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError...) on bad files
        return path, f"{type(err).__name__}: {err}", None


def find_differences(folder, spec, read_images=True):
    """Compare a class-folder tree with the published dataset.

    Returns (differences, notes, n_images): differences are lines that make the check fail,
    notes are printed but do not (image sizes: training resizes every image anyway).
    """
    diffs, notes = [], []
    ext = "." + spec["ext"]
    found = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    expected = spec["classes"]
    if expected is not None:
        diffs += [f"missing class: {c} (expected {expected[c]} images)" for c in sorted(set(expected) - set(found))]
        diffs += [f"extra class: {c}" for c in found if c not in expected]
    elif len(found) != spec["num_classes"]:
        diffs.append(f"{len(found)} class folders, expected {spec['num_classes']}")

    images = []
    for c in found:
        class_dir = os.path.join(folder, c)
        entries = sorted(os.scandir(class_dir), key=lambda e: e.name)
        good = [e.path for e in entries if e.is_file() and e.name.lower().endswith(ext)]
        for e in entries:
            if e.is_dir():
                diffs.append(f"sub-folder inside a class folder (images must be directly in the class "
                             f"folder): {e.path}")
            elif e.is_file() and not e.name.lower().endswith(ext) \
                    and not e.name.startswith(".") and e.name.lower() not in OS_CLUTTER:
                diffs.append(f"wrong extension: {e.path} (expected {ext})")
        n = len(good)
        if expected is not None and c in expected and n != expected[c]:
            gap = expected[c] - n
            diffs.append(f"class {c}: {n} {ext} images, expected {expected[c]} "
                         + (f"({gap} missing)" if gap > 0 else f"({-gap} extra)"))
        elif expected is None and not spec["per_class"][0] <= n <= spec["per_class"][1]:
            lo, hi = spec["per_class"]
            diffs.append(f"class {c}: {n} {ext} images, expected between {lo} and {hi}")
        images += good

    want_total = sum(expected.values()) if expected is not None else spec["total"]
    if len(images) != want_total:
        diffs.append(f"{len(images)} {ext} images in all, expected {want_total}")

    if read_images and images:
        # Threads: Pillow releases the GIL while decoding, and checking 30,000 files takes minutes.
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(tqdm(pool.map(_probe, images), total=len(images), desc="opening images",
                                unit="img", leave=False))
        diffs += [f"unreadable: {path} ({err})" for path, err, _ in results if err]
        wrong_size = [(path, size) for path, err, size in results
                      if not err and spec["size"] is not None and size != tuple(spec["size"])]
        if wrong_size:
            w, h = spec["size"]
            examples = ", ".join(f"{p} is {s[0]}x{s[1]}" for p, s in wrong_size[:5])
            notes.append(f"{len(wrong_size)} images are not {w}x{h} as published (e.g. {examples}); training "
                         "resizes every image, so this alone does not stop it")
    return diffs, notes, len(images)


def cmd_check(args):
    spec = catalog.DATASETS[args.dataset]
    folder = os.path.abspath(args.path or os.path.join(args.root, spec["name"]))
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist; put {spec['title']} there as <class>/<image>{'.' + spec['ext']} "
                        "or point --path (or --root) at it")
    print(f"checking {folder} against the published {spec['title']}")
    diffs, notes, n = find_differences(folder, spec)
    for line in notes:
        print(f"note: {line}")
    if diffs:
        print(f"differences from the published {spec['title']}:")
        for line in diffs:
            print(f"  {line}")
        raise UserError(f"{folder} differs from the published {spec['title']} in {len(diffs)} way(s), "
                        "listed above; fix or re-download those files and check again")
    n_classes = len(next(os.walk(folder))[1])
    print(f"OK: {n_classes} classes, {n} images, all readable, as published")
    print_where(folder, spec["ext"])


# ---------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------

def cmd_download(args):
    spec, source = catalog.DATASETS[args.dataset], catalog.DOWNLOADS[args.dataset]
    root = os.path.abspath(args.root)
    target = os.path.join(root, spec["name"])
    archive_dir = os.path.join(root, "downloads")
    archive = os.path.join(archive_dir, source["filename"])
    work = os.path.join(archive_dir, spec["name"] + ".extracted")

    if os.path.isdir(target):
        print(f"{spec['title']} is already there: {target}")
        if args.dataset in CHECKABLE:
            print(f"to verify it: python data/prepare.py check {args.dataset} --path {target}")
    else:
        print(f"downloading {spec['title']} from {source['url']}")
        download(source["url"], archive, source["md5"])
        print(f"extracting {archive}")
        extract(archive, work)
        inner = os.path.join(work, source["inner"])
        if not os.path.isdir(inner):
            raise UserError(f"{archive} does not contain the folder {source['inner']} where the class folders "
                            f"should be; the release may have changed. Delete {work} and the archive, or "
                            f"arrange {target} as <class>/<image> by hand")
        os.replace(inner, target)  # one rename: the dataset folder appears complete or not at all
        # The counts were published with the archive's MD5, so a difference here means our tables
        # are off, not the download: say so, but keep the data.
        diffs, _, n = find_differences(target, spec, read_images=False)
        for line in diffs:
            print(f"warning: {line}")
        print(f"{spec['title']}: {n} images in {len(next(os.walk(target))[1])} classes")
    shutil.rmtree(work, ignore_errors=True)  # the rest of the archive (and leftovers of a stop after the rename)
    if args.remove_archive and os.path.exists(archive):
        os.remove(archive)
        print(f"removed {archive}")
    _warn_if_unreadable(target, spec.get("bands", 3))
    print_where(target, spec["ext"], spec.get("bands", 3))


def _warn_if_unreadable(folder, bands):
    """Say so if the training's image reader cannot open the files (a release that changed format)."""
    from utils.data.scenes import read_image
    for dirpath, _, files in os.walk(folder):
        if files:
            try:
                read_image(os.path.join(dirpath, sorted(files)[0]), bands)
            except UserError as err:
                print(f"note: the training's image reader (utils/data/scenes.py) cannot open these files: {err}")
            return


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------

def cmd_digits(args):
    from utils.data.digits import make_digits
    target = os.path.join(os.path.abspath(args.root), "digits")
    if os.path.isdir(target):
        print(f"the digits demo is already there: {target}")
    else:
        make_digits(os.path.abspath(args.root), size=args.size)
        print(f"wrote the digits demo (scikit-learn's 1,797 handwritten digits, {args.size}x{args.size} PNG)")
    print_where(target, "png")


# ---------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------

def cmd_split(args):
    """Write our split (70/10/20 per class, seed 42) of a dataset as a split file (--split-file)."""
    from utils.data.scenes import SPLITS, SceneDataset
    from utils.data.split_files import lists_sha256, read_split_file, relative_lists, write_split_file
    from utils.training.flags import image_extension

    ext = image_extension(args.dataset, args.imgEXT)
    folder = os.path.join(os.path.abspath(args.root), args.dataset)
    if args.dataset == "digits" and not os.path.isdir(folder):  # as training creates it on first use
        cmd_digits(argparse.Namespace(root=args.root, size=32))
    lists = relative_lists([SceneDataset(os.path.abspath(args.root), args.dataset, s, ext) for s in SPLITS], folder)
    if os.path.exists(args.out):
        if os.path.isfile(args.out) and read_split_file(args.out, folder) == lists:
            print(f"{args.out} already holds this split")
            return
        raise UserError(f"{args.out} already exists and holds other lists; pass another --out, or remove it first")
    try:
        write_split_file(args.out, lists)
    except OSError as err:
        raise UserError(f"cannot write the split file {args.out} ({err.strerror}); pass a writable --out") from None
    counts = ", ".join(f"{len(lists[s])} {s}" for s in SPLITS)
    print(f"wrote the split of {folder} ({counts}; sha256 {lists_sha256(lists)}) to {args.out}\n"
          f"train with: --data {os.path.abspath(args.root)} --dataset {args.dataset} --split-file {args.out}")


# ---------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Download, check or generate scene datasets in the "
                                                 "<root>/<dataset>/<class>/<image> layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    root_help = f"data folder holding the datasets (default: {DEFAULT_ROOT})"

    p = sub.add_parser("download", help="download, verify and extract an official archive")
    p.add_argument("dataset", choices=sorted(catalog.DOWNLOADS))
    p.add_argument("--root", default=DEFAULT_ROOT, help=root_help)
    p.add_argument("--remove-archive", action="store_true",
                   help="delete the archive from <root>/downloads/ once the dataset is in place")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("check", help="verify a dataset folder you placed yourself against the published counts")
    p.add_argument("dataset", choices=CHECKABLE)
    p.add_argument("--root", default=DEFAULT_ROOT, help=root_help)
    p.add_argument("--path", help="the dataset folder itself (default: <root>/<dataset name>)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("digits", help="write the offline demo dataset (no download)")
    p.add_argument("--root", default=DEFAULT_ROOT, help=root_help)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.set_defaults(func=cmd_digits)

    p = sub.add_parser("split", help="write our train/val/test split of a dataset as a --split-file (JSON)")
    p.add_argument("--dataset", required=True, help="dataset folder under --data")
    p.add_argument("--data", "--root", dest="root", default=DEFAULT_ROOT, help=root_help)
    p.add_argument("--imgEXT", default=None, help="image file extension (default: the dataset's own, else tif)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.set_defaults(func=cmd_split)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
