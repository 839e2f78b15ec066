"""Hamming search at scale: today's float search (hamming_topk), raw faiss IndexBinaryFlat, and
BinaryIndex, exact and approximate, on random codes.

    python benchmarks/bench_search.py                       # 10^5, 10^6, 10^7 codes x 32, 64, 128 bits
    python benchmarks/bench_search.py --sizes 100000 --bits 64 --queries 200
    python benchmarks/bench_search.py --choose-engine --sizes 1000000 --bits 64   # the exact scans compared
    python benchmarks/bench_search.py --ivf-ties --sizes 100000 --bits 32 64      # IVF's ties: faiss's or by index

For each size and bit count: build time, one query (median of 11), a batch of --queries queries
(per query), file size, resident memory added (build; for a loaded BinaryIndex, after load and a
search), recall@k of the approximate engines against the exact index and their speed-up over it.
Recall is given two ways: by id (the share of the exact answer's ids returned: a code tied with
the k-th one but of a higher index counts as a miss, though docs/method.md section 6 only picks
among equals) and by distance (utils/retrieval/search.py recall_by_distance: a result counts when its
distance, recomputed from the codes, is below the exact k-th one, or at it up to the number of
exact results there); the second is the one to read. Today's search runs only up to --today-max
codes and on --today-queries queries of the batch (its float codes and full sort take 32x the
memory and minutes beyond); HNSW only up to --hnsw-max codes (its build is the slow part).
Random codes are the hard case for approximate engines (no clusters); trained codes cluster, and
recall is higher there.
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_header  # noqa: E402
from utils.retrieval.exact import (  # noqa: E402
    exact_search,
    recall_by_distance,
    sort_results,  # noqa: E402
)
from utils.search import BinaryIndex, hamming_topk  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def one_query_ms(search, queries):
    return 1e3 * statistics.median(timed(lambda: search(queries[i:i + 1]))[0] for i in range(11))


def random_codes(n, code_bytes, seed):
    rng = np.random.default_rng(seed)
    out = np.empty((n, code_bytes), np.uint8)
    for start in range(0, n, 1 << 22):
        out[start:start + (1 << 22)] = rng.integers(0, 256, (min(1 << 22, n - start), code_bytes), dtype=np.uint8)
    return out


def id_recall(found, exact):
    """The share of the exact answer's ids found (the count before recall_by_distance)."""
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(found, exact)]))


def row(rows, method, n, bits, build_s, one_ms, batch_ms, file_mb, mem_mb, rec=("", ""), speedup="", note=""):
    """rec: (recall by id, recall by distance)."""
    rows.append((f"{n:.0e}".replace("+0", ""), bits, method, f"{build_s:.2f}" if build_s != "" else "",
                 f"{one_ms:.2f}", f"{batch_ms:.3f}", f"{file_mb:.1f}" if file_mb != "" else "",
                 f"{mem_mb:.0f}", *rec, speedup, note))
    print(" | ".join(str(x) for x in rows[-1]), flush=True)


def bench(n, bits, args, rows, tmp):
    nb = bits // 8
    db, queries = random_codes(n, nb, n + bits), random_codes(args.queries, nb, 7)
    k, cut = args.k, args.today_queries

    if n <= args.today_max and not args.engines_only:  # today: float +-1 codes, matmul and a full sort
        base = rss_mb()
        build, db_f = timed(lambda: torch.from_numpy(np.unpackbits(db, axis=1).astype(np.float32) * 2 - 1))
        q_f = torch.from_numpy(np.unpackbits(queries, axis=1).astype(np.float32) * 2 - 1)
        mem = rss_mb() - base
        one = one_query_ms(lambda q: hamming_topk(q, db_f, k), q_f)
        t, (today_d, today_i) = timed(lambda: hamming_topk(q_f[:cut], db_f, k, chunk_size=16))
        path = os.path.join(tmp, "today.pth")
        torch.save({"codes": torch.from_numpy(np.unpackbits(db, axis=1).astype(np.int8) * 2 - 1)}, path)
        size = os.path.getsize(path) / 2**20
        os.remove(path)
        row(rows, "today: hamming_topk (float)", n, bits, build, one, 1e3 * t / cut, size, mem,
            note=f"batch: first {cut} queries")
        db_f = q_f = None
        gc.collect()
    else:
        today_d = None

    flat_d, t_flat = raw_faiss(db, queries, bits, k, rows, n, tmp) if not args.engines_only else (None, None)
    bench_binary_index(db, queries, bits, k, rows, n, tmp, args, today_d, today_i if today_d is not None else None,
                       flat_d, t_flat)


def raw_faiss(db, queries, bits, k, rows, n, tmp):
    base = rss_mb()
    flat = faiss.IndexBinaryFlat(bits)
    build, _ = timed(lambda: flat.add(db))
    mem = rss_mb() - base
    one = one_query_ms(lambda q: flat.search(q, k), queries)
    t_flat, (flat_d, flat_i) = timed(lambda: flat.search(queries, k))
    path = os.path.join(tmp, "flat.faiss")
    faiss.write_index_binary(flat, path)
    size = os.path.getsize(path) / 2**20
    os.remove(path)
    row(rows, "faiss IndexBinaryFlat", n, bits, build, one, 1e3 * t_flat / len(queries), size, mem)
    return flat_d, t_flat


def bench_binary_index(db, queries, bits, k, rows, n, tmp, args, today_d, today_i, flat_d, t_flat):
    cut = args.today_queries

    base = rss_mb()
    index = BinaryIndex(bits)
    build, _ = timed(lambda: index.add_packed(db))
    mem = rss_mb() - base
    one = one_query_ms(lambda q: index.search_packed(q, k), queries)
    t_exact, (exact_d, exact_i) = timed(lambda: index.search_packed(queries, k))
    path = os.path.join(tmp, "exact.bidx")
    index.save(path)
    size = os.path.getsize(path) / 2**20
    agree = flat_d is None or np.array_equal(exact_d, flat_d)
    if today_d is not None:
        agree = agree and np.array_equal(exact_d[:cut], today_d.numpy()) and np.array_equal(exact_i[:cut],
                                                                                          today_i.numpy())
    row(rows, "BinaryIndex exact", n, bits, build, one, 1e3 * t_exact / len(queries), size, mem,
        note="" if flat_d is None else f"same results as {'today and ' if today_d is not None else ''}faiss: "
                                       f"{agree}; {t_flat / t_exact:.2f}x faiss's batch speed")
    index = None
    gc.collect()
    if not args.engines_only:
        bench_loaded(path, queries, k, rows, n, bits, size)
    os.remove(path)
    bench_engines(db, queries, bits, k, rows, n, tmp, args, exact_d, exact_i, t_exact)


def bench_loaded(path, queries, k, rows, n, bits, size):
    base = rss_mb()
    load, loaded = timed(lambda: BinaryIndex.load(path))
    mem_load = rss_mb() - base
    t_loaded, _ = timed(lambda: loaded.search_packed(queries, k))
    row(rows, "BinaryIndex exact, loaded (mmap)", n, bits, load, one_query_ms(lambda q: loaded.search_packed(q, k),
        queries), 1e3 * t_loaded / len(queries), size, rss_mb() - base,
        note=f"{mem_load:.0f} MB resident after load, before the search")


def bench_engines(db, queries, bits, k, rows, n, tmp, args, exact_d, exact_i, t_exact):
    # "all": nprobe = the built nlist, every list probed (the exact scan's answer: engines.py).
    engines = [("ivf", {}), ("ivf", {"nprobe": 64}), ("ivf", {"nprobe": "all"}), ("mih", {})]
    if n <= args.hnsw_max:
        engines.insert(3, ("hnsw", {}))
    engines = [(name, params) for name, params in engines if name in args.engines]
    approx = None
    for engine, params in engines:
        if approx is not None and approx.engine != engine:
            approx = None  # free the last engine's structure before measuring this one's
            gc.collect()
        base = rss_mb()
        if approx is not None and approx.engine == engine:  # the same structure, other search parameters
            approx.set_search_params(**{key: approx.params["nlist"] if v == "all" else v for key, v in params.items()})
            build, mem = "", 0
        else:
            approx = BinaryIndex.from_packed(bits, db, engine, **params)
            build, _ = timed(lambda: approx.search_packed(queries[:1], k))  # builds the structure
            mem = rss_mb() - base
        one = one_query_ms(lambda q: approx.search_packed(q, k), queries)
        t, (_, idx) = timed(lambda: approx.search_packed(queries, k))
        path = os.path.join(tmp, "approx.bidx")
        approx.save(path)
        size = os.path.getsize(path) / 2**20
        os.remove(path)
        label = f"BinaryIndex {engine} " + ", ".join(f"{key} {v}" for key, v in approx.params.items())
        rec = f"{id_recall(idx, exact_i):.3f}", f"{recall_by_distance(queries, db, idx, exact_d):.3f}"
        row(rows, label, n, bits, build, one, 1e3 * t / len(queries), size, mem, rec=rec, speedup=f"{t_exact / t:.1f}x")
    approx = None
    gc.collect()


def ivf_ties(n, bits, n_queries, k):
    """What settling IVF's ties by index would cost: on one IVF structure (default nlist) and
    random codes, at nprobe 16, 64 and nlist, faiss's search as BinaryIndex ran it before (nprobe
    nlist included), the same settled by index (asked for 2k, then 4 times as many for the rows
    whose k-th distance reaches the end of the list, as exact_search does), and at nlist the
    exact scan that BinaryIndex's IVF now runs there; ms per query (the best of three batches),
    recall by id and by distance."""
    nb = bits // 8
    db, queries = random_codes(n, nb, n + bits), random_codes(n_queries, nb, 7)
    exact_d, exact_i = exact_search(queries, db, k)
    approx = BinaryIndex.from_packed(bits, db, "ivf")
    approx.search_packed(queries[:1], k)  # builds the structure
    faiss_ivf, nlist = approx.approx.index, approx.params["nlist"]

    def faiss_search(wide):
        d, i = faiss_ivf.search(queries, wide)
        return sort_results(d.astype(np.int64), i.astype(np.int64))

    def settled():
        dists, idxs = np.empty((len(queries), k), np.int64), np.empty((len(queries), k), np.int64)
        rows, wide = np.arange(len(queries)), 2 * k
        while len(rows):
            d, i = sort_results(*(a.astype(np.int64) for a in faiss_ivf.search(queries[rows], wide)))
            spill = (i[:, -1] >= 0) & (d[:, -1] == d[:, k - 1]) if wide < n else np.zeros(len(rows), bool)
            dists[rows[~spill]], idxs[rows[~spill]] = d[~spill, :k], i[~spill, :k]
            rows, wide = rows[spill], min(n, 4 * wide)
        return dists, idxs

    print(f"IVF ties, {n} codes of {bits} bits, nlist {nlist}, {n_queries} queries, k = {k} "
          f"(ms per query, recall by id, recall by distance):")
    t_exact = min(timed(lambda: exact_search(queries, db, k))[0] for _ in range(3))
    print(f"  exact scan                               {1e3 * t_exact / n_queries:9.3f}")
    for nprobe in (16, 64, nlist):
        faiss_ivf.nprobe = nprobe
        cases = [("faiss's ties", lambda: faiss_search(k)), ("ties settled by index", settled)]
        if nprobe == nlist:
            approx.set_search_params(nprobe=nlist)
            cases.append(("exact scan (BinaryIndex ivf now)", lambda: approx.search_packed(queries, k)))
        for name, fn in cases:
            t, (_, idx) = min((timed(fn) for _ in range(3)), key=lambda r: r[0])  # the best of three
            print(f"  nprobe {nprobe:5d}, {name:32s} {1e3 * t / n_queries:9.3f}  {id_recall(idx, exact_i):.3f}  "
                  f"{recall_by_distance(queries, db, idx, exact_d):.3f}", flush=True)


def choose_engine(n, bits, n_queries, k):
    """The candidates for BinaryIndex's exact scan, timed on one batch: faiss's IndexBinaryFlat,
    faiss's knn_hamming on our own array (no copy; its heap asked for 2k, and its counting
    variant), BinaryIndex's exact search (which of the two it runs and the ties settled), numpy's
    bitwise_count with a partial sort, and today's float matmul with a full sort."""
    nb = bits // 8
    db, queries = random_codes(n, nb, 1), random_codes(n_queries, nb, 2)
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(db)
    words = db.view(np.uint64) if nb % 8 == 0 else None

    def numpy_scan():
        for q in (queries.view(np.uint64) if words is not None else queries):
            d = np.bitwise_count(np.bitwise_xor(words if words is not None else db, q)).sum(1, dtype=np.int32)
            part = np.argpartition(d, k)[:k]
            part[np.lexsort((part, d[part]))]

    db_f = torch.from_numpy(np.unpackbits(db, axis=1).astype(np.float32) * 2 - 1)
    q_f = torch.from_numpy(np.unpackbits(queries, axis=1).astype(np.float32) * 2 - 1)
    print(f"exact scans, {n} codes of {bits} bits, {n_queries} queries, k = {k} (ms per query):")
    for name, fn in (("faiss IndexBinaryFlat.search", lambda: flat.search(queries, k)),
                     ("faiss knn_hamming heap, asked for 2k", lambda: faiss.knn_hamming(queries, db, 2 * k)),
                     ("faiss knn_hamming counting (mc), k", lambda: faiss.knn_hamming(queries, db, k, variant="mc")),
                     ("BinaryIndex exact search", lambda: exact_search(queries, db, k)),
                     ("numpy bitwise_count + argpartition", numpy_scan),
                     ("torch float matmul + sort (hamming_topk)", lambda: hamming_topk(q_f, db_f, k, chunk_size=16))):
        best = min(timed(fn)[0] for _ in range(2))
        print(f"  {name:42s} {1e3 * best / n_queries:9.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument("--bits", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--queries", type=int, default=1000, help="the query batch (default 1000)")
    p.add_argument("--k", type=int, default=100, help="results per query, and the k of recall@k (default 100)")
    p.add_argument("--today-max", type=int, default=10**6, help="largest database for today's search")
    p.add_argument("--today-queries", type=int, default=100, help="queries of the batch for today's search")
    p.add_argument("--hnsw-max", type=int, default=10**6, help="largest database for HNSW (slow to build)")
    p.add_argument("--engines", nargs="+", default=["ivf", "hnsw", "mih"], help="approximate engines to run")
    p.add_argument("--engines-only", action="store_true",
                   help="only BinaryIndex: exact (the reference of recall) and the approximate engines")
    p.add_argument("--choose-engine", action="store_true",
                   help="only time the candidate exact scans (first --sizes, first --bits, 100 queries)")
    p.add_argument("--ivf-ties", action="store_true",
                   help="only time IVF with faiss's ties against ties settled by index (each --sizes x --bits)")
    args = p.parse_args()
    print_header()
    if args.choose_engine:
        return choose_engine(args.sizes[0], args.bits[0], min(args.queries, 100), args.k)
    if args.ivf_ties:
        for n in args.sizes:
            for bits in args.bits:
                ivf_ties(n, bits, args.queries, args.k)
        return
    print(f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads, numpy {np.__version__}; "
          f"random codes, k = {args.k}, times in ms per query unless said")
    rows = []
    print("N | bits | method | build s | 1 query ms | batch ms/query | file MB | memory MB | recall@k by id | "
          "recall@k by distance | "
          "speed-up vs exact | note")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for bits in args.bits:
                bench(n, bits, args, rows, tmp)


if __name__ == "__main__":
    main()
