"""The paper's Table I: test mAP@100 (%) over datasets x bit lengths x methods, ours beside the paper's.

Each cell (method, dataset, bits, seed[, lr]) is one training run in a fixed folder
<out>/<dataset>/<method>_<bits>bit[_lr<lr>]_seed<seed>. A folder counts as the cell only when its
run was made with the flags the table passes now (every flag that can change a number): such a
finished run is skipped, an interrupted one (or one asked for a larger --epochs) is resumed, and a
run made with other flags stops the table before anything runs (exit 2), unless --rerun-stale
sets it aside as <folder>.stale-<time> and runs the cell again. So does a run made in another
environment (device type, processes, torch, CPU threads on a CPU, ...) than a cell started here
would get, unless --accept-environment takes it knowingly (marked in table.md). Each run's output goes to
<run folder>/log.txt. Writes table.md, table.csv, table.json and the figures table, pr_curves and
precision_at_k (PNG and PDF) to --report (default: --out). --ties expected reports each run's
tie-aware test mAP@100 and precision-at-K curve (results.json's test_tie_aware, docs/method.md
section 6) in place of the index-order ones; table.md says which in one line.

Reproduce Table I on a GPU (the paper's settings are the scripts' defaults):

    python -m utils.table --dataset EuroSAT NWPU-RESISC45

The offline digits demo on a CPU (everything after -- goes to every training command), with the
learning rate of each trained cell chosen on val:

    python -m utils.table --dataset digits --bits 16 32 64 --out runs/table_digits --lr-grid 0.01 0.001 \\
        -- --no-pretrained --img-size 32 -b 64 --epochs 5 --num_workers 0

On a cluster: --slurm DIR writes an array job, or `--print-commands > cells.txt` prints the
unfinished cells' commands, one a line; `--collect runs/table` then gathers the finished runs.
"""
import argparse
import json
import os
import shlex
import sys
import time

from utils import REPO_ROOT
from utils.errors import UserError, exit_on_user_error
from utils.metrics import TIES
from utils.table import grid_runner
from utils.table.cells import (FEATURE_METHODS, METHODS, PAPER_METHODS, STALE_MARK, Cell, cell_label, collect, command,
                               grid_rate, grid_rates, read_diverged, read_result, reserved_clash, run_folder)
from utils.table.identity import assess
from utils.table.report import PAPER, PAPER_BITS, aggregate, mixed_environments, with_ties, write_report
from utils.table.slurm import slurm_args_value
from utils.training.resume import interpreter


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UserError(f"{message}; see python -m utils.table --help")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = slurm_args_value(argv[:argv.index("--")] if "--" in argv else argv)
    p = _Parser(prog="python -m utils.table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Everything after a literal -- is passed to every training command.")
    p.add_argument("--dataset", nargs="+", help="datasets (default: NWPU-RESISC45 EuroSAT; with --collect: all found)")
    p.add_argument("--bits", nargs="+", type=int, help="code lengths (default: 16 32 64 128; --collect: all found)")
    p.add_argument("--methods", nargs="+", help=f"of {' '.join(METHODS)}, or all (default: the paper's seven, "
                                                f"{' '.join(PAPER_METHODS)})")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0; with --collect: all found)")
    p.add_argument("--lr-grid", nargs="+", metavar="LR",
                   help="run each trained cell once per learning rate and report the rate with the best mean "
                        "val mAP@100 over seeds (LSH and ITQ run once); xF is F times each method's default "
                        "--lr (--lr-grid x10 x1 x0.1 brackets every method's own)")
    p.add_argument("--data", help="dataset root passed to the scripts (default: theirs)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "table"), help="root of the run folders")
    p.add_argument("--collect", metavar="RUNS_DIR", help="only gather the results.json files under RUNS_DIR")
    p.add_argument("--print-commands", action="store_true", help="print the unfinished cells' commands, run nothing")
    p.add_argument("--rerun-stale", action="store_true",
                   help=f"run again the cells whose folder holds a run with other flags or made in another environment "
                        f"(kept as <folder>{STALE_MARK}<time>)")
    p.add_argument("--accept-environment", action="store_true",
                   help="take finished or resumable runs made in another environment (CPU threads, processes, device, "
                        "torch, ...) than a cell here would get, with a warning each, marked in table.md")
    p.add_argument("--report", metavar="DIR", help="where table.md/csv/json and the figures go (default: --out, or RUNS_DIR)")
    p.add_argument("--ties", choices=TIES, default="index",
                   help="test mAP@100 with ties at equal Hamming distance broken by database index (default), or "
                        "its expectation over random orders within the ties (docs/method.md section 6)")
    p.add_argument("--figure-bits", type=int, metavar="BITS",
                   help="code length of pr_curves and precision_at_k (default: the largest in the table)")
    g = p.add_argument_group("cells at once, on GPUs, on Slurm (utils/table/grid_runner.py)")
    g.add_argument("--jobs", type=int, default=1, metavar="N", help="cells at the same time")
    g.add_argument("--gpus", nargs="+", metavar="ID", help="one cell per listed GPU at a time (CUDA_VISIBLE_DEVICES)")
    g.add_argument("--per-gpu", type=int, default=1, metavar="K", help="cells at once on each of --gpus")
    g.add_argument("--slurm", metavar="DIR", help="write DIR/table.sbatch, an array job of the unfinished cells; run nothing")
    g.add_argument("--slurm-max-running", type=int, metavar="M", help="at most M array tasks at once (%%M)")
    g.add_argument("--slurm-args", default="", metavar='"..."',
                   help='#SBATCH options added to the script, e.g. --slurm-args "--gres=gpu:1 --time=04:00:00"')
    args = p.parse_args(argv)
    for name in ("dataset", "bits", "methods", "seeds", "lr_grid"):  # a name given twice is one cell, not two runs
        if getattr(args, name):
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    if args.methods and "all" in args.methods:
        args.methods = list(dict.fromkeys([m for m in args.methods if m != "all"] + list(METHODS)))
    bad = [m for m in args.methods or () if m not in METHODS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}; choose from {' '.join(METHODS)}")
    if any(b <= 0 for b in args.bits or ()):
        raise UserError(f"--bits must be positive code lengths, got {args.bits}; e.g. --bits 16 32 64 128")
    try:
        args.lr_grid = list(dict.fromkeys(map(grid_rate, args.lr_grid))) if args.lr_grid else None
    except ValueError:
        raise UserError(f"--lr-grid takes positive learning rates or factors of each method's default (x10), got "
                        f"{' '.join(args.lr_grid)}; e.g. --lr-grid 0.1 0.01 0.001 or --lr-grid x10 x1 x0.1") from None
    grid_runner.check_options(args.jobs, args.gpus, args.per_gpu)
    # Each flag as the cells' scripts will take it, abbreviations included (--see is --seed to argparse).
    clash = reserved_clash(args.methods or list(PAPER_METHODS), extra, bool(args.lr_grid))
    if clash:
        raise UserError(clash)
    if args.collect and (args.print_commands or args.slurm or args.rerun_stale or args.accept_environment):
        raise UserError("--collect runs nothing; drop --print-commands/--slurm/--rerun-stale/--accept-environment "
                        "or --collect")
    if args.collect and not os.path.isdir(args.collect):
        raise UserError(f"--collect folder {args.collect} does not exist; pass the folder holding the run folders")
    args.out = os.path.abspath(args.out)
    args.data = os.path.abspath(args.data) if args.data else None  # printed commands work from anywhere
    return args, extra


def check_writable(folder, flag):
    """Refuse, before any run, a folder that cannot be created or written (nothing is created here)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {folder} cannot be created: {probe} is a file, not a folder; pass another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable (no write permission in {probe}); pass a writable {flag}")


def cells(methods, datasets, bits, seeds, lr_grid=None):
    """The grid; with a learning-rate grid a trained cell is one per rate, LSH and ITQ one in all."""
    return [Cell(m, d, b, s, lr) for d in datasets for m in methods for b in bits for lr in grid_rates(m, lr_grid)
            for s in seeds]


def assess_grid(grid, args, extra, gpu=None, here=True):
    """{cell: Assessment}; with stale cells, or cells made in another environment, one line each and exit 2
    unless --rerun-stale sets them aside (--accept-environment takes the latter as they are)."""
    found = {cell: assess(cell, args.out, args.data, extra, gpu, here) for cell in grid}
    stale = [c for c, a in found.items() if a.state == "stale"]
    other = [c for c, a in found.items() if a.state in ("finished", "resume") and a.environment]
    refused = ([] if args.rerun_stale else stale) + ([] if args.rerun_stale or args.accept_environment else other)
    for cell in refused:
        what = (f"is not the run asked for: {found[cell].reason}" if cell in stale else found[cell].environment)
        accept = "" if cell in stale else ", take it as it is with --accept-environment,"
        print(f"error: cell {cell_label(cell)} ({run_folder(args.out, cell)}) {what}; run it again with --rerun-stale "
              f"(the old folder is kept as <folder>{STALE_MARK}<time>){accept} or pass a new --out", file=sys.stderr)
    if refused:
        raise SystemExit(2)
    accepted = [c for c in other if args.accept_environment]
    for cell in accepted:
        print(f"warning: cell {cell_label(cell)} ({run_folder(args.out, cell)}) {found[cell].environment}; taken "
              f"with --accept-environment (marked in table.md)", file=sys.stderr)
    for cell in stale + [c for c in other if c not in accepted]:
        folder = run_folder(args.out, cell)
        aside = f"{folder}{STALE_MARK}{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while os.path.exists(aside):
            aside, n = f"{folder}{STALE_MARK}{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        try:
            os.rename(folder, aside)
        except OSError as err:
            raise UserError(f"cannot set aside {folder} as {aside} ({err.strerror}); make {args.out} writable or "
                            f"pass a new --out") from None
        why = found[cell].reason if cell in stale else found[cell].environment
        print(f"set aside {folder} as {aside} ({why}); running the cell again")
        found[cell] = found[cell]._replace(state="new", environment="")
    return found


def jobs_of(grid, found, args, extra, resume_auto=False):
    """The Job of each cell that is not finished (utils/grid_runner.Job)."""
    out = []
    for cell in grid:
        state = found[cell].state
        if state in ("finished", "diverged"):
            continue
        folder = run_folder(args.out, cell)
        resume = "auto" if resume_auto else state == "resume"
        out.append(grid_runner.Job(cell_label(cell), command(cell, args.out, args.data, extra, resume), folder,
                                       os.path.join(folder, "log.txt")))
    return out


def print_commands(jobs, out):
    """One shell line per unfinished cell on stdout (nothing else there, for a scheduler)."""
    for job in jobs:
        print(shlex.join(job.cmd))
    print(f"# run folders under {out}; gather them with: {interpreter()} -m utils.table --collect {shlex.quote(out)}",
          file=sys.stderr)


def collected(args):
    """The records under --collect that match the flags given, and the methods, datasets, bits to show."""
    wanted = (("method", args.methods), ("dataset", args.dataset), ("bits", args.bits), ("seed", args.seeds))
    records = [r for r in collect(args.collect) if all(f is None or r[k] in f for k, f in wanted)]
    if args.lr_grid:  # only the rates of the grid asked for take part in the choice
        records = [r for r in records if r["method"] in FEATURE_METHODS or r["lr"] in grid_rates(r["method"], args.lr_grid)]
    if not records:
        raise UserError(f"no results under {args.collect} match the --dataset/--bits/--methods/--seeds/--lr-grid "
                        f"given; drop or widen them")
    return (records, ordered(args.methods or [r["method"] for r in records], list(METHODS)),
            args.dataset or [r["dataset"] for r in records], args.bits or {r["bits"] for r in records})


def ordered(found, paper_order):
    """Known names in the paper's order, then the others in the order given."""
    return [x for x in paper_order if x in found] + [x for x in dict.fromkeys(found) if x not in paper_order]


def run(jobs, args):
    """(failures as (label, command, exit status), signal number or None); the runner reports each cell."""
    if not jobs:  # every cell finished: no empty progress bar
        return [], None

    def note(job):
        record = read_result(os.path.join(job.folder, "results.json"))
        return f"test mAP@100 {record['value']:.2f}%" if record else None
    failures, signum = grid_runner.run_jobs(jobs, args.jobs, args.gpus, args.per_gpu, on_finish=note)
    return [(job.label, job.cmd, status, job.folder) for job, status, _ in failures], signum


# What shapes a report (its rows and the rates shown), compared before --collect replaces one.
REPORT_OPTIONS = ("lr_grid", "methods", "datasets", "bits", "ties")


def check_report(report, made_by):
    """Refuse a --collect that would replace the report of a grid run (table.json records what made it)
    with another table: e.g. a per-rate table where the grid's chose the rates on val (no --lr-grid)."""
    try:
        with open(os.path.join(report, "table.json")) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return  # none there (or not ours to read): nothing to replace
    if not isinstance(old, dict):
        return
    before = old.get("made_by")
    if isinstance(before, dict) and before.get("mode") != "grid":
        return  # another --collect's: made from the same run folders again, nothing of a grid's is lost
    if not isinstance(before, dict):  # a report from before they recorded it: its rate grid is all it says
        before, origin = {"lr_grid": old.get("lr_grid")}, "a report from before reports recorded what made them"
    else:
        origin = f"the report of a grid run: {before.get('command')}"
    differ = [f"{key} {before.get(key)} there, {made_by[key]} here" for key in REPORT_OPTIONS
              if key in before and _same(before.get(key)) != _same(made_by[key])]
    if differ:
        raise UserError(f"--report {report} holds {origin}; this --collect would replace it with another table "
                        f"({'; '.join(differ)}): pass --report DIR to write it elsewhere, or the grid's options "
                        f"(e.g. its --lr-grid)")


def _same(value):
    return sorted(map(str, value)) if isinstance(value, (list, tuple)) else value


@exit_on_user_error
def main(argv=None):
    args, extra = parse_args(argv)
    methods, datasets = args.methods or list(PAPER_METHODS), args.dataset or list(PAPER)
    grid = cells(methods, datasets, args.bits or list(PAPER_BITS), args.seeds or [0], args.lr_grid)
    report = os.path.abspath(args.report or args.collect or args.out)
    if not args.collect:
        check_writable(args.out, "--out")
    if args.slurm:
        check_writable(args.slurm, "--slurm")
    if not args.print_commands and not args.slurm:
        check_writable(report, "--report")
    if args.figure_bits is not None and args.figure_bits not in (args.bits or PAPER_BITS) and not args.collect:
        raise UserError(f"--figure-bits {args.figure_bits} is not one of the table's --bits {args.bits or list(PAPER_BITS)}")
    failures, accepted = [], {}
    where = (f"report: {os.path.join(report, 'table.{md,csv,json}')} and the figures table, pr_curves, "
             f"precision_at_k (.png, .pdf)")
    if args.collect:
        print(where)
        records, methods, datasets, bits = collected(args)
    else:
        # The cells' environment is this machine's, unless their commands run elsewhere (--slurm, --print-commands).
        here = not (args.print_commands or args.slurm)
        gpu = grid_runner.places(args.jobs, args.gpus, args.per_gpu)[0] if args.gpus else None
        found = assess_grid(grid, args, extra, gpu, here)
        if not here and any(a.state in ("finished", "resume") for a in found.values()):
            print("note: the cells' commands run elsewhere, so finished runs are not compared with an environment "
                  "(unknown here), and --pipeline auto takes the pipeline each run chose; --collect keeps runs of "
                  "different environments in separate rows", file=sys.stderr)
        accepted = {run_folder(args.out, c): a.environment for c, a in found.items() if a.environment}
        if args.print_commands:
            return print_commands(jobs_of(grid, found, args, extra), args.out) or 0
        if args.slurm:
            path = grid_runner.write_sbatch(args.slurm, jobs_of(grid, found, args, extra, resume_auto=True),
                                                args.slurm_max_running, args.slurm_args)
            print(f"wrote {path}; submit it with:\n  sbatch {shlex.quote(path)}\nthen gather with: {interpreter()} "
                  f"-m utils.table --collect {shlex.quote(args.out)} (or the same table command inside an allocation "
                  "of the same nodes: elsewhere it compares the runs with that machine's environment)")
            return 0
        if args.ties != "index":  # finished runs without tie-aware metrics: refused before the grid runs
            with_ties([r for r in (read_result(os.path.join(run_folder(args.out, c), "results.json"))
                                   for c, a in found.items() if a.state == "finished") if r], args.ties)
        for cell, a in found.items():
            if a.state == "finished":
                print(f"skipped {cell_label(cell)}: finished ({os.path.join(run_folder(args.out, cell), 'results.json')})")
            elif a.state == "resume":
                print(f"resuming {cell_label(cell)}: {a.reason}")
            elif a.state == "diverged":
                print(f"skipped {cell_label(cell)}: diverged at this rate ({a.reason}), out of the rate choice")
        print(f"{where}\nrun folders: {os.path.join(args.out, '<dataset>', '<method>_<bits>bit[_lr<lr>]_seed<seed>')} "
              f"(each run's output in its log.txt)")
        failures, signum = run(jobs_of(grid, found, args, extra), args)
        if signum:
            print(f"\nstopped by signal {signum}; run the same command again to resume the grid", file=sys.stderr)
            return 128 + signum
        states = {run_folder(args.out, c): assess(c, args.out, args.data, extra, gpu, here).state for c in grid}
        records = [r for r in (read_result(os.path.join(f, "results.json")) if s == "finished" else
                               read_diverged(os.path.join(f, "diverged.json")) for f, s in states.items()
                               if s in ("finished", "diverged")) if r]
        # A run stopped by a non-finite loss is a result at that rate (diverged), not a failed cell.
        failures = [f for f in failures if states.get(f[3]) != "diverged"]
        for r in records:  # taken with --accept-environment: marked in table.md
            if r["folder"] in accepted:
                r["environment_accepted"] = accepted[r["folder"]]
        bits = {c.bits for c in grid}
    if args.figure_bits is not None and args.figure_bits not in bits:
        raise UserError(f"--figure-bits {args.figure_bits} is not among the bits found: {sorted(bits)}")
    datasets, bits = ordered(datasets, list(PAPER)), sorted(set(bits))
    made_by = {"mode": "collect" if args.collect else "grid",
               "command": shlex.join([sys.executable, "-m", "utils.table", *(sys.argv[1:] if argv is None else argv)]),
               "lr_grid": args.lr_grid, "methods": list(methods), "datasets": list(datasets), "bits": list(bits),
               "ties": args.ties}
    if args.collect:
        check_report(report, made_by)
    rows = aggregate(with_ties(records, args.ties), methods, datasets, bits, args.lr_grid)
    for line in mixed_environments(rows):
        print(f"warning: {line}", file=sys.stderr)
    failures = [f[:3] for f in failures]
    paths = write_report(report, rows, failures, args.lr_grid, args.figure_bits, made_by, args.ties)
    print("wrote " + ", ".join(paths))
    if failures:
        print(f"{len(failures)} cell(s) failed:\n" + "\n".join(f"  {label} exit status {s}: {shlex.join(cmd)}"
                                                                for label, cmd, s in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
