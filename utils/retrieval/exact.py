"""Exact Hamming search over packed codes, under docs/method.md section 6's rule (ascending
distance, ties by database index), and recall of an approximate answer against it.

It is faiss's `knn_hamming` (the scan of `IndexBinaryFlat`, run on our own array, so a
memory-mapped database is searched without being read in):

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
import faiss
import numpy as np
import torch

from utils.errors import UserError

QUERY_ENTRIES = 1 << 21  # results held at once (queries x 2k, ~50 bytes each): memory for any batch


WIDEST = 1 << 16  # results asked of faiss per query before ties are settled by a scan


COUNTING_MAX_BITS, COUNTING_MAX_K = 64, 4096  # where the counting variant is used (its buckets: (bits + 1) x k)


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


def sort_results(dist, idx):
    """Each row ordered by (distance, database index); -1 indices (not found) last."""
    key_dist = np.where(idx < 0, np.iinfo(np.int64).max, dist)
    order = np.lexsort((idx, key_dist), axis=1)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)
