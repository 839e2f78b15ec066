"""Approximate engines of BinaryIndex, each a faiss binary index built from the packed codes:

* "ivf":  IndexBinaryIVF, codes grouped into `nlist` clusters (k-means of `niter` rounds on a
          sample of 40 codes per cluster); a query scans the `nprobe` nearest clusters.
          Defaults: nlist = sqrt(n) (at most 65536), nprobe 16, niter 10.
* "hnsw": IndexBinaryHNSW, a graph of `M` links per code (built with `efConstruction`); a query
          explores `efSearch` candidates (at least k). Defaults: M 16, efConstruction 40, efSearch 128.
* "mih":  IndexBinaryMultiHash (multi-index hashing), `nhash` tables of `b` bits (default b =
          bits / nhash) probed with up to `nflip` flipped bits. Defaults: nhash 4, nflip 2.

Their results are what faiss finds, ordered by (distance, database index), -1 where it found
fewer than k (IVF with nprobe >= nlist runs the exact scan: the exact engine's answer, ids
included); recall against the exact index, counted by distance (exact.recall_by_distance), is
in docs/benchmarks.md. Below nlist, IVF's choice among codes tied at the k-th distance is faiss's:
settling it by index changes no result's distance and cost 1.3 to 5.5 times the search at
nprobe 16 and 64 (`benchmarks/bench_search.py --ivf-ties`, docs/benchmarks.md section 8).
The structure is built at the first search (codes added later are added to it then) and saved
with a BinaryIndex file; the retrieval command keeps it in the index folder (engine_store.py).
"""
import math

import faiss
import numpy as np

from utils.errors import UserError
from utils.retrieval.exact import exact_search, sort_results

ADD_ROWS = 1 << 20
TRAIN_PER_LIST = 40  # k-means sample: this many codes per cluster (faiss warns below 39)


class ApproximateEngine:
    # defaults: every parameter; search_flags: those that steer a search only (the rest shape the
    # structure, and changing them means building it again).
    name, defaults, search_flags = "", {}, ()

    def __init__(self, dim_bits, params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise UserError(f"engine {self.name} takes {', '.join(self.defaults)}, not {', '.join(unknown)}")
        for key, value in params.items():
            if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
                raise UserError(f"engine {self.name}: {key} must be a positive integer, got {value!r}")
        self.d = dim_bits
        self.params = {**self.defaults, **{k: int(v) for k, v in params.items() if v is not None}}
        self.index, self.built = None, 0

    def sync(self, codes):
        """Build the structure from the codes, or add those added since."""
        if self.index is None:
            self.index = self.build(codes)
        for start in range(self.built, len(codes), ADD_ROWS):
            self.index.add(np.ascontiguousarray(codes[start:start + ADD_ROWS]))
        self.built = len(codes)

    def search(self, queries, codes, k):
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), np.int64)
        self.sync(codes)
        self.set_search_params(k)
        dists, idxs = [], []
        for start in range(0, len(queries), 4096):
            d, i = self.index.search(np.ascontiguousarray(queries[start:start + 4096]), k)
            d, i = sort_results(d.astype(np.int64), i.astype(np.int64))
            dists.append(d)
            idxs.append(i)
        return np.concatenate(dists), np.concatenate(idxs)

    def serialize(self, codes):
        if len(codes) == 0:
            return b""
        self.sync(codes)
        return faiss.serialize_index_binary(self.index).tobytes()

    def deserialize(self, data, count):
        self.index, self.built = faiss.deserialize_index_binary(np.array(data)), count

    def set_search_params(self, k):
        pass

    def change_search_flags(self, flags):
        wrong = sorted(set(flags) - set(self.search_flags))
        if wrong:
            raise UserError(f"engine {self.name}: {', '.join(wrong)} shape(s) its structure; only "
                            f"{', '.join(self.search_flags)} can change after it is built")
        for key, value in flags.items():
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise UserError(f"engine {self.name}: {key} must be a positive integer, got {value!r}")
            self.params[key] = int(value)

    @classmethod
    def build_flags(cls):
        return tuple(flag for flag in cls.defaults if flag not in cls.search_flags)


class IVF(ApproximateEngine):
    name, defaults, search_flags = "ivf", {"nlist": None, "nprobe": 16, "niter": 10}, ("nprobe",)

    def build(self, codes):
        nlist = self.params["nlist"] or max(1, min(65536, round(math.sqrt(len(codes)))))
        if len(codes) < nlist:
            raise UserError(f"engine ivf: {len(codes)} codes cannot fill nlist={nlist} clusters; pass a smaller "
                            f"nlist (or use the exact engine)")
        self.params["nlist"] = nlist
        self.quantizer = faiss.IndexBinaryFlat(self.d)  # kept: the IVF index does not own it
        index = faiss.IndexBinaryIVF(self.quantizer, self.d, nlist)
        index.cp.niter = self.params["niter"]
        take = min(len(codes), TRAIN_PER_LIST * nlist)
        sample = np.random.default_rng(0).choice(len(codes), take, replace=False) if take < len(codes) else None
        index.train(np.ascontiguousarray(codes[np.sort(sample)] if sample is not None else codes))
        return index

    def search(self, queries, codes, k):
        if k and len(queries):
            self.sync(codes)
            if self.params["nprobe"] >= self.index.nlist:
                # Every list probed makes every code a candidate: that is the exact scan, which
                # keeps docs/method.md section 6's tie rule, where faiss's scan of the lists keeps
                # its own choice among codes tied at the k-th distance (other ids than the exact
                # engine's), in about the same time (docs/benchmarks.md section 8).
                return exact_search(queries, codes, k)
        return super().search(queries, codes, k)

    def set_search_params(self, k):
        self.index.nprobe = min(self.params["nprobe"], self.index.nlist)


class HNSW(ApproximateEngine):
    name, defaults, search_flags = "hnsw", {"M": 16, "efConstruction": 40, "efSearch": 128}, ("efSearch",)

    def build(self, codes):
        index = faiss.IndexBinaryHNSW(self.d, self.params["M"])
        index.hnsw.efConstruction = self.params["efConstruction"]
        return index

    def set_search_params(self, k):
        self.index.hnsw.efSearch = max(self.params["efSearch"], k)


class MultiIndexHashing(ApproximateEngine):
    name, defaults, search_flags = "mih", {"nhash": 4, "b": None, "nflip": 2}, ("nflip",)

    def build(self, codes):
        b = self.params["b"] or self.d // self.params["nhash"]
        if b * self.params["nhash"] > self.d or b > 64:
            raise UserError(f"engine mih: nhash x b must be at most the {self.d} bits and b at most 64")
        self.params["b"] = b
        return faiss.IndexBinaryMultiHash(self.d, self.params["nhash"], b)

    def set_search_params(self, k):
        self.index.nflip = self.params["nflip"]

    def serialize(self, codes):
        return b""  # its hash tables are rebuilt from the codes at the first search (quick)


ENGINES = {cls.name: cls for cls in (IVF, HNSW, MultiIndexHashing)}


def approximate_engine(name, dim_bits, params):
    return ENGINES[name](dim_bits, params)
