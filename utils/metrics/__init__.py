"""Hamming-ranking retrieval metrics (docs/method.md section 6), in pure torch on the codes' device.

Definitions (per query, then averaged over all queries unless said otherwise):

* Codes: bit = 1 iff value > 0 (docs/method.md section 2), i.e. b = +1 where value > 0, else -1,
  so real-valued codes, exact zeros (-> -1) and codes that are already +-1 all work.
* Relevance: 1-D labels are class ids (relevant iff equal); 2-D labels are multi-hot
  (relevant iff the label sets intersect).
* Hamming distance d = (L - b_q . b_j) / 2. Ranking: ascending d, ties broken by
  database index (a stable sort), giving the ranked list r_1, r_2, ...
* P@K = (relevant among the first K) / K.
* AP@R = (1 / R_rel) * sum over k <= R with r_k relevant of (relevant among the first k) / k,
  where R_rel = number of relevant items among the first R (not all relevant items of the
  database). A query with no relevant item among the first R has AP 0 and still counts.
  mAP@R is the mean over all queries; mAP (no R) is the same with R = database size.
* P@H<=r: precision of the items within Hamming distance r; 0 for a query with none.
* PR curve, for each radius r = 0..L: precision as P@H<=r (averaged over all queries), and
  recall = relevant within r / all relevant in the database, averaged over the queries that
  have at least one relevant database item.
* K or R larger than the database is capped at the database size.
* ties="expected" (every function below that ranks): P@K, AP@R and mAP as their expectation over
  uniformly random orders within each group of items at equal distance (McSherry and Najork,
  ECIR 2008), in closed form from the per-distance counts (utils/metrics/ties.py, derivation
  there); P@H<=r and the PR curve do not depend on the order inside a distance, so they are
  the same as with ties="index" (the default, the ranking above).

reference_metrics, first below, is this definition in code: a stable sort of each query's
distances, then the formulas above read off the ranked list. retrieval_metrics and the
single-metric functions after it compute the same numbers without sorting (a counting rank,
described where it starts); the tests check that they agree with reference_metrics. It is
kept because the sort dominates an evaluation on the CPU: at NWPU-RESISC45's size (6,300
test queries x 22,005 database items x 128 bits, on 2 CPU cores) the counting rank takes 1.6 s
and the reference 7.1 s, 4-5 times as long (docs/benchmarks.md section 4.1).
"""

import torch
import torch.nn.functional as F

from utils.metrics.codes import binarize  # noqa: F401 - part of this module's interface
from utils.metrics.rank_counting import RankCounts
from utils.metrics.ties import ExpectedRanks

TIES = ("index", "expected")  # ties broken by database index (the ranking above), or their expectation

# ----------------------------------------------------------------------------- the definition

def relevance(query_labels, db_labels):
    """Q x N bool: the same class id (1-D labels) or intersecting label sets (2-D multi-hot)."""
    if query_labels.dim() == 1:
        return query_labels[:, None] == db_labels[None, :]
    return (query_labels.double() @ db_labels.double().t()) > 0


def ranked_list(query_codes, query_labels, db_codes, db_labels):
    """Each query's ranking of the database: ascending Hamming distance, ties by database
    index (a stable sort). Returns (distances, relevant), both Q x N in rank order."""
    bq, bd = binarize(query_codes), binarize(db_codes)
    dist = ((bq.shape[1] - bq @ bd.t()) / 2).round().long()  # d = (L - b_q . b_j) / 2 (exact sums of +-1)
    dist, order = torch.sort(dist, dim=1, stable=True)
    rel = relevance(torch.as_tensor(query_labels).to(dist.device), torch.as_tensor(db_labels).to(dist.device))
    return dist, rel.gather(1, order)


def reference_per_query(query_codes, query_labels, db_codes, db_labels, topk=(20, 100), radius=2):
    """Each query's metrics (float64), read off its ranked list: "mAP", "mAP@K", "P@K" and
    f"P@H<={radius}" hold per-query values, "pr_precision" and "pr_recall" one row per query
    over the radii 0..L (recall NaN for a query with no relevant database item)."""
    dist, rel = ranked_list(query_codes, query_labels, db_codes, db_labels)
    n_q, n_db = rel.shape
    hits = F.pad(rel.cumsum(1, dtype=torch.float64), (1, 0))  # hits[:, k]: relevant among the first k
    ranks = torch.arange(1, n_db + 1, dtype=torch.float64, device=rel.device)
    precision = torch.where(rel, hits[:, 1:] / ranks, 0.0)   # at each relevant rank, else 0

    def ap(R):  # AP@R, 0 when nothing relevant is among the first R
        R = min(R, n_db)
        return precision[:, :R].sum(1) / hits[:, R].clamp(min=1)

    def within(radii):  # (items, relevant items) within each Hamming radius, Q x len(radii)
        n = torch.searchsorted(dist, radii.to(dist.device).expand(n_q, -1).contiguous(), right=True)
        return n, hits.gather(1, n)

    out = {"mAP": ap(n_db)}
    out.update({f"mAP@{k}": ap(k) for k in topk})
    out.update({f"P@{k}": hits[:, min(k, n_db)] / min(k, n_db) for k in topk})
    n, n_rel = within(torch.tensor([radius]))
    out[f"P@H<={radius}"] = (n_rel / n.clamp(min=1))[:, 0]
    n, n_rel = within(torch.arange(torch.as_tensor(db_codes).shape[1] + 1))
    out["pr_precision"] = n_rel / n.clamp(min=1)
    out["pr_recall"] = n_rel / hits[:, -1:]
    return out


def reference_metrics(query_codes, query_labels, db_codes, db_labels, topk=(20, 100), radius=2,
                      with_pr=False, chunk_size=None):
    """retrieval_metrics' dict, from reference_per_query over chunks of `chunk_size` queries
    (by default about 2**22 ranked items a chunk, a few hundred MB)."""
    topk = tuple(int(k) for k in (topk if isinstance(topk, (tuple, list)) else (topk,)))
    qc, ql = torch.as_tensor(query_codes), torch.as_tensor(query_labels)
    rows = chunk_size or max(1, 2 ** 22 // len(db_codes))
    parts = [reference_per_query(qc[a:a + rows], ql[a:a + rows], db_codes, db_labels, topk, radius)
             for a in range(0, len(qc), rows)]
    per_query = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    out = {key: float(v.mean()) for key, v in per_query.items() if v.dim() == 1}
    if with_pr:
        recall = per_query["pr_recall"]
        recall = recall[~recall.isnan().any(1)]  # the queries with a relevant database item
        out["pr_precision"] = per_query["pr_precision"].mean(0).tolist()
        out["pr_recall"] = (recall.mean(0) if len(recall) else torch.zeros(recall.shape[1])).tolist()
    return out


# ----------------------------------------------------------------------------- the fast path
# The same numbers without sorting: utils/metrics/rank_counting.py (about 5x faster at NWPU-RESISC45
# size on a CPU, docs/benchmarks.md); the tests compare it with the reference above.

def check_ties(ties):
    """`ties` is one of TIES, or ValueError."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    return ties


def _topk(topk):
    return tuple(int(k) for k in (topk if isinstance(topk, (tuple, list)) else (topk,)))


def metrics_of(s, ties="index", with_pr=False):
    """retrieval_metrics' dict from a RankCounts `s` (its topk and radius), index order or expected."""
    check_ties(ties)
    if ties == "expected":
        e = ExpectedRanks(s.cum_all, s.cum_rel, s.n_db)
        ap, ap_at, p_at = e.average_precision, e.average_precision, e.precision_at
    else:
        ap, ap_at, p_at = (lambda: s.ap), s.ap_at.__getitem__, s.p_at.__getitem__
    out = {"mAP": s.mean(ap())}
    for k in s.topk:
        out[f"mAP@{k}"] = s.mean(ap_at(k))
    for k in s.topk:
        out[f"P@{k}"] = s.mean(p_at(k))
    out[f"P@H<={s.radius}"] = s.mean(s.p_radius)   # order inside a distance plays no part: the same for both
    if with_pr:
        precision, recall = s.pr()
        out["pr_precision"], out["pr_recall"] = precision.tolist(), recall.tolist()
    return out


def retrieval_metrics(query_codes, query_labels, db_codes, db_labels, topk=(20, 100), radius=2,
                      chunk_size=None, with_pr=False, max_bytes=None, ties="index"):
    """All section-6 metrics from one pass over the Hamming distances.

    Returns a dict of floats: "mAP" (whole ranking), "mAP@K" and "P@K" for each K in `topk`
    (K capped at the database size), and f"P@H<={radius}". With `with_pr=True` it also has
    "pr_precision" and "pr_recall", lists indexed by Hamming radius 0..L (definitions in the
    module docstring). `chunk_size` forces the number of queries per chunk; by default
    chunks are sized so that their working memory stays under about `max_bytes`. ties="expected":
    the same keys, each its expectation over random orders within the ties (module docstring).
    """
    check_ties(ties)
    s = RankCounts(query_codes, query_labels, db_codes, db_labels, _topk(topk), radius, chunk_size, max_bytes)
    return metrics_of(s, ties, with_pr)


def retrieval_metrics_by_ties(query_codes, query_labels, db_codes, db_labels, topk=(20, 100), radius=2,
                              chunk_size=None, with_pr=False, max_bytes=None):
    """{"index": retrieval_metrics(...), "expected": retrieval_metrics(..., ties="expected")} from one
    counting pass (the expected values need only its per-distance counts)."""
    s = RankCounts(query_codes, query_labels, db_codes, db_labels, _topk(topk), radius, chunk_size, max_bytes)
    return {ties: metrics_of(s, ties, with_pr) for ties in TIES}


def mean_average_precision(query_codes, query_labels, db_codes, db_labels, topk=None, ties="index", **kw):
    """mAP@R with R = `topk` (capped at the database size), or over the whole ranking when None.

    AP@R divides by the number of relevant items among the first R (not by all relevant
    items); a query with no relevant item there has AP 0 and still counts in the mean.
    ties="expected": its expectation over random orders within the ties.
    """
    check_ties(ties)
    s = RankCounts(query_codes, query_labels, db_codes, db_labels, () if topk is None else (int(topk),), **kw)
    if ties == "expected":
        return s.mean(ExpectedRanks(s.cum_all, s.cum_rel, s.n_db).average_precision(topk))
    return s.mean(s.ap if topk is None else s.ap_at[int(topk)])


def precision_at_k(query_codes, query_labels, db_codes, db_labels, k, ties="index", **kw):
    """Mean over queries of (relevant among the first k) / k, k capped at the database size.
    ties="expected": its expectation over random orders within the ties."""
    check_ties(ties)
    s = RankCounts(query_codes, query_labels, db_codes, db_labels, (int(k),), **kw)
    if ties == "expected":
        return s.mean(ExpectedRanks(s.cum_all, s.cum_rel, s.n_db).precision_at(k))
    return s.mean(s.p_at[int(k)])


def precision_within_radius(query_codes, query_labels, db_codes, db_labels, radius=2, **kw):
    """Mean over queries of the precision of the items within Hamming distance `radius`,
    counting 0 for a query with no item that close."""
    s = RankCounts(query_codes, query_labels, db_codes, db_labels, (), radius, **kw)
    return s.mean(s.p_radius)


def pr_curve(query_codes, query_labels, db_codes, db_labels, **kw):
    """(precision, recall): float64 tensors indexed by Hamming radius r = 0..L.

    precision[r]: mean over all queries of the precision within radius r (0 for a query with
    nothing that close); recall[r]: relevant within r / all relevant, averaged over the
    queries that have at least one relevant database item (all 0 if none has).
    """
    return RankCounts(query_codes, query_labels, db_codes, db_labels, (), **kw).pr()
