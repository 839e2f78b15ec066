"""Time the image check that runs before training (utils/data/image_check.py) on N generated images.

    python benchmarks/bench_image_check.py --images 30000 --size 64 --format jpg   # EuroSAT-like
    python benchmarks/bench_image_check.py --images 30000 --size 256 --format jpg  # NWPU-like

Compared in the same run, on the same files (the first pass also warms the page cache, so it
is repeated after the others): the check as it runs (header of TIFFs, then the pixel data;
JPEGs at 1/8 scale; a few threads), the same on one thread, headers only (Image.open without
decoding: fast, but blind to a file cut short), and the full read that --skip-bad-images did
before (utils.data.read_image of every file, one thread). The files go to a temporary folder
that is removed at the end.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import print_header  # noqa: E402
from utils.data.image_check import find_unreadable  # noqa: E402
from utils.data.scenes import read_image  # noqa: E402


def write_images(folder, n, size, fmt):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        d = os.path.join(folder, f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{i:06d}.{fmt}")
        Image.fromarray(np.roll(base, i, axis=1)).save(path)
        paths.append(path)
    return paths


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def headers_only(paths):
    for path in paths:
        with Image.open(path):
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=30000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--format", default="jpg", choices=("jpg", "png", "tif"))
    args = p.parse_args()
    print_header()
    folder = tempfile.mkdtemp(prefix="bench_image_check_")
    try:
        paths = write_images(folder, args.images, args.size, args.format)
        n = len(paths)
        check = timed(lambda: find_unreadable(paths))  # also warms the page cache
        rows = [("the check (threads)", timed(lambda: find_unreadable(paths))),
                ("the check, 1 thread", timed(lambda: find_unreadable(paths, threads=1))),
                ("headers only, 1 thread", timed(lambda: headers_only(paths))),
                ("read_image of every file, 1 thread (before)", timed(lambda: [read_image(q) for q in paths]))]
        print(f"{n} {args.size}x{args.size} .{args.format} images; the check, first pass (cold cache): {check:.1f} s")
        for name, seconds in rows:
            print(f"  {name:45s} {seconds:7.2f} s  {seconds / n * 1e6:7.0f} us/image  "
                  f"{seconds / rows[0][1]:5.2f}x the check's time")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
