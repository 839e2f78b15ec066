"""The cells of a grid as child processes: several at once, K per GPU, or one Slurm array task each.

    run_jobs(jobs, jobs_at_once=2)            # two cells at a time on this machine (CPU or GPU)
    run_jobs(jobs, gpus=[0, 1, 2, 3])         # one cell per GPU at a time, each seeing only its GPU
    write_sbatch("slurm", jobs, max_running=8, sbatch_args="--partition=gpu --gres=gpu:1")

Every child runs in a process group of its own with its output appended to its cell's log.txt,
so a signal to the grid reaches each run once, the way Slurm or `kill -- -PGID` signals a single
run: it finishes its step, saves a checkpoint and exits 128 + the signal, and `--resume auto`
continues it. python -m utils.table builds the jobs and calls these two functions.
"""
import os
import re
import shlex
import signal
import subprocess
import time
from collections import namedtuple

from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Job = namedtuple("Job", "label cmd folder log")  # cmd: list[str]; log: path of the cell's log.txt
# Ctrl-C, preemption or `timeout`, and Slurm's warning before a time limit (when the table runs as a job).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Progress bars redrawn every 10 s, not 10 times a second: a long run's log stays small (tail -f shows them).
CHILD_ENV = {"TQDM_MININTERVAL": "10", "PYTHONUNBUFFERED": "1"}
# The trainer's bar, "epoch 3/130 train: 45%|...", is the last thing a running cell writes.
_EPOCH = re.compile(rb"epoch (\d+)/(\d+)")
_SLURM_OWN = ("--array", "-a", "--output", "-o", "--error", "-e", "--open-mode", "--requeue", "--no-requeue")


def check_options(jobs_at_once=1, gpus=None, per_gpu=1):
    """One-line errors for the table's --jobs / --gpus / --per-gpu before anything runs."""
    if not isinstance(jobs_at_once, int) or jobs_at_once < 1:
        raise UserError(f"--jobs must be a whole number of cells at once, at least 1; got {jobs_at_once}")
    if not isinstance(per_gpu, int) or per_gpu < 1:
        raise UserError(f"--per-gpu must be a whole number of cells per GPU, at least 1; got {per_gpu}")
    if gpus is None:
        if per_gpu != 1:
            raise UserError("--per-gpu needs --gpus: name the GPUs, e.g. --gpus 0 1 --per-gpu 2")
        return
    names = [str(g) for g in gpus]
    if not names or any(not g.strip() or "," in g for g in names):
        raise UserError(f"--gpus takes GPU numbers one by one, e.g. --gpus 0 1 2 3; got {' '.join(names)!r}")
    if len(set(names)) < len(names):
        raise UserError(f"--gpus {' '.join(names)} names a GPU twice; for several cells per GPU use --per-gpu K")
    if jobs_at_once != 1:
        raise UserError("--jobs and --gpus both given: --gpus runs --per-gpu cells on each GPU named "
                        "(default 1); drop --jobs")


def places(jobs_at_once=1, gpus=None, per_gpu=1):
    """Where cells can run at the same time: a GPU name per place, or None (no GPU set) per place."""
    if gpus is None:
        return [None] * jobs_at_once
    return [str(g) for _ in range(per_gpu) for g in gpus]


def log_tail(path, n=5):
    """The last n non-empty lines of a log (of a progress bar's redraws, the latest)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    lines = ([seg.strip() for seg in line.split("\r") if seg.strip()] for line in text.split("\n"))
    return [segs[-1] for segs in lines if segs][-n:]


def current_epoch(log):
    """'epoch 3/130' from the last 4 KB of a running cell's log (its training bar); '' before the first."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 4096))
            found = _EPOCH.findall(fh.read())
    except OSError:
        return ""
    return f"epoch {int(found[-1][0])}/{int(found[-1][1])}" if found else ""


def _shell_status(returncode):
    """The exit status as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _minutes(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _Child:
    def __init__(self, job, place, proc):
        self.job, self.place, self.proc = job, place, proc
        self.started, self.signalled = time.monotonic(), None


class _Grid:
    """The loop of run_jobs: start cells while places are free, reap them, pass a stop signal on."""

    def __init__(self, jobs, free, cwd, on_finish, refresh):
        from tqdm import tqdm

        self.tqdm = tqdm
        self.pending, self.free, self.cwd, self.on_finish, self.refresh = list(jobs), free, cwd, on_finish, refresh
        self.running, self.failures, self.done, self.stopped = [], [], 0, 0
        self.stop, self.asked_again = None, False
        self.bar = tqdm(total=len(self.pending), unit="cell", dynamic_ncols=True)

    def on_signal(self, signum, frame):
        if self.stop is None:
            self.stop = signum
        else:  # every child is already told once; say whom the grid is waiting for
            self.asked_again = True

    def run(self):
        last = 0.0
        try:
            while self.running or (self.pending and self.stop is None):
                self.start_cells()
                self.pass_stop_on()
                if self.reap() or time.monotonic() - last >= self.refresh:
                    self.draw()
                    last = time.monotonic()
                time.sleep(0.1)
        finally:
            self.draw()
            self.bar.close()
        return self.failures, self.stop

    def start_cells(self):
        while self.pending and self.free and self.stop is None:
            job, place = self.pending.pop(0), self.free.pop(0)
            try:
                proc = _start(job, place, self.cwd)
            except OSError as err:  # e.g. the interpreter is gone: this cell fails, the others go on
                with open(job.log, "a") as log:
                    log.write(f"could not start: {err}\n")
                self.free.append(place)
                self.failed(job, 127, [f"could not start: {err}"])
                continue
            self.running.append(_Child(job, place, proc))
            where = "" if place is None else f" on GPU {place}"
            self.tqdm.write(f"started {job.label}{where}; output in {job.log}")

    def pass_stop_on(self):
        if self.stop is None:
            return
        if self.asked_again:
            self.asked_again = False
            self.tqdm.write("still saving: " + ", ".join(f"{c.job.label} (kill -9 -- -{c.proc.pid} stops it without "
                                                         "saving)" for c in self.running))
        for child in self.running:
            if child.signalled is None:
                child.signalled = self.stop
                try:
                    os.killpg(child.proc.pid, self.stop)  # its whole group, loader workers and ranks too
                except (ProcessLookupError, PermissionError):
                    pass  # it has just exited; reap() reads its status
                self.tqdm.write(f"{signal.Signals(self.stop).name} passed on to {child.job.label}: it saves a "
                                "checkpoint and stops")

    def reap(self):
        """Record the cells that have exited; whether any had."""
        ended = [c for c in self.running if c.proc.poll() is not None]
        for child in ended:
            self.running.remove(child)
            self.free.append(child.place)
            status, job = _shell_status(child.proc.returncode), child.job
            took = _minutes(time.monotonic() - child.started)
            if status and child.signalled and status == 128 + child.signalled:
                self.tqdm.write(f"stopped {job.label} after {took} (exit status {status}); the same command "
                                "continues it from its checkpoint")
                self.stopped += 1
            elif status:
                self.failed(job, status, log_tail(job.log))
            else:
                note = self.on_finish(job) if self.on_finish else None
                self.tqdm.write(f"finished {job.label} in {took}" + (f": {note}" if note else ""))
                self.done += 1
        return bool(ended)

    def failed(self, job, status, tail):
        """A failed cell: recorded with its log's last lines; the others go on."""
        self.failures.append((job, status, tail))
        self.tqdm.write(f"FAILED {job.label} (exit status {status}); its log {job.log} ends:\n  " + "\n  ".join(tail))

    def draw(self):
        failed = (f", {len(self.failures)} failed" if self.failures else "") + (
            f", {self.stopped} stopped" if self.stopped else "")
        self.bar.n = self.done + len(self.failures)
        self.bar.set_description(f"{self.done} done{failed}, {len(self.running)} running, {len(self.pending)} left",
                                 refresh=False)
        self.bar.set_postfix_str("; ".join(
            ("" if c.place is None else f"GPU {c.place} ") + f"{c.job.label} {current_epoch(c.job.log) or 'starting'}"
            for c in self.running), refresh=False)
        self.bar.refresh()


def _start(job, place, cwd):
    """One cell in a process group of its own, stdin empty, output appended to its log."""
    os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
    env = dict(os.environ, **CHILD_ENV)
    prefix = ""
    if place is not None:
        env["CUDA_VISIBLE_DEVICES"] = place
        prefix = f"CUDA_VISIBLE_DEVICES={shlex.quote(place)} "
    with open(job.log, "a") as log:
        log.write(f"$ {prefix}{shlex.join(job.cmd)}\n")
        if place is not None:
            log.write(f"# on GPU {place} (the run sees it as cuda:0), started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        return subprocess.Popen(job.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=True)


def run_jobs(jobs, jobs_at_once=1, gpus=None, per_gpu=1, cwd=REPO, on_finish=None, refresh=1.0):
    """Run the jobs, up to jobs_at_once at a time, or per_gpu on each of gpus (CUDA_VISIBLE_DEVICES).

    A failing job does not stop the others. SIGINT, SIGTERM or SIGUSR1 to this process is passed on to every
    running job's process group once; nothing new starts and the running jobs are waited for (they
    save a checkpoint). on_finish(job) may return a note for the "finished" line. Returns (failures,
    signal number or None); failures: (job, exit status as a shell gives it, last lines of its log).
    A job that exits 128 + the signal passed on is stopped, not failed.
    """
    check_options(jobs_at_once, gpus, per_gpu)
    grid = _Grid(jobs, places(jobs_at_once, gpus, per_gpu), cwd, on_finish, refresh)
    try:
        previous = {s: signal.signal(s, grid.on_signal) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals stay with whoever handles them there
        previous = {}
    try:
        return grid.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_SBATCH_HEAD = """#!/bin/bash
# The grid's unfinished cells as one Slurm array job: array task i runs cell i (the case below),
# each with --resume auto, requeued at the time limit until its run has finished.
# Submit with: sbatch {script}
{sbatch}
# --signal=B:USR1@N: Slurm sends SIGUSR1 to this script N seconds before the time limit.
# --requeue lets `scontrol requeue` put the task back in the queue; --open-mode=append keeps
# one Slurm log per task across the restarts. Each cell's own output goes to its log.txt.

cd {repo} || exit 1
export TQDM_MININTERVAL=10 PYTHONUNBUFFERED=1
task="${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is an array job}}"
case "$task" in
"""
_SBATCH_TAIL = """    *) echo "no cell for array task $task: this script has tasks 0-{last}" >&2; exit 2 ;;
esac

mkdir -p "$(dirname "$log")"
echo "array task $task (job ${{SLURM_JOB_ID:-?}}): $label; output in $log"
{{ printf '$ %s\\n' "$line"
  echo "# Slurm job ${{SLURM_JOB_ID:-?}} (array task $task) on $(hostname), GPUs: ${{CUDA_VISIBLE_DEVICES:-none set}}"
}} >> "$log"

# --resume auto continues the run when its folder holds a checkpoint and starts it otherwise,
# so every restart of a task runs this same line.
"${{cell[@]}}" >> "$log" 2>&1 < /dev/null &
run=$!

# The warning goes on to the training processes: they finish the step, save a checkpoint
# and exit with 138 (128 + SIGUSR1).
trap 'echo "time limit ahead: saving a checkpoint"; kill -USR1 "$run"' USR1
wait "$run"                                      # returns early when the trap runs...
while kill -0 "$run" 2>/dev/null; do wait "$run"; done
wait "$run"; status=$?                           # ...so read the run's own exit status here
echo "$label: exit status $status"
if [ "$status" -eq 138 ]; then
    echo "requeueing job $SLURM_JOB_ID; the cell continues from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def sbatch_lines(sbatch_args):
    """--slurm-args "..." as one #SBATCH line per flag ("-p gpu" stays one line); the script's own refused."""
    lines, signal_flag, name_flag = [], None, None
    for word in shlex.split(sbatch_args or ""):
        if word.startswith("-"):
            lines.append(word)
        elif lines:
            lines[-1] += " " + word
        else:
            raise UserError(f"--slurm-args must start with a flag, got {word!r}; e.g. --slurm-args \"--partition=gpu "
                            "--gres=gpu:1 --time=04:00:00\"")
    for line in lines:
        flag = re.split(r"[ =]", line, 1)[0]
        if flag in _SLURM_OWN:
            raise UserError(f"--slurm-args {flag}: the table writes {flag} itself (one array task per cell, "
                            f"logs per task, requeue); drop it")
        if flag == "--signal":
            if not re.fullmatch(r"--signal[ =]B:USR1@\d+", line):
                raise UserError(f"--slurm-args {line}: the script saves checkpoints on SIGUSR1 to the batch shell; "
                                "give --signal=B:USR1@SECONDS or leave it (default B:USR1@300)")
            signal_flag = line
        name_flag = line if flag in ("--job-name", "-J") else name_flag
    own = [name_flag or "--job-name=cdne-table", signal_flag or "--signal=B:USR1@300", "--requeue",
           "--open-mode=append"]
    return own + [line for line in lines if line not in (signal_flag, name_flag)]


def write_sbatch(slurm_dir, jobs, max_running=None, sbatch_args=""):
    """DIR/table.sbatch: an array job with one task per job; submits nothing. Returns its path."""
    jobs = list(jobs)
    if not jobs:
        raise UserError("every cell is finished: there is no array job to write; the table command without "
                        "--slurm (or --collect) gathers them")
    if max_running is not None and (not isinstance(max_running, int) or max_running < 1):
        raise UserError(f"--slurm-max-running must be at least 1 task at a time; got {max_running}")
    slurm_dir = os.path.abspath(slurm_dir)
    if re.search(r"\s", slurm_dir):
        raise UserError(f"--slurm {slurm_dir!r} has a space, which an #SBATCH --output line cannot hold; "
                        "choose a folder without one")
    for job in jobs:
        words = list(job.cmd)
        if not any(a == "--resume" and b == "auto" for a, b in zip(words, words[1:])):
            raise ValueError(f"{job.label}: a Slurm task must run with --resume auto (requeued tasks continue)")
    os.makedirs(os.path.join(slurm_dir, "logs"), exist_ok=True)
    script = os.path.join(slurm_dir, "table.sbatch")
    array = f"0-{len(jobs) - 1}" + (f"%{max_running}" if max_running else "")
    output = os.path.join(slurm_dir, "logs", "%A_%a.out").replace("%", "%%").replace("%%A_%%a", "%A_%a")
    flags = [f"--array={array}", f"--output={output}"] + sbatch_lines(sbatch_args)
    text = _SBATCH_HEAD.format(script=script, repo=shlex.quote(REPO), sbatch="\n".join(f"#SBATCH {f}" for f in flags))
    for i, job in enumerate(jobs):
        text += (f"    {i}) label={shlex.quote(job.label)}; log={shlex.quote(os.path.abspath(job.log))}\n"
                 f"       line={shlex.quote(shlex.join(job.cmd))}\n"
                 f"       cell=({' '.join(shlex.quote(w) for w in job.cmd)}) ;;\n")
    text += _SBATCH_TAIL.format(last=len(jobs) - 1)
    part = script + ".part"
    with open(part, "w") as fh:
        fh.write(text)
    os.chmod(part, 0o755)
    os.replace(part, script)  # a half-written script is never submitted
    return script
