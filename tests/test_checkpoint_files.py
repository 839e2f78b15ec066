"""A checkpoint that cannot be read (empty, cut short, not a torch file) is one whole line, exit
status 2: the file, its size, what is wrong with it and what to do instead."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from utils.errors import UserError
from utils.training import checkpoint as ckpt_io

WHY = "as a full disk or an interrupted copy leaves"
AGAIN = "copy it again from where it was written if it is whole there, or start the run again under another --name"
WRONG_FILE = "pass a checkpoint_last.pth or checkpoint_best.pth from a run folder"


def whole_checkpoint(path):
    """A small file in the checkpoints' format (a torch zip archive), written as runs write theirs."""
    ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "model": {"w": torch.arange(20000.0)}}, str(path))
    return path.read_bytes()


def cut(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("keep", ["0", "5", "64", "half", "all-10", "all-1"])
def test_an_empty_or_truncated_checkpoint_is_named_with_its_size_and_the_fix(tmp_path, keep):
    data = whole_checkpoint(tmp_path / "whole.pth")
    n = {"0": 0, "5": 5, "64": 64, "half": len(data) // 2, "all-10": len(data) - 10, "all-1": len(data) - 1}[keep]
    path = cut(tmp_path / "checkpoint_last.pth", data[:n])
    with pytest.raises(UserError) as err:
        ckpt_io.load_checkpoint(path)
    what = f"empty: 0 bytes, {WHY}" if n == 0 else f"truncated: {n:,} bytes with the end of the file missing, {WHY}"
    assert str(err.value) == f"checkpoint {path} is {what}; {AGAIN}"


@pytest.mark.parametrize("content", [b"hello\n", os.urandom(300), b'{"format": "cdne-checkpoint"}'])
def test_a_file_that_is_no_torch_file_says_so(tmp_path, content):
    path = cut(tmp_path / "notes.pth", content)
    with pytest.raises(UserError) as err:
        ckpt_io.load_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path} is not a readable checkpoint: {len(content):,} bytes that are not "
                              f"a torch file of tensors and plain data; {WRONG_FILE}")


def test_a_damaged_or_old_format_file_is_named_so(tmp_path):
    data = bytearray(whole_checkpoint(tmp_path / "whole.pth"))
    pickle_at = data.find(b"data.pkl") + 40  # inside the pickled dict: the zip directory is intact
    data[pickle_at:pickle_at + 20] = b"\xff" * 20
    path = cut(tmp_path / "damaged.pth", bytes(data))
    with pytest.raises(UserError) as err:
        ckpt_io.load_checkpoint(path)
    assert str(err.value).startswith(f"checkpoint {path} is damaged: a whole zip archive of {len(data):,} bytes "
                                     "that torch cannot read (")
    assert str(err.value).endswith(f"); {AGAIN}")
    # torch's older format (a pickle stream), as a checkpoint from elsewhere may be.
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    old = (tmp_path / "old.pth").read_bytes()
    path = cut(tmp_path / "old_cut.pth", old[:len(old) // 2])
    with pytest.raises(UserError) as err:
        ckpt_io.load_checkpoint(path)
    assert str(err.value) == (f"checkpoint {path} is truncated or damaged: {len(old) // 2:,} bytes of a torch file in "
                              f"the older format that torch cannot read to the end, {WHY}; {AGAIN}")


def test_the_run_folders_other_checkpoint_is_offered_when_it_is_whole(tmp_path):
    data = whole_checkpoint(tmp_path / "checkpoint_best.pth")
    best = str(tmp_path / "checkpoint_best.pth")
    last = cut(tmp_path / "checkpoint_last.pth", data[:len(data) // 3])
    with pytest.raises(UserError) as err:
        ckpt_io.load_checkpoint(last)
    assert str(err.value) == (f"checkpoint {last} is truncated: {len(data) // 3:,} bytes with the end of the file "
                              f"missing, {WHY}; {best} in the same folder is a whole file: pass it instead if it is "
                              "intact (it holds the best epoch, which may be older than the last), or start the run "
                              "again under another --name")
    # The other way round: a cut best checkpoint points at the last.
    os.replace(last, tmp_path / "cut")
    whole_checkpoint(tmp_path / "checkpoint_last.pth")
    cut(tmp_path / "checkpoint_best.pth", b"")
    with pytest.raises(UserError, match=r"is empty: 0 bytes, .*; \S*checkpoint_last.pth in the same folder is a whole "
                                        r"file: pass it instead if it is intact \(it holds the last epoch saved\)"):
        ckpt_io.load_checkpoint(best)
    # A best checkpoint that is a hard link to the cut last one is the same file: not offered.
    os.remove(best)
    cut(tmp_path / "checkpoint_last.pth", data[:100])
    os.link(tmp_path / "checkpoint_last.pth", best)
    with pytest.raises(UserError) as err:
        ckpt_io.load_checkpoint(str(tmp_path / "checkpoint_last.pth"))
    assert str(err.value).endswith(f"; {AGAIN}")


SCRIPTS = {"MB": [os.path.join(REPO, "train_MB", "main.py")], "MU": [os.path.join(REPO, "train", "main.py")],
           "dpsh": [os.path.join(REPO, "baselines", "main.py"), "--method", "dpsh"]}


def one_line_exit_2(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_resume_from_an_empty_checkpoint_through_the_scripts(script, tiny_root, tmp_path):
    path = cut(tmp_path / "checkpoint_last.pth", b"")
    cmd = [sys.executable, *SCRIPTS[script], "--data", tiny_root, "--dataset", "digits", "--no-pretrained",
           "--img-size", "16", "--dim", "8", "--num_workers", "0", "--device", "cpu", "--out", str(tmp_path / "runs"),
           "--resume", path]
    assert one_line_exit_2(cmd) == f"error: checkpoint {path} is empty: 0 bytes, {WHY}; {AGAIN}"
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("keep", ["0", "half"])
def test_retrieve_evaluate_of_a_cut_checkpoint(keep, tmp_path):
    data = whole_checkpoint(tmp_path / "whole.pth")
    n = 0 if keep == "0" else len(data) // 2
    path = cut(tmp_path / "checkpoint_best.pth", data[:n])
    line = one_line_exit_2([sys.executable, "-m", "utils.retrieve", "evaluate", "--checkpoint", path])
    what = f"empty: 0 bytes, {WHY}" if n == 0 else f"truncated: {n:,} bytes with the end of the file missing, {WHY}"
    # whole.pth is no run checkpoint's name: nothing beside it is offered.
    assert line == f"error: checkpoint {path} is {what}; {AGAIN}"
