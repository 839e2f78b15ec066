"""Every image of a run's splits opened once before the first epoch, so that a damaged file or a
file of the wrong kind stops the run before anything is trained or written, with all such files
listed at once (or, with --skip-bad-images, left out).

What is read: the pixel data, which is what finds a file cut short (a header alone looks fine),
and for a TIFF of several pages or one Pillow cannot read, tifffile's reading of its header (a
multi-band TIFF read as RGB is refused, utils/data/image_files.py). JPEGs are
decoded at 1/8 scale (Pillow's draft mode): the whole compressed stream is still read, in a
fraction of the time. Multi-band files are read as training reads them. Files are checked on
a few threads (decoding releases the GIL); docs/benchmarks.md gives the time for 30,000 images.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from tqdm import tqdm

from utils.data.image_files import refuse_multiband, rgb_read_failure
from utils.data.multiband import read_multiband
from utils.errors import UserError

SHOWN = 5  # unreadable files named in one message; the rest are counted


def check_rgb(path):
    """Raise the UserError that reading `path` as RGB for training would raise, if any (the
    same tests as utils.data.read_rgb, which Pillow's draft mode makes cheaper for JPEGs)."""
    try:
        with Image.open(path) as img:
            refuse_multiband(img, path)
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise rgb_read_failure(path, err) from None


def find_unreadable(paths, bands=3, threads=None):
    """{path: UserError} of the images among `paths` that cannot be read with `bands`."""
    def check(path):
        try:
            check_rgb(path) if bands == 3 else read_multiband(path, bands)
        except UserError as err:
            return path, err
        return path, None

    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        checked = tqdm(pool.map(check, paths), total=len(paths), desc="checking images", unit="img",
                       leave=False, mininterval=1)
        return {path: err for path, err in checked if err is not None}


def check_images(datasets, skip=False):
    """Open every image of the datasets once. Unreadable ones stop the run in one line that lists
    them (the first few and a count) with the fix; with `skip` they are dropped from each dataset
    in place (indices re-numbered, so memory rows still run 0..N-1) and returned, sorted.

    With `skip`, what is left must still be usable: not every image gone, no split emptied, no
    class left without train images. The message names the likely fix, seldom skipping more."""
    paths = sorted({path for ds in datasets for path, _ in ds.samples})
    bad = find_unreadable(paths, datasets[0].bands) if paths else {}
    if not bad:
        return []
    if not skip:
        raise _unreadable_error(bad, len(paths), datasets[0])
    before = [ds.samples for ds in datasets]
    for ds in datasets:
        ds.samples = [(p, y) for p, y in ds.samples if p not in bad]
        ds.labels = torch.tensor([y for _, y in ds.samples], dtype=torch.long)
    _check_usable(datasets, before, bad, len(paths))
    return sorted(bad)


def _unreadable_error(bad, checked, ds):
    """One line for all unreadable images: a wrong kind of file first (its fix is the likely one for
    all, and not --skip-bad-images), else the damaged files with the --skip-bad-images hint."""
    wrong_kind = [p for p, e in bad.items() if not getattr(e, "broken", True)]
    if wrong_kind:
        first = bad[wrong_kind[0]]
        more = f" ({len(wrong_kind) - 1} more file(s) like it)" if len(wrong_kind) > 1 else ""
        return UserError(f"{first.problem}{more}; {first.fix}")
    paths = sorted(bad)
    listed = ", ".join(paths[:SHOWN]) + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")
    return UserError(f"{len(paths)} of the {checked} images in {os.path.join(ds.root, ds.dataset)} cannot be read: "
                     f"{listed} (e.g. {_problem(bad[paths[0]])}); replace or remove them, or pass "
                     "--skip-bad-images to leave unreadable files out")


def _check_usable(datasets, before, bad, checked):
    ds0 = datasets[0]
    with_bands = f"with --bands {ds0.bands}"
    if len(bad) == checked:
        example = _example(bad.values())
        raise UserError(f"every one of the {checked} .{ds0.ext} images was unreadable {with_bands} "
                        f"(e.g. {_problem(example)}); {_fix(example, 'download or unpack the dataset again')}")
    for ds, samples in zip(datasets, before):
        if samples and not ds.samples:
            example = _example(bad[p] for p, _ in samples)
            raise UserError(f"every {ds.split} image was unreadable {with_bands}, so --skip-bad-images left the "
                            f"{ds.split} split empty (e.g. {_problem(example)}); "
                            f"{_fix(example, 'replace the damaged files, or download the dataset again')}")
        if ds.split == "train":
            left = set(ds.labels.tolist())
            for label, name in enumerate(ds.classes):
                if label not in left:
                    class_dir = os.path.join(ds.root, ds.dataset, name)
                    example = _example(bad[p] for p, y in samples if y == label)
                    raise UserError(
                        f"every train image of class {name} was unreadable {with_bands}, so --skip-bad-images "
                        f"left the class without train images (e.g. {_problem(example)}); "
                        f"{_fix(example, f'replace the damaged images in {class_dir}, or remove that folder')}")


def _example(errors):
    """The error to show: one of the wrong kind of file if any, as its fix is the likely one for all."""
    errors = list(errors)
    return next((e for e in errors if not getattr(e, "broken", True)), errors[0])


def _problem(err):
    return getattr(err, "problem", str(err))


def _fix(example, broken_fix):
    if not getattr(example, "broken", True):
        return example.fix
    return f"the files are damaged or not images (a failed download often saves an error page): {broken_fix}"
