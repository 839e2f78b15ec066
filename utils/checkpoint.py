"""Checkpoints: plain state_dicts, written atomically, read with weights_only=True.

A checkpoint holds only tensors and plain data, so loading one from someone
else cannot run code; torch.load(weights_only=True) refuses anything else.
"""
import errno
import os
import pickle
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from .errors import UserError

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


def safe_load(path, what="checkpoint"):
    """torch.load with weights_only=True; every failure is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; pass the path of a checkpoint_*.pth file from a run folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:  # a reference to a function or class: loading it could run code
            raise UserError(f"{path} holds more than tensors and plain data ({found.group(1)}), so it is not "
                            f"loaded (it could run code); use a {what} written by this project") from None
        raise UserError(f"{path} is not a readable {what} (not a torch file of tensors and plain data); "
                        f"pass a {what} written by this project") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise UserError(f"{path} is not a readable {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        f"pass a {what} written by this project") from None
    return obj


def load_checkpoint(path):
    ckpt = safe_load(path)
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
