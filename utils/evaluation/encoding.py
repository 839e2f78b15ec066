"""Evaluation: encode a split, score its queries against the database, and the test pictures.

The database is the train split with the eval transform; codes are the signs of the relaxed
codes f (docs/method.md section 6). Each metric comes two ways from one counting pass: with ties
at equal Hamming distance broken by database index (the ranking of section 6, which chooses the
best epoch) and as its expectation over random orders within the ties (ties="expected").
"""
import torch
from tqdm import tqdm

from utils import distributed as dist
from utils.evaluation.pictures import bit_balance, retrieval_grid, to_chw
from utils.metrics import TIES, check_ties, metrics_of
from utils.metrics.codes import hamming_topk
from utils.metrics.rank_counting import RankCounts
from utils.metrics.ties import ExpectedRanks


@torch.no_grad()
def encode(model, loader, n, dim, device, autocast, desc):
    """Relaxed codes f of a whole split, in dataset order, gathered from all ranks."""
    model.eval()
    local_idx, local_f = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not dist.is_main()):
        img = batch["img"].to(device, non_blocking=True)
        with autocast():
            f, _, _ = model(img)
        local_idx.append(torch.as_tensor(batch["idx"], device=device))
        local_f.append(f.float())
    idx = dist.all_gather(torch.cat(local_idx)) if local_idx else torch.empty(0, dtype=torch.long, device=device)
    f = dist.all_gather(torch.cat(local_f)) if local_f else torch.empty(0, dim, device=device)
    codes = torch.zeros(n, dim, device=device)
    codes[idx] = f
    return codes


def evaluate(model, splits, split, device, topk, autocast, return_codes=False, tie_aware=False):
    """Every metric of `split` queries against the train split as database (eval transform), on
    `device`, mAP@R and P@K at R, K = 20, 100 and `topk` (--topk), the PR curve included; with
    tie_aware, (index-order metrics, tie-aware metrics) in place of the metrics (one counting
    pass); with return_codes also the (query, database) codes."""
    dim = model.dim
    db_codes = encode(model, splits.eval_loader("train"), len(splits.db), dim, device, autocast, "encode database")
    q = getattr(splits, split)
    q_codes = encode(model, splits.eval_loader(split), len(q), dim, device, autocast, f"encode {split}")
    if tie_aware:
        both = every_metric_by_ties(q_codes, q.labels.to(device), db_codes, splits.db.labels.to(device), topk)
        metrics = (both["index"], both["expected"])
    else:
        metrics = (every_metric(q_codes, q.labels.to(device), db_codes, splits.db.labels.to(device), topk),)
    return (*metrics, q_codes, db_codes) if return_codes else (metrics if tie_aware else metrics[0])


def _every_topk(topk):
    return tuple(sorted({20, 100, topk}))


def every_metric(q_codes, q_labels, db_codes, db_labels, topk, ties="index"):
    """Every metric, mAP@R and P@K for R, K in 20, 100 and --topk, and the PR curve; ties: "index"
    (ties broken by database index) or "expected" (utils/metrics/ties.py)."""
    return every_metric_by_ties(q_codes, q_labels, db_codes, db_labels, topk, (check_ties(ties),))[ties]


def every_metric_by_ties(q_codes, q_labels, db_codes, db_labels, topk, ties=TIES):
    """{ties: every_metric(..., ties)} for each of `ties`, from one counting pass."""
    s = RankCounts(q_codes, q_labels, db_codes, db_labels, _every_topk(topk))
    return {t: metrics_of(s, t, with_pr=True) for t in ties}


def precision_at_k_curve(q_codes, q_labels, db_codes, db_labels, ties="index"):
    """Mean precision at K over the queries for K = 1, 5, 10, 20, 50, then 100 to 1,000 in
    steps of 100, capped at the database size (then its last K): the paper's P@K figure; ties
    "index" or "expected" (then each its expectation over random orders within the ties)."""
    return precision_at_k_curves(q_codes, q_labels, db_codes, db_labels, (check_ties(ties),))[ties]


def precision_at_k_curves(q_codes, q_labels, db_codes, db_labels, ties=TIES):
    """{ties: precision_at_k_curve(..., ties)} for each of `ties`, from one counting pass."""
    n_db = len(db_codes)
    ks = sorted({min(k, n_db) for k in (1, 5, 10, 20, 50, *range(100, 1001, 100))})
    s = RankCounts(q_codes, q_labels, db_codes, db_labels, tuple(ks))
    out = {}
    for t in ties:
        e = ExpectedRanks(s.cum_all, s.cum_rel, s.n_db) if check_ties(t) == "expected" else None
        out[t] = {"k": ks, "precision": [s.mean(s.p_at[k] if e is None else e.precision_at(k)) for k in ks]}
    return out


def log_test_pictures(writer, splits, metrics, q_codes, db_codes, bands, step, n_queries=8, k=10):
    """TensorBoard pictures of the final test: PR curve, a retrieval grid, bit balance."""
    precision = torch.tensor(metrics["pr_precision"], dtype=torch.float64)
    recall = torch.tensor(metrics["pr_recall"], dtype=torch.float64)
    zeros = [0] * len(precision)
    # The PR plugin expects thresholds in rising order, i.e. falling recall: radius L first.
    writer.add_pr_curve_raw("test/pr_curve_hamming_radius", zeros, zeros, zeros, zeros,
                            precision.flip(0).tolist(), recall.flip(0).tolist(), step, len(precision))
    # A few queries spread over the classes, with their top-k.
    pick = torch.linspace(0, len(q_codes) - 1, min(n_queries, len(q_codes))).round().long().unique()
    dist_k, idx_k = hamming_topk(q_codes[pick], db_codes, k)
    q_labels, db_labels = splits.test.labels[pick.cpu()], splits.db.labels
    relevant = (db_labels[idx_k.cpu()] == q_labels[:, None]).tolist()
    grid = retrieval_grid([splits.test.samples[i][0] for i in pick.tolist()],
                          [[splits.db.samples[j][0] for j in row] for row in idx_k.tolist()],
                          relevant, dist_k.tolist(), bands=bands)
    writer.add_image("test/retrieval_top10", to_chw(grid), step)
    # The fraction of ones of each bit over the database, one histogram at the epoch step of the
    # other test values (steps are epochs everywhere; a scalar per bit would be L charts).
    writer.add_histogram("test/bit_fraction_ones", bit_balance(db_codes).cpu().numpy(), step, bins=20)


def tb_tag(metric):
    """TensorBoard tags allow neither '@' nor '<=': mAP@100 -> mAP_100, P@H<=2 -> P_H_le_2."""
    return metric.replace("@H<=", "_H_le_").replace("@", "_")
