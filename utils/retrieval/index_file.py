"""Index files of the retrieval command: the codes of a database, what built them, and the
checks that a query uses the same network (its configuration and a fingerprint of its weights).

An index (version 3) is a folder that opens larger than memory:

    NAME.index/header.json        format, version, bits, count, config, checkpoint, weights_sha256, classes
    NAME.index/codes.bidx         the packed codes, a BinaryIndex file (utils/retrieval/search.py; memory-mapped)
    NAME.index/labels.npy         int64 class ids, -1 where unknown (np.load(..., mmap_mode="r"))
    NAME.index/paths.txt          absolute image paths, one a line
    NAME.index/path_offsets.npy   int64 byte offset of each line, so that a path is read alone

It is written as the codes come: a new index in NAME.index.partial, renamed into place at the
end (a replaced index, `--overwrite`, stays whole until then); an appended part after the last
row, header.json (whose count is the truth) rewritten last, so an interrupted append leaves the
index as it was, and a failed one (a full disk) is cut back to its old bytes (`abandon`).
Version-1 and -2 indexes (one torch.save file) still open, in memory, for queries.
"""
import errno
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch

from utils.errors import UserError
from utils.retrieval.search import HEADER_BYTES, BinaryIndex, encode_header, read_header
from utils.training import checkpoint as ckpt_io
from utils.training.checkpoint import write_json_atomic

INDEX_FORMAT = "cdne-index"
INDEX_VERSION = 3  # 2: "weights_sha256"; 3: a folder of packed codes, labels, paths (opens memory-mapped)
# What must agree between the checkpoint that built an index and the one that queries it.
CODE_KEYS = ("arch", "dim", "in_channels", "img_size")
BUILD_HINT = "python -m utils.retrieve index --checkpoint CHECKPOINT --out"


def weights_fingerprint(state_dict):
    """sha256 (hex) over a state_dict's tensors in key order: each name, dtype, shape and bytes.

    Two checkpoints have the same fingerprint iff their networks compute the same codes
    (bit for bit the same parameters and buffers), wherever the files lie."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Paths:
    """The image paths of an index folder, read one at a time through their byte offsets."""

    def __init__(self, folder, count):
        self.file = os.path.join(folder, "paths.txt")
        self.offsets = np.load(os.path.join(folder, "path_offsets.npy"), mmap_mode="r")[:count + 1]

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, j):
        if not 0 <= j < len(self):
            raise IndexError(j)
        with open(self.file, "rb") as fh:
            fh.seek(int(self.offsets[j]))
            return fh.read(int(self.offsets[j + 1] - self.offsets[j]) - 1).decode()


class OpenedIndex:
    """An index opened for queries: `header` (every field but the data), `search` (a BinaryIndex
    over the codes), `labels` (class ids, -1 unknown), `paths` (indexable), `classes`."""

    def __init__(self, path, header, search, labels, paths):
        self.path, self.header, self.search, self.labels, self.paths = path, header, search, labels, paths
        self.classes, self.config = header.get("classes"), header["config"]

    def get(self, key, default=None):
        return self.header.get(key, default)

    def __len__(self):
        return len(self.search)

    def label_name(self, j):
        label = int(self.labels[j]) if self.labels is not None else -1
        return self.classes[label] if self.classes and label >= 0 else None


def load_index(path):
    if not os.path.exists(path):
        raise UserError(f"index file {path} does not exist; build one with `{BUILD_HINT} {path}` "
                        "(add --folder DIR to index a folder of images instead of the run's train split)")
    if os.path.isdir(path):
        header = read_index_header(path)
        count, bits = header["count"], header["bits"]
        codes_path = os.path.join(path, "codes.bidx")
        read_header(codes_path)  # a BinaryIndex file, not truncated below its own count
        codes = np.memmap(codes_path, np.uint8, "r", HEADER_BYTES, (count, (bits + 7) // 8)) if count else \
            np.zeros((0, (bits + 7) // 8), np.uint8)
        labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")[:count]
        return OpenedIndex(path, header, BinaryIndex.from_packed(bits, codes), labels, Paths(path, count))
    index = ckpt_io.safe_load(path, what="index")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise UserError(f"{path} is not an index file; build one with `python -m utils.retrieve index`")
    # Versions 1 and 2: +-1 int8 codes in one torch file, small enough to have been read whole.
    codes = index.pop("codes")
    search = BinaryIndex(codes.shape[1])
    search.add(codes)
    labels, paths = index.pop("labels"), index.pop("paths")
    labels = labels.numpy() if labels is not None else None
    return OpenedIndex(path, {**index, "bits": codes.shape[1], "count": len(paths)}, search, labels, paths)


def read_index_header(folder):
    file = os.path.join(folder, "header.json")
    try:
        with open(file) as fh:
            header = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder} is not a readable index folder ({file}: {err}); rebuild it with "
                        f"`{BUILD_HINT} {folder} --overwrite`") from None
    if header.get("format") != INDEX_FORMAT or header.get("version") != INDEX_VERSION:
        raise UserError(f"{folder} is not an index folder of this version (format {header.get('format')!r}, "
                        f"version {header.get('version')!r}); rebuild it with `{BUILD_HINT} {folder} --overwrite`")
    return header


def reserve(fh, start, stop):
    """Allocate bytes [start, stop) of an open file now. Rows are written through memory maps, and
    a page of a map that a full disk cannot back kills the process (SIGBUS, checked on a full
    tmpfs) instead of raising; allocated here, the same disk raises ENOSPC before any encoding."""
    if stop > start and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fh.fileno(), start, stop - start)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EINVAL, EOPNOTSUPP: a filesystem that cannot allocate ahead; its writes find out later


def grow_npy(file, old_rows, new_rows, dtype):
    """Resize a 1-D .npy file in place to new_rows (numpy leaves room in the header for this);
    the added rows are allocated (reserve)."""
    with open(file, "r+b") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        header_len = fh.tell()
        fh.seek(0)
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": (new_rows,)})
        if fh.tell() != header_len:
            raise RuntimeError(f"{file}: the .npy header cannot grow in place")
        fh.truncate(header_len + new_rows * np.dtype(dtype).itemsize)
        reserve(fh, header_len + old_rows * np.dtype(dtype).itemsize, header_len + new_rows * np.dtype(dtype).itemsize)
    return np.lib.format.open_memmap(file, mode="r+")


class IndexWriter:
    """Writes an index folder: `create` (a new index, in NAME.partial until `finish`) or `extend`
    (an existing one) lays out paths and labels and room for the codes; each process then
    `open_rows()` and writes its rows; the main process calls `finish()`."""

    def __init__(self, out, folder, header, start, total):
        self.out, self.folder, self.header, self.start, self.total = out, folder, header, start, total

    @classmethod
    def create(cls, out, header, paths, labels):
        folder = out.rstrip("/") + ".partial"
        header = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **header, "count": 0}
        writer = cls(out, folder, header, 0, len(paths))
        try:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            with open(os.path.join(folder, "codes.bidx"), "wb") as fh:
                fh.write(encode_header(codes_header(header["bits"], 0)))
            np.save(os.path.join(folder, "labels.npy"), np.zeros(0, np.int64))
            np.save(os.path.join(folder, "path_offsets.npy"), np.zeros(1, np.int64))
            open(os.path.join(folder, "paths.txt"), "wb").close()
            writer.lay_out(paths, labels)
        except BaseException:
            writer.abandon()
            raise
        return writer

    @classmethod
    def extend(cls, out, header, paths, labels):
        writer = cls(out, out, header, header["count"], header["count"] + len(paths))
        try:
            writer.lay_out(paths, labels)
        except BaseException:
            writer.abandon()
            raise
        return writer

    def lay_out(self, paths, labels):
        for path in paths:
            if "\n" in path:
                raise UserError(f"image path {path!r} holds a line break; rename the file")
        n_old, n_new, folder = self.start, self.total, self.folder
        offsets = grow_npy(os.path.join(folder, "path_offsets.npy"), n_old + 1, n_new + 1, np.int64)
        with open(os.path.join(folder, "paths.txt"), "r+b") as fh:
            fh.truncate(int(offsets[n_old]))  # drops what an interrupted append left
            fh.seek(int(offsets[n_old]))
            position = int(offsets[n_old])
            for i, path in enumerate(paths):
                line = (os.path.abspath(path) + "\n").encode()
                fh.write(line)
                position += len(line)
                offsets[n_old + 1 + i] = position
        offsets.flush()
        stored = grow_npy(os.path.join(folder, "labels.npy"), n_old, n_new, np.int64)
        stored[n_old:] = -1 if labels is None else np.asarray(labels, np.int64)
        stored.flush()
        code_bytes = (self.header["bits"] + 7) // 8
        with open(os.path.join(folder, "codes.bidx"), "r+b") as fh:
            fh.truncate(HEADER_BYTES + n_new * code_bytes)
            reserve(fh, HEADER_BYTES + n_old * code_bytes, HEADER_BYTES + n_new * code_bytes)

    def abandon(self):
        """Undo an unfinished write (the main process, after a failure): a new index's folder is
        removed; an extended one is cut back to the rows it had, its files the bytes they were
        (their header.json was never rewritten), which gives a full disk back the room taken."""
        if self.folder != self.out:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        folder, rows = self.folder, self.start
        try:
            offsets = os.path.join(folder, "path_offsets.npy")
            end = int(np.load(offsets, mmap_mode="r")[rows])
            with open(os.path.join(folder, "codes.bidx"), "r+b") as fh:  # finish() may have counted the rows
                fh.write(encode_header(codes_header(self.header["bits"], rows)))
                fh.truncate(HEADER_BYTES + rows * ((self.header["bits"] + 7) // 8))
            with open(os.path.join(folder, "paths.txt"), "r+b") as fh:
                fh.truncate(end)
            for name, kept in (("path_offsets.npy", rows + 1), ("labels.npy", rows)):
                grow_npy(os.path.join(folder, name), kept, kept, np.int64)  # its map is dropped at once
        except OSError:
            pass  # the count in header.json is still the old one: the index reads as it was

    def open_rows(self):
        """The codes of the new rows, (n, bits / 8) uint8 mapped for writing (each process its part)."""
        code_bytes = (self.header["bits"] + 7) // 8
        if self.total == self.start:
            return np.zeros((0, code_bytes), np.uint8)
        return np.memmap(os.path.join(self.folder, "codes.bidx"), np.uint8, "r+",
                         HEADER_BYTES + self.start * code_bytes, (self.total - self.start, code_bytes))

    def finish(self):
        """Record the new count (codes.bidx, then header.json: the count readers trust) and, for
        a new index, move it into place (an older index or file at that path is replaced)."""
        with open(os.path.join(self.folder, "codes.bidx"), "r+b") as fh:
            fh.write(encode_header(codes_header(self.header["bits"], self.total)))
            os.fsync(fh.fileno())
        write_json_atomic(os.path.join(self.folder, "header.json"), {**self.header, "count": self.total})
        if self.folder != self.out:
            old = None
            if os.path.lexists(self.out):  # rename cannot replace a folder that holds files: the old one steps aside
                old = self.out.rstrip("/") + f".old-{os.getpid()}"
                os.replace(self.out, old)
            try:
                os.replace(self.folder, self.out)
            except BaseException:
                if old:
                    os.replace(old, self.out)  # the old index back in its place
                raise
            if old:  # the new index is in place: failing to delete the old one loses nothing
                if os.path.isdir(old):
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    try:
                        os.remove(old)
                    except OSError:
                        pass


def indexed_among(folder, count, paths):
    """The paths (as given) whose absolute path is among the first `count` of an index folder's,
    read line by line: memory for the new paths only, whatever the index's size."""
    wanted = {(os.path.abspath(path) + "\n").encode(): path for path in paths}
    found = set()
    with open(os.path.join(folder, "paths.txt"), "rb") as fh:
        for _, line in zip(range(count), fh):
            if line in wanted:
                found.add(wanted[line])
    return [path for path in paths if path in found]


def codes_header(bits, count):
    return {"version": 1, "bits": bits, "code_bytes": (bits + 7) // 8, "count": count, "engine": "exact",
            "params": {}, "structure_bytes": 0}


def check_compatible(index_config, config, index_path, ckpt_path):
    diffs = [f"{k} {index_config.get(k)!r} vs {config.get(k)!r}" for k in CODE_KEYS
             if index_config.get(k) != config.get(k)]
    if diffs:
        raise UserError(f"index {index_path} was built with another kind of checkpoint than {ckpt_path} "
                        f"({', '.join(diffs)}); query it with the checkpoint that built it or rebuild the index")


def check_weights(index, loaded, index_path):
    """Refuse a checkpoint whose weights are not those that built the index; warn for old indexes."""
    built_with = index.get("weights_sha256")
    if built_with is None:
        print(f"warning: index {index_path} was written by an older version and records no fingerprint of the "
              f"weights that built it, so {loaded.path} cannot be checked against it; rebuild the index to have "
              f"it checked", file=sys.stderr)
    elif built_with != loaded.fingerprint:
        raise UserError(f"index {index_path} was built with other weights than those of {loaded.path} (it was "
                        f"built with {index.get('checkpoint')}), so its codes would not match; query it with the "
                        f"checkpoint that built it (omit --checkpoint) or rebuild the index with "
                        f"`python -m utils.retrieve index --checkpoint {loaded.path} ...`")
