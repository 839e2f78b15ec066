"""The comparison methods end to end through baselines/main.py: trained ones learn on the
digits demo, feature ones fit and evaluate once, and their checkpoints serve retrieval."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

MAIN = os.path.join(REPO, "baselines", "main.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
FAST = ["--no-pretrained", "--img-size", "32", "--dim", "16", "--num_workers", "0", "--device", "cpu"]


def baseline(*args):
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, env=ENV, timeout=600)


# Triplet at 16 bits and lr 0.01 stays near 0.19 (docs/benchmarks.md section 3.2); at 32 bits it
# learns (val P@20 0.32 here). DHCNN, at its authors' defaults, and the later methods learn in
# tests/test_methods_a.py and tests/test_methods_b.py.
@pytest.mark.parametrize("method,name,lr,dim", [("dpsh", "DPSH", "0.01", "16"), ("triplet", "Triplet", "0.01", "32")])
def test_trained_methods_learn_on_digits(method, name, lr, dim, digits_root, tmp_path):
    proc = baseline("--method", method, "--data", digits_root, "--dataset", "digits", "--epochs", "2", "-b", "32",
                    "--lr", lr, "--out", str(tmp_path), "--name", "b", *FAST, "--dim", dim)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "b"
    assert sorted(os.listdir(run)) == ["args.json", "checkpoint_best.pth", "checkpoint_last.pth", "results.json",
                                       "tensorboard"]
    results = json.loads((run / "results.json").read_text())
    assert results["variant"] == name and results["best_epoch"] in (1, 2)
    assert results["val"]["P@20"] > 0.2, results["val"]  # 10 balanced classes: chance is 0.1
    ckpt = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert ckpt["config"]["variant"] == name and ckpt["args"]["method"] == method


@pytest.mark.parametrize("method,name", [("lsh", "LSH"), ("itq", "ITQ")])
def test_feature_methods_fit_once_and_serve_retrieval(method, name, tiny_root, tmp_path):
    proc = baseline("--method", method, "--data", tiny_root, "--dataset", "digits", "--out", str(tmp_path),
                    "--name", "f", *FAST, "--img-size", "16", "--dim", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "f"
    results = json.loads((run / "results.json").read_text())
    assert results["variant"] == name and results["best_epoch"] == 0
    assert 0 <= results["test"]["mAP@100"] <= 1 and "P@20" in results["val"]
    # The checkpoint's FC1 holds the fitted projection: retrieval's evaluation gives the run's numbers.
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "utils.retrieve", "evaluate", "--checkpoint",
                           str(run / "checkpoint_best.pth"), "--split", "test", "--device", "cpu", "--num_workers",
                           "0", "--json", str(out)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["mAP@100"] == pytest.approx(results["test"]["mAP@100"], abs=1e-9)


def test_itq_projection_in_the_checkpoint_is_orthogonal_after_pca(tiny_root, tmp_path):
    proc = baseline("--method", "itq", "--data", tiny_root, "--dataset", "digits", "--out", str(tmp_path),
                    "--name", "i", *FAST, "--img-size", "16", "--dim", "8", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    w = torch.load(tmp_path / "i" / "checkpoint_best.pth", weights_only=True)["model"]["fc1.weight"].double()
    # W = (P R)^T with P's columns orthonormal and R orthogonal: W W^T = I.
    torch.testing.assert_close(w @ w.t(), torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)


def test_method_is_required_and_checked(tmp_path):
    proc = baseline("--dataset", "digits")
    assert proc.returncode == 2 and "--method is required" in proc.stderr and "Traceback" not in proc.stderr
    proc = baseline("--method", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
