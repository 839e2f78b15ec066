"""utils.table.grid_runner: cells at once, one or K per GPU, failures and stop signals; the Slurm array job,
run by stand-ins for sbatch and scontrol. The children are small `python -c` stand-ins for runs."""
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import REPO

from utils.errors import UserError
from utils.table.grid_runner import Job, check_options, current_epoch, log_tail, run_jobs, write_sbatch

# A cell that records when it ran and what it saw. It waits (up to 10 s) until as many cells have
# started as the runner should have let in by then, so "at once" is shown without racing the clock.
CELL = r"""
import glob, json, os, sys, time
shared, index, wave, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
def running(pattern="*"):
    return len(glob.glob(f"{shared}/{pattern}.start")) - len(glob.glob(f"{shared}/{pattern}.end"))
open(f"{shared}/{gpu}-{index}.start", "w").close()
seen = {"start": time.time(), "running": running(), "on_my_gpu": running(f"{gpu}-*"), "gpu": gpu,
        "stdin": os.path.realpath("/proc/self/fd/0"), "own_group": os.getpgid(0) == os.getpid(),
        "env": [os.environ.get("TQDM_MININTERVAL"), os.environ.get("PYTHONUNBUFFERED")]}
print("epoch 3/7 train: 50%|", flush=True)
deadline = time.time() + 10
while len(glob.glob(f"{shared}/*.start")) < min(total, (index // wave + 1) * wave) and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.15)
seen["end"] = time.time()
json.dump(seen, open(f"{shared}/{index}.json", "w"))
open(f"{shared}/{gpu}-{index}.end", "w").close()
"""


def cells(tmp_path, n, wave, extra=()):
    shared = tmp_path / "shared"
    shared.mkdir()
    return [Job(f"cell{i}", [sys.executable, "-c", CELL, str(shared), str(i), str(wave), str(n), *extra],
                str(tmp_path / f"cell{i}"), str(tmp_path / f"cell{i}" / "log.txt")) for i in range(n)], shared


def most_at_once(records):
    """The largest number of the records' [start, end] intervals that overlap."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def records(shared, n):
    return [json.load(open(shared / f"{i}.json")) for i in range(n)]


def test_two_at_once_never_more(tmp_path, capsys):
    jobs, shared = cells(tmp_path, 4, wave=2)
    failures, stopped = run_jobs(jobs, jobs_at_once=2, refresh=0.2)
    assert failures == [] and stopped is None
    seen = records(shared, 4)
    assert most_at_once(seen) == 2 and max(r["running"] for r in seen) <= 2
    assert all(r["stdin"] == "/dev/null" and r["own_group"] and r["env"] == ["10", "1"] for r in seen)
    assert all(r["gpu"] == "-" for r in seen)  # no --gpus: CUDA_VISIBLE_DEVICES left as it was
    err = capsys.readouterr().err
    assert "cell0 epoch 3/7" in err and "2 running" in err and "4 done, 0 running, 0 left" in err
    # A cell run again (resumed) keeps its earlier log.
    run_jobs(jobs[:1])
    assert open(jobs[0].log).read().count("$ ") == 2


def test_one_cell_per_place_on_each_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")  # e.g. a Slurm allocation: --gpus 0 1 are GPUs 4 and 7
    jobs, shared = cells(tmp_path, 6, wave=4)
    failures, _ = run_jobs(jobs, gpus=[0, 1], per_gpu=2)
    assert failures == []
    seen = records(shared, 6)
    assert most_at_once(seen) == 4 and max(r["on_my_gpu"] for r in seen) <= 2
    assert Counter(r["gpu"] for r in seen[:4]) == {"4": 2, "7": 2}  # the first four: two on each GPU
    for job, rec in zip(jobs, seen):
        log = open(job.log).read()  # the GPU at the top of the cell's log
        assert log.startswith(f"$ CUDA_VISIBLE_DEVICES={rec['gpu']} ") and f"\n# on GPU {rec['gpu']} " in log


def test_a_failing_cell_leaves_the_others_going(tmp_path):
    ok = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').close()"]
    jobs = [Job("bad", [sys.executable, "-c", "print('loading'); print('ValueError: boom'); raise SystemExit(3)"],
                str(tmp_path), str(tmp_path / "bad" / "log.txt")),
            Job("gone", [str(tmp_path / "no-python"), "x"], str(tmp_path), str(tmp_path / "gone" / "log.txt")),
            Job("killed", [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], str(tmp_path),
                str(tmp_path / "killed" / "log.txt"))]  # e.g. by the kernel, out of memory
    jobs += [Job(f"ok{i}", ok + [str(tmp_path / f"ok{i}.done")], str(tmp_path), str(tmp_path / f"ok{i}" / "log.txt"))
             for i in range(3)]
    failures, stopped = run_jobs(jobs, jobs_at_once=2, on_finish=lambda job: f"note on {job.label}")
    assert stopped is None and all((tmp_path / f"ok{i}.done").exists() for i in range(3))
    tails = {job.label: (status, tail) for job, status, tail in failures}  # in the order they failed
    assert sorted(tails) == ["bad", "gone", "killed"] and (tails["bad"][0], tails["gone"][0]) == (3, 127)
    assert tails["killed"][0] == 128 + 9  # as a shell reports it
    assert tails["bad"][1][-2:] == ["loading", "ValueError: boom"] and "could not start" in tails["gone"][1][-1]


RUNNER = """
import json, sys
from utils.table.grid_runner import Job, run_jobs
jobs = [Job(**j) for j in json.loads(sys.argv[1])]
failures, stopped = run_jobs(jobs, jobs_at_once=2)
print(json.dumps({"failed": [j.label for j, _, _ in failures], "signal": stopped}))
"""
# A run stand-in: on a stop signal it "saves a checkpoint" (a marker) and exits 128 + the signal, as a run does.
TRAPS = """
import os, signal, sys, time
def stop(signum, frame):
    time.sleep(0.5)
    open(sys.argv[1] + ".saved", "w").write(str(signum))
    sys.exit(128 + signum)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, stop)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])  # USR1: the table as a Slurm job
def test_a_stop_signal_reaches_the_running_cells_and_starts_nothing_new(tmp_path, sig):
    jobs = [dict(label=f"run{i}", cmd=[sys.executable, "-c", TRAPS, str(tmp_path / f"run{i}")], folder=str(tmp_path),
                 log=str(tmp_path / f"run{i}" / "log.txt")) for i in range(3)]
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while len(glob.glob(str(tmp_path / "*.ready"))) < 2 and time.time() < deadline and runner.poll() is None:
        time.sleep(0.05)
    runner.send_signal(sig)  # to the runner only (Ctrl-C at a terminal reaches it alone too): it passes it on
    time.sleep(0.05)
    runner.send_signal(sig)  # a second one while the cells save: passed on once only, the runner says so
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"failed": [], "signal": sig}
    saved = sorted(glob.glob(str(tmp_path / "*.saved")))
    assert [os.path.basename(p) for p in saved] == ["run0.saved", "run1.saved"]
    assert all(open(p).read() == str(int(sig)) for p in saved)
    assert not os.path.exists(jobs[2]["log"])  # the third never started
    assert "stopped run0" in out and "still saving: run0" in out and "Traceback" not in err


@pytest.mark.parametrize("kwargs,words", [
    (dict(jobs_at_once=0), "--jobs must be"),
    (dict(per_gpu=2), "--per-gpu needs --gpus"),
    (dict(gpus=[0, 0]), "--per-gpu K"),
    (dict(gpus=["0,1"]), "one by one"),
    (dict(gpus=[0, 1], jobs_at_once=2), "drop --jobs"),
    (dict(gpus=[0, 2]), r"--gpus 2: this process sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES='4,7'\); .* 0 to 1"),
])
def test_bad_options_are_one_line_errors(kwargs, words, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    with pytest.raises(UserError, match=words):
        check_options(**kwargs)
    check_options(gpus=["1"])  # by position among the visible ones
    with pytest.raises(UserError, match="--gpus 7: .* 0 to 1"):
        check_options(gpus=["7"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="sees no GPU"):  # a child would run on the CPU
        check_options(gpus=[0])


def test_the_epoch_and_the_tail_come_from_the_log(tmp_path):
    log = tmp_path / "log.txt"
    bars = "epoch 2/5 train: 10%|\repoch 2/5 train: 60%|\r"  # tqdm's redraws
    log.write_text("$ cmd\n" + "x" * 9000 + "\nepoch 1: val mAP@100 0.5\n" + bars)
    assert current_epoch(str(log)) == "epoch 2/5" and current_epoch(str(tmp_path / "none")) == ""
    assert log_tail(str(log), 2) == ["epoch 1: val mAP@100 0.5", "epoch 2/5 train: 60%|"]


# Stand-in sbatch: runs the array tasks one after another, as Slurm would with the variables set.
SBATCH = r"""#!{python}
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
first, last = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, re.M).groups())
output = re.search(r"^#SBATCH --output=(\S+)", text, re.M).group(1)
print("Submitted batch job 500")
for task in range(first, last + 1):
    env = dict(os.environ, SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID=str(task), SLURM_JOB_ID=str(600 + task))
    with open(output.replace("%A", "500").replace("%a", str(task)), "a") as out:
        subprocess.run(["bash", script], env=env, stdout=out, stderr=subprocess.STDOUT)
"""


def stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for name in ("sbatch", "scontrol"):
        os.chmod(bin_dir / name, stat.S_IRWXU)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_the_array_job_runs_every_cell_under_the_stand_in_sbatch(tmp_path):
    done = "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))"
    jobs = [Job(f"digits mb_{b}bit", [sys.executable, "-c", done, str(tmp_path / f"{b}.done"), "--resume", "auto",
                                      "it's quoted"], str(tmp_path / str(b)), str(tmp_path / str(b) / "log.txt"))
            for b in (8, 16, 32)]
    script = write_sbatch(str(tmp_path / "slurm"), jobs, max_running=2,
                          sbatch_args="--partition=gpu --gres=gpu:1 -t 04:00:00 --signal=B:USR1@600")
    assert script == str(tmp_path / "slurm" / "table.sbatch")
    text = open(script).read()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 04:00:00",
                 "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/slurm/logs/%A_%a.out", f"cd {REPO} "):
        assert line + "\n" in text or line in text, line
    assert text.count("#SBATCH --signal") == 1  # the one given replaces the default B:USR1@300
    sub = subprocess.run(["sbatch", script], env=stand_ins(tmp_path), capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    for i, b in enumerate((8, 16, 32)):
        assert (tmp_path / f"{b}.done").read_text() == "--resume auto it's quoted"
        log = open(jobs[i].log).read()
        assert log.startswith(f"$ {sys.executable} -c ") and "# Slurm job 60" in log
        out = open(tmp_path / "slurm" / "logs" / f"500_{i}.out").read()
        assert f"array task {i} (job {600 + i}): digits mb_{b}bit" in out and "exit status 0" in out
    assert not (tmp_path / "scontrol.log").exists()


# A run stand-in for the time limit: the first time it waits for SIGUSR1, "saves" and exits 138;
# run again it finds its checkpoint and finishes.
REQUEUED = """
import os, signal, sys, time
mark = sys.argv[1]
if os.path.exists(mark + ".saved"):
    open(mark + ".finished", "w").close()
    sys.exit(0)
def stop(signum, frame):
    open(mark + ".saved", "w").close()
    sys.exit(128 + signum)
signal.signal(signal.SIGUSR1, stop)
open(mark + ".ready", "w").close()
time.sleep(60)
"""


def test_a_task_at_its_time_limit_saves_and_is_requeued(tmp_path):
    mark = str(tmp_path / "run")
    job = Job("run", [sys.executable, "-c", REQUEUED, mark, "--resume", "auto"], str(tmp_path), mark + "/log.txt")
    script = write_sbatch(str(tmp_path / "slurm"), [job])
    env = dict(stand_ins(tmp_path), SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="77")
    task = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    while not os.path.exists(mark + ".ready") and time.time() < deadline and task.poll() is None:
        time.sleep(0.05)
    task.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N does: to the batch shell only
    out, err = task.communicate(timeout=60)
    assert task.returncode == 138, out + err
    assert "time limit ahead" in out and (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and os.path.exists(mark + ".finished")
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]  # not requeued again
    assert open(job.log).read().count("$ ") == 2  # one log across the restarts


@pytest.mark.parametrize("args,words", [
    ("--array=0-3", "writes --array itself"),
    ("-o x.out", "writes -o itself"),
    ("--signal=B:TERM@60", "B:USR1@SECONDS"),
    ("gpu --time=1:00:00", "must start with a flag"),
])
def test_bad_slurm_args_are_refused(tmp_path, args, words):
    job = Job("c", [sys.executable, "x.py", "--resume", "auto"], str(tmp_path), str(tmp_path / "log.txt"))
    with pytest.raises(UserError, match=words):
        write_sbatch(str(tmp_path / "slurm"), [job], sbatch_args=args)
    with pytest.raises(UserError, match="every cell is finished"):
        write_sbatch(str(tmp_path / "slurm"), [])
    with pytest.raises(ValueError, match="--resume auto"):
        write_sbatch(str(tmp_path / "slurm"), [job._replace(cmd=[sys.executable, "x.py"])])


# End to end through python -m utils.table: two tiny CDNE(MB) cells (8-px digits, 1 epoch).
TINY = ["--no-pretrained", "--img-size", "8", "-b", "16", "--lr", "0.01", "--epochs", "1", "--num_workers", "0",
        "--device", "cpu"]


def test_the_table_two_at_once_and_as_an_array_job_gives_the_numbers_of_one_at_a_time(tmp_path, monkeypatch, capsys):
    from utils.data.digits import make_digits
    from utils.table import command as table

    make_digits(str(tmp_path / "data"), size=8, per_class=12)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs on two cores, one thread each
    grid = ["--dataset", "digits", "--bits", "8", "--methods", "mb", "--seeds", "0", "1", "--data",
            str(tmp_path / "data")]

    def means(out):
        return [(r["key"], r["bits"], r["seeds"], r["mean"]) for r in json.load(open(out / "table.json"))["rows"]]

    def runs(out):  # seed: test mAP@100 of its run
        return {run["seed"]: run["value"] for r in json.load(open(out / "table.json"))["rows"] for run in r["runs"]}

    assert table.main([*grid, "--out", str(tmp_path / "at_once"), "--jobs", "2", "--", *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("started digits mb_8bit_seed")]
    first_end = min(i for i, line in enumerate(lines) if line.startswith("finished digits mb_8bit_seed"))
    assert len(started) == 2 and max(started) < first_end  # both running before either finished

    # The same grid as a Slurm array job, seed 0 already finished (its folder copied): one task, for
    # seed 1, which the stand-in sbatch runs alone.
    shutil.copytree(tmp_path / "at_once" / "digits" / "mb_8bit_seed0", tmp_path / "array" / "digits" / "mb_8bit_seed0")
    slurm = tmp_path / "slurm"
    assert table.main([*grid, "--out", str(tmp_path / "array"), "--slurm", str(slurm), "--slurm-max-running", "1",
                       "--slurm-args=--time=00:10:00", "--", *TINY]) == 0
    assert f"sbatch {slurm / 'table.sbatch'}" in capsys.readouterr().out
    text = (slurm / "table.sbatch").read_text()
    assert "#SBATCH --array=0-0%1" in text and "#SBATCH --time=00:10:00" in text
    assert "mb_8bit_seed1 --no-pretrained" in text and "mb_8bit_seed0" not in text and "--resume auto" in text
    sub = subprocess.run(["sbatch", str(slurm / "table.sbatch")], env=stand_ins(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert sub.returncode == 0, sub.stderr
    assert "exit status 0" in open(slurm / "logs" / "500_0.out").read()
    # After the job the plain table command finds every cell finished and gathers them.
    assert table.main([*grid, "--out", str(tmp_path / "array"), "--", *TINY]) == 0
    assert capsys.readouterr().out.count("skipped digits mb_8bit_seed") == 2
    at_once, alone = runs(tmp_path / "at_once"), runs(tmp_path / "array")
    assert at_once[1] == alone[1] and means(tmp_path / "at_once") == means(tmp_path / "array")
    assert [len(seeds) for _, _, seeds, _ in means(tmp_path / "array")] == [2]


def test_cells_started_at_once_make_the_digits_folder_once_and_whole(tmp_path):
    """Two digits cells of one grid may both create the dataset; neither may see or leave half of it."""
    import threading

    from utils.data.digits import make_digits

    errors = []

    def create():
        try:
            make_digits(str(tmp_path), size=8, per_class=12)
        except Exception as err:  # noqa: BLE001 - any error is the failure looked for
            errors.append(repr(err))

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and os.listdir(tmp_path) == ["digits"]
    assert sorted(Counter(os.path.basename(os.path.dirname(p)) for p in glob.glob(str(tmp_path / "digits/*/*.png"))
                          ).values()) == [12] * 10


def test_cells_at_once_without_a_thread_count_are_warned_about(monkeypatch, capsys):
    from utils.table.grid_runner import warn_oversubscribed

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    warn_oversubscribed(2, None, cores=4)
    assert "OMP_NUM_THREADS=2" in capsys.readouterr().err
    for args in ((1, None), (2, [0, 1])):  # one at a time, or one per GPU: nothing to say
        warn_oversubscribed(*args, cores=4)
        assert capsys.readouterr().err == ""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    warn_oversubscribed(2, None, cores=4)
    assert capsys.readouterr().err == ""


def test_the_bar_counts_every_running_cell(tmp_path, capsys):
    """Issue 21: with two at once the bar said "1 running" most of the time: it was drawn between a cell's
    end and the start of the next (into a file, only then)."""
    import re

    jobs, shared = cells(tmp_path, 6, wave=2)
    failures, _ = run_jobs(jobs, jobs_at_once=2, refresh=3600)  # drawn only when cells end or start
    assert failures == []
    states = [tuple(map(int, m)) for m in re.findall(r"(\d+) done, (\d+) running, (\d+) left", capsys.readouterr().err)]
    assert states and states[-1] == (6, 0, 0)
    assert all(running == 2 for done, running, left in states if left), states
    assert (2, 2, 2) in states  # after the first wave, before the second ends


def test_slurm_args_takes_a_value_that_starts_with_dashes_and_warns_of_what_is_missing(tmp_path, capsys):
    from utils.table import command as table

    job = Job("c", [sys.executable, "x.py", "--resume", "auto"], str(tmp_path), str(tmp_path / "log.txt"))
    args, _ = table.parse_args(["--slurm", str(tmp_path / "s"), "--slurm-args", "--time=01:00:00 -p gpu"])
    assert args.slurm_args == "--time=01:00:00 -p gpu"
    assert table.parse_args(["--slurm-arg", "--gres=gpu:1"])[0].slurm_args == "--gres=gpu:1"  # as argparse abbreviates
    write_sbatch(str(tmp_path / "slurm"), [job], sbatch_args=args.slurm_args)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --slurm-args gives no GPU request (--gres=gpu:N or --gpus): the tasks get the "
                   "partition's defaults, which may be a short limit or no GPU (a cell without one trains on the CPU "
                   "under --device auto); add e.g. --slurm-args=\"--gres=gpu:1\" (or ignore this for CPU cells)"]
    assert "#SBATCH -p gpu" in open(tmp_path / "slurm" / "table.sbatch").read()
    write_sbatch(str(tmp_path / "slurm"), [job])
    assert "gives no time limit (--time) and no GPU request" in capsys.readouterr().err
    for given in ("-t 04:00:00 --gres=gpu:1", "--time=4:00:00 --gpus=1", "-t04:00:00 -G1", "--time=1 --gpus-per-node=2"):
        write_sbatch(str(tmp_path / "slurm"), [job], sbatch_args=given)
        assert capsys.readouterr().err == "", given
