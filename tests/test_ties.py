"""Tie-aware metrics (utils/metrics/ties.py, docs/method.md section 6): the closed form against the mean
over every ordering of the ties, enumerated; the ordinary metric where nothing ties; the same keys as the
index order; and where runs record them (results.json, retrieve evaluate, the table's --ties)."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from utils.metrics import (mean_average_precision, precision_at_k, reference_metrics, retrieval_metrics,
                           retrieval_metrics_by_ties)
from utils.table import command as table

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOPK = (1, 2, 3, 4, 5, 7, 100)


# ----------------------------------------------------------------------------- enumeration, written here

def metrics_of_ranking(rel, topk):
    """P@K, AP@R (R_rel = relevant among the first R, 0 when none) and AP of one ranked 0/1 list, as
    docs/method.md section 6 defines them."""
    n, hits, prec = len(rel), 0, []
    for i, r in enumerate(rel):
        hits += r
        prec.append(hits / (i + 1) if r else 0.0)

    def ap(R):
        R = min(R, n)
        return sum(prec[:R]) / sum(rel[:R]) if sum(rel[:R]) else 0.0
    out = {"mAP": ap(n)}
    out.update({f"mAP@{k}": ap(k) for k in topk})
    out.update({f"P@{k}": sum(rel[:min(k, n)]) / min(k, n) for k in topk})
    return out


def enumerated(q_codes, q_labels, db_codes, db_labels, topk):
    """Mean over queries of the mean over ALL orderings within each group of equal Hamming distance
    (itertools.permutations of each group, every combination of them)."""
    bq, bd = torch.where(q_codes > 0, 1, -1), torch.where(db_codes > 0, 1, -1)
    dist = ((bq.shape[1] - bq @ bd.t()) // 2).tolist()
    if q_labels.dim() == 1:
        rel = (q_labels[:, None] == db_labels[None]).int().tolist()
    else:
        rel = ((q_labels.int() @ db_labels.int().t()) > 0).int().tolist()
    total = {}
    for d, r in zip(dist, rel):
        groups = [[j for j in range(len(d)) if d[j] == g] for g in sorted(set(d))]
        orders = list(itertools.product(*(itertools.permutations(g) for g in groups)))
        per_query = {}
        for combo in orders:
            m = metrics_of_ranking([r[j] for part in combo for j in part], topk)
            for k, v in m.items():
                per_query[k] = per_query.get(k, 0.0) + v / len(orders)
        for k, v in per_query.items():
            total[k] = total.get(k, 0.0) + v / len(dist)
    return total


def assert_same(ours, theirs):
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k


def pm(rows):
    return torch.tensor(rows, dtype=torch.float32) * 2 - 1


# 3 bits, 8 items: groups of 2-4 items at each distance from the queries, so that K and R in TOPK
# fall inside groups (and on their edges).
DB = pm([[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
DB_Y = torch.tensor([0, 1, 1, 0, 2, 0, 0, 1])
Q = pm([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1]])


def test_closed_form_equals_the_mean_over_every_ordering_of_the_ties():
    qy = torch.tensor([0, 1, 2, 0])
    ours = retrieval_metrics(Q, qy, DB, DB_Y, topk=TOPK, ties="expected")
    assert_same(ours, enumerated(Q, qy, DB, DB_Y, TOPK))
    # It differs from the index order here (ties decide), so the comparison is not vacuous.
    index = retrieval_metrics(Q, qy, DB, DB_Y, topk=TOPK)
    assert any(abs(index[k] - ours[k]) > 1e-3 for k in ours)


def test_queries_with_nothing_relevant_and_all_items_tied():
    # Class 5 is in no database item (RankCounts leaves such a query's counts at 0); class 2 has one.
    qy = torch.tensor([5, 2, 5, 1])
    assert_same(retrieval_metrics(Q, qy, DB, DB_Y, topk=TOPK, ties="expected"), enumerated(Q, qy, DB, DB_Y, TOPK))
    same = DB[:1].expand(7, -1).clone()   # every item at one distance: one group of 7
    y = torch.tensor([0, 1, 0, 0, 1, 2, 0])
    for q in (DB[:1], -DB[:1]):
        ours = retrieval_metrics(q, torch.tensor([0]), same, y, topk=TOPK, ties="expected")
        assert_same(ours, enumerated(q, torch.tensor([0]), same, y, TOPK))
    # With every item tied, the expected P@K is the fraction relevant, whatever K.
    assert ours["P@3"] == pytest.approx(4 / 7) and ours["P@7"] == pytest.approx(4 / 7)


def test_multi_label_relevance():
    db_y = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]])
    qy = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 1, 1]])   # the third: no label, nothing relevant
    assert_same(retrieval_metrics(Q, qy, DB, db_y, topk=TOPK, ties="expected"), enumerated(Q, qy, DB, db_y, TOPK))


@pytest.mark.parametrize("seed", range(6))
def test_random_small_cases(seed):
    g = torch.Generator().manual_seed(seed)
    n_db, bits = 7, 2 + seed % 3
    db, q = torch.randn(n_db, bits, generator=g), torch.randn(3, bits, generator=g)
    db_y, qy = torch.randint(0, 3, (n_db,), generator=g), torch.randint(0, 3, (3,), generator=g)
    assert_same(retrieval_metrics(q, qy, db, db_y, topk=TOPK, ties="expected"), enumerated(q, qy, db, db_y, TOPK))


def test_every_database_permutation_averages_to_the_closed_form():
    """Permuting the database re-breaks every tie (the index order is the permutation's): the mean of the
    library's own index-order reference_metrics over all 6! permutations is the expectation."""
    db, db_y = DB[:6], DB_Y[:6]
    qy = torch.tensor([0, 1, 2, 0])
    perms = list(itertools.permutations(range(6)))
    runs = [reference_metrics(Q, qy, db[list(p)], db_y[list(p)], topk=(2, 3, 5)) for p in perms]
    mean = {k: math.fsum(r[k] for r in runs) / len(runs) for k in runs[0]}
    assert_same(retrieval_metrics(Q, qy, db, db_y, topk=(2, 3, 5), ties="expected"), mean)


def test_no_ties_gives_the_ordinary_metric():
    # Thermometer codes (the first j bits set): every query below is at a distinct distance from each item.
    bits = 9
    db = pm([[1] * j + [0] * (bits - j) for j in range(bits + 1)])
    perm = torch.randperm(bits + 1, generator=torch.Generator().manual_seed(0))
    db, db_y = db[perm], torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0, 1])
    q = pm([[0] * bits, [1] * bits])
    assert all(len(set(row)) == len(row) for row in ((bits - q @ db.t()) / 2).tolist())
    for topk in ((1, 3, 4), (5, 10, 20)):
        index = retrieval_metrics(q, torch.tensor([0, 1]), db, db_y, topk=topk, with_pr=True)
        expected = retrieval_metrics(q, torch.tensor([0, 1]), db, db_y, topk=topk, with_pr=True, ties="expected")
        assert expected.keys() == index.keys()
        for k in index:
            assert expected[k] == pytest.approx(index[k], abs=1e-12), k


def test_same_keys_and_the_single_metric_functions():
    qy = torch.tensor([0, 1, 2, 0])
    for with_pr in (False, True):
        index = retrieval_metrics(Q, qy, DB, DB_Y, topk=(2, 5), with_pr=with_pr)
        expected = retrieval_metrics(Q, qy, DB, DB_Y, topk=(2, 5), with_pr=with_pr, ties="expected")
        assert list(expected) == list(index)
        # The radius and the PR curve count items within a distance: the order inside it plays no part.
        assert expected["P@H<=2"] == index["P@H<=2"]
        if with_pr:
            assert expected["pr_precision"] == index["pr_precision"] and expected["pr_recall"] == index["pr_recall"]
    both = retrieval_metrics_by_ties(Q, qy, DB, DB_Y, topk=(2, 5), with_pr=True)
    assert both == {"index": index, "expected": expected}
    assert mean_average_precision(Q, qy, DB, DB_Y, topk=5, ties="expected") == pytest.approx(expected["mAP@5"])
    assert mean_average_precision(Q, qy, DB, DB_Y, ties="expected") == pytest.approx(expected["mAP"])
    assert precision_at_k(Q, qy, DB, DB_Y, 2, ties="expected") == pytest.approx(expected["P@2"])
    assert precision_at_k(Q, qy, DB, DB_Y, 2) == pytest.approx(index["P@2"])   # the default stays the index order
    with pytest.raises(ValueError, match="ties must be one of index, expected"):
        retrieval_metrics(Q, qy, DB, DB_Y, ties="random")


# ----------------------------------------------------------------------------- where runs record them

@pytest.fixture(scope="module")
def one_epoch(tiny_root, tmp_path_factory):
    """One epoch of CDNE(MB) on the tiny digits at 8 bits (many ties); its run folder."""
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_MB", "main.py"), "--data", tiny_root,
                           "--dataset", "digits", "--no-pretrained", "--img-size", "16", "--dim", "8", "-b", "16",
                           "--lr", "0.01", "--num_workers", "0", "--device", "cpu", "--epochs", "1",
                           "--out", str(out), "--name", "r"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tiny_root, out / "r"


def test_a_run_records_tie_aware_val_and_test(one_epoch, tmp_path):
    root, run = one_epoch
    res = json.loads((run / "results.json").read_text())
    for split in ("val", "test"):
        ours, index = res[f"{split}_tie_aware"], res[split]
        assert ours.keys() == index.keys()
        assert ours["P@H<=2"] == index["P@H<=2"] and ours["pr_precision"] == index["pr_precision"]
        assert all(0 <= ours[k] <= 1 for k in ("mAP", "mAP@100", "P@20"))
    assert res["test_tie_aware"]["precision_at_k"]["k"] == res["test"]["precision_at_k"]["k"]
    # retrieve evaluate prints both columns and writes both; its numbers are the run's.
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, "-m", "utils.retrieve", "evaluate", "--checkpoint",
                           str(run / "checkpoint_best.pth"), "--data", root, "--split", "test", "--json", str(out),
                           "--device", "cpu", "--num_workers", "0"], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "index tie-aware" in proc.stdout
    report = json.loads(out.read_text())
    for key in ("mAP", "mAP@100", "P@20"):
        assert report["metrics"][key] == pytest.approx(res["test"][key], abs=1e-6)
        assert report["metrics_tie_aware"][key] == pytest.approx(res["test_tie_aware"][key], abs=1e-6)


def test_the_table_reports_the_tie_aware_number_when_asked(one_epoch, tmp_path, capsys):
    _, run = one_epoch
    res = json.loads((run / "results.json").read_text())
    for ties, key in (("index", "test"), ("expected", "test_tie_aware")):
        report = tmp_path / ties
        assert table.main(["--collect", str(run.parent), "--report", str(report), "--ties", ties]) == 0
        md = (report / "table.md").read_text()
        assert f"--ties {ties}" in md.splitlines()[1]
        assert f"| {100 * res[key]['mAP@100']:.2f} |" in md
        data = json.loads((report / "table.json").read_text())
        assert data["ties"] == ties and data["made_by"]["ties"] == ties
        assert data["rows"][0]["precision_at_k"]["precision"] == pytest.approx(res[key]["precision_at_k"]["precision"])


def test_the_table_refuses_runs_without_tie_aware_metrics(one_epoch, tmp_path, capsys):
    _, run = one_epoch
    old = tmp_path / "old" / "r"
    old.mkdir(parents=True)
    res = json.loads((run / "results.json").read_text())
    del res["val_tie_aware"], res["test_tie_aware"]   # as runs wrote it before they recorded them
    (old / "results.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit) as exc:
        table.main(["--collect", str(old.parent), "--report", str(tmp_path / "rep"), "--ties", "expected"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--ties expected: 1 run(s) have no test_tie_aware" in err and str(old) in err and "--ties index" in err
    assert not (tmp_path / "rep" / "table.md").exists()
