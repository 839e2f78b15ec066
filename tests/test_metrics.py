"""utils.metrics (docs/method.md section 6): the sort-based reference_metrics and the counting-rank
retrieval_metrics against hand-computed cases, and against each other on random cases."""
import numpy as np
import pytest
import torch

from utils.metrics import (binarize, mean_average_precision, pr_curve, precision_at_k, precision_within_radius,
                           reference_metrics, retrieval_metrics)

BOTH = pytest.mark.parametrize("metrics", [retrieval_metrics, reference_metrics],
                               ids=["counting_rank", "reference"])

# A 2-bit database used by the hand-computed cases.
#   db0 [+1 +1]  class 0
#   db1 [-1 -1]  class 0
#   db2 [+1 +1]  class 1
#   db3 [+1 -1]  class 0
#   db4 [+1 +1]  class 1
DB = torch.tensor([[1., 1.], [-1., -1.], [1., 1.], [1., -1.], [1., 1.]])
DB_Y = torch.tensor([0, 0, 1, 0, 1])


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


@BOTH
def test_ties_broken_by_database_index(metrics):
    # Query [+1 +1], class 0. Distances: db0 0, db1 2, db2 0, db3 1, db4 0.
    # Ranking (ascending distance, ties by index): db0 db2 db4 | db3 | db1
    # relevant:                                      1   0   0  |  1  |  1
    # precision at the relevant ranks 1, 4, 5: 1/1, 2/4, 3/5
    # AP = (1 + 0.5 + 0.6) / 3 = 0.7.  (Ties broken the other way, db4 db2 db0, would give
    # (1/3 + 2/4 + 3/5) / 3 = 0.478.)
    # AP@2: first two db0 db2 hold one relevant item -> R_rel = 1, AP = 1/1 = 1.
    # AP@4: db0 db2 db4 db3 -> R_rel = 2, AP = (1 + 2/4) / 2 = 0.75.
    # P@2 = 1/2, P@4 = 2/4, P@10 -> capped at 5: 3/5.
    # Within radius 0: db0 db2 db4 -> 1/3; radius 1: + db3 -> 2/4; radius 2: all -> 3/5.
    q, y = t([1, 1]), torch.tensor([0])
    m = metrics(q, y, DB, DB_Y, topk=(2, 4, 10), radius=0, with_pr=True)
    assert m["mAP"] == pytest.approx(0.7)
    assert m["mAP@2"] == pytest.approx(1.0)
    assert m["mAP@4"] == pytest.approx(0.75)
    assert m["mAP@10"] == pytest.approx(0.7)           # R capped at the database size
    assert m["P@2"] == pytest.approx(0.5)
    assert m["P@4"] == pytest.approx(0.5)
    assert m["P@10"] == pytest.approx(0.6)             # K capped at the database size: 3 / 5
    assert m["P@H<=0"] == pytest.approx(1 / 3)
    assert metrics(q, y, DB, DB_Y, radius=2)["P@H<=2"] == pytest.approx(0.6)
    # PR curve (r = 0, 1, 2): precision 1/3, 2/4, 3/5; recall (3 relevant) 1/3, 2/3, 3/3.
    assert m["pr_precision"] == pytest.approx([1 / 3, 0.5, 0.6])
    assert m["pr_recall"] == pytest.approx([1 / 3, 2 / 3, 1.0])


@BOTH
def test_queries_with_nothing_relevant_still_count(metrics):
    # q0: the query above (AP 0.7, AP@2 1, P@2 1/2).
    # q1: [-1 -1], class 1. Distances: db0 2, db1 0, db2 2, db3 1, db4 2.
    #     Ranking db1 | db3 | db0 db2 db4, relevant 0 | 0 | 0 1 1: precision 1/4 at rank 4 and
    #     2/5 at rank 5 -> AP = (0.25 + 0.4) / 2 = 0.325.
    #     AP@2: nothing relevant in the first two -> 0, and it still counts. P@2 = 0.
    #     Radius 2 holds everything: P@H<=2 = 2/5. Radius 0: only db1 -> 0; radius 1: 0/2.
    # q2: [+1 +1], class 7, absent from the database: AP 0, P 0, precision 0 at every radius,
    #     and it is left out of the recall average.
    q = t([1, 1], [-1, -1], [1, 1])
    y = torch.tensor([0, 1, 7])
    m = metrics(q, y, DB, DB_Y, topk=(2,), radius=2, with_pr=True)
    assert m["mAP"] == pytest.approx((0.7 + 0.325 + 0) / 3)
    assert m["mAP@2"] == pytest.approx((1.0 + 0 + 0) / 3)
    assert m["P@2"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert m["P@H<=2"] == pytest.approx((0.6 + 0.4 + 0) / 3)
    assert m["pr_precision"] == pytest.approx([(1 / 3 + 0 + 0) / 3, (0.5 + 0 + 0) / 3, (0.6 + 0.4 + 0) / 3])
    # recall over q0 and q1 only: q1 has 2 relevant items, none within radius 1.
    assert m["pr_recall"] == pytest.approx([(1 / 3 + 0) / 2, (2 / 3 + 0) / 2, (1 + 1) / 2])


@BOTH
def test_nothing_within_radius_counts_zero(metrics):
    # q1 above at radius 0 retrieves db1 only (not relevant); a query [+1 -1] of class 1 at
    # radius 0 retrieves db3 (class 0): both 0. A query far from everything with L = 4 bits:
    # db codes padded with two +1 bits, query [-1 -1 -1 -1] is at distance >= 2 from all of
    # them, so nothing lies within radius 1: precision 0 for that query.
    def within(q, y, db, radius):
        return metrics(q, torch.tensor(y), db, DB_Y, radius=radius)[f"P@H<={radius}"]

    assert within(t([-1, -1]), [1], DB, radius=0) == 0.0
    assert within(t([1, -1]), [1], DB, radius=0) == 0.0
    db4 = torch.cat([DB, torch.ones(5, 2)], 1)
    assert within(t([-1, -1, -1, -1]), [0], db4, radius=1) == 0.0
    assert within(t([-1, -1, -1, -1]), [0], db4, radius=2) == 1.0
    assert within(t([1, 1]), [0], DB, radius=-1) == 0.0  # a negative radius holds nothing


@BOTH
def test_multi_label_relevance_is_label_set_intersection(metrics):
    # Classes (multi-hot over 3): db0 {0}, db1 {1,2}, db2 {2}, db3 {0,1}, db4 {}.
    # Both queries are [+1 +1]: ranking db0 db2 db4 db3 db1 (as above).
    # q0 {1}: relevant db1, db3 -> 0 0 0 1 1 -> AP = (1/4 + 2/5) / 2 = 0.325, P@3 = 0.
    # q1 {2}: relevant db1, db2 -> 0 1 0 0 1 -> AP = (1/2 + 2/5) / 2 = 0.45, P@3 = 1/3.
    yd = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    yq = torch.tensor([[0, 1, 0], [0, 0, 1]])
    q = t([1, 1], [1, 1])
    m = metrics(q, yq, DB, yd, topk=(2, 3))
    assert m["mAP"] == pytest.approx((0.325 + 0.45) / 2)
    assert m["P@3"] == pytest.approx((0 + 1 / 3) / 2)
    # AP@2: q0 has nothing relevant in db0 db2 -> 0; q1 has db2 at rank 2 -> (1/2) / 1.
    assert m["mAP@2"] == pytest.approx((0 + 0.5) / 2)


@BOTH
def test_real_valued_codes_and_exact_zeros(metrics):
    # Bit = 1 iff value > 0, so 0 (and -0) is bit -1.
    assert binarize(torch.tensor([0.0, -0.0, 1e-30, -2.0, 3.0])).tolist() == [-1, -1, 1, -1, 1]
    # Query [0, 0.3] -> [-1 +1]. db: [0 0] -> [-1 -1] class 0, [0.5 0.2] -> [+1 +1] class 1,
    # [-0.1 1e-9] -> [-1 +1] class 1. Distances 1, 1, 0: ranking db2 db0 db1, relevant 1 0 1,
    # AP = (1 + 2/3) / 2 = 5/6. (Reading 0 as +1 would rank db0 db1 db2 -> AP (1/2 + 2/3) / 2.)
    q = t([0.0, 0.3])
    db = t([0.0, 0.0], [0.5, 0.2], [-0.1, 1e-9])
    yd = torch.tensor([0, 1, 1])
    assert metrics(q, torch.tensor([1]), db, yd)["mAP"] == pytest.approx(5 / 6)
    # the same codes already as +-1 give the same numbers
    assert metrics(binarize(q), torch.tensor([1]), binarize(db), yd)["mAP"] == pytest.approx(5 / 6)


def test_topk_validation():
    with pytest.raises(ValueError):
        retrieval_metrics(t([1, 1]), torch.tensor([0]), DB, DB_Y, topk=(0,))


def random_case(seed, n_q, n_db, bits, classes, multi=False, zeros=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, bits, generator=g)
    db = torch.randn(n_db, bits, generator=g)
    if zeros:   # exact zeros count as -1
        q[torch.rand(q.shape, generator=g) < 0.2] = 0
        db[torch.rand(db.shape, generator=g) < 0.2] = 0
    if multi:
        yq = (torch.rand(n_q, classes, generator=g) < 0.3).long()
        yd = (torch.rand(n_db, classes, generator=g) < 0.3).long()
    else:   # query classes may be absent from the database
        yq = torch.randint(0, classes + 1, (n_q,), generator=g)
        yd = torch.randint(0, classes, (n_db,), generator=g)
    return q, yq, db, yd


def assert_matches_reference(args, topk, radius):
    ours = retrieval_metrics(*args, topk=topk, radius=radius, with_pr=True)
    ref = reference_metrics(*args, topk=topk, radius=radius, with_pr=True)
    assert list(ours) == list(ref)
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("bits", [1, 4, 6, 8])
@pytest.mark.parametrize("multi", [False, True])
def test_matches_reference_with_many_ties(bits, multi):
    # Few bits: almost every distance is tied, so the index tie-break decides the ranking.
    args = random_case(bits + 10 * multi, 40, 700, bits, classes=4, multi=multi, zeros=bits == 6)
    assert_matches_reference(args, topk=(1, 20, 100, 5000), radius=2)


def test_matches_reference_at_radius_0_negative_and_past_L():
    args = random_case(3, 30, 400, 8, classes=3)
    assert_matches_reference(args, topk=(20,), radius=0)
    assert_matches_reference(args, topk=(20,), radius=-1)
    assert_matches_reference(args, topk=(20,), radius=50)


def test_matches_reference_with_no_relevant_item_anywhere():
    # Multi-hot rows without labels, and query classes absent from the database: the recall
    # average has no query left and is 0, as are the other metrics of those queries.
    q, yq, db, yd = random_case(9, 12, 300, 8, classes=3, multi=True)
    assert_matches_reference((q, torch.zeros_like(yq), db, yd), topk=(5,), radius=2)
    q, yq, db, yd = random_case(9, 12, 300, 8, classes=3)
    assert_matches_reference((q, yq + 10, db, yd), topk=(5,), radius=2)


def test_reference_chunks_do_not_change_it():
    args = random_case(10, 23, 300, 8, classes=3)
    whole = reference_metrics(*args, with_pr=True)
    chunked = reference_metrics(*args, with_pr=True, chunk_size=4)
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=0, atol=1e-15, err_msg=key)


def test_matches_reference_with_many_blocks():
    # 5000 items: blocks of 51, about 100 blocks per distance, 33 distances.
    args = random_case(4, 25, 5000, 32, classes=5)
    assert_matches_reference(args, topk=(20, 100), radius=3)


def test_matches_reference_with_128_bits_and_class_correlated_codes():
    # As in an evaluation: codes near their class's prototype, 128 bits, most queries' relevant
    # items near the top of the ranking.
    g = torch.Generator().manual_seed(11)
    proto = torch.randn(6, 128, generator=g).sign()
    yq, yd = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 6, (900,), generator=g)
    q = proto[yq] + 1.5 * torch.randn(40, 128, generator=g)
    db = proto[yd] + 1.5 * torch.randn(900, 128, generator=g)
    assert_matches_reference((q, yq, db, yd), topk=(20, 100, 2000), radius=2)


@pytest.mark.parametrize("multi", [False, True])
def test_chunked_equals_unchunked(multi):
    args = random_case(5, 37, 600, 6, classes=3, multi=multi)
    whole = retrieval_metrics(*args, with_pr=True)
    for chunk in (1, 2, 5):
        assert retrieval_metrics(*args, with_pr=True, chunk_size=chunk) == whole
    assert retrieval_metrics(*args, with_pr=True, max_bytes=1) == whole   # one query per chunk


def test_single_thread_and_float64_keys_agree(monkeypatch):
    args = random_case(6, 20, 500, 8, classes=3)
    whole = retrieval_metrics(*args, with_pr=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert retrieval_metrics(*args, with_pr=True, chunk_size=3) == whole
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    # With reduced-precision float32 matmuls allowed, keys come from float64 instead.
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert retrieval_metrics(*args, with_pr=True) == whole
    finally:
        torch.set_float32_matmul_precision(precision)


def test_single_metric_functions_agree_with_retrieval_metrics():
    args = random_case(7, 15, 300, 8, classes=3)
    m = retrieval_metrics(*args, topk=(10, 50), radius=1, with_pr=True)
    assert mean_average_precision(*args) == m["mAP"]
    assert mean_average_precision(*args, topk=50) == m["mAP@50"]
    assert precision_at_k(*args, k=10) == m["P@10"]
    assert precision_within_radius(*args, radius=1) == m["P@H<=1"]
    precision, recall = pr_curve(*args)
    assert precision.tolist() == m["pr_precision"] and recall.tolist() == m["pr_recall"]
    assert set(retrieval_metrics(*args)) == {"mAP", "mAP@20", "mAP@100", "P@20", "P@100", "P@H<=2"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("multi", [False, True])
def test_cuda_matches_cpu(multi):
    args = random_case(8, 50, 3000, 16, classes=4, multi=multi)
    cpu = retrieval_metrics(*args, topk=(1, 20, 100), with_pr=True)
    gpu = retrieval_metrics(*(a.cuda() for a in args), topk=(1, 20, 100), with_pr=True, chunk_size=7)
    for key in cpu:
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=0, atol=1e-12, err_msg=key)
