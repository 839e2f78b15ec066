"""The grid's unfinished cells as one Slurm array job: DIR/table.sbatch, a task per cell.

Each task runs its cell's command (with --resume auto) under the trap of docs/slurm_train.sh:
Slurm's SIGUSR1 ahead of the time limit makes the run save a checkpoint, and the task requeues
itself. utils.table.grid_runner.write_sbatch is this module's write_sbatch; it submits nothing.
"""
import os
import re
import shlex
import sys

from utils import REPO_ROOT
from utils.errors import UserError

# Flags the script sets itself: one task per cell, a log per task kept across requeues.
_SLURM_OWN = ("--array", "-a", "--output", "-o", "--error", "-e", "--open-mode", "--requeue", "--no-requeue")

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


def missing_requests(lines):
    """What the #SBATCH lines leave to the partition's defaults of a time limit and a GPU request, as a
    one-line warning ("" when both are given): a default limit may stop every task early, and a task
    given no GPU trains on the CPU under --device auto."""
    flags = [re.split(r"[ =]", line, 1)[0] for line in lines]
    short = [f[:2] for f in flags if not f.startswith("--")]  # -t04:00:00 and -G1 as sbatch reads them
    no_time = not ("--time" in flags or "-t" in short)
    gres = [line for line, f in zip(lines, flags) if f == "--gres" and "gpu" in line]
    no_gpu = not (gres or "-G" in short or any(f == "--gpus" or f.startswith("--gpus-per-") for f in flags))
    if not (no_time or no_gpu):
        return ""
    what = " and ".join(w for w, missing in (("no time limit (--time)", no_time),
                                             ("no GPU request (--gres=gpu:N or --gpus)", no_gpu)) if missing)
    example = " ".join(x for x, missing in (("--time=04:00:00", no_time), ("--gres=gpu:1", no_gpu)) if missing)
    return (f"warning: --slurm-args gives {what}: the tasks get the partition's defaults, which may be a short "
            f"limit or no GPU (a cell without one trains on the CPU under --device auto); add e.g. "
            f"--slurm-args=\"{example}\" (or ignore this for CPU cells)")


def write_sbatch(slurm_dir, jobs, max_running=None, sbatch_args=""):
    """DIR/table.sbatch: an array job with one task per job; submits nothing. Returns its path."""
    jobs = list(jobs)
    if not jobs:
        raise UserError("every cell is finished: there is no array job to write; --collect (or the table command "
                        "without --slurm, on a node like the ones that ran them) gathers them")
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
    given = sbatch_lines(sbatch_args)
    warning = missing_requests(given)
    if warning:
        print(warning, file=sys.stderr)
    flags = [f"--array={array}", f"--output={output}"] + given
    text = _SBATCH_HEAD.format(script=script, repo=shlex.quote(REPO_ROOT), sbatch="\n".join(f"#SBATCH {f}" for f in flags))
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


def slurm_args_value(argv):
    """`--slurm-args "--time=01:00:00"`: the word after --slurm-args (or an abbreviation argparse would
    take for it) is its value even when it starts with -, which argparse would take for a flag
    ("expected one argument")."""
    out, words = [], iter(argv)
    for word in words:
        if len(word) >= len("--slurm-a") and "--slurm-args".startswith(word):
            value = next(words, None)
            out.append(word if value is None else f"--slurm-args={value}")
        else:
            out.append(word)
    return out
