"""What `retrieve serve` answers with, apart from the web: an index opened for the page (a
"side"; a second one with --compare), its rankings, the code of an uploaded image. Nothing here
writes: the index is opened read-only (memory maps in mode "r") and an approximate engine's
structure is built in memory when the folder keeps none.

A ranking is `retrieve query --exclude-self`'s for an item of the index (its own code; the
search asks for k + 1 and leaves out the rows whose path is the item's, then keeps k), and
`retrieve query`'s for an uploaded image. Its metrics and the worst queries of a class are in
serve_metrics.py.
"""
import hashlib
import mmap
import os
import threading
import time

import numpy as np
import torch

from utils.errors import UserError
from utils.retrieval.exact import pack_codes
from utils.retrieval.index_file import check_compatible, check_weights, load_index
from utils.retrieval.network import ImageFiles, Loaded, transform_of
from utils.retrieval.serve_metrics import metrics_json


class Refused(Exception):
    """A request the server answers with an HTTP error: `status` and a one-line `message`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


# ----------------------------------------------------------------------------- paths


class PathTable:
    """An index's image paths as bytes: paths.txt memory-mapped read-only with its line offsets (a
    path is a slice; a substring search runs in mmap.find, not in Python), or an old index's list."""

    def __init__(self, blob, offsets):
        self.blob, self.offsets = blob, offsets
        self.end = int(offsets[-1])

    @classmethod
    def of(cls, opened):
        count = len(opened)
        if os.path.isdir(opened.path):
            offsets = np.load(os.path.join(opened.path, "path_offsets.npy"), mmap_mode="r")[:count + 1]
            with open(os.path.join(opened.path, "paths.txt"), "rb") as fh:
                blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            return cls(blob, offsets)
        lines = [(opened.paths[j] + "\n").encode() for j in range(count)]
        return cls(b"".join(lines), np.cumsum([0] + [len(line) for line in lines]))

    def __len__(self):
        return len(self.offsets) - 1

    def raw(self, j):
        return self.blob[int(self.offsets[j]):int(self.offsets[j + 1]) - 1]

    def __getitem__(self, j):
        return self.raw(j).decode(errors="replace")

    def rows_containing(self, needle):
        """The rows whose path contains `needle` (bytes without a line break), in order."""
        pos = 0
        while True:
            hit = self.blob.find(needle, pos, self.end)
            if hit < 0:
                return
            row = int(np.searchsorted(self.offsets, hit, side="right")) - 1
            yield row
            pos = int(self.offsets[row + 1])

    def digest(self):
        """sha256 of the paths (in order), to tell two indexes of the same images in the same order."""
        h = hashlib.sha256()
        for start in range(0, self.end, 1 << 24):
            h.update(self.blob[start:min(self.end, start + (1 << 24))])
        return h.hexdigest()

    def common_folder(self):
        """The deepest folder holding every path: the lexicographically first and last paths share
        every prefix that all of them share."""
        lo = hi = None
        for j in range(len(self)):
            path = self.raw(j)
            lo = path if lo is None or path < lo else lo
            hi = path if hi is None or path > hi else hi
        folder = os.path.commonpath([lo.decode(errors="replace"), hi.decode(errors="replace")])
        return folder if lo != hi else os.path.dirname(folder)


# ----------------------------------------------------------------------------- one index


class Side:
    """One index as the page serves it: `opened` (load_index), `search` (its BinaryIndex, or an
    approximate engine over its codes), `paths` (PathTable), `loaded` (the checkpoint that built
    it, for uploads; None when there is none to load), and the mapping of its rows to those of the
    main index (None: the same rows)."""

    def __init__(self, role, path, opened, search, loaded, upload_note):
        self.role, self.path, self.opened, self.search = role, os.path.abspath(path), opened, search
        self.loaded, self.upload_note = loaded, upload_note
        self.paths = PathTable.of(opened)
        self.labels = opened.labels
        self.classes = list(opened.classes or [])
        self.bits = search.bits
        self.to_main = self.from_main = None
        self.model_lock = threading.Lock()
        self.worst_cache, self.worst_lock = {}, threading.Lock()
        known = np.asarray(self.labels) if self.labels is not None else np.zeros(0, np.int64)
        self.class_counts = np.bincount(known[known >= 0], minlength=len(self.classes)).tolist() \
            if self.classes else []

    def __len__(self):
        return len(self.opened)

    def label_name(self, j):
        return self.opened.label_name(j)

    def class_id(self, name):
        return self.classes.index(name) if name in self.classes else None

    def main_id(self, j):
        return int(j) if self.to_main is None else int(self.to_main[j])

    def row_of(self, main_id):
        return int(main_id) if self.from_main is None else int(self.from_main[main_id])

    def describe_engine(self):
        return {"engine": self.search.engine, "engine_params": dict(self.search.params)}


def open_side(role, path, checkpoint, args, device, engine_of):
    """An index and, for uploads, its checkpoint: `checkpoint` when given (refused in one line when
    it is of another kind or has other weights than those that built the index, as `retrieve query`
    refuses it), else the one the index records when that file exists (uploads are off otherwise)."""
    opened = load_index(path)
    if len(opened) == 0:
        raise UserError(f"index {path} holds no images; add some with `python -m utils.retrieve index ... "
                        f"--out {path} --append`")
    ckpt_path = checkpoint or opened.get("checkpoint")
    loaded, note = None, None
    if checkpoint or (ckpt_path and os.path.isfile(ckpt_path)):
        if not os.path.isfile(ckpt_path):
            raise UserError(f"checkpoint {ckpt_path} does not exist; pass the checkpoint_*.pth that built index "
                            f"{path}, or leave --checkpoint out to serve without uploads")
        loaded = Loaded(ckpt_path, device)
        check_compatible(opened.config, loaded.config, path, ckpt_path)
        check_weights(opened, loaded, path)
    else:
        note = (f"uploads are off for {path}: the checkpoint it records ({ckpt_path}) does not exist; pass "
                f"--checkpoint PATH to encode uploaded images") if role == "main" else \
               (f"uploads are ranked by the main index alone: the checkpoint that --compare {path} records "
                f"({ckpt_path}) does not exist")
    return Side(role, path, opened, engine_of(args, opened), loaded, note)


def align(main, other):
    """Map `other`'s rows onto `main`'s by path: --compare takes an index of the same images (the same
    set of paths); in the same order (the usual case: the same split indexed by another run) the rows
    are the same and nothing is built."""
    if len(main) == len(other) and main.paths.end == other.paths.end and main.paths.digest() == other.paths.digest():
        return
    rows = {}
    for j in range(len(other)):
        rows.setdefault(other.paths.raw(j), j)
    from_main = np.full(len(main), -1, np.int64)
    for i in range(len(main)):
        from_main[i] = rows.get(main.paths.raw(i), -1)
    missing = np.flatnonzero(from_main < 0)
    if len(missing) or len(main) != len(other):
        example = f" (the first: {main.paths[int(missing[0])]})" if len(missing) else ""
        raise UserError(f"--compare {other.path} is not an index of the same images as {main.path}: {len(other)} "
                        f"images against {len(main)}, {len(missing)} of the latter not in it{example}; index the "
                        f"same images with the other checkpoint (`python -m utils.retrieve index --checkpoint ... "
                        f"--out ...` with the same split or --folder)")
    to_main = np.empty(len(other), np.int64)
    to_main[from_main] = np.arange(len(main))
    other.from_main, other.to_main = from_main, to_main


# ----------------------------------------------------------------------------- rankings


def ranking(side, packed, k, own=None):
    """`retrieve query`'s results for one packed code: (rows, distances, left_out, search_ms); with
    `own` (an item's path, bytes) as --exclude-self: k + 1 asked, the rows with that path left out
    (left_out: their (row, distance)), then k kept."""
    started = time.perf_counter()
    dist_k, idx_k = side.search.search_packed(packed[None], k + int(own is not None))
    search_ms = (time.perf_counter() - started) * 1000
    rows, dists, left_out = [], [], []
    for d, j in zip(dist_k[0].tolist(), idx_k[0].tolist()):
        if j < 0:
            continue
        if own is not None and side.paths.raw(j) == own:
            left_out.append((j, d))
            continue
        rows.append(j)
        dists.append(d)
    return rows[:k], dists[:k], left_out, search_ms


def results_json(side, rows, dists, label):
    """The ranking as `retrieve query --json` writes it, with each result's id (a row of the main
    index: the same image on both sides of --compare)."""
    out = []
    for rank, (j, d) in enumerate(zip(rows, dists), 1):
        name = side.label_name(j)
        relevant = None if label is None or name is None else name == label
        out.append({"rank": rank, "id": side.main_id(j), "distance": int(d), "path": side.paths[j], "label": name,
                    "relevant": relevant})
    return out


def bit_string(side, packed):
    return "".join(str(b) for b in np.unpackbits(np.asarray(packed, np.uint8))[:side.bits].tolist())


def answer(side, packed, k, label, own=None, own_row=None):
    """Everything the page shows of one query on one side (query --json's results, and more). An
    item's query (`own`, `own_row`: its path and row) leaves its rows out of the ranking as
    --exclude-self does, and out of the database its metrics count: its own row (at distance 0
    from its own code, whether or not the search met it) and any other of its path met."""
    rows, dists, left_out, search_ms = ranking(side, packed, k, own)
    if own_row is not None and own_row not in {j for j, _ in left_out}:
        left_out.append((own_row, 0))
    return {"index": side.role, "k": int(k), "results": results_json(side, rows, dists, label),
            "metrics": metrics_json(side, packed, rows, dists, label, k, left_out), "code": bit_string(side, packed),
            "bits": side.bits, **side.describe_engine(), "search_ms": round(search_ms, 3)}


def encode_upload(side, file):
    """The packed code of an image file as `retrieve query` computes it: the checkpoint's eval
    transform on the image read as the index's images are, the network on a batch of one."""
    loaded = side.loaded
    with side.model_lock:  # one image at a time through the network: uploads are rare, searches are not
        item = ImageFiles([file], None, transform_of(loaded.config), loaded.config.get("in_channels", 3))[0]
        device = next(loaded.model.parameters()).device
        with torch.no_grad():
            f, _, _ = loaded.model(item["img"][None].to(device))
    return pack_codes(f.float().cpu(), side.bits)[0]
