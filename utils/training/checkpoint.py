"""Checkpoints: plain state_dicts, written atomically, read with weights_only=True.

A checkpoint holds only tensors and plain data, so loading one from someone
else cannot run code; torch.load(weights_only=True) refuses anything else.
"""
import errno
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile

import numpy as np
import torch

from utils.errors import UserError

FORMAT = "cdne-checkpoint"
# What must match for a checkpoint to continue a run: the network's shape and the memory's rows.
CONFIG_KEYS = ("variant", "arch", "dim", "num_classes", "in_channels", "num_samples", "classes")


def write_atomically(path, write, suffix="", binary=True):
    """write(fh) into a temporary file in the same folder, fsync, then rename over `path`:
    a crash or a full disk mid-write leaves the previous file (or none), never half a file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
        # Text as given (newline=""): csv writes its own line ends, and the rest writes "\n".
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the rest of a group
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):  # a full disk, a quota, a folder gone: the user's to fix, in one line
            raise UserError(write_failure(path, err)) from None
        raise


def write_failure(path, err):
    """One line on a failed write: what, why, how much room is left, that the old file stayed,
    and what to do about it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        room = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        room = ""
    kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space and try again"
    elif not os.path.isdir(folder):
        fix = f"the folder {folder} is gone; create it or choose another output folder"
    else:
        fix = f"make {folder} writable or choose another output folder"
    return f"cannot write {path} ({err.strerror or err}{room}); {kept}; {fix}"


def atomic_save(obj, path):
    """torch.save, written atomically (write_atomically)."""
    write_atomically(path, lambda fh: torch.save(obj, fh), suffix=".pth")


def atomic_duplicate(src, dst):
    """Make `dst` hold what `src` holds, atomically: a hard link where the filesystem has them
    (the best checkpoint is usually the last one, and a ResNet-50 checkpoint is 130 MB), else
    a copy. Safe because checkpoints are only ever replaced by rename, never written in place."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".tmp-link-{os.getpid()}-{os.path.basename(dst)}")
    if os.path.exists(dst) and os.path.samefile(src, dst):  # already one file (a rename would do nothing)
        return
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network filesystems): copy instead
            with open(src, "rb") as source:
                write_atomically(dst, lambda fh: shutil.copyfileobj(source, fh), suffix=".pth")
            return
        os.replace(tmp, dst)
    except OSError as err:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise UserError(write_failure(dst, err)) from None


def safe_load(path, what="checkpoint", fix=None):
    """torch.load with weights_only=True; every failure is a one-line UserError that says what
    is wrong with the file (empty, truncated, damaged, not a torch file) and what to do:
    fix(kind) for kind "empty", "truncated", "damaged" or "foreign" (default: pass a file
    written by this project)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; pass the path of a checkpoint_*.pth file from a run folder")
    size = os.path.getsize(path)
    fix = fix or (lambda kind: f"pass a {what} written by this project")

    def refused(err):
        kind, words = damage(path, size, what, err)
        return UserError(f"{what} {path} is {words}; {fix(kind)}")

    if size == 0:  # torch.load raises an EOFError with no message at all: say it ourselves
        raise refused(None)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:  # a reference to a function or class: loading it could run code
            raise UserError(f"{path} holds more than tensors and plain data ({found.group(1)}), so it is not "
                            f"loaded (it could run code); use a {what} written by this project") from None
        raise refused(err) from None
    except Exception as err:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise refused(err) from None
    return obj


def damage(path, size, what, err):
    """(kind, words) for a file of `size` bytes that torch.load refused with `err`: torch's own
    messages run to several sentences about zip internals and say nothing for an empty file."""
    if size == 0:
        return "empty", "empty: 0 bytes, as a full disk or an interrupted copy leaves"
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive, whose directory is at the very end: a cut file loses it.
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "truncated", (f"truncated: {size:,} bytes with the end of the file missing, as a full disk or "
                             "an interrupted copy leaves")
    if head == b"PK\x03\x04":
        return "damaged", (f"damaged: a whole zip archive of {size:,} bytes that torch cannot read "
                           f"({first_sentence(err)})")
    if head == b"\x80\x02\x8a\x0a":  # torch's older format: a pickle stream that opens with torch's magic number
        return "truncated", (f"truncated or damaged: {size:,} bytes of a torch file in the older format that "
                             "torch cannot read to the end, as a full disk or an interrupted copy leaves")
    return "foreign", f"not a readable {what}: {size:,} bytes that are not a torch file of tensors and plain data"


def first_sentence(err):
    """The first sentence of an exception's message, whole, or its type when it has none."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text.split('. ')[0]}" if text else type(err).__name__


def checkpoint_fix(path):
    """fix(kind) for safe_load: a checkpoint that is not a torch file at all was the wrong file;
    one that is cut or damaged can be replaced by its run folder's other checkpoint when that
    is a whole file (and not the same file through a hard link), else the run starts again."""
    def fix(kind):
        if kind == "foreign":
            return "pass a checkpoint_last.pth or checkpoint_best.pth from a run folder"
        folder, name = os.path.split(path)
        # The last checkpoint first, unless it is the one refused: then the best, a hard link to
        # the last when they were the same epoch (the samefile test) or an older epoch's.
        for other, holds in (("checkpoint_last.pth", "the last epoch saved"),
                             ("checkpoint_best.pth", "the best epoch, which may be older than the last")):
            sibling = os.path.join(folder, other)
            if other != name and os.path.isfile(sibling) and not os.path.samefile(sibling, path) \
                    and zipfile.is_zipfile(sibling):
                return (f"{sibling} in the same folder is a whole file: pass it instead if it is intact (it holds "
                        f"{holds}), or start the run again under another --name")
        return ("copy it again from where it was written if it is whole there, or start the run again under "
                "another --name")
    return fix


def load_checkpoint(path):
    ckpt = safe_load(path, fix=checkpoint_fix(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a CDNE checkpoint; pass a checkpoint_last.pth or checkpoint_best.pth "
                        "from a run folder")
    return ckpt


def check_config(ckpt_config, config, path):
    """Refuse a checkpoint of another configuration (bits, classes, architecture, variant)."""
    diffs = [f"{k}={_short(ckpt_config.get(k))} (this run: {_short(config.get(k))})"
             for k in CONFIG_KEYS if k in ckpt_config and ckpt_config.get(k) != config.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} is from another configuration: {', '.join(diffs)}; "
                        "resume it with the same flags or start a new run")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rng_state():
    """All RNG states, as tensors and plain data (no numpy arrays, so weights_only loading works)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    # Python's random state is nested tuples; keep it so after a round trip through the loader.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_json_atomic(path, obj):
    """JSON written atomically: a kill mid-write leaves the previous file (or none), never half
    a file that the table cannot read."""
    write_atomically(path, lambda fh: json.dump(obj, fh, indent=2), suffix=".json", binary=False)
