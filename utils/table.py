"""The paper's Table I: test mAP@100 (%) over datasets x bit lengths x methods, ours beside the paper's.

Each cell (method, dataset, bits, seed[, lr]) is one training run in a fixed folder
<out>/<dataset>/<method>_<bits>bit[_lr<lr>]_seed<seed>. A folder counts as the cell only when its
run was made with the flags the table passes now (every flag that can change a number): such a
finished run is skipped, an interrupted one (or one asked for a larger --epochs) is resumed, and a
run made with other flags stops the table before anything runs (exit 2), unless --rerun-stale
sets it aside as <folder>.stale-<time> and runs the cell again. Each run's output goes to
<run folder>/log.txt. Writes table.md, table.csv, table.json and the figures table, pr_curves and
precision_at_k (PNG and PDF) to --report (default: --out).

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
import os
import shlex
import sys
import time

from utils import grid_runner
from utils.errors import UserError, exit_on_user_error
from utils.table_cells import (FEATURE_METHODS, METHODS, REPO, RESERVED, STALE_MARK, Cell, assess, cell_label,
                               collect, command, read_result, run_folder)
from utils.table_report import PAPER, PAPER_BITS, aggregate, mixed_environments, write_report


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UserError(f"{message}; see python -m utils.table --help")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = _Parser(prog="python -m utils.table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Everything after a literal -- is passed to every training command.")
    p.add_argument("--dataset", nargs="+", help="datasets (default: NWPU-RESISC45 EuroSAT; with --collect: all found)")
    p.add_argument("--bits", nargs="+", type=int, help="code lengths (default: 16 32 64 128; --collect: all found)")
    p.add_argument("--methods", nargs="+", help=f"of {' '.join(METHODS)} (default: all, in the paper's order)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0; with --collect: all found)")
    p.add_argument("--lr-grid", nargs="+", type=float, metavar="LR",
                   help="run each trained cell once per learning rate and report the rate with the best mean "
                        "val mAP@100 over seeds (LSH and ITQ run once)")
    p.add_argument("--data", help="dataset root passed to the scripts (default: theirs)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "table"), help="root of the run folders")
    p.add_argument("--collect", metavar="RUNS_DIR", help="only gather the results.json files under RUNS_DIR")
    p.add_argument("--print-commands", action="store_true", help="print the unfinished cells' commands, run nothing")
    p.add_argument("--rerun-stale", action="store_true",
                   help=f"run again the cells whose folder holds a run with other flags (kept as <folder>{STALE_MARK}<time>)")
    p.add_argument("--report", metavar="DIR", help="where table.md/csv/json and the figures go (default: --out, or RUNS_DIR)")
    p.add_argument("--figure-bits", type=int, metavar="BITS",
                   help="code length of pr_curves and precision_at_k (default: the largest in the table)")
    g = p.add_argument_group("cells at once, on GPUs, on Slurm (utils/grid_runner.py)")
    g.add_argument("--jobs", type=int, default=1, metavar="N", help="cells at the same time")
    g.add_argument("--gpus", nargs="+", metavar="ID", help="one cell per listed GPU at a time (CUDA_VISIBLE_DEVICES)")
    g.add_argument("--per-gpu", type=int, default=1, metavar="K", help="cells at once on each of --gpus")
    g.add_argument("--slurm", metavar="DIR", help="write DIR/table.sbatch, an array job of the unfinished cells; run nothing")
    g.add_argument("--slurm-max-running", type=int, metavar="M", help="at most M array tasks at once (%%M)")
    g.add_argument("--slurm-args", default="", metavar='"..."', help="#SBATCH options added to the script")
    args = p.parse_args(argv)
    for name in ("dataset", "bits", "methods", "seeds", "lr_grid"):  # a name given twice is one cell, not two runs
        if getattr(args, name):
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    bad = [m for m in args.methods or () if m not in METHODS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}; choose from {' '.join(METHODS)}")
    if any(b <= 0 for b in args.bits or ()):
        raise UserError(f"--bits must be positive code lengths, got {args.bits}; e.g. --bits 16 32 64 128")
    if any(not lr > 0 for lr in args.lr_grid or ()):
        raise UserError(f"--lr-grid takes positive learning rates, got {args.lr_grid}; e.g. --lr-grid 0.1 0.01 0.001")
    grid_runner.check_options(args.jobs, args.gpus, args.per_gpu)
    reserved = RESERVED + (("--lr", "--learning-rate") if args.lr_grid else ())
    clash = [f for f in extra if f.split("=")[0] in reserved]
    if clash:
        raise UserError(f"{clash[0]} after -- clashes with the cell's own flag; use the table's "
                        f"--dataset/--bits/--seeds/--lr-grid/--data/--out instead")
    if args.collect and (args.print_commands or args.slurm or args.rerun_stale):
        raise UserError("--collect runs nothing; drop --print-commands/--slurm/--rerun-stale or --collect")
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
    def rates(m):
        return [None] if not lr_grid or m in FEATURE_METHODS else lr_grid
    return [Cell(m, d, b, s, lr) for d in datasets for m in methods for b in bits for lr in rates(m) for s in seeds]


def assess_grid(grid, args, extra):
    """{cell: Assessment}; with stale cells, one line each and exit 2 unless --rerun-stale sets them aside."""
    found = {cell: assess(cell, args.out, args.data, extra) for cell in grid}
    stale = [c for c, a in found.items() if a.state == "stale"]
    if stale and not args.rerun_stale:
        for cell in stale:
            print(f"error: cell {cell_label(cell)} ({run_folder(args.out, cell)}) is not the run asked for: "
                  f"{found[cell].reason}; run it again with --rerun-stale (the old folder is kept as "
                  f"<folder>{STALE_MARK}<time>) or pass a new --out", file=sys.stderr)
        raise SystemExit(2)
    for cell in stale:
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
        print(f"set aside {folder} as {aside} ({found[cell].reason}); running the cell again")
        found[cell] = found[cell]._replace(state="new")
    return found


def jobs_of(grid, found, args, extra, resume_auto=False):
    """The Job of each cell that is not finished (utils/grid_runner.Job)."""
    out = []
    for cell in grid:
        state = found[cell].state
        if state == "finished":
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
    print(f"# run folders under {out}; gather them with: python -m utils.table --collect {shlex.quote(out)}",
          file=sys.stderr)


def collected(args):
    """The records under --collect that match the flags given, and the methods, datasets, bits to show."""
    wanted = (("method", args.methods), ("dataset", args.dataset), ("bits", args.bits), ("seed", args.seeds))
    records = [r for r in collect(args.collect) if all(f is None or r[k] in f for k, f in wanted)]
    if args.lr_grid:  # only the rates of the grid asked for take part in the choice
        records = [r for r in records if r["method"] in FEATURE_METHODS or r["lr"] in args.lr_grid]
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
    return [(job.label, job.cmd, status) for job, status, _ in failures], signum


@exit_on_user_error
def main(argv=None):
    args, extra = parse_args(argv)
    methods, datasets = args.methods or list(METHODS), args.dataset or list(PAPER)
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
    failures = []
    where = (f"report: {os.path.join(report, 'table.{md,csv,json}')} and the figures table, pr_curves, "
             f"precision_at_k (.png, .pdf)")
    if args.collect:
        print(where)
        records, methods, datasets, bits = collected(args)
    else:
        found = assess_grid(grid, args, extra)
        if args.print_commands:
            return print_commands(jobs_of(grid, found, args, extra), args.out) or 0
        if args.slurm:
            path = grid_runner.write_sbatch(args.slurm, jobs_of(grid, found, args, extra, resume_auto=True),
                                                args.slurm_max_running, args.slurm_args)
            print(f"wrote {path}; submit it with:\n  sbatch {shlex.quote(path)}\nthen gather with the same "
                  f"table command (or python -m utils.table --collect {shlex.quote(args.out)})")
            return 0
        for cell, a in found.items():
            if a.state == "finished":
                print(f"skipped {cell_label(cell)}: finished ({os.path.join(run_folder(args.out, cell), 'results.json')})")
            elif a.state == "resume":
                print(f"resuming {cell_label(cell)}: {a.reason}")
        print(f"{where}\nrun folders: {os.path.join(args.out, '<dataset>', '<method>_<bits>bit[_lr<lr>]_seed<seed>')} "
              f"(each run's output in its log.txt)")
        failures, signum = run(jobs_of(grid, found, args, extra), args)
        if signum:
            print(f"\nstopped by signal {signum}; run the same command again to resume the grid", file=sys.stderr)
            return 128 + signum
        done = [run_folder(args.out, c) for c in grid if assess(c, args.out, args.data, extra).state == "finished"]
        records = [r for r in (read_result(os.path.join(f, "results.json")) for f in done) if r]
        bits = {c.bits for c in grid}
    if args.figure_bits is not None and args.figure_bits not in bits:
        raise UserError(f"--figure-bits {args.figure_bits} is not among the bits found: {sorted(bits)}")
    rows = aggregate(records, methods, ordered(datasets, list(PAPER)), sorted(set(bits)), args.lr_grid)
    for line in mixed_environments(rows):
        print(f"warning: {line}", file=sys.stderr)
    paths = write_report(report, rows, failures, args.lr_grid, args.figure_bits)
    print("wrote " + ", ".join(paths))
    if failures:
        print(f"{len(failures)} cell(s) failed:\n" + "\n".join(f"  {label} exit status {s}: {shlex.join(cmd)}"
                                                                for label, cmd, s in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
