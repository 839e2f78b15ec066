"""The retrieval command end to end on the digits demo, with checkpoints trained here."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from utils.digits import make_digits


def train(root, out, name, dim):
    cmd = [sys.executable, os.path.join(REPO, "train_MB", "main.py"), "--data", root, "--dataset", "digits",
           "--epochs", "1", "-b", "16", "--lr", "0.01", "--no-pretrained", "--img-size", "16", "--dim", str(dim),
           "--num_workers", "0", "--device", "cpu", "--out", out, "--name", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return os.path.join(out, name)


def retrieve(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "utils.retrieve", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    make_digits(root, size=16, per_class=12)
    out = str(tmp_path_factory.mktemp("runs"))
    return root, train(root, out, "a", 16), train(root, out, "b", 8)


def test_evaluate_matches_the_runs_own_test_metrics(trained, tmp_path):
    root, run_a, _ = trained
    out = tmp_path / "eval.json"
    proc = retrieve("evaluate", "--checkpoint", os.path.join(run_a, "checkpoint_best.pth"), "--data", root,
                    "--dataset", "digits", "--split", "test", "--json", str(out), "--device", "cpu")
    assert "mAP@100" in proc.stdout and "P@H<=2" in proc.stdout
    ours = json.loads(out.read_text())["metrics"]
    theirs = json.loads(open(os.path.join(run_a, "results.json")).read())["test"]
    for key in ("mAP", "mAP@100", "P@20", "P@H<=2"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert len(ours["pr_precision"]) == 16 + 1


def test_index_and_query_a_split(trained, tmp_path):
    root, run_a, run_b = trained
    index = tmp_path / "train.index"
    retrieve("index", "--checkpoint", os.path.join(run_a, "checkpoint_best.pth"), "--data", root,
             "--dataset", "digits", "--out", str(index), "--device", "cpu")
    data = torch.load(index, weights_only=True)
    from utils.data import SceneDataset
    train_split = SceneDataset(root, "digits", "train", "png")
    assert data["codes"].shape == (len(train_split), 16) and set(data["codes"].unique().tolist()) == {-1, 1}
    assert torch.equal(data["labels"], train_split.labels) and data["classes"] == train_split.classes
    # A database image queried against its own index comes back first, at distance 0.
    query = train_split.samples[5][0]
    grid = tmp_path / "grid.png"
    proc = retrieve("query", "--index", str(index), query, "--topk", "5", "--grid", str(grid), "--device", "cpu")
    lines = [line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 5 and "d=  0" in lines[0] and query in proc.stdout
    assert Image.open(grid).size[1] > 16
    # An index built with 16-bit codes cannot be queried with an 8-bit checkpoint.
    proc = retrieve("query", "--index", str(index), "--checkpoint", os.path.join(run_b, "checkpoint_best.pth"),
                    query, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "another kind of checkpoint" in proc.stderr and "dim 16 vs 8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_index_a_folder_of_images(trained, tmp_path):
    root, run_a, _ = trained
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 80, 10, 10)).save(folder / "sub" / f"{i}.jpg")
    index = tmp_path / "mine.index"
    retrieve("index", "--checkpoint", os.path.join(run_a, "checkpoint_last.pth"), "--folder", str(folder),
             "--out", str(index), "--device", "cpu")
    data = torch.load(index, weights_only=True)
    assert data["labels"] is None and len(data["paths"]) == 3 and data["codes"].shape == (3, 16)
