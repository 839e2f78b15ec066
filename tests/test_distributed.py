"""Two-process DistributedDataParallel training on the CPU (gloo), launched with torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPTS = {"MU": os.path.join(REPO, "train", "main.py"), "MB": os.path.join(REPO, "train_MB", "main.py")}


@pytest.mark.parametrize("variant", ["MU", "MB"])
def test_two_processes_keep_identical_memories(variant, digits_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           SCRIPTS[variant], "--data", digits_root, "--dataset", "digits", "--epochs", "2", "-b", "32",
           "--lr", "0.01", "--out", str(tmp_path), "--name", "ddp", "--no-pretrained", "--img-size", "32",
           "--dim", "16", "--num_workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Written once, by rank 0.
    assert os.listdir(tmp_path) == ["ddp"]
    run_dir = tmp_path / "ddp"
    assert len(os.listdir(run_dir / "tensorboard")) == 1
    assert proc.stdout.count("results written to") == 1
    ckpt = torch.load(run_dir / "checkpoint_last.pth", weights_only=True)
    # Every rank's memory, fingerprinted at the save: identical on both ranks, and trained.
    prints = ckpt["fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    memory = ckpt["method"]["memory.memory"]
    assert torch.allclose(memory.norm(dim=1), torch.ones(len(memory)), atol=1e-4)  # every row was written
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["val"]["P@20"] > 0.25, results["val"]  # chance is 0.1


def test_distributed_resume_continues_exactly(tmp_path):
    from utils.digits import make_digits

    make_digits(str(tmp_path / "data"), size=16, per_class=12)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               SCRIPTS["MB"], "--data", str(tmp_path / "data"), "--dataset", "digits", "-b", "16", "--lr", "0.01",
               "--out", str(tmp_path), "--no-pretrained", "--img-size", "16", "--dim", "8", "--num_workers", "0",
               "--device", "cpu", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("--epochs", "2", "--name", "straight")
    launch("--epochs", "1", "--name", "cut")
    launch("--epochs", "2", "--resume", str(tmp_path / "cut" / "checkpoint_last.pth"))
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k].double(), b["model"][k].double(), rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(a["method"]["memory.memory"], b["method"]["memory.memory"], rtol=0, atol=1e-6)


def test_a_method_without_a_classifier_trains_under_torchrun(tiny_root, tmp_path):
    """DPSH never uses FC2: DDP needs that layer frozen, or the second step fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "baselines", "main.py"), "--method", "dpsh", "--data", tiny_root, "--dataset", "digits",
           "--epochs", "1", "-b", "16", "--lr", "0.01", "--out", str(tmp_path), "--name", "dpsh", "--no-pretrained",
           "--img-size", "16", "--dim", "8", "--num_workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "dpsh" / "checkpoint_last.pth", weights_only=True)
    assert ckpt["fingerprints"][0] == ckpt["fingerprints"][1]  # U identical on both ranks
    assert ckpt["method"]["U"].abs().sum(1).gt(0).all()  # every row written
