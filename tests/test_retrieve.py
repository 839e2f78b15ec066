"""The retrieval command end to end on the digits demo, with checkpoints trained here.

Two short training runs (16 and 8 bits) serve every test; checkpoints with other weights,
moved run folders and old indexes are made from them by editing copies."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from utils import retrieve as retrieve_mod
from utils.data.scenes import SceneDataset
from utils.retrieval.index_file import load_index
from utils.search import hamming_topk


def train(root, out, name, dim):
    cmd = [sys.executable, os.path.join(REPO, "train_MB", "main.py"), "--data", root, "--dataset", "digits",
           "--epochs", "1", "-b", "16", "--lr", "0.01", "--no-pretrained", "--img-size", "16", "--dim", str(dim),
           "--num_workers", "0", "--device", "cpu", "--out", out, "--name", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return os.path.join(out, name)


def retrieve(*args, check=True):
    """The command as a user runs it: a subprocess (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "utils.retrieve", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def call(capsys, *args):
    """utils.retrieve.main in this process (faster): (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = retrieve_mod.main([*args, "--device", "cpu"])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def result_lines(stdout):
    return [line for line in stdout.splitlines() if line.strip()[:1].isdigit()]


def parse(line):
    """A result line: (rank, distance, path, class or None, "relevant"/"irrelevant" or None)."""
    found = re.fullmatch(r"\s*(\d+)\s+d=\s*(\d+)\s+(\S+)(?:\s+(\S+?))?(?:\s+(relevant|irrelevant))?", line)
    assert found, line
    rank, dist, path, cls, mark = found.groups()
    return int(rank), int(dist), path, cls, mark


def edited_copy(src, dst, edit):
    obj = torch.load(src, weights_only=True)
    edit(obj)
    torch.save(obj, dst)
    return str(dst)


def edited_index(src, dst, edit):
    """A copy of an index folder with its header.json edited."""
    shutil.copytree(src, dst)
    header = json.loads((dst / "header.json").read_text())
    edit(header)
    (dst / "header.json").write_text(json.dumps(header))
    return str(dst)


def pm1_codes(opened):
    """An opened index's codes as a +-1 tensor (unpacked)."""
    bits = np.unpackbits(np.asarray(opened.search.codes), axis=1)[:, :opened.search.bits]
    return torch.from_numpy(bits.astype(np.int8) * 2 - 1)


def old_format_copy(index, dst, **changes):
    """The index as the single torch file of versions 1 and 2."""
    opened = load_index(index)
    old = {**{k: v for k, v in opened.header.items() if k not in ("count", "bits")}, "version": 2,
           "codes": pm1_codes(opened), "labels": torch.from_numpy(np.array(opened.labels)),
           "paths": [opened.paths[j] for j in range(len(opened))], **changes}
    torch.save(old, dst)
    return str(dst)


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs"))
    return tiny_root, train(tiny_root, out, "a", 16), train(tiny_root, out, "b", 8)


@pytest.fixture(scope="module")
def split_index(trained, tmp_path_factory):
    """An index of run a's train split, built with neither --dataset nor --data (the checkpoint's)."""
    root, run_a, _ = trained
    index = str(tmp_path_factory.mktemp("index") / "train.index")
    proc = retrieve("index", "--checkpoint", os.path.join(run_a, "checkpoint_best.pth"), "--out", index,
                    "--device", "cpu", "--num_workers", "0")
    assert "from the checkpoint's flags: --dataset digits" in proc.stdout and f"--data {root}" in proc.stdout
    assert "indexed" in proc.stdout and "the train split of digits" in proc.stdout
    return index


def test_evaluate_matches_the_runs_own_test_metrics(trained, tmp_path):
    root, run_a, _ = trained
    out = tmp_path / "eval.json"
    proc = retrieve("evaluate", "--checkpoint", os.path.join(run_a, "checkpoint_best.pth"), "--data", root,
                    "--dataset", "digits", "--split", "test", "--json", str(out), "--device", "cpu")
    assert "mAP@100" in proc.stdout and "P@H<=2" in proc.stdout
    assert "from the checkpoint's flags: --imgEXT png" in proc.stdout  # the only one not given
    ours = json.loads(out.read_text())["metrics"]
    theirs = json.loads(open(os.path.join(run_a, "results.json")).read())["test"]
    for key in ("mAP", "mAP@100", "P@20", "P@H<=2"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert len(ours["pr_precision"]) == 16 + 1


def test_evaluate_takes_dataset_data_and_extension_from_the_checkpoint(trained, tmp_path, capsys):
    root, run_a, _ = trained
    best = os.path.join(run_a, "checkpoint_best.pth")
    code, out, _ = call(capsys, "evaluate", "--checkpoint", best, "--json", str(tmp_path / "e.json"),
                        "--num_workers", "0")
    assert code == 0
    assert f"from the checkpoint's flags: --dataset digits, --imgEXT png, --data {root}" in out
    assert out.splitlines()[1].startswith("digits test queries")
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["dataset"] == "digits" and report["data"] == os.path.abspath(root)
    theirs = json.loads(open(os.path.join(run_a, "results.json")).read())["test"]
    assert report["metrics"]["mAP@100"] == pytest.approx(theirs["mAP@100"], abs=1e-6)

    # The run's data folder has gone: the error names the recorded path and the flag.
    gone = str(tmp_path / "moved_data")
    moved = edited_copy(best, tmp_path / "moved.pth", lambda c: c["args"].update(data=gone))
    proc = retrieve("evaluate", "--checkpoint", moved, "--device", "cpu", check=False)
    assert_user_error(proc.returncode, proc.stderr, f"the data folder recorded in checkpoint {moved}, {gone}, "
                      "does not exist", "pass --data DIR")
    code, _, err = call(capsys, "index", "--checkpoint", moved, "--out", str(tmp_path / "x.index"))
    assert_user_error(code, err, gone, "--data")
    # Flags given override the recorded ones.
    code, out, _ = call(capsys, "evaluate", "--checkpoint", moved, "--data", root, "--split", "val",
                        "--num_workers", "0")
    assert code == 0 and "from the checkpoint's flags: --dataset digits, --imgEXT png\n" in out
    assert "digits val queries" in out
    code, _, err = call(capsys, "evaluate", "--checkpoint", best, "--dataset", "nowhere")
    assert_user_error(code, err, os.path.join(root, "nowhere"))


def test_index_and_query_a_split(trained, split_index, tmp_path, capsys):
    root, run_a, run_b = trained
    data = load_index(split_index)
    train_split = SceneDataset(root, "digits", "train", "png")
    assert data.search.codes.shape == (len(train_split), 2) and isinstance(data.search.codes, np.memmap)
    assert np.array_equal(data.labels, train_split.labels.numpy()) and data.classes == train_split.classes
    assert [data.paths[j] for j in range(len(data))] == [p for p, _ in train_split.samples]
    best = torch.load(os.path.join(run_a, "checkpoint_best.pth"), weights_only=True)
    assert data.get("weights_sha256") == retrieve_mod.weights_fingerprint(best["model"])
    # A database image queried against its own index comes back first, at distance 0 (ties are
    # broken by database index, so take one whose code no earlier image shares).
    codes = pm1_codes(data).tolist()
    i = next(i for i in range(5, len(codes)) if codes[i] not in codes[:i]) if len(set(map(tuple, codes))) > 5 else 0
    query, label = train_split.samples[i][0], train_split.classes[train_split.samples[i][1]]
    grid = tmp_path / "grid.png"
    proc = retrieve("query", "--index", split_index, query, "--topk", "5", "--grid", str(grid), "--device", "cpu")
    header = proc.stdout.splitlines()[0]
    assert header == (f"index {split_index}: {len(train_split)} database images, 16 bits, "
                      f"checkpoint {os.path.join(run_a, 'checkpoint_best.pth')}")
    assert f"query {query}  class {label}" in proc.stdout
    lines = result_lines(proc.stdout)
    assert len(lines) == 5 and "d=  0" in lines[0]
    assert parse(lines[0]) == (1, 0, query, label, "relevant")
    assert all(parse(line)[4] in ("relevant", "irrelevant") for line in lines)
    assert Image.open(grid).size[1] > 16

    # --exclude-self leaves it out and still gives --topk results; --json agrees with the table.
    code, out, _ = call(capsys, "query", "--index", split_index, query, "--topk", "5", "--exclude-self",
                        "--json", str(tmp_path / "r.json"))
    assert code == 0
    lines = result_lines(out)
    assert len(lines) == 5 and query not in [parse(line)[2] for line in lines]
    ranking = json.loads((tmp_path / "r.json").read_text())
    assert ranking["index"] == split_index and ranking["bits"] == 16
    assert ranking["checkpoint"] == os.path.join(run_a, "checkpoint_best.pth")
    (q,) = ranking["queries"]
    assert q["path"] == query and q["label"] == label
    assert [r["rank"] for r in q["results"]] == [1, 2, 3, 4, 5]
    for line, r in zip(lines, q["results"]):
        rank, dist, path, cls, mark = parse(line)
        assert (rank, dist, path, cls) == (r["rank"], r["distance"], r["path"], r["label"])
        assert r["relevant"] == (mark == "relevant") == (r["label"] == label)
    assert [r["distance"] for r in q["results"]] == sorted(r["distance"] for r in q["results"])

    # --json - : the ranking alone on stdout, the table on stderr; a query from outside the dataset
    # has no known class, so relevance is unknown.
    outside = tmp_path / "mine" / "3"
    outside.mkdir(parents=True)
    shutil.copy(query, outside / "copy.png")
    code, out, err = call(capsys, "query", "--index", split_index, query, str(outside / "copy.png"), "--topk", "3",
                          "--exclude-self", "--json", "-")
    ranking = json.loads(out)
    own, other = ranking["queries"]
    assert own["label"] == label and other["label"] is None
    assert all(r["relevant"] is None for r in other["results"]) and other["results"][0]["path"] == query
    assert other["results"][0]["distance"] == 0 and len(own["results"]) == len(other["results"]) == 3
    assert "class (unknown)" in err and len(result_lines(err)) == 6

    # An index built with 16-bit codes cannot be queried with an 8-bit checkpoint.
    code, _, err = call(capsys, "query", "--index", split_index, "--checkpoint",
                        os.path.join(run_b, "checkpoint_best.pth"), query)
    assert_user_error(code, err, "another kind of checkpoint", "dim 16 vs 8")


def test_query_refuses_other_weights(trained, split_index, tmp_path, capsys):
    root, run_a, _ = trained
    best = os.path.join(run_a, "checkpoint_best.pth")
    query = SceneDataset(root, "digits", "train", "png").samples[0][0]

    def perturb(ckpt):
        w = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
        ckpt["model"][w] = ckpt["model"][w] + 0.01

    other = edited_copy(best, tmp_path / "other.pth", perturb)
    proc = retrieve("query", "--index", split_index, "--checkpoint", other, query, "--device", "cpu", check=False)
    assert_user_error(proc.returncode, proc.stderr,
                      f"index {split_index} was built with other weights than those of {other} (it was built with "
                      f"{best})", "query it with the checkpoint that built it (omit --checkpoint)",
                      f"rebuild the index with `python -m utils.retrieve index --checkpoint {other} ...`")
    # The same weights anywhere (a copy, or checkpoint_last of the same epoch) are accepted.
    copy = tmp_path / "elsewhere" / "checkpoint_best.pth"
    copy.parent.mkdir()
    shutil.copy(best, copy)
    for ckpt in (str(copy), os.path.join(run_a, "checkpoint_last.pth")):
        code, out, err = call(capsys, "query", "--index", split_index, "--checkpoint", ckpt, query, "--topk", "2")
        assert code == 0 and "warning" not in err and len(result_lines(out)) == 2

    # The checkpoint the index records has moved: say where that path came from and what to pass.
    moved = edited_index(split_index, tmp_path / "moved.index",
                         lambda ix: ix.update(checkpoint=str(tmp_path / "gone" / "checkpoint_best.pth")))
    code, _, err = call(capsys, "query", "--index", moved, query)
    assert_user_error(code, err, f"checkpoint {tmp_path / 'gone' / 'checkpoint_best.pth'} does not exist; "
                      f"this path came from index {moved}", "pass --checkpoint PATH to use another copy of it")
    code, out, _ = call(capsys, "query", "--index", moved, "--checkpoint", str(copy), query, "--topk", "1")
    assert code == 0 and "d=  0" in result_lines(out)[0]

    # An index written before fingerprints (version 1, one torch file): accepted, with a one-line warning.
    old = old_format_copy(split_index, tmp_path / "old.index", version=1)
    ix = torch.load(old, weights_only=True)
    ix.pop("weights_sha256")
    torch.save(ix, old)
    code, out, err = call(capsys, "query", "--index", old, "--checkpoint", other, query, "--topk", "1")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1 and "records no fingerprint" in warnings[0] and old in warnings[0]
    assert len(result_lines(out)) == 1

    # No index file at all: say so, and how to build one.
    missing = str(tmp_path / "nope.index")
    code, _, err = call(capsys, "query", "--index", missing, query)
    assert_user_error(code, err, f"index file {missing} does not exist; build one with "
                      f"`python -m utils.retrieve index --checkpoint CHECKPOINT --out {missing}`")
    assert "checkpoint_*.pth" not in err


def test_index_a_folder_of_images(trained, tmp_path, capsys):
    root, run_a, _ = trained
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 80, 10, 10)).save(folder / "sub" / f"{i}.jpg")
    index = tmp_path / "mine.index"
    code, _, _ = call(capsys, "index", "--checkpoint", os.path.join(run_a, "checkpoint_last.pth"), "--folder",
                      str(folder), "--out", str(index), "--num_workers", "0")
    assert code == 0
    data = load_index(str(index))
    assert (np.asarray(data.labels) == -1).all() and data.classes is None and len(data) == 3
    assert data.search.bits == 16
    # Without labels: results have no class and no relevance, in the table and in the JSON.
    query = str(folder / "sub" / "0.jpg")  # the first: first among equal codes too
    code, out, _ = call(capsys, "query", "--index", str(index), query, "--json", str(tmp_path / "r.json"))
    assert code == 0 and f"query {query}  class (unknown)" in out
    lines = result_lines(out)
    assert len(lines) == 3 and parse(lines[0]) == (1, 0, query, None, None)
    (q,) = json.loads((tmp_path / "r.json").read_text())["queries"]
    assert q["label"] is None and all(r["label"] is None and r["relevant"] is None for r in q["results"])
    code, out, _ = call(capsys, "query", "--index", str(index), query, "--exclude-self", "--topk", "10")
    assert code == 0 and [parse(line)[0] for line in result_lines(out)] == [1, 2]
    assert query not in [parse(line)[2] for line in result_lines(out)]


def test_every_flag_has_help():
    parser = retrieve_mod.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_query_ranks_as_hamming_topk(trained, split_index, tmp_path, capsys):
    """query through BinaryIndex gives today's ranking: hamming_topk of the same codes, ties by index."""
    root, _, _ = trained
    opened = load_index(split_index)
    db = pm1_codes(opened).float()
    picks = [0, 7, 33, len(db) - 1]
    images = [opened.paths[j] for j in picks]
    code, out, _ = call(capsys, "query", "--index", split_index, *images, "--topk", "12", "--json", "-")
    assert code == 0
    dist, idx = hamming_topk(db[picks], db, 12)  # a database image's code is its query code
    for q, d_row, i_row in zip(json.loads(out)["queries"], dist.tolist(), idx.tolist()):
        assert [r["distance"] for r in q["results"]] == d_row
        assert [r["path"] for r in q["results"]] == [opened.paths[j] for j in i_row]
    # An approximate engine probing every cluster gives the same ranking.
    code, again, _ = call(capsys, "query", "--index", split_index, *images, "--topk", "12", "--json", "-",
                          "--engine", "ivf", "--nlist", "4", "--nprobe", "4")
    assert code == 0
    assert [q["results"] for q in json.loads(again)["queries"]] == [q["results"] for q in json.loads(out)["queries"]]
    assert json.loads(again)["engine_params"] == {"nlist": 4, "nprobe": 4, "niter": 10}
    # The structure was kept in the index folder: the next query loads it and answers alike.
    code, third, err = call(capsys, "query", "--index", split_index, *images, "--topk", "12", "--json", "-",
                            "--engine", "ivf", "--nlist", "4", "--nprobe", "4")
    assert code == 0 and f"loaded the ivf structure kept in {split_index}/engine-ivf.faiss" in err
    assert json.loads(third)["queries"] == json.loads(again)["queries"]
    code, _, err = call(capsys, "query", "--index", split_index, images[0], "--efSearch", "4")
    assert_user_error(code, err, "--efSearch is a parameter of --engine hnsw, not of --engine exact")
    code, _, err = call(capsys, "query", "--index", split_index, images[0], "--rebuild-engine")
    assert_user_error(code, err, "--rebuild-engine is for an approximate --engine")
    code, _, err = call(capsys, "query", "--index", split_index, images[0], "--engine", "mih", "--rebuild-engine")
    assert_user_error(code, err, "--rebuild-engine is for ivf and hnsw, whose structure an index folder keeps")


def test_append_and_unwritable_outputs(trained, split_index, tmp_path, capsys):
    root, run_a, run_b = trained
    best = os.path.join(run_a, "checkpoint_best.pth")
    index = tmp_path / "grown.index"
    shutil.copytree(split_index, index)
    n = len(load_index(str(index)))
    folder = tmp_path / "more"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 90, 200, 10)).save(folder / f"{i}.png")
    code, out, _ = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(index),
                        "--append", "--num_workers", "0")
    assert code == 0 and f"appended 3 images of {folder} to {index} ({n + 3} images" in out
    grown = load_index(str(index))
    assert len(grown) == n + 3 and grown.paths[n + 2] == str(folder / "2.png") and grown.label_name(n) is None
    assert np.array_equal(np.asarray(grown.search.codes[:n]), np.asarray(load_index(split_index).search.codes))
    code, out, _ = call(capsys, "query", "--index", str(index), str(folder / "1.png"), "--topk", "1")
    assert code == 0 and "d=  0" in result_lines(out)[0]
    # Other weights, or an old single-file index, are refused in one line and left as they were.
    code, _, err = call(capsys, "index", "--checkpoint", os.path.join(run_b, "checkpoint_best.pth"), "--folder",
                        str(folder), "--out", str(index), "--append")
    assert_user_error(code, err, f"--append: index {index} was built with other weights")
    old = old_format_copy(split_index, tmp_path / "old.index")
    code, _, err = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", old, "--append")
    assert_user_error(code, err, "an index file of an older version cannot grow",
                      "rebuild it with --overwrite instead of --append")
    assert len(load_index(str(index))) == n + 3 and len(load_index(old)) == n

    # Every output is checked before anything is encoded: one line, exit 2, nothing written.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    image = str(folder / "0.png")
    for args, flag in ((["index", "--checkpoint", best, "--folder", str(folder)], "--out"),
                       (["evaluate", "--checkpoint", best], "--json"),
                       (["query", "--index", split_index, image], "--json"),
                       (["query", "--index", split_index, image], "--grid")):
        target = str(blocker / "sub" / "x.out")
        code, out, err = call(capsys, *args, flag, target)
        assert_user_error(code, err, f"cannot write {flag} {target}: {blocker} is a file, not a folder")
        assert "encode" not in out + err
    code, _, err = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(tmp_path))
    assert_user_error(code, err, f"--out {tmp_path} is a folder that is not an index (it would be replaced)")
    code, _, err = call(capsys, "query", "--index", split_index, image, "--grid", str(tmp_path))
    assert_user_error(code, err, f"--grid {tmp_path} is a folder")


def test_two_processes_write_the_index_of_one(trained, split_index, tmp_path, monkeypatch):
    """write_index as two ranks (threads standing in for torchrun's processes, with its barriers
    and broadcast) gives the files one process wrote. A real 2-process gloo torchrun of the command
    did too (docs/benchmarks.md, search); it costs 20 s here, so this test keeps to one process."""
    from utils.retrieval import build
    from utils.retrieval.network import Loaded

    root, run_a, _ = trained
    best = os.path.join(run_a, "checkpoint_best.pth")
    ranks, meet, shared = threading.local(), threading.Barrier(2), {}

    def broadcast(t, src=0):
        if ranks.rank == src:
            shared["t"] = t.clone()
        meet.wait()
        t.copy_(shared["t"])
        meet.wait()
        return t

    for name, fake in (("rank", lambda: ranks.rank), ("world_size", lambda: 2), ("is_main", lambda: ranks.rank == 0),
                       ("barrier", meet.wait), ("broadcast", broadcast)):
        monkeypatch.setattr(build.dist, name, fake)
    loaded = Loaded(best, torch.device("cpu"))
    train_split = SceneDataset(root, "digits", "train", "png")
    out, failures = str(tmp_path / "two.index"), []

    def rank_main(rank):
        ranks.rank = rank
        try:
            build.write_index(out, loaded, best, [p for p, _ in train_split.samples], train_split.labels.numpy(),
                              train_split.classes, torch.device("cpu"), 16, 0)
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)
            meet.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert len(load_index(out)) == len(train_split)
    for name in ("codes.bidx", "labels.npy", "paths.txt", "path_offsets.npy", "header.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(split_index, name), "rb").read(), name


def folder_bytes(folder):
    """Every file of an index folder, name -> bytes (to show it was left as it was)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def images(folder, count, shade=0):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (i * 60, shade, 10)).save(folder / f"{i}.png")
    return folder


def test_an_existing_index_is_replaced_or_grown_only_when_asked(trained, split_index, tmp_path, capsys):
    _, run_a, _ = trained
    best = os.path.join(run_a, "checkpoint_best.pth")
    index = tmp_path / "db.index"
    shutil.copytree(split_index, index)
    n, before = len(load_index(str(index))), folder_bytes(index)
    folder = images(tmp_path / "more", 3)
    code, out, err = call(capsys, "index", "--checkpoint", best, "--out", str(index), "--num_workers", "0")
    assert_user_error(code, err, f"--out {index} is an existing index ({n} images); pass --overwrite to replace it "
                      "(kept until the new index is whole), --append to add the images to it, or a new path")
    assert "encode" not in out + err and folder_bytes(index) == before
    for flags, message in ((["--append", "--overwrite"], "--append adds to the index at --out and --overwrite "
                            "replaces it; pass one of them"),
                           (["--allow-duplicates"], "--allow-duplicates is for --append")):
        code, _, err = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(index),
                            *flags)
        assert_user_error(code, err, message)
    assert folder_bytes(index) == before
    old = old_format_copy(split_index, tmp_path / "old.index")
    code, _, err = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", old)
    assert_user_error(code, err, f"--out {old} is an existing file; pass --overwrite")

    # --overwrite: the new index in place of the old one, nothing else left beside it.
    code, out, _ = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(index),
                        "--overwrite", "--num_workers", "0")
    assert code == 0
    assert out.splitlines()[-1] == (f"indexed 3 images of {folder} into {index} (3 images, 16-bit codes); it "
                                    f"replaced the index ({n} images) that was there")
    replaced = load_index(str(index))
    assert len(replaced) == 3 and [replaced.paths[j] for j in range(3)] == [str(folder / f"{i}.png") for i in range(3)]
    assert not [name for name in os.listdir(tmp_path) if ".partial" in name or ".old-" in name]
    code, out, _ = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", old, "--overwrite",
                        "--num_workers", "0")
    assert code == 0 and out.endswith("it replaced the file that was there\n") and len(load_index(old)) == 3

    # Appending images the index holds (the same path) is refused, naming how many and the first.
    images(folder, 5)  # 0-2 again (rewritten: the path is what counts), 3 and 4 new
    after = folder_bytes(index)
    code, out, err = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(index),
                          "--append", "--num_workers", "0")
    assert_user_error(code, err, f"--append: 3 of the 5 images are already in index {index} (the same path), the "
                      f"first {folder / '0.png'}; leave them out, or pass --allow-duplicates to add them again")
    assert folder_bytes(index) == after
    code, out, _ = call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(index),
                        "--append", "--allow-duplicates", "--num_workers", "0")
    assert code == 0 and f"appended 5 images of {folder} to {index} (8 images" in out
    grown = load_index(str(index))
    assert [grown.paths[j] for j in range(8)] == [str(folder / f"{i}.png") for i in (0, 1, 2, 0, 1, 2, 3, 4)]
    assert np.array_equal(np.asarray(grown.search.codes[:3]), np.asarray(grown.search.codes[3:6]))


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def on_a_terminal(text):
    """What a terminal shows of stderr: each line from its last carriage return (the progress bar,
    left=False, is erased before the error line)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def test_a_failed_index_write_is_one_line_and_loses_nothing(trained, split_index, tmp_path, capsys, monkeypatch):
    """A full disk while `index` writes: one line (utils/training/checkpoint.py's wording), exit 2, and the
    index at --out as it was: a new one's partial folder removed, an existing one byte for byte."""
    from utils.retrieval import build, index_file

    _, run_a, _ = trained
    best = os.path.join(run_a, "checkpoint_best.pth")
    folder = images(tmp_path / "more", 3, shade=200)
    real_encode = build.encode_into

    def encode_then_fail(rows, *args, **kwargs):  # the disk fills after the first rows are written
        real_encode(rows, *args, **kwargs)
        no_space()

    def index(out, *flags):
        return call(capsys, "index", "--checkpoint", best, "--folder", str(folder), "--out", str(out),
                    "--num_workers", "0", *flags)

    # A new index: nothing left behind, not even its partial folder.
    fresh = tmp_path / "fresh.index"
    for target, fail in ((build, "encode_into"), (index_file.os, "posix_fallocate"), (index_file.np, "save")):
        with monkeypatch.context() as patch:
            patch.setattr(target, fail, encode_then_fail if fail == "encode_into" else no_space)
            code, _, err = index(fresh)
        assert_user_error(code, on_a_terminal(err), f"cannot write {fresh} (No space left on device, ", " MiB free there); nothing "
                          "was written; free some space and try again")
        assert not os.path.lexists(fresh) and not os.path.lexists(f"{fresh}.partial"), fail

    # An existing index, replaced (--overwrite) or appended to, fails at each step: it keeps its bytes.
    kept = tmp_path / "kept.index"
    shutil.copytree(split_index, kept)
    before = folder_bytes(kept)
    for flag, target, fail in (("--overwrite", build, "encode_into"), ("--append", build, "encode_into"),
                               ("--append", index_file.os, "posix_fallocate"), ("--append", index_file.os, "fsync")):
        with monkeypatch.context() as patch:
            patch.setattr(target, fail, encode_then_fail if fail == "encode_into" else no_space)
            code, _, err = index(kept, flag)
        assert_user_error(code, on_a_terminal(err), f"cannot write {kept} (No space left on device, ", "the previous file is kept; "
                          "free some space and try again")
        assert folder_bytes(kept) == before, (flag, fail)
        assert not [name for name in os.listdir(tmp_path) if ".partial" in name or ".old-" in name]
    # The same command on a disk with room: the images are appended (nothing half-done in the way).
    code, out, _ = index(kept, "--append")
    assert code == 0 and f"({len(load_index(split_index)) + 3} images" in out
