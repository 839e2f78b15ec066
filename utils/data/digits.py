"""The offline demo dataset: scikit-learn's 1,797 real handwritten digits as RGB PNGs."""
import os
import shutil
import threading

import numpy as np
from PIL import Image
from tqdm import tqdm


def make_digits(root, name="digits", size=32, per_class=None):
    """Write <root>/<name>/<digit>/<n>.png, each 8x8 digit upsampled to size x size.

    per_class keeps the first images of each class (small test datasets).
    Writes into a temporary folder of this process and renames it, so an interrupted run leaves
    nothing half-made and cells started at once (python -m utils.table --jobs) never share one:
    the first complete folder renamed wins, the others are dropped.
    """
    from sklearn.datasets import load_digits

    target = os.path.join(root, name)
    if os.path.isdir(target):
        return target
    digits = load_digits()
    tmp = f"{target}.partial-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    counts = {}
    for img, label in tqdm(zip(digits.images, digits.target), total=len(digits.target),
                           desc=f"writing {target}", leave=False):
        n = counts.get(label, 0)
        if per_class is not None and n >= per_class:
            continue
        counts[label] = n + 1
        class_dir = os.path.join(tmp, str(label))
        os.makedirs(class_dir, exist_ok=True)
        gray = (img / 16.0 * 255).round().astype(np.uint8)  # pixel values are 0..16
        Image.fromarray(gray).resize((size, size), Image.BICUBIC).convert("RGB").save(
            os.path.join(class_dir, f"{n:04d}.png"))
    try:
        os.replace(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: its folder is the same
    return target
