"""Straightforward per-query numpy reference for SPEC section 6 (test oracle and benchmark baseline).

One query at a time: Hamming distances, a stable argsort (ties by database index), then
the section-6 formulas read off the ranked list. Slow on purpose of being obvious;
utils.metrics must agree with it.
"""
import numpy as np


def _pm1(codes):
    """Section 2: bit 1 iff value > 0, as +-1 (so 0 -> -1); float32 so the dot products use BLAS (exact)."""
    return np.where(np.asarray(codes, dtype=np.float64) > 0, 1, -1).astype(np.float32)


def reference_metrics(query_codes, query_labels, db_codes, db_labels, topk=(20, 100), radius=2):
    """Same keys as utils.metrics.retrieval_metrics, plus "pr_precision"/"pr_recall" (radius 0..L)."""
    bq, bd = _pm1(query_codes), _pm1(db_codes)
    yq, yd = np.asarray(query_labels), np.asarray(db_labels)
    n_db, L = bd.shape
    ap_full, ap_at = [], {k: [] for k in topk}
    p_at = {k: [] for k in topk}
    p_radius, pr_p, pr_r = [], [], []
    for i in range(len(bq)):
        dist = ((L - bd @ bq[i]) / 2).astype(np.int64)
        if yd.ndim == 1:
            rel = yd == yq[i]
        else:  # multi-hot: relevant iff the label sets intersect
            rel = (yd.astype(bool) & yq[i].astype(bool)).any(1)
        order = np.argsort(dist, kind="stable")
        rel_sorted = rel[order]
        hits = np.cumsum(rel_sorted)                     # relevant among the first k
        prec = hits / np.arange(1, n_db + 1)             # precision at each rank k

        def ap(R):
            R = min(R, n_db)
            n_rel = hits[R - 1]
            return prec[:R][rel_sorted[:R]].sum() / n_rel if n_rel > 0 else 0.0

        ap_full.append(ap(n_db))
        for k in topk:
            ap_at[k].append(ap(k))
            p_at[k].append(hits[min(k, n_db) - 1] / min(k, n_db))

        within = dist <= radius
        p_radius.append(rel[within].sum() / within.sum() if within.any() else 0.0)

        # PR curve: items within Hamming radius r, r = 0..L
        retrieved = np.cumsum(np.bincount(dist, minlength=L + 1))
        tp = np.cumsum(np.bincount(dist, weights=rel, minlength=L + 1))
        pr_p.append(np.where(retrieved > 0, tp / np.maximum(retrieved, 1), 0.0))
        pr_r.append(tp / rel.sum() if rel.sum() > 0 else None)

    out = {"mAP": float(np.mean(ap_full))}
    for k in topk:
        out[f"mAP@{k}"] = float(np.mean(ap_at[k]))
    for k in topk:
        out[f"P@{k}"] = float(np.mean(p_at[k]))
    out[f"P@H<={radius}"] = float(np.mean(p_radius))
    recalls = [r for r in pr_r if r is not None]
    out["pr_precision"] = np.mean(pr_p, axis=0).tolist()
    out["pr_recall"] = (np.mean(recalls, axis=0) if recalls else np.zeros(L + 1)).tolist()
    return out
