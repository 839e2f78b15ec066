"""Resumable, checksum-verified downloads and safe archive extraction.

Dataset archives are large (EuroSAT MS is about 2 GB), so both steps are built to be
re-run after an interruption: the download continues where it stopped (HTTP Range), and
an extraction works in a temporary folder that is only renamed into place when complete.
"""
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

from utils.errors import UserError

CHUNK = 1 << 20
TIMEOUT_S = 60  # per blocking socket operation, not for the whole download


def file_md5(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _by_hand(url, dest):
    return f"download {url} by hand (e.g. in a browser) and save it as {dest}"


def _check_md5(path, md5, url, dest):
    """Raise (and delete the file) unless path has the expected MD5."""
    found = file_md5(path)
    if found != md5.lower():
        os.remove(path)  # never leave a bad file where the next run would trust or resume it
        raise UserError(f"checksum mismatch for {dest}: expected MD5 {md5}, found {found}; the file was "
                        f"corrupt or incomplete and has been deleted. Run the command again to download it "
                        f"afresh, or {_by_hand(url, dest)}")


def _content_range(resp):
    """(start, total) from a 206 response's Content-Range; total is None when unknown."""
    m = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def download(url, dest, md5, progress=True):
    """Download url to dest, verified against md5. Returns dest.

    Data goes to dest + ".part" first; an existing .part is resumed with a Range request
    (restarted if the server ignores it). dest itself only ever holds a verified file.
    """
    if os.path.exists(dest):  # done earlier, or placed by hand: trust it only if it verifies
        _check_md5(dest, md5, url, dest)
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "cdne-data-prepare"}
    if have:
        headers["Range"] = f"bytes={have}-"
    total = None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
            start, total = _content_range(resp) if resp.status == 206 else (None, None)
            if have and start == have:
                mode = "ab"
                if total is None and resp.headers.get("Content-Length"):
                    total = have + int(resp.headers["Content-Length"])
            else:  # a fresh download, or the server ignored the Range header: start over
                have, mode = 0, "wb"
                length = resp.headers.get("Content-Length")
                total = int(length) if length else None
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=os.path.basename(dest),
                                             disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        # 416: nothing left to send, i.e. the .part is already whole (an earlier run stopped
        # before verifying it); the checksum below decides. Any other status is a failure.
        if not (err.code == 416 and have):
            raise UserError(f"could not download {url} (HTTP {err.code} {err.reason}); run the command "
                            f"again later, or {_by_hand(url, dest)}") from None
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets are OSErrors
        raise UserError(f"could not download {url} ({err}); what arrived is kept in {part}, so running the "
                        f"command again resumes the download. Or {_by_hand(url, dest)}") from None
    size = os.path.getsize(part)
    if total is not None and size < total:
        # http.client does not raise when a server closes early, so compare sizes ourselves
        raise UserError(f"the download of {url} stopped after {size} of {total} bytes; run the command again "
                        f"to resume it, or {_by_hand(url, dest)}")
    _check_md5(part, md5, url, dest)
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

def _inside(root, name):
    """True if the archive member name, extracted under root, stays inside root."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, name))
    return os.path.commonpath([root, target]) == root


def _refuse(archive, name, why="would be written outside the extraction folder"):
    raise UserError(f"refusing to extract {archive}: member {name!r} {why}; the archive is damaged or "
                    "was tampered with. Delete it and download it again")


def _extract_zip(archive, tmp):
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for m in members:  # check everything before writing anything
            if not _inside(tmp, m.filename):
                _refuse(archive, m.filename)
        for m in tqdm(members, desc=f"extracting {os.path.basename(archive)}", unit="file", leave=False):
            zf.extract(m, tmp)


def _extract_tar(archive, tmp):
    # Python's "data" filter (3.11.4+) also blocks links and special files that escape; our own
    # checks below come first so that the message is the same on every Python version.
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            if not _inside(tmp, m.name):
                _refuse(archive, m.name)
            if m.issym() and not _inside(tmp, os.path.join(os.path.dirname(m.name), m.linkname)):
                _refuse(archive, m.name, f"is a link to {m.linkname!r}, outside the extraction folder")
            if m.islnk() and not _inside(tmp, m.linkname):
                _refuse(archive, m.name, f"is a link to {m.linkname!r}, outside the extraction folder")
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                _refuse(archive, m.name, "is a device or other special file")
        for m in tqdm(members, desc=f"extracting {os.path.basename(archive)}", unit="file", leave=False):
            tf.extract(m, tmp, **kwargs)


def extract(archive, dest_dir):
    """Extract a .zip, .tar, .tar.gz or .tgz archive into dest_dir. Returns dest_dir.

    Works in dest_dir + ".partial" and renames it at the end, so dest_dir exists only when
    complete; a leftover .partial from an interrupted run is deleted and the extraction redone.
    Members that would land outside the folder are refused (path traversal).
    """
    if os.path.isdir(dest_dir):
        return dest_dir
    lower = archive.lower()
    if lower.endswith(".zip"):
        extract_into = _extract_zip
    elif lower.endswith((".tar", ".tar.gz", ".tgz")):
        extract_into = _extract_tar
    else:
        raise UserError(f"cannot extract {archive}: expected a .zip, .tar, .tar.gz or .tgz archive")
    tmp = dest_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    os.makedirs(tmp)
    try:
        extract_into(archive, tmp)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot extract {archive} ({err}); delete the archive and run the command again "
                        "to download it afresh") from None
    except BaseException:  # our refusals, Ctrl-C: leave no half-extracted folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, dest_dir)
    return dest_dir
