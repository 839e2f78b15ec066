"""Hamming search. `BinaryIndex` keeps codes packed (bits / 8 bytes each) and searches them with
faiss, exactly (the default) or approximately; `hamming_topk` is the float reference it replaced
(kept with its meaning: it is what the metrics' ranking rule looks like written out).

Exact search is faiss's `knn_hamming` (the scan of `IndexBinaryFlat`, run on our own array, so a
memory-mapped database is searched without being read in), exact under section 6's rule:

* up to 64 bits (and k up to 4096), its counting variant ("mc"): per query one bucket per
  distance, each holding the first k items met at that distance while the database is scanned
  in index order, so the buckets read in order of distance are the rule's top k, in one pass.
  Short codes tie often at the k-th distance (at 32 bits, 10^6 codes, a few hundred items
  share it), which made the method below scan twice;
* longer codes (ties are rare) or larger k: the heap variant, whatever it does with ties: it is
  asked for 2k results, which are ordered by (distance, index); where the k-th distance still
  reaches the end of that list, for four times as many, and so on; past 65,536 the items at
  that distance are taken in index order from a scan.

Both were chosen by measurement (docs/benchmarks.md, section 8); tests/test_search.py checks
both against a brute-force stable sort.
"""
import json
import os

import faiss
import numpy as np
import torch

from ..errors import UserError
from ..metrics import binarize
from .engines import ENGINES, approximate_engine, sort_results

MAGIC = b"CDNE-BINARY-INDEX\n"
HEADER_BYTES = 4096  # magic + JSON header, padded; the codes start here (page-aligned for mmap)
QUERY_ENTRIES = 1 << 21  # results held at once (queries x 2k, ~50 bytes each): memory for any batch
WIDEST = 1 << 16  # results asked of faiss per query before ties are settled by a scan
COUNTING_MAX_BITS, COUNTING_MAX_K = 64, 4096  # where the counting variant is used (its buckets: (bits + 1) x k)


@torch.no_grad()
def hamming_topk(query_codes, db_codes, k, chunk_size=1024):
    """(distances, indices) of the k nearest database items of each query, ascending
    Hamming distance, ties broken by database index (docs/method.md section 6)."""
    q, db = binarize(query_codes), binarize(db_codes).to(query_codes.device if torch.is_tensor(query_codes) else "cpu")
    L, k = q.shape[1], min(int(k), db.shape[0])
    dists, idxs = [], []
    for start in range(0, q.shape[0], chunk_size):
        d = ((L - q[start:start + chunk_size] @ db.t()) / 2).round().long()
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        dists.append(torch.gather(d, 1, order))
        idxs.append(order)
    if not dists:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)


def pack_codes(codes, bits):
    """(n, bits) codes (+-1, 0/1 or real: a bit is 1 where the value is > 0, section 2's rule) as
    (n, ceil(bits / 8)) uint8; bit counts that are not a multiple of 8 are padded with zero bits,
    which every code shares, so distances do not change."""
    if torch.is_tensor(codes):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != bits:
        raise UserError(f"codes of shape {tuple(codes.shape)} given to a {bits}-bit index; pass an (n, {bits}) "
                        f"array of +-1 or 0/1 values")
    return np.packbits(codes > 0, axis=1)


BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)  # for numpy < 2.0


def popcount_distances(query, db):
    """Hamming distances of one packed query to packed rows (numpy's bitwise_count where it has one)."""
    xor = np.bitwise_xor(db, query)
    ones = np.bitwise_count(xor) if hasattr(np, "bitwise_count") else BYTE_POPCOUNT[xor]
    return ones.sum(axis=1, dtype=np.int64)


def exact_search(queries, db, k):
    """(distances, indices), each (q, k) int64, of packed queries against packed db: exact,
    ascending distance, ties by database index."""
    n, k = len(db), min(int(k), len(db))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), np.int64)
    if queries.shape[1] * 8 <= COUNTING_MAX_BITS and k <= COUNTING_MAX_K:
        return counting_search(queries, db, k)
    dists, idxs = np.empty((len(queries), k), np.int64), np.empty((len(queries), k), np.int64)
    rows, wide = np.arange(len(queries)), min(n, 2 * k)
    # Ask faiss for `wide` results; the rows whose k-th distance still reaches the end of them are
    # asked again for four times as many, up to WIDEST; beyond that, a scan settles the ties.
    while len(rows):
        spilled = []
        step = max(1, QUERY_ENTRIES // wide)
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            d, i = faiss.knn_hamming(np.ascontiguousarray(queries[part]), db, wide)
            d, i = sort_results(d.astype(np.int64), i.astype(np.int64))
            spill = (d[:, wide - 1] == d[:, k - 1]) if wide < n else np.zeros(len(part), bool)
            dists[part[~spill]], idxs[part[~spill]] = d[~spill, :k], i[~spill, :k]
            spilled.append(part[spill])
            if wide >= WIDEST:
                for row in np.flatnonzero(spill):
                    dists[part[row]], idxs[part[row]] = ties_in_index_order(queries[part[row]], db, d[row, :k],
                                                                            i[row, :k])
        rows = np.concatenate(spilled) if wide < WIDEST else rows[:0]
        wide = min(n, 4 * wide, max(WIDEST, 2 * k))
    return dists, idxs


def counting_search(queries, db, k):
    """exact_search through faiss's counting variant: the first k items at each distance in index
    order, in one scan. Its buckets take (bits + 1) x k ids per query: queries go in chunks."""
    step = max(1, QUERY_ENTRIES * 50 // ((queries.shape[1] * 8 + 1) * k * 8))
    dists, idxs = [], []
    for start in range(0, len(queries), step):
        d, i = faiss.knn_hamming(np.ascontiguousarray(queries[start:start + step]), db, k, variant="mc")
        d, i = sort_results(d.astype(np.int64), i.astype(np.int64))  # already so; cheap to be sure
        dists.append(d)
        idxs.append(i)
    return np.concatenate(dists), np.concatenate(idxs)


def recall_by_distance(queries, db, ids, exact_dist):
    """recall@k of an approximate answer `ids` (q, k; -1: none) against the exact distances
    `exact_dist` (q, k), packed queries and db: the mean share of the k results that some exact
    answer holds. Items tied at the k-th distance are interchangeable (section 6's rule picks the
    lowest indices, an engine may keep others): a result counts when its distance, recomputed here
    from the codes (an engine's own distances are not trusted), is below the exact k-th distance,
    or equal to it for as many results as the exact answer has there. Without that cap a result at
    the k-th distance that took the place of a nearer one the engine missed would count too (0.687
    against 0.561 for IVF at nprobe 16 on 10^5 random 32-bit codes). -1 and repeated ids count as
    misses."""
    ids, exact_dist = np.asarray(ids), np.asarray(exact_dist)
    if exact_dist.shape[1] == 0:
        return 1.0
    shares = []
    for query, found, exact in zip(queries, ids, exact_dist):
        found = np.unique(found[found >= 0])
        dist = popcount_distances(query, db[found])
        last = exact[-1]
        below, at = int((dist < last).sum()), int((dist == last).sum())
        shares.append((below + min(at, int((exact == last).sum()))) / len(exact))
    return float(np.mean(shares))


def ties_in_index_order(query, db, dist, idx, rows=1 << 20):
    """One query's top k when more items lie at the k-th distance than faiss returned: every
    item closer than it (all in faiss's list) and the first ones at it in index order (a scan)."""
    k, last = len(dist), dist[-1]
    closer = dist < last
    need = k - int(closer.sum())
    found = []
    for start in range(0, len(db), rows):
        hits = np.flatnonzero(popcount_distances(query, db[start:start + rows]) == last) + start
        found.extend(hits[:need - len(found)].tolist())
        if len(found) == need:
            break
    idx = np.concatenate([idx[closer], np.asarray(found, np.int64)])
    return np.concatenate([dist[closer], np.full(need, last, np.int64)]), idx


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
