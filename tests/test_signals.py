"""Signals as clusters send them: to the whole process group (Slurm, `timeout`, kill -- -PGID),
with loader workers, with both pipelines, single-process and under torchrun (utils.launch);
and README's Slurm batch script, run by a stand-in for sbatch with the Slurm variables set."""
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO

MB = os.path.join(REPO, "train_MB", "main.py")
TINY = ["--no-pretrained", "--img-size", "16", "--dim", "8", "--device", "cpu", "-b", "8", "--lr", "0.01"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from utils.data.digits import make_digits

    root = tmp_path_factory.mktemp("sigdata")
    make_digits(str(root), size=16, per_class=30)
    return str(root)


def start(cmd, cwd=REPO):
    """The command in a process group of its own, as a job scheduler starts it."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV,
                            start_new_session=True)


def wait_for(path, proc, seconds=300):
    deadline = time.time() + seconds
    while not os.path.exists(path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert os.path.exists(path), proc.communicate()[1][-3000:]


# The training bar on stderr once epoch 2 has finished a step ("epoch 2/3 train:   4%|...| 1/27 ...").
EPOCH_2_UNDER_WAY = re.compile(r"epoch 2/\d+ train:\s+\d+%\|[^|]*\|\s*[1-9]\d*/")


def stop_mid_epoch(cmd, run_dir, sig, twice=False):
    """Start a run, wait until epoch 2 has taken a step, signal the whole group; returns
    (status, out, err)."""
    def send(proc):
        os.killpg(proc.pid, sig)
        if twice:  # a second signal while the first is being handled (the save)
            time.sleep(0.05)
            os.killpg(proc.pid, sig)

    return signal_in_epoch_2(start(cmd), run_dir, send)


def signal_in_epoch_2(proc, run_dir, send):
    """Wait until the run of `proc` has taken a step of epoch 2 (read from its progress bar, so a
    fast machine cannot run past the epoch first), send(proc); returns (status, out, err)."""
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=stream, k=key: chunks[k].extend(iter(lambda: s.read(256), "")),
                                daemon=True) for key, stream in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    wait_for(os.path.join(run_dir, "checkpoint_last.pth"), proc)
    deadline = time.time() + 300
    while not EPOCH_2_UNDER_WAY.search("".join(chunks["err"])) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    send(proc)
    proc.wait(timeout=300)
    for reader in readers:
        reader.join(timeout=60)
    return proc.returncode, "".join(chunks["out"]), "".join(chunks["err"])


@pytest.mark.parametrize("sig,pipeline,workers", [
    (signal.SIGTERM, "pil", 2),
    (signal.SIGINT, "cached", 0),
    (signal.SIGUSR1, "pil", 0),
])
def test_a_signal_to_the_process_group_saves_and_exits(data, tmp_path, sig, pipeline, workers):
    cmd = [sys.executable, MB, "--data", data, "--dataset", "digits", "--out", str(tmp_path), "--name", "r",
           "--epochs", "3", "--pipeline", pipeline, "--num_workers", str(workers), *TINY]
    status, out, err = stop_mid_epoch(cmd, tmp_path / "r", sig, twice=sig == signal.SIGTERM)
    assert status == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = tmp_path / "r" / "checkpoint_last.pth"
    assert f"stopped by {signal.Signals(sig).name}" in out and f"--resume {last}" in out
    ckpt = torch.load(last, weights_only=True)
    assert 1 <= ckpt["epoch"] < 3 and ckpt["step"] > 0  # mid-epoch
    done = subprocess.run([sys.executable, MB, "--resume", str(last)], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(last, weights_only=True)["epoch"] == 3 and (tmp_path / "r" / "results.json").exists()


def test_under_torchrun_every_rank_stops_at_the_same_step(data, tmp_path):
    cmd = [sys.executable, "-m", "utils.launch", "--standalone", "--nproc_per_node", "2", MB, "--data", data,
           "--dataset", "digits", "--out", str(tmp_path), "--name", "ddp", "--epochs", "3", "--num_workers", "1",
           *TINY]
    status, out, err = stop_mid_epoch(cmd, tmp_path / "ddp", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert out.count("stopped by SIGTERM") == 1  # rank 0 speaks for both
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint_last.pth", weights_only=True)
    # One checkpoint from both ranks at one step: both RNG states, identical memories.
    assert ckpt["step"] > 0 and len(ckpt["rng"]) == 2 and ckpt["fingerprints"][0] == ckpt["fingerprints"][1]


SLURM_FLAGS = "train/main.py --dataset NWPU-RESISC45 --dim 64 --num_workers 8 --name mu_nwpu_64 --resume auto"


def test_readme_slurm_script_requeues_at_the_time_limit_and_resumes(data, tmp_path):
    script_path = os.path.join(REPO, "docs", "slurm_train.sh")
    script = open(script_path).read()
    readme = open(os.path.join(REPO, "README.md")).read()
    assert script.strip() in readme  # README shows this very script
    # The same script on the digits demo, on the CPU, with this Python.
    assert SLURM_FLAGS in script and "source .venv/bin/activate" in script
    script = script.replace(SLURM_FLAGS, f"{MB} --data {data} --dataset digits --out {tmp_path} --name slurm "
                                         f"--epochs 3 --num_workers 1 --resume auto {' '.join(TINY)}")
    script = script.replace("source .venv/bin/activate", f"export PATH={os.path.dirname(sys.executable)}:$PATH")
    job = tmp_path / "job.sh"
    job.write_text(script)
    # Stand-ins: sbatch runs the batch script at once with the Slurm variables set;
    # scontrol records what it was asked.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexport SLURM_JOB_ID=4242 SLURM_SUBMIT_DIR=" + REPO +
                                    " SLURM_GPUS_ON_NODE=1 SLURM_JOB_NAME=cdne\nexec bash \"$1\"\n")
    for name in ("scontrol", "sbatch"):
        os.chmod(bin_dir / name, stat.S_IRWXU)
    env = dict(ENV, PATH=f"{bin_dir}:{os.environ['PATH']}")

    def sbatch():
        return subprocess.Popen(["sbatch", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)

    first = sbatch()
    # What --signal=B:USR1@300 does: SIGUSR1 to the batch shell only.
    status, out, err = signal_in_epoch_2(first, tmp_path / "slurm", lambda proc: proc.send_signal(signal.SIGUSR1))
    assert status == 138, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    ckpt = torch.load(tmp_path / "slurm" / "checkpoint_last.pth", weights_only=True)
    assert 1 <= ckpt["epoch"] < 3 and ckpt["step"] > 0
    # The requeued job runs the same script: it continues the run and finishes it.
    second = sbatch()
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert "resumed from" in out and (tmp_path / "slurm" / "results.json").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # not requeued again
