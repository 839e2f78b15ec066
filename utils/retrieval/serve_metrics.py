"""The metrics and the worst queries `retrieve serve` shows beside a ranking.

AP@K and P@K are those of docs/method.md section 6 as `retrieve evaluate` computes them
(utils/metrics: AP@K over the relevant among the first K, K capped at the database size), the
database being the index without the query's own rows; with the exact engine also their
tie-aware values (utils/metrics/ties.py, the expectation over the orders of the items tied at a
distance: `evaluate`'s second column). The worst queries of a class are its items of lowest AP@K,
each ranked as GET /api/search ranks it.
"""
import numpy as np
import torch

from utils.metrics.ties import ExpectedRanks

WORST_SAMPLE = 1000   # queries of a class scored for its worst ones (a fixed sample of larger classes)
WORST_BATCH = 256     # queries searched at once while scoring them
SCAN_ROWS = 1 << 20   # codes compared at once in the tie-aware count (a few MB of temporaries)


def ap_and_p(relevant, k, n_db):
    """AP@K and P@K of one ranked list (bools, best first), K capped at the database size: AP@K
    divides by the relevant among the first K and is 0 without any (docs/method.md section 6).
    Results an approximate engine did not find count as irrelevant."""
    kk = min(int(k), int(n_db))
    rel = np.zeros(kk, bool)
    rel[:min(kk, len(relevant))] = relevant[:kk]
    hits = np.cumsum(rel)
    found = int(hits[-1]) if kk else 0
    ap = float((hits[rel] / (np.flatnonzero(rel) + 1)).sum() / found) if found else 0.0
    return ap, (found / kk if kk else 0.0)


def rows_at_distance(codes, packed, distance):
    """The rows of packed codes at exactly this Hamming distance from one packed code, compared through
    the widest word that divides the code (a 64-bit code is one uint64 per row), chunk by chunk."""
    width = next(w for w in (8, 4, 2, 1) if codes.shape[1] % w == 0)
    word = np.dtype(f"<u{width}")
    query = np.ascontiguousarray(packed).view(word)
    found = []
    for start in range(0, len(codes), SCAN_ROWS):
        part = np.ascontiguousarray(codes[start:start + SCAN_ROWS]).view(word) ^ query
        ones = np.bitwise_count(part) if hasattr(np, "bitwise_count") else \
            np.unpackbits(part.view(np.uint8), axis=1)
        ones = ones[:, 0] if ones.shape[1] == 1 else ones.sum(axis=1, dtype=np.int64)  # one word: no sum
        found.append(np.flatnonzero(ones == distance) + start)
    return np.concatenate(found)


def tie_aware(side, packed, class_id, k, rows, dists, left_out):
    """E[AP@K] and E[P@K] over the orders within each distance (utils/metrics/ties.py) of an exact
    ranking (`rows`, `dists`: its first min(K, database) results). They need the items and the
    relevant ones at each distance up to that of rank K: the groups before it lie wholly inside the
    results, and the group at it is counted over the codes (one pass: a few ms at 10^6 x 64 bits)."""
    n_db = len(side) - len(left_out)
    kk = min(int(k), n_db)
    if kk == 0:
        return 0.0, 0.0
    if len(rows) < kk:  # duplicates of the query (--allow-duplicates) took places in the k + 1 asked for
        return None, None
    labels = np.asarray(side.labels)
    n_g, r_g = np.zeros(side.bits + 1, np.int64), np.zeros(side.bits + 1, np.int64)
    last = dists[kk - 1]
    for j, d in zip(rows[:kk], dists[:kk]):
        if d < last:
            n_g[d] += 1
            r_g[d] += int(labels[j] == class_id)
    at = rows_at_distance(side.search.codes, packed, last)
    n_g[last] = len(at)
    r_g[last] = int(np.count_nonzero(labels[at] == class_id))
    for j, d in left_out:  # the query's own rows are not the database
        if d == last:
            n_g[last] -= 1
            r_g[last] -= int(labels[j] == class_id)
    # The items past rank K's distance are left out (E[AP@K] and E[P@K] do not depend on them): the
    # database given to ExpectedRanks ends there, so that its tables (harmonic numbers, log k!) are
    # sized by that, not by the index (their O(n) took 100 ms a query at 10^6 codes).
    e = ExpectedRanks(torch.from_numpy(np.cumsum(n_g))[None], torch.from_numpy(np.cumsum(r_g))[None],
                      int(n_g.sum()))
    return float(e.average_precision(kk)[0]), float(e.precision_at(kk)[0])


def metrics_json(side, packed, rows, dists, label, k, left_out):
    """{"K", "AP", "P"} of the ranking shown (ties by database index) and, with the exact engine,
    "AP_tie_aware", "P_tie_aware"; None when the query's class is unknown. `left_out`: the rows
    that are not the database, with their distances (the query's own)."""
    class_id = side.class_id(label) if label is not None else None
    if class_id is None or side.labels is None:
        return None
    n_db = len(side) - len(left_out)
    relevant = (np.asarray(side.labels)[rows] == class_id) if rows else np.zeros(0, bool)
    ap, p = ap_and_p(relevant, k, n_db)
    out = {"K": min(int(k), n_db), "AP": ap, "P": p, "AP_tie_aware": None, "P_tie_aware": None}
    if side.search.engine == "exact":
        out["AP_tie_aware"], out["P_tie_aware"] = tie_aware(side, packed, class_id, k, rows, dists, left_out)
    return out


# ----------------------------------------------------------------------------- worst queries


def worst_queries(side, class_id, k, n):
    """The queries of a class with the lowest AP@K (ties by database index, the ranking the page
    shows), each an item of the index ranked as GET /api/search ranks it; a class of more than
    WORST_SAMPLE items is scored on a fixed sample of that many (seed 0)."""
    key = (class_id, int(k))
    with side.worst_lock:
        cached = side.worst_cache.get(key)
    if cached is None:
        cached = score_class(side, class_id, k)
        with side.worst_lock:
            side.worst_cache[key] = cached
    rows, ap, p, total = cached
    order = np.lexsort((rows, ap))[:n]
    worst = [{"id": side.main_id(rows[i]), "path": side.paths[int(rows[i])], "AP": float(ap[i]), "P": float(p[i])}
             for i in order.tolist()]
    return {"index": side.role, "label": side.classes[class_id], "k": int(k), "queries": total,
            "scored": len(rows), "sampled": len(rows) < total, "mean_AP": float(ap.mean()) if len(ap) else None,
            "mean_P": float(p.mean()) if len(p) else None, "worst": worst}


def score_class(side, class_id, k):
    labels = np.asarray(side.labels)
    rows = np.flatnonzero(labels == class_id)
    total = len(rows)
    if total > WORST_SAMPLE:
        rows = np.sort(np.random.default_rng(0).choice(rows, WORST_SAMPLE, replace=False))
    ap, p = np.zeros(len(rows)), np.zeros(len(rows))
    codes = side.search.codes
    for start in range(0, len(rows), WORST_BATCH):
        part = rows[start:start + WORST_BATCH]
        dist_k, idx_k = side.search.search_packed(np.ascontiguousarray(codes[part]), k + 1)
        for q, row in enumerate(part.tolist()):
            own = side.paths.raw(row)
            kept, dropped = [], {row}  # the database of its metrics: the index without its own rows (answer)
            for j in idx_k[q].tolist():
                if j < 0:
                    continue
                if side.paths.raw(j) == own:
                    dropped.add(j)
                    continue
                kept.append(j)
            kept = kept[:k]
            relevant = labels[kept] == class_id if kept else np.zeros(0, bool)
            ap[start + q], p[start + q] = ap_and_p(relevant, k, len(side) - len(dropped))
    return rows, ap, p, total
