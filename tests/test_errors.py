"""Every bad input gets one line naming the problem and the fix, exit status 2, no traceback,
and no checkpoint is ever lost."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, load_script
from PIL import Image

from utils.data.digits import make_digits
from utils.errors import UserError
from utils.training import checkpoint as ckpt_io

MB = os.path.join(REPO, "train_MB", "main.py")
FAST = ["--no-pretrained", "--img-size", "16", "--dim", "8", "--num_workers", "0", "--device", "cpu", "-b", "16",
        "--lr", "0.01"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_digits(str(root), size=16, per_class=8)
    return str(root)


@pytest.fixture(scope="module")
def mb():
    return load_script("train_MB")


def run_inproc(module, argv, capsys):
    """Run a script's main in this process; returns (exit status, stderr); stdout is kept in run_inproc.out."""
    method = getattr(module, "MemoryBankCDNE", None) or module.MemoryUnitCDNE
    from utils.training.trainer import run
    try:
        status = run(method, "test", argv)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    run_inproc.out = captured.out
    return status, captured.err


def assert_one_line_error(status, err, *fragments):
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def make_folder(root, tree):
    for rel, content in tree.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if content == "img":
            Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
        else:
            with open(path, "wb") as fh:
                fh.write(content)


@pytest.mark.parametrize("flags,fragments", [
    (["--epochs", "0"], ["--epochs must be positive"]),
    (["-b", "0"], ["--batch-size must be positive"]),
    (["--dim", "-4"], ["--dim must be positive"]),
    (["--temperature", "0"], ["--temperature must be positive"]),
    (["--lr", "-0.1"], ["--lr must be positive"]),
    (["--memory-momentum", "1.5"], ["--memory-momentum must be in [0, 1]"]),
    (["--device", "cuda"], ["no CUDA GPU", "--device cpu"]),
    (["--device", "tpu7"], ["is not a device"]),
    (["--no-pretrained", "--weights", "x.pth"], ["contradict"]),
])
def test_bad_flag_values(mb, tiny, tmp_path, capsys, flags, fragments):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["--data", tiny, "--dataset", "digits", "--out", str(tmp_path), *FAST, *flags]
    assert_one_line_error(*run_inproc(mb, argv, capsys), *fragments)


def test_missing_data_folder(mb, tmp_path, capsys):
    argv = ["--data", str(tmp_path / "nothing"), "--dataset", "UCMerced", "--out", str(tmp_path), *FAST]
    assert_one_line_error(*run_inproc(mb, argv, capsys), "does not exist", "--data")


def test_dataset_without_class_folders(mb, tmp_path, capsys):
    make_folder(str(tmp_path), {"d/scenes/loose.tif": "img"})
    argv = ["--data", str(tmp_path / "d"), "--dataset", "scenes", "--out", str(tmp_path), *FAST]
    assert_one_line_error(*run_inproc(mb, argv, capsys), "no class folders")


def test_wrong_extension_lists_the_ones_found(mb, tmp_path, capsys):
    make_folder(str(tmp_path), {f"d/scenes/{c}/{i}.jpg": "img" for c in "ab" for i in range(4)})
    argv = ["--data", str(tmp_path / "d"), "--dataset", "scenes", "--out", str(tmp_path), *FAST]
    assert_one_line_error(*run_inproc(mb, argv, capsys), "no .tif files", ".jpg", "--imgEXT")


def test_class_too_small(mb, tmp_path, capsys):
    make_folder(str(tmp_path), {"d/scenes/a/0.tif": "img", "d/scenes/a/1.tif": "img", "d/scenes/b/0.tif": "img"})
    argv = ["--data", str(tmp_path / "d"), "--dataset", "scenes", "--out", str(tmp_path), *FAST]
    assert_one_line_error(*run_inproc(mb, argv, capsys), "only 1", "b")


def test_unreadable_image_is_named_and_can_be_skipped(mb, tmp_path, capsys):
    tree = {f"d/scenes/{c}/{i}.png": "img" for c in "ab" for i in range(10)}
    tree["d/scenes/a/0.png"] = b"not an image at all"
    make_folder(str(tmp_path), tree)
    # A truncated PNG: the header is fine, the pixel data is cut short.
    good = tmp_path / "d/scenes/b/0.png"
    Image.new("RGB", (64, 64)).save(good)
    good.write_bytes(good.read_bytes()[:60])
    argv = ["--data", str(tmp_path / "d"), "--dataset", "scenes", "--imgEXT", "png", "--out", str(tmp_path),
            "--epochs", "1", *FAST]
    status, err = run_inproc(mb, argv + ["--name", "strict"], capsys)
    assert_one_line_error(status, err, "cannot read image", "--skip-bad-images")
    assert "0.png" in err
    status, _ = run_inproc(mb, argv + ["--name", "lenient", "--skip-bad-images"], capsys)
    assert status == 0
    assert "skipped 2 unreadable image(s)" in run_inproc.out
    assert (tmp_path / "lenient" / "results.json").exists()


def test_unreadable_image_message_in_a_subprocess_with_workers(tiny, tmp_path):
    """Read in a DataLoader worker: still one line, exit 2, no traceback."""
    import shutil
    data = tmp_path / "d"
    shutil.copytree(tiny, data)
    victim = sorted((data / "digits" / "3").iterdir())[0]
    victim.write_bytes(b"\x89PNG broken")
    proc = subprocess.run([sys.executable, MB, "--data", str(data), "--dataset", "digits", "--out", str(tmp_path),
                           "--epochs", "1", *FAST, "--num_workers", "1"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "cannot read image", victim.name)


def test_unwritable_output_folder(mb, tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    argv = ["--data", tiny, "--dataset", "digits", "--out", str(blocker / "runs"), *FAST]
    assert_one_line_error(*run_inproc(mb, argv, capsys), "cannot write to the run folder", "--out")


def test_resume_missing_and_not_a_checkpoint(mb, tiny, tmp_path, capsys):
    argv = ["--data", tiny, "--dataset", "digits", "--out", str(tmp_path), *FAST]
    assert_one_line_error(*run_inproc(mb, argv + ["--resume", str(tmp_path / "nope.pth")], capsys),
                          "does not exist")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(300))
    assert_one_line_error(*run_inproc(mb, argv + ["--resume", str(junk)], capsys), "not a readable checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, other)
    assert_one_line_error(*run_inproc(mb, argv + ["--resume", str(other)], capsys), "not a CDNE checkpoint")


class RunsCode:
    """Unpickling this calls open() on a marker file: code that a checkpoint must not be able to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(mb, tiny, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"format": ckpt_io.FORMAT, "payload": RunsCode(str(marker))}, evil)
    assert not marker.exists()
    argv = ["--data", tiny, "--dataset", "digits", "--out", str(tmp_path), *FAST, "--resume", str(evil)]
    assert_one_line_error(*run_inproc(mb, argv, capsys), "more than tensors and plain data")
    assert not marker.exists()
    # And the plain pickle route (not a zip) is refused the same way.
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(RunsCode(str(marker)), fh)
    with pytest.raises(UserError):
        ckpt_io.safe_load(str(tmp_path / "evil.pkl"))
    assert not marker.exists()


def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    ckpt_io.atomic_save({"epoch": 1, "w": torch.ones(4)}, str(path))
    real_save = torch.save

    def failing_save(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")  # the disk fills up mid-write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UserError, match=r"No space left on device, \d+ MiB free there\); the previous file is kept; "
                                        r"free some space and try again$"):
        ckpt_io.atomic_save({"epoch": 2, "w": torch.zeros(4)}, str(path))
    # A folder that cannot be written (read-only, gone): one line too, before any temporary file.
    with pytest.raises(UserError, match=r"cannot write .*/gone/results.json \(No such file or directory.*; nothing "
                                        r"was written; the folder .*/gone is gone; create it"):
        ckpt_io.write_atomically(str(tmp_path / "gone" / "results.json"), lambda fh: fh.write(b"{}"))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"\(Read-only file system.*the previous file is kept; make .* writable"):
        ckpt_io.atomic_save({"epoch": 3}, str(path))
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]  # no temporary left behind


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(mb, tiny, tmp_path, capsys, monkeypatch):
    argv = ["--data", tiny, "--dataset", "digits", "--out", str(tmp_path), "--name", "r", *FAST]
    assert run_inproc(mb, argv + ["--epochs", "1"], capsys)[0] == 0
    last = tmp_path / "r" / "checkpoint_last.pth"
    good = torch.load(last, weights_only=True)
    from utils.training import trainer
    real_step = trainer.Trainer.train_step

    def nan_step(self, batch):
        losses, n = real_step(self, batch)
        losses["total"] = losses["total"] * float("nan")
        return losses, n

    monkeypatch.setattr(trainer.Trainer, "train_step", nan_step)
    status, err = run_inproc(mb, argv + ["--epochs", "2", "--resume", str(last)], capsys)
    assert_one_line_error(status, err, "the loss became nan at step 0 of epoch 2", "last good checkpoint")
    kept = torch.load(last, weights_only=True)
    assert kept["epoch"] == good["epoch"] == 1
    for k in good["model"]:
        assert torch.equal(kept["model"][k], good["model"][k])
    # diverged.json says where, with the run's flags: a table's --lr-grid counts the rate as diverged.
    record = json.loads((tmp_path / "r" / "diverged.json").read_text())
    assert (record["variant"], record["loss"], record["epoch"], record["step"]) == ("MB", "nan", 2, 0)
    assert record["args"]["epochs"] == 2 and record["args"]["dim"] == kept["args"]["dim"]
    # A new run that diverges before its first checkpoint keeps only that record (and its flags, events).
    fresh = ["--data", tiny, "--dataset", "digits", "--out", str(tmp_path), "--name", "fresh", "--epochs", "1", *FAST]
    assert_one_line_error(*run_inproc(mb, fresh, capsys), "no checkpoint had been written yet")
    assert sorted(os.listdir(tmp_path)) == ["fresh", "r"]
    assert "diverged.json" in os.listdir(tmp_path / "fresh") and "checkpoint_last.pth" not in os.listdir(tmp_path / "fresh")
    # The same run finishing in that folder later removes the record.
    monkeypatch.undo()
    assert run_inproc(mb, fresh, capsys)[0] == 0
    assert sorted(os.listdir(tmp_path / "fresh")) == ["args.json", "checkpoint_best.pth", "checkpoint_last.pth",
                                                      "results.json", "tensorboard"]


def test_sigint_saves_a_resumable_checkpoint(tmp_path):
    make_digits(str(tmp_path), size=16, per_class=40)
    cmd = [sys.executable, MB, "--data", str(tmp_path), "--dataset", "digits", "--out", str(tmp_path),
           "--name", "run", "--epochs", "3", *FAST, "-b", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the second epoch is under way, then press Ctrl-C.
    last = tmp_path / "run" / "checkpoint_last.pth"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "stopped by SIGINT" in out
    # The whole command, with this interpreter by its path (a bare python may not be the venv's).
    assert f"continue with: {sys.executable} {os.path.relpath(MB)} --resume {last}" in out
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] > 0  # mid-epoch
    done = subprocess.run(cmd + ["--resume", str(last)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 3 and (tmp_path / "run" / "results.json").exists()


def test_a_run_folder_with_a_checkpoint_is_never_overwritten(mb, tiny, tmp_path, capsys):
    argv = ["--data", tiny, "--dataset", "digits", "--out", str(tmp_path), "--name", "taken", "--epochs", "1", *FAST]
    assert run_inproc(mb, argv, capsys)[0] == 0
    last = tmp_path / "taken" / "checkpoint_last.pth"
    before = last.read_bytes()
    assert_one_line_error(*run_inproc(mb, argv, capsys), "already holds a checkpoint", "--resume")
    assert last.read_bytes() == before


def test_the_best_checkpoint_is_the_last_one_without_a_second_copy(tmp_path, monkeypatch):
    last, best = tmp_path / "checkpoint_last.pth", tmp_path / "checkpoint_best.pth"
    ckpt_io.atomic_save({"epoch": 1}, str(last))
    ckpt_io.atomic_duplicate(str(last), str(best))
    assert os.stat(last).st_ino == os.stat(best).st_ino  # one file on disk, two names
    ckpt_io.atomic_save({"epoch": 2}, str(last))  # replaced by rename: the best one keeps epoch 1
    assert torch.load(best, weights_only=True)["epoch"] == 1
    assert torch.load(last, weights_only=True)["epoch"] == 2

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # a filesystem without hard links gets a copy
    ckpt_io.atomic_duplicate(str(last), str(best))
    assert os.stat(last).st_ino != os.stat(best).st_ino
    assert torch.load(best, weights_only=True)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_best.pth", "checkpoint_last.pth"]


def test_a_failed_checkpoint_write_says_how_to_go_on(tmp_path, monkeypatch):
    from utils.training.run_folder import RunFolder

    run = object.__new__(RunFolder)  # only the two paths matter here
    run.last, run.best = str(tmp_path / "checkpoint_last.pth"), str(tmp_path / "checkpoint_best.pth")
    state = {"config": {"variant": "MB"}, "epoch": 1}
    run.save(state, best=True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", full_disk)
    with pytest.raises(UserError, match=r"No space left on device.*free some space and try again; then continue the "
                                        r"run with: " + re.escape(sys.executable) + r" \S*train_MB/main.py --resume \S*checkpoint_last.pth$"):
        run.save(dict(state, epoch=2), best=True)
    monkeypatch.undo()
    assert [torch.load(p, weights_only=True)["epoch"] for p in (run.last, run.best)] == [1, 1]
