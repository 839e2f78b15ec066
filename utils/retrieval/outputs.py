"""Output paths of the retrieval command, checked before any image is encoded (one line, exit 2)."""
import json
import os
import tempfile

from utils.errors import UserError


def check_writable(path, flag):
    """Refuse an output file that cannot be written: its folder (or the nearest one that exists,
    the rest being created later) must take a new file, and the path must not be a folder."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; pass the path of a file to write")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {flag} {path}: the file is read-only; pass another path")
    probe_folder(os.path.dirname(path), path, flag)


def check_index_out(out, append, overwrite=False):
    """Refuse an index path that cannot be written, a folder there that is not an index (it would
    be replaced), or an index there unless --append (add to it) or --overwrite (replace it) says
    what to do with it."""
    path = os.path.abspath(out)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "header.json")):
        raise UserError(f"--out {path} is a folder that is not an index (it would be replaced); pass a new path "
                        f"such as {os.path.join(path, 'images.index')}")
    if os.path.lexists(path) and not append and not overwrite:
        raise UserError(f"--out {path} is {existing(path)}; pass --overwrite to replace it (kept until the new "
                        f"index is whole), --append to add the images to it, or a new path")
    if os.path.isdir(path) and append:
        probe_folder(path, path, "--out")
    probe_folder(os.path.dirname(path), path, "--out")


def existing(path):
    """What lies at an index path, for a message: "an existing index (N images)" or "an existing
    file" (an index of an older version is one file)."""
    if not os.path.isdir(path):
        return "an existing file"
    try:
        with open(os.path.join(path, "header.json")) as fh:
            return f"an existing index ({json.load(fh)['count']} images)"
    except (OSError, ValueError, KeyError, TypeError):
        return "an existing index"


def probe_folder(folder, path, flag):
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {flag} {path}: {folder} is a file, not a folder; pass a path in a folder "
                        f"you can write")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise UserError(f"cannot write {flag} {path}: folder {folder} does not take new files ({err.strerror}); "
                        f"pass a path in a folder you can write") from None
