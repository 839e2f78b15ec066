"""The cells of a grid as child processes: several at once, K per GPU, or one Slurm array task each.

    run_jobs(jobs, jobs_at_once=2)            # two cells at a time on this machine (CPU or GPU)
    run_jobs(jobs, gpus=[0, 1, 2, 3])         # one cell per GPU at a time, each seeing only its GPU
    write_sbatch("slurm", jobs, max_running=8, sbatch_args="--partition=gpu --gres=gpu:1")

Every child runs in a process group of its own with its output appended to its cell's log.txt,
so a signal to the grid reaches each run once, the way Slurm or `kill -- -PGID` signals a single
run: it finishes its step, saves a checkpoint and exits 128 + the signal, and `--resume auto`
continues it. python -m utils.table builds the jobs and calls these two functions (write_sbatch
lives in utils/table/slurm.py).
"""
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import namedtuple

from utils import REPO_ROOT
from utils.errors import UserError
from utils.table.slurm import write_sbatch  # the Slurm array job, in a module of its own

__all__ = ["Job", "run_jobs", "write_sbatch", "check_options", "visible_gpus", "current_epoch", "log_tail"]
Job = namedtuple("Job", "label cmd folder log")  # cmd: list[str]; log: path of the cell's log.txt
# Ctrl-C, preemption or `timeout`, and Slurm's warning before a time limit (when the table runs as a job).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Progress bars redrawn every 10 s, not 10 times a second: a long run's log stays small (tail -f shows them).
CHILD_ENV = {"TQDM_MININTERVAL": "10", "PYTHONUNBUFFERED": "1"}
# The trainer's bar, "epoch 3/130 train: 45%|...", is the last thing a running cell writes.
_EPOCH = re.compile(rb"epoch (\d+)/(\d+)")


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
    visible, where = visible_gpus()
    unknown = [g for g in names if not (int(g) < len(visible) if g.isdigit() else g in visible)]
    if unknown:
        # A child shown no GPU would train on the CPU under --device auto: days, without a word.
        raise UserError(f"--gpus {unknown[0]}: this process sees {len(visible)} GPU(s) ({where}); "
                        f"name them by their position, 0 to {len(visible) - 1}" if visible else
                        f"--gpus {unknown[0]}: this process sees no GPU ({where}); drop --gpus, or use --jobs N")


def visible_gpus():
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them, and where that list comes from.

    Inside a Slurm allocation or a shared node's CUDA_VISIBLE_DEVICES=2,3, --gpus 0 1 are those two."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()], f"CUDA_VISIBLE_DEVICES={env!r}"
    import torch

    return [str(i) for i in range(torch.cuda.device_count())], "torch.cuda.device_count()"


def places(jobs_at_once=1, gpus=None, per_gpu=1):
    """Where cells can run at the same time: the CUDA_VISIBLE_DEVICES value of a child per place,
    or None (left as it is) per place. --gpus names GPUs by their position among the visible ones."""
    if gpus is None:
        return [None] * jobs_at_once
    visible = visible_gpus()[0]
    names = [visible[int(g)] if str(g).isdigit() else str(g) for g in gpus]  # a name: a UUID or MIG id
    return [g for _ in range(per_gpu) for g in names]


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
        # Into a file (a Slurm log, nohup) a redraw every second would add a line a second: once a minute there.
        refresh = refresh if sys.stderr.isatty() else max(refresh, 60.0)
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
                # Reap before starting and draw after both: a bar drawn between a cell's end and the start of
                # the next on its place showed one cell fewer running (into a file, where it is drawn only on
                # such changes, "1 running" of two most of the time).
                ended = self.reap()
                started = self.start_cells()
                self.pass_stop_on()
                if ended or started or time.monotonic() - last >= self.refresh:
                    self.draw()
                    last = time.monotonic()
                time.sleep(0.1)
        finally:
            self.draw()
            self.bar.close()
        return self.failures, self.stop

    def start_cells(self):
        """Start cells while places are free; how many started (or failed to start)."""
        started = 0
        while self.pending and self.free and self.stop is None:
            job, place = self.pending.pop(0), self.free.pop(0)
            try:
                proc = _start(job, place, self.cwd)
            except OSError as err:  # e.g. the interpreter is gone: this cell fails, the others go on
                with open(job.log, "a") as log:
                    log.write(f"could not start: {err}\n")
                self.free.append(place)
                self.failed(job, 127, [f"could not start: {err}"])
                started += 1  # the bar changes too
                continue
            self.running.append(_Child(job, place, proc))
            started += 1
            where = "" if place is None else f" on GPU {place}"
            self.tqdm.write(f"started {job.label}{where}; output in {job.log}")
        return started

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
            elif status and _diverged_since(job.folder, time.time() - (time.monotonic() - child.started)):
                # The trainer's record of a non-finite loss: a result at this rate, not a failed cell.
                self.tqdm.write(f"diverged {job.label} after {took} (a non-finite loss; {job.folder}/diverged.json)")
                self.done += 1
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


def warn_oversubscribed(jobs_at_once, gpus, cores=None):
    """Say so when cells at once would each start torch's default of one thread per core: measured on
    2 cores (docs/benchmarks.md section 6), two such cells at once took 3.5x as long as one at a time."""
    cores = cores or os.cpu_count() or 1
    if gpus is None and jobs_at_once > 1 and "OMP_NUM_THREADS" not in os.environ and cores > 1:
        print(f"warning: {jobs_at_once} cells at once, each with torch's default of {cores} threads, share "
              f"{cores} cores and slow each other down; on a CPU set OMP_NUM_THREADS={max(1, cores // jobs_at_once)} "
              "for the table (a run's thread count can change its numbers: compare runs made with the same one)",
              file=sys.stderr)


def run_jobs(jobs, jobs_at_once=1, gpus=None, per_gpu=1, cwd=REPO_ROOT, on_finish=None, refresh=1.0):
    """Run the jobs, up to jobs_at_once at a time, or per_gpu on each of gpus (CUDA_VISIBLE_DEVICES).

    A failing job does not stop the others. SIGINT, SIGTERM or SIGUSR1 to this process is passed on to every
    running job's process group once; nothing new starts and the running jobs are waited for (they
    save a checkpoint). on_finish(job) may return a note for the "finished" line. Returns (failures,
    signal number or None); failures: (job, exit status as a shell gives it, last lines of its log).
    A job that exits 128 + the signal passed on is stopped, not failed.
    """
    check_options(jobs_at_once, gpus, per_gpu)
    warn_oversubscribed(jobs_at_once, gpus)
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


def _diverged_since(folder, started):
    """Whether the run in `folder` wrote diverged.json (utils/training/trainer.py) since `started` (time.time())."""
    try:
        return os.path.getmtime(os.path.join(folder, "diverged.json")) >= started - 1.0
    except OSError:
        return False
