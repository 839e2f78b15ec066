"""End to end: both scripts train on the digits demo on the CPU; resume is exact."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from conftest import REPO

SCRIPTS = {"MU": os.path.join(REPO, "train", "main.py"), "MB": os.path.join(REPO, "train_MB", "main.py")}
FAST = ["--no-pretrained", "--img-size", "16", "--dim", "16", "--num_workers", "0", "--device", "cpu"]


def run_script(variant, *args, cwd=None, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPTS[variant], *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def event_tags(folder):
    """Scalar tags in TensorBoard event files (TFRecord framing, tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            data = fh.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


@pytest.mark.parametrize("variant", ["MU", "MB"])
def test_end_to_end_digits(variant, digits_root, tmp_path):
    out = tmp_path / "runs"
    # Run from an unrelated working directory: the scripts must find their package.
    proc = run_script(variant, "--data", digits_root, "--dataset", "digits", "--epochs", "3", "-b", "32",
                      "--lr", "0.01", "--out", str(out), "--name", "demo", *FAST, "--img-size", "32",
                      cwd=str(tmp_path))
    run_dir = out / "demo"
    assert sorted(os.listdir(run_dir)) == ["args.json", "checkpoint_best.pth", "checkpoint_last.pth",
                                           "results.json", "tensorboard"]
    assert str(run_dir) in proc.stdout  # says where the outputs go
    results = json.loads((run_dir / "results.json").read_text())
    assert results["variant"] == variant and results["best_epoch"] in (1, 2, 3)
    for split in ("val", "test"):
        assert {"mAP@100", "P@20"} <= set(results[split])
    # 10 balanced classes: chance P@20 is 0.1.
    assert results["val"]["P@20"] > 0.3 and results["test"]["P@20"] > 0.3, results
    tags = event_tags(run_dir / "tensorboard")
    for tag in ("train/loss_cdne", "train/loss_ce", "train/loss_quant", "train/loss_total", "train/lr",
                "val/mAP_100", "val/P_20", "val/mAP", "val/P_H_le_2"):
        assert [step for step, _ in tags[tag]] == [1, 2, 3], tag  # epochs finished, 1-based
    assert tags["train/lr"][0][1] == pytest.approx(0.01)
    # The best checkpoint is the epoch with the highest val mAP@100 (the earliest on a tie).
    scores = [v for _, v in tags["val/mAP_100"]]
    assert results["best_epoch"] == scores.index(max(scores)) + 1
    best = torch.load(run_dir / "checkpoint_best.pth", weights_only=True)
    assert best["config"]["variant"] == variant and best["epoch"] == results["best_epoch"]


def tensors_of(path):
    ckpt = torch.load(path, weights_only=True)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()}
    flat.update({f"method.{k}": v for k, v in ckpt["method"].items()})
    return ckpt, flat


@pytest.mark.parametrize("variant", ["MU", "MB"])
def test_resume_continues_exactly(variant, tiny_root, tmp_path):
    common = ["--data", tiny_root, "--dataset", "digits", "-b", "16", "--lr", "0.01", "--out", str(tmp_path),
              *FAST]
    run_script(variant, *common, "--epochs", "3", "--name", "straight")
    run_script(variant, *common, "--epochs", "1", "--name", "interrupted")
    proc = run_script(variant, *common, "--epochs", "3", "--resume", str(tmp_path / "interrupted" / "checkpoint_last.pth"))
    assert "resumed from" in proc.stdout
    a, ta = tensors_of(tmp_path / "straight" / "checkpoint_last.pth")
    b, tb = tensors_of(tmp_path / "interrupted" / "checkpoint_last.pth")
    assert a["epoch"] == b["epoch"] == 3
    assert ta.keys() == tb.keys() and len(ta) > 100
    for k in ta:
        torch.testing.assert_close(ta[k].double(), tb[k].double(), rtol=0, atol=1e-6, msg=k)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert a["scheduler"] == b["scheduler"]


def test_resume_refuses_another_configuration(tiny_root, tmp_path):
    common = ["--data", tiny_root, "--dataset", "digits", "-b", "16", "--out", str(tmp_path), *FAST]
    run_script("MB", *common, "--epochs", "1", "--name", "r")
    ckpt = str(tmp_path / "r" / "checkpoint_last.pth")
    before = os.path.getmtime(ckpt)
    proc = run_script("MB", *common, "--dim", "32", "--epochs", "2", "--resume", ckpt, check=False)
    assert proc.returncode == 2
    assert "other flags" in proc.stderr and "--dim 32 (the run's: 16)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_script("MU", *common, "--epochs", "2", "--resume", ckpt, check=False)
    assert proc.returncode == 2 and "made by train_MB/main.py" in proc.stderr  # names the script that made it
    assert os.path.getmtime(ckpt) == before  # the checkpoint is untouched


@pytest.mark.parametrize("variant", ["MU", "MB"])
def test_amp_and_cached_pipeline_on_the_cpu(variant, tiny_root, tmp_path, monkeypatch, capsys):
    """--amp (bfloat16 autocast) with the cached batch pipeline, a few steps, on a CPU taken to
    compute bfloat16 natively (this one may not: --amp would then be refused)."""
    from conftest import load_script

    from utils.training import flags
    from utils.training.trainer import run

    monkeypatch.setattr(flags, "cpu_supports_bf16", lambda: True)
    module = load_script("train" if variant == "MU" else "train_MB")
    method = getattr(module, "MemoryBankCDNE", None) or module.MemoryUnitCDNE
    status = run(method, "test", ["--data", tiny_root, "--dataset", "digits", "-b", "16", "--lr", "0.01",
                                  "--epochs", "1", "--out", str(tmp_path), "--name", "amp", *FAST, "--amp",
                                  "--pipeline", "cached", "--num_workers", "1"])
    assert status == 0, capsys.readouterr().err[-2000:]
    tags = event_tags(tmp_path / "amp" / "tensorboard")
    for tag in ("train/loss_cdne", "train/loss_ce", "train/loss_quant"):
        value = tags[tag][0][1]
        assert value == value and 0 < value < 50, (tag, value)
    ckpt = torch.load(tmp_path / "amp" / "checkpoint_last.pth", weights_only=True)
    memory = ckpt["method"]["memory.memory"]
    assert memory.dtype == torch.float32
    assert torch.allclose(memory.norm(dim=1), torch.ones(len(memory)), atol=1e-3)  # every row written, unit norm
    assert ckpt["args"]["amp"] and ckpt["args"]["pipeline"] == "cached"


def test_epoch_batches_cover_every_sample_once_and_never_leave_a_rank_one_sample():
    from utils.data.splits import EpochBatches

    def epoch(n, b, world=1, min_per_rank=1, seed=3):
        per_rank = []
        for rank in range(world):
            sampler = EpochBatches(n, b, True, seed, rank, world, min_per_rank)
            sampler.set_epoch(5)
            per_rank.append(list(sampler))
        return per_rank

    [single] = epoch(10, 4)
    assert [len(x) for x in single] == [4, 4, 2]  # the last partial batch is kept
    assert sorted(i for x in single for i in x) == list(range(10))
    [merged] = epoch(9, 4, min_per_rank=2)
    assert [len(x) for x in merged] == [4, 5]  # a last batch of one joins the one before
    ranks = epoch(9, 4, world=2)
    assert [[len(x) for x in r] for r in ranks] == [[2, 3], [2, 2]]
    # Two ranks see the global batches a single process sees with the same seed.
    [alone] = epoch(9, 4, min_per_rank=2)
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(x) for x in alone]
    assert epoch(10, 4)[0] != epoch(10, 4, seed=4)[0]


def test_a_last_batch_of_one_sample_at_small_images(tiny_root, tmp_path):
    """80 training images in batches of 79: the last one would hold one sample, which BatchNorm
    (1x1 feature maps at 16x16 input) cannot train on; it joins the previous batch."""
    run_script("MU", "--data", tiny_root, "--dataset", "digits", "-b", "79", "--lr", "0.01", "--epochs", "1",
               "--out", str(tmp_path), "--name", "one", *FAST)
    assert (tmp_path / "one" / "results.json").exists()
