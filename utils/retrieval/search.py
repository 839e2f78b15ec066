"""Hamming search. `BinaryIndex` keeps codes packed (bits / 8 bytes each) and searches them with
faiss, exactly (the default: exact.py) or approximately (engines.py). `hamming_topk`, the float
reference it replaced, is the metrics' ranking rule written out (utils/metrics/codes.py); it is
re-exported here under the name the interface keeps.
"""
import json
import os

import numpy as np

from utils.errors import UserError
from utils.metrics.codes import hamming_topk  # noqa: F401 - part of this module's interface
from utils.retrieval.engines import ENGINES, approximate_engine
from utils.retrieval.exact import exact_search, pack_codes

MAGIC = b"CDNE-BINARY-INDEX\n"
HEADER_BYTES = 4096  # magic + JSON header, padded; the codes start here (page-aligned for mmap)


class BinaryIndex:
    """Packed binary codes and their search (docs/method.md section 6).

    BinaryIndex(bits, engine="exact" | "ivf" | "hnsw", **params): `add(codes)` in pieces,
    `search(codes, k) -> (distances, indices)` as (q, k) int64 arrays, `len`, `save(path)`, and
    `BinaryIndex.load(path)`, which memory-maps the codes. Approximate engines (engines.py) build
    their faiss structure from the codes at the first search and are saved with them;
    `set_search_params(nprobe=64)` changes how they search without building it again."""

    def __init__(self, bits, engine="exact", **params):
        bits = int(bits)
        if bits <= 0:
            raise UserError(f"a BinaryIndex needs a positive number of bits, got {bits}")
        if engine != "exact" and engine not in ENGINES:
            raise UserError(f"unknown search engine {engine!r}; choose exact, {', '.join(ENGINES)}")
        self.bits, self.code_bytes, self.engine = bits, (bits + 7) // 8, engine
        self.approx = approximate_engine(engine, self.code_bytes * 8, params) if engine != "exact" else None
        self.params = self.approx.params if self.approx else {}
        if engine == "exact" and params:
            raise UserError(f"the exact engine takes no parameters (got {', '.join(params)})")
        self._codes = np.zeros((0, self.code_bytes), np.uint8)
        self._count = 0

    def __len__(self):
        return self._count

    @property
    def codes(self):
        """The packed codes, (len, bits / 8) uint8 (a read-only memory map after load)."""
        return self._codes[:self._count]

    def add(self, codes):
        """Append (n, bits) codes of +-1, 0/1 (or real: > 0 is 1) values."""
        self.add_packed(pack_codes(codes, self.bits))

    def add_packed(self, packed):
        packed = np.asarray(packed, dtype=np.uint8)
        if packed.ndim != 2 or packed.shape[1] != self.code_bytes:
            raise UserError(f"packed codes of shape {tuple(packed.shape)} given to a {self.bits}-bit index; "
                            f"pass (n, {self.code_bytes}) uint8")
        need = self._count + len(packed)
        if need > len(self._codes) or not self._codes.flags.writeable:  # grow by doubling (a map is copied)
            grown = np.empty((max(need, 2 * len(self._codes), 1024), self.code_bytes), np.uint8)
            grown[:self._count] = self._codes[:self._count]
            self._codes = grown
        self._codes[self._count:need] = packed
        self._count = need

    def set_search_params(self, **flags):
        """Change an approximate engine's search-time parameters (ivf nprobe, hnsw efSearch, mih
        nflip) without building its structure again."""
        if self.approx is None:
            raise UserError(f"the exact engine has no search parameters (got {', '.join(flags)})")
        self.approx.change_search_flags(flags)

    def search(self, codes, k):
        """(distances, indices), (q, k) int64: the k nearest codes in ascending Hamming distance,
        ties by database index; exact unless the engine is approximate (then -1 where it found
        fewer than k). k is capped at len(self)."""
        return self.search_packed(pack_codes(codes, self.bits), k)

    def search_packed(self, packed, k):
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        if int(k) <= 0:
            raise UserError(f"k must be positive, got {k}")
        if self.approx is None:
            return exact_search(packed, self.codes, k)
        return self.approx.search(packed, self.codes, min(int(k), self._count))

    def save(self, path):
        """One file: a JSON header padded to 4 KiB, the packed codes, then any engine structure.
        Written to a temporary file and renamed, so a failed save leaves an old file intact."""
        structure = self.approx.serialize(self.codes) if self.approx else b""
        header = {"version": 1, "bits": self.bits, "code_bytes": self.code_bytes, "count": self._count,
                  "engine": self.engine, "params": self.params, "structure_bytes": len(structure)}
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(encode_header(header))
                for start in range(0, self._count, 1 << 22):
                    fh.write(self.codes[start:start + (1 << 22)].tobytes())
                fh.write(structure)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_packed(cls, bits, packed, engine="exact", **params):
        """An index over packed (n, ceil(bits / 8)) uint8 codes as they are (a memory map stays one)."""
        index = cls(bits, engine, **params)
        if packed.ndim != 2 or packed.shape[1] != index.code_bytes or packed.dtype != np.uint8:
            raise UserError(f"packed codes of shape {tuple(packed.shape)} for a {bits}-bit index; pass "
                            f"(n, {index.code_bytes}) uint8")
        index._codes, index._count = packed, len(packed)
        return index

    @classmethod
    def load(cls, path):
        """The index saved at `path`, its codes memory-mapped (not read in)."""
        header = read_header(path)
        index = cls(header["bits"], header["engine"], **header["params"])
        index._codes, index._count = map_codes(path, header), header["count"]
        if header.get("structure_bytes"):
            offset = HEADER_BYTES + header["count"] * header["code_bytes"]
            index.approx.deserialize(np.memmap(path, np.uint8, "r", offset, (header["structure_bytes"],)),
                                     header["count"])
        return index


def encode_header(header):
    text = MAGIC + json.dumps(header).encode()
    if len(text) >= HEADER_BYTES:
        raise ValueError("index header too long")
    return text + b" " * (HEADER_BYTES - 1 - len(text)) + b"\n"


def read_header(path):
    if not os.path.isfile(path):
        raise UserError(f"index file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    if not head.startswith(MAGIC) or len(head) < HEADER_BYTES:
        raise UserError(f"{path} is not a BinaryIndex file (written by BinaryIndex.save)")
    header = json.loads(head[len(MAGIC):].decode())
    expected = HEADER_BYTES + header["count"] * header["code_bytes"] + header.get("structure_bytes", 0)
    if os.path.getsize(path) < expected:
        raise UserError(f"{path} is truncated ({os.path.getsize(path)} bytes, its header says {expected}); "
                        f"rebuild it")
    return header


def map_codes(path, header):
    if header["count"] == 0:
        return np.zeros((0, header["code_bytes"]), np.uint8)
    return np.memmap(path, np.uint8, "r", HEADER_BYTES, (header["count"], header["code_bytes"]))
