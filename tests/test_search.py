"""BinaryIndex against a brute-force stable sort (random codes, many ties, an engine that breaks
ties the other way), its file (memory-mapped), the approximate engines, and index folders
(written in parts, appended, an interrupted append, the old single-file format)."""
import json
import os

import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.retrieval import exact as exact_mod
from utils.retrieval import index_file
from utils.retrieval import search as search_mod
from utils.retrieval.index_file import IndexWriter, load_index
from utils.search import BinaryIndex, hamming_topk


def brute_force(queries, db, k):
    """Distances of every pair from the unpacked bits, ranked by a stable sort (section 6)."""
    qb, dbb = np.asarray(queries) > 0, np.asarray(db) > 0
    d = (qb[:, None, :] != dbb[None, :, :]).sum(2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("bits", [32, 64, 128, 12])
def test_exact_search_is_a_stable_sort(bits):
    rng = np.random.default_rng(bits)
    db = rng.choice([-1, 1], (10_000, bits)).astype(np.int8)
    queries = rng.choice([-1, 1], (25, bits)).astype(np.int8)
    index = BinaryIndex(bits)
    index.add(torch.from_numpy(db[:3_000]))  # a tensor, a 0/1 array and a +-1 array, in pieces
    index.add((db[3_000:7_000] > 0).astype(np.uint8))
    index.add(db[7_000:])
    assert len(index) == 10_000 and index.codes.shape == (10_000, (bits + 7) // 8)
    dist, idx = index.search(queries, 100)
    ref_dist, ref_idx = brute_force(queries, db, 100)
    assert dist.dtype == idx.dtype == np.int64
    np.testing.assert_array_equal(dist, ref_dist)
    np.testing.assert_array_equal(idx, ref_idx)
    # Queries are searched in chunks (bounded memory for any batch): the same answer in many pieces.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exact_mod, "QUERY_ENTRIES", 450)
        for got, ref in zip(index.search(queries, 100), (ref_dist, ref_idx)):
            np.testing.assert_array_equal(got, ref)
    # hamming_topk keeps its meaning: the same ranking, from float codes.
    t_dist, t_idx = hamming_topk(torch.from_numpy(queries).float(), torch.from_numpy(db).float(), 100)
    np.testing.assert_array_equal(t_dist.numpy(), ref_dist)
    np.testing.assert_array_equal(t_idx.numpy(), ref_idx)


def test_ties_are_broken_by_database_index_whatever_the_engine_does(monkeypatch):
    rng = np.random.default_rng(0)
    db = rng.choice([-1, 1], (10_000, 8))  # 256 possible codes: about 40 copies of each
    db[5_000:5_400] = db[17]  # and one code held by 400 items, more than 2k
    queries = np.concatenate([db[[17, 3]], rng.choice([-1, 1], (6, 8))])
    ref = brute_force(queries, db, 150)
    index = BinaryIndex(8)
    index.add(db)
    for k in (1, 150):
        got = index.search(queries, k)
        np.testing.assert_array_equal(got[0], ref[0][:, :k])
        np.testing.assert_array_equal(got[1], ref[1][:, :k])

    def knn_preferring_late_items(xq, xb, k):  # a correct top k that keeps the last items of a tie
        d = np.unpackbits(np.bitwise_xor(xq[:, None, :], np.asarray(xb)[None]), axis=2).sum(2)
        order = np.lexsort((-np.arange(len(xb))[None, :].repeat(len(xq), 0), d), axis=1)[:, :k]
        return np.take_along_axis(d, order, 1).astype(np.int32), order

    # Codes of more than 64 bits take faiss's heap, whose choice among ties is its own: make it
    # keep the wrong ones, and the answer must not change.
    monkeypatch.setattr(exact_mod, "COUNTING_MAX_BITS", 0)
    monkeypatch.setattr(exact_mod.faiss, "knn_hamming", knn_preferring_late_items)
    for widest in (exact_mod.WIDEST, 300):  # ties settled by asking faiss for more, or by the scan
        monkeypatch.setattr(exact_mod, "WIDEST", widest)
        got = index.search(queries, 150)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_save_and_load_memory_maps(tmp_path):
    rng = np.random.default_rng(1)
    db, queries = rng.choice([-1, 1], (10_000, 64)), rng.choice([-1, 1], (10, 64))
    index = BinaryIndex(64)
    index.add(db)
    path = tmp_path / "codes.bidx"
    index.save(path)
    assert os.path.getsize(path) == search_mod.HEADER_BYTES + 10_000 * 8
    loaded = BinaryIndex.load(path)
    assert isinstance(loaded.codes, np.memmap) and not loaded.codes.flags.writeable and len(loaded) == 10_000
    for got, ref in zip(loaded.search(queries, 30), index.search(queries, 30)):
        np.testing.assert_array_equal(got, ref)
    loaded.add(db[:5])  # a loaded index grows in memory; its file is left as it was
    assert len(loaded) == 10_005 and loaded.search(db[:1], 2)[1].tolist() == [[0, 10_000]]
    assert os.path.getsize(path) == search_mod.HEADER_BYTES + 10_000 * 8
    with open(path, "r+b") as fh:
        fh.truncate(5_000)
    with pytest.raises(UserError, match="truncated"):
        BinaryIndex.load(path)
    (tmp_path / "other").write_bytes(b"not an index")
    with pytest.raises(UserError, match="not a BinaryIndex file"):
        BinaryIndex.load(tmp_path / "other")


def test_bad_input_is_refused_in_one_line():
    index = BinaryIndex(16)
    for call, match in ((lambda: index.add(np.ones((3, 15))), r"shape \(3, 15\) given to a 16-bit index"),
                        (lambda: BinaryIndex(16, "annoy"), "unknown search engine 'annoy'"),
                        (lambda: BinaryIndex(16, "ivf", nprobes=3), "ivf takes nlist, nprobe, niter, not nprobes"),
                        (lambda: BinaryIndex(16, "hnsw", M=0), "M must be a positive integer"),
                        (lambda: BinaryIndex(16, nlist=3), "the exact engine takes no parameters"),
                        (lambda: index.search(np.ones((1, 16)), 0), "k must be positive")):
        with pytest.raises(UserError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    assert [a.shape for a in index.search(np.ones((2, 16)), 5)] == [(2, 0), (2, 0)]  # an empty index


def clustered_codes(rng, n, centres, flips=3):
    """Codes near a few centres, as trained hashing codes are: approximate search has a chance."""
    bits = centres.shape[1]
    codes = centres[rng.integers(0, len(centres), n)].copy()
    rows, cols = np.repeat(np.arange(n), flips), rng.integers(0, bits, n * flips)
    codes[rows, cols] *= -1
    return codes


@pytest.mark.parametrize("engine, params", [("ivf", {"nlist": 16, "nprobe": 4}), ("hnsw", {"M": 12}),
                                            ("mih", {"nflip": 2})])
def test_approximate_engines(engine, params, tmp_path):
    rng = np.random.default_rng(2)
    centres = rng.choice([-1, 1], (20, 64))
    db, queries = clustered_codes(rng, 4_000, centres), clustered_codes(rng, 20, centres)
    exact = BinaryIndex(64)
    exact.add(db)
    ref_dist, ref_idx = exact.search(queries, 50)
    approx = BinaryIndex(64, engine, **params)
    approx.add(db[:2_000])
    approx.search(queries[:1], 5)  # built now; the rest is added to the structure at the next search
    approx.add(db[2_000:])
    dist, idx = approx.search(queries, 50)
    found = idx >= 0
    # Among many equal distances the engine may keep other items than the exact index: count
    # the results as near as the exact ones at the same rank.
    assert np.mean(found & (dist == ref_dist)) > 0.9
    assert (dist[found] >= ref_dist[found]).all()  # never nearer than the truth
    for row, f in zip(dist * 10**6 + idx, found):  # ascending (distance, index); -1 only at the end
        assert (np.diff(row[f]) > 0).all() and f[:f.sum()].all()
    path = tmp_path / f"{engine}.bidx"
    approx.save(path)
    again = BinaryIndex.load(path)
    assert again.engine == engine and again.params == approx.params
    for got, want in zip(again.search(queries, 50), (dist, idx)):
        np.testing.assert_array_equal(got, want)
    assert exact_mod.recall_by_distance(exact_mod.pack_codes(queries, 64), exact.codes, idx, ref_dist) > 0.9
    if engine == "ivf":  # every cluster probed: the exact answer, ids included
        full = BinaryIndex(64, "ivf", nlist=16, nprobe=16)
        full.add(db)
        for got, want in zip(full.search(queries, 50), (ref_dist, ref_idx)):
            np.testing.assert_array_equal(got, want)


def test_recall_is_counted_by_distance():
    """A result tied with the k-th exact one counts; one that took a nearer one's place does not."""
    db = exact_mod.pack_codes(np.array([[1] * 8] * 3 + [[1] * 7 + [-1]] * 3 + [[-1] * 8]), 8)
    query = db[:1]  # distances 0, 0, 0, 1, 1, 1, 8
    exact_dist = np.array([[0, 0, 1, 1]])  # the exact top 4: items 0, 1, 3, 4
    recall = exact_mod.recall_by_distance

    def share(*ids):
        return recall(query, db, np.array([ids]), exact_dist)

    assert share(0, 1, 3, 4) == 1.0
    assert share(1, 0, 5, 3) == 1.0  # item 5 ties with item 4 at the 4th distance: not a miss
    assert share(0, 2, 3, 4) == 1.0  # item 2 ties with 0 and 1 below it; any two of them will do
    # Three results at distance 1 where the answer has two: the third took the place of a missed 0.
    assert share(0, 3, 4, 5) == 0.75
    assert share(0, 1, 3, 6) == 0.75  # item 6 lies at distance 8
    assert share(0, 1, 3, -1) == 0.75  # not found
    assert share(0, 0, 3, 4) == 0.75  # a repeated id counts once
    # Distances come from the codes: the query is not asked what the engine said.
    two = np.concatenate([query, db[6:7]])  # the second query is item 6 itself
    assert recall(two, db, np.array([[0, 1, 3, 4], [6, 3, 4, 5]]), np.array([[0, 0, 1, 1], [0, 7, 7, 7]])) == 1.0
    assert recall(two, db, np.array([[0, 1, 3, 4], [6, 0, 1, 2]]), np.array([[0, 0, 1, 1], [0, 7, 7, 7]])) == 0.625


def test_ivf_probing_every_list_is_the_exact_engine_with_ties():
    """Random 24-bit codes tie by the dozen at the 50th distance, where faiss's own scan of every
    list keeps other ids than section 6's rule: the engine runs the exact scan there instead."""
    rng = np.random.default_rng(6)
    db, queries = rng.choice([-1, 1], (5_000, 24)), rng.choice([-1, 1], (40, 24))
    exact = BinaryIndex(24)
    exact.add(db)
    ref_dist, ref_idx = exact.search(queries, 50)
    ivf = BinaryIndex(24, "ivf", nlist=20, nprobe=4)
    ivf.add(db)
    partial = ivf.search(queries, 50)
    ivf.set_search_params(nprobe=20)
    for got, want in zip(ivf.search(queries, 50), (ref_dist, ref_idx)):
        np.testing.assert_array_equal(got, want)
    packed = exact_mod.pack_codes(queries, 24)
    ivf.approx.index.nprobe = 20  # faiss's own scan of every list: what the engine returned before
    faiss_dist, faiss_idx = ivf.approx.index.search(packed, 50)
    np.testing.assert_array_equal(np.sort(faiss_dist, 1), ref_dist)
    assert (np.sort(faiss_idx, 1) != np.sort(ref_idx, 1)).any(1).sum() >= 10  # other ids among the ties
    assert exact_mod.recall_by_distance(packed, exact.codes, faiss_idx, ref_dist) == 1.0
    id_recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(faiss_idx, ref_idx)])
    assert id_recall < 0.99
    # Fewer lists: distances no nearer than the truth, recall below 1, counted the same way.
    assert (partial[0] >= ref_dist).all()
    assert 0.2 < exact_mod.recall_by_distance(packed, exact.codes, partial[1], ref_dist) < 1.0


def header(bits=16):
    return {"bits": bits, "config": {"dim": bits}, "checkpoint": "/x/checkpoint_best.pth",
            "weights_sha256": "ab" * 32, "classes": ["a", "b"]}


def write(writer, codes, start=0, stop=None):
    rows = writer.open_rows()
    rows[start:stop] = np.packbits(codes[start:stop] > 0, axis=1)
    rows.flush()


def test_index_folders_written_in_parts_appended_and_interrupted(tmp_path):
    rng = np.random.default_rng(3)
    codes = rng.choice([-1, 1], (300, 16))
    paths = [str(tmp_path / "img" / f"{i}.png") for i in range(300)]
    labels = rng.integers(0, 2, 300)
    out = str(tmp_path / "db.index")
    writer = IndexWriter.create(out, header(), paths[:200], labels[:200])
    write(writer, codes[:200], 0, 120)  # two processes' shares of one file
    write(writer, codes[:200], 120, None)
    assert not os.path.exists(out)  # in out.partial until finished
    writer.finish()
    opened = load_index(out)
    assert len(opened) == 200 and opened.paths[199] == paths[199] and opened.label_name(3) == "ab"[labels[3]]
    # An append that stops before finish() leaves the index as it was; the next one overwrites its rows.
    broken = IndexWriter.extend(out, index_file.read_index_header(out), paths[200:260], None)
    write(broken, codes[200:260] * -1)
    assert len(load_index(out)) == 200
    writer = IndexWriter.extend(out, index_file.read_index_header(out), paths[200:], None)
    write(writer, codes[200:])
    writer.finish()
    opened = load_index(out)
    assert len(opened) == 300 and len(opened.paths) == 300
    assert [opened.paths[j] for j in (0, 200, 299)] == [paths[0], paths[200], paths[299]]
    assert opened.label_name(250) is None and list(opened.labels[:200]) == list(labels[:200])
    assert isinstance(opened.search.codes, np.memmap)
    for got, ref in zip(opened.search.search(codes[:7], 40), brute_force(codes[:7], codes, 40)):
        np.testing.assert_array_equal(got, ref)
    # A new index at the same path replaces it whole.
    writer = IndexWriter.create(out, header(), paths[:5], None)
    write(writer, codes[:5])
    writer.finish()
    assert len(load_index(out)) == 5 and not os.path.exists(out + ".partial")


def test_old_single_file_indexes_still_open(tmp_path):
    rng = np.random.default_rng(4)
    codes = torch.from_numpy(rng.choice([-1, 1], (50, 16))).to(torch.int8)
    old = {"format": "cdne-index", "version": 2, "codes": codes, "labels": torch.zeros(50, dtype=torch.long),
           "paths": [f"/d/{i}.png" for i in range(50)], "classes": ["a"], "config": {"dim": 16},
           "checkpoint": "/x.pth", "weights_sha256": "00"}
    torch.save(old, tmp_path / "old.index")
    opened = load_index(str(tmp_path / "old.index"))
    assert len(opened) == 50 and opened.paths[49] == "/d/49.png" and opened.label_name(0) == "a"
    for got, ref in zip(opened.search.search(codes[:3], 10), brute_force(codes[:3].numpy(), codes.numpy(), 10)):
        np.testing.assert_array_equal(got, ref)
    (tmp_path / "new.index").mkdir()
    (tmp_path / "new.index" / "header.json").write_text('{"format": "cdne-index", "version": 9}')
    with pytest.raises(UserError, match="rebuild it with `python -m utils.retrieve index"):
        load_index(str(tmp_path / "new.index"))


@pytest.mark.parametrize("engine, build", [("ivf", {"nlist": 8, "niter": None}), ("hnsw", {"M": 8})])
def test_an_index_folder_keeps_the_engine_structure(engine, build, tmp_path, monkeypatch):
    from utils.retrieval import engine_store

    rng = np.random.default_rng(5)
    centres = rng.choice([-1, 1], (10, 64))
    packed = exact_mod.pack_codes(clustered_codes(rng, 2_000, centres), 64)
    queries = packed[[3, 1_200, 1_999]]
    head = {"weights_sha256": "ab" * 32}
    said = []

    def attached(rows, asked=build, folder=tmp_path, head=head, **kw):
        said.clear()
        search = BinaryIndex.from_packed(64, packed[:rows], engine, **{k: v for k, v in asked.items() if v})
        engine_store.attach(search, str(folder), head, asked, say=said.append, **kw)
        return search

    first = attached(1_500)
    assert said[0].startswith(f"built the {engine} structure over 1500 codes") and "kept it in" in said[1]
    record = json.loads((tmp_path / f"engine-{engine}.json").read_text())
    assert record["count"] == 1_500 and record["bytes"] == os.path.getsize(tmp_path / f"engine-{engine}.faiss")
    answer = first.search_packed(queries[:2], 20)
    # The next query with these build flags loads it (a search flag may differ) and answers alike.
    again = attached(1_500, {**build, "nprobe": 8} if engine == "ivf" else {**build, "efSearch": 200})
    assert said == [s for s in said if s.startswith(f"loaded the {engine} structure kept in")] and len(said) == 1
    again.set_search_params(**{flag: first.params[flag] for flag in again.approx.search_flags})
    with pytest.raises(UserError, match="shape.* its structure"):
        again.set_search_params(**{flag: 3 for flag in engine_store.BUILD_FLAGS[engine]})
    for got, want in zip(again.search_packed(queries[:2], 20), answer):
        np.testing.assert_array_equal(got, want)
    # Codes appended to the folder since are added to the kept structure, which is kept again.
    grown = attached(2_000)
    assert "added the 500 appended since" in said[0] and "kept it in" in said[1]
    assert json.loads((tmp_path / f"engine-{engine}.json").read_text())["count"] == 2_000
    dist, idx = grown.search_packed(queries[2:], 5)
    assert idx[0, 0] == 1_999 and dist[0, 0] == 0
    # Other build flags, other weights, --rebuild-engine or a damaged file: built again.
    other = {**build, "nlist": 4} if engine == "ivf" else {**build, "M": 12}
    for case in (dict(asked=other), dict(head={"weights_sha256": "cd" * 32}), dict(rebuild=True)):
        attached(2_000, **case)
        assert said[0].startswith(f"built the {engine} structure"), case
    kept_file = tmp_path / f"engine-{engine}.faiss"
    kept_file.write_bytes(b"half")
    attached(2_000)
    assert said[0].startswith(f"built the {engine} structure")
    kept_file.write_bytes(bytes(os.path.getsize(kept_file)))  # the right size, but not faiss's
    attached(2_000)
    assert "does not hold the 2000 codes its record says; building it again" in said[0]
    assert said[1].startswith(f"built the {engine} structure")
    # A folder that cannot be written to: the query goes on, with a warning.
    from utils.training import checkpoint

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    searched = attached(2_000, rebuild=True)
    assert said[-1].startswith(f"warning: the {engine} structure could not be kept") and len(searched) == 2_000
    assert "Read-only file system" in said[-1]
    assert searched.search_packed(queries[2:], 1)[1][0, 0] == 1_999
