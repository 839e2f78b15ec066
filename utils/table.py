"""The paper's Table I: test mAP@100 (%) over datasets x bit lengths x methods, ours beside the paper's.

Each cell (method, dataset, bits, seed) is one training run in a fixed folder
<out>/<dataset>/<method>_<bits>bit_seed<seed>. A folder with results.json is finished and skipped,
one with only checkpoint_last.pth is resumed, any other is run fresh: the same command continues
an interrupted grid. Each run's output goes to <run folder>/log.txt. Writes table.md, table.csv,
table.json and table.png (mAP@100 against bits) to --report (default: --out).

Reproduce Table I on a GPU (the paper's settings are the scripts' defaults):

    python -m utils.table --dataset EuroSAT NWPU-RESISC45

The offline digits demo on a CPU (everything after -- goes to every training command):

    python -m utils.table --dataset digits --bits 16 32 64 --out runs/table_digits \\
        -- --no-pretrained --img-size 32 -b 64 --lr 0.01 --epochs 5 --num_workers 0

On a cluster: `--print-commands > cells.txt` prints the unfinished cells' commands, one a line,
to submit; `--collect runs/table` then gathers the finished runs.
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from collections import namedtuple

from utils.errors import UserError, exit_on_user_error
from utils.visualize import mAP_against_bits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = os.path.join(REPO, "baselines", "main.py")
# key -> (row label in the paper, script, "variant" of results.json); in the paper's row order.
METHODS = {
    "mb": ("CDNE(MB)", os.path.join(REPO, "train_MB", "main.py"), "MB"),
    "mu": ("CDNE(MU)", os.path.join(REPO, "train", "main.py"), "MU"),
    "dhcnn": ("DHCNN", BASELINES, "DHCNN"), "triplet": ("Triplet", BASELINES, "Triplet"),
    "dpsh": ("DPSH", BASELINES, "DPSH"),
    "itq": ("CNN+PCA-ITQ", BASELINES, "ITQ"),
    "lsh": ("CNN+LSH", BASELINES, "LSH"),
}
VARIANT_KEYS = {variant.lower(): key for key, (_, _, variant) in METHODS.items()}
PAPER_BITS = (16, 32, 64, 128)
_PAPER_ROWS = {  # the paper's Table I, mAP@100 in %, at PAPER_BITS
    "NWPU-RESISC45": {"mb": (99.69, 99.83, 99.91, 99.97), "mu": (99.19, 99.86, 99.87, 99.96),
                      "dhcnn": (98.07, 92.12, 94.24, 99.95), "triplet": (76.02, 84.21, 87.39, 89.25),
                      "dpsh": (29.94, 31.09, 42.51, 47.98), "itq": (63.35, 82.59, 87.54, 88.66),
                      "lsh": (32.98, 50.38, 67.82, 77.35)},
    "EuroSAT": {"mb": (99.89, 99.99, 99.97, 99.99), "mu": (99.93, 99.97, 100.00, 100.00),
                "dhcnn": (99.51, 99.29, 99.95, 99.38), "triplet": (94.94, 96.73, 97.22, 98.02),
                "dpsh": (57.10, 85.76, 98.81, 98.40), "itq": (92.08, 93.61, 93.44, 93.64),
                "lsh": (49.44, 69.37, 81.24, 87.89)},
}
PAPER = {ds: {m: dict(zip(PAPER_BITS, v)) for m, v in rows.items()} for ds, rows in _PAPER_ROWS.items()}
# The table sets these per cell; the same flag after -- would silently put a run in the wrong cell.
RESERVED = ("--data", "--dataset", "--dim", "--seed", "--out", "--name", "--resume", "--method")
HEADER = ("Test mAP@100 (%), R = 100, database = train split, queries = test split. Each cell: ours "
          "(mean ± sample std over seeds, n = seeds), the paper's Table I value and ours minus the paper's.")
Cell = namedtuple("Cell", "method dataset bits seed")


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
    p.add_argument("--data", help="dataset root passed to the scripts (default: theirs)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "table"), help="root of the run folders")
    p.add_argument("--collect", metavar="RUNS_DIR", help="only gather the results.json files under RUNS_DIR")
    p.add_argument("--print-commands", action="store_true", help="print the unfinished cells' commands, run nothing")
    p.add_argument("--report", metavar="DIR", help="where table.md/csv/json/png go (default: --out, or RUNS_DIR)")
    args = p.parse_args(argv)
    for name in ("dataset", "bits", "methods", "seeds"):  # a name given twice is one cell, not two runs of it
        if getattr(args, name):
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    bad = [m for m in args.methods or () if m not in METHODS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}; choose from {' '.join(METHODS)}")
    if any(b <= 0 for b in args.bits or ()):
        raise UserError(f"--bits must be positive code lengths, got {args.bits}; e.g. --bits 16 32 64 128")
    clash = [f for f in extra if f.split("=")[0] in RESERVED]
    if clash:
        raise UserError(f"{clash[0]} after -- clashes with the cell's own flag; use the table's "
                        f"--dataset/--bits/--seeds/--data/--out instead")
    if args.collect and args.print_commands:
        raise UserError("--collect runs nothing and prints no commands; drop --print-commands or --collect")
    if args.collect and not os.path.isdir(args.collect):
        raise UserError(f"--collect folder {args.collect} does not exist; pass the folder holding the run folders")
    args.out = os.path.abspath(args.out)
    args.data = os.path.abspath(args.data) if args.data else None  # printed commands work from anywhere
    return args, extra


def cells(methods, datasets, bits, seeds):
    return [Cell(m, d, b, s) for d in datasets for m in methods for b in bits for s in seeds]


def cell_name(cell):
    return f"{cell.method}_{cell.bits}bit_seed{cell.seed}"


def run_folder(out, cell):
    return os.path.join(out, cell.dataset, cell_name(cell))


def folder_status(folder):
    if os.path.isfile(os.path.join(folder, "results.json")):
        return "finished"
    if os.path.isfile(os.path.join(folder, "checkpoint_last.pth")):
        return "interrupted"
    return "new"


def command(cell, out, data=None, extra=(), resume=False):
    script = METHODS[cell.method][1]
    cmd = [sys.executable, script] + (["--method", cell.method] if script == BASELINES else [])
    cmd += (["--data", data] if data else []) + ["--dataset", cell.dataset, "--dim", str(cell.bits),
                                                 "--seed", str(cell.seed), "--out", os.path.join(out, cell.dataset),
                                                 "--name", cell_name(cell)] + list(extra)
    if resume:  # after the passthrough flags: a resumed run takes e.g. a larger --epochs from them
        cmd += ["--resume", os.path.join(run_folder(out, cell), "checkpoint_last.pth")]
    return cmd


def run_cell(cmd, log_path):
    """Run one cell with its output appended to log_path (a resumed cell keeps the earlier log); exit status."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    # Progress bars redrawn every 10 s, not 10 times a second: a long run's log stays small (tail -f shows them).
    env = dict(os.environ, TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # the run got the Ctrl-C too and saves its checkpoint: let it, so the cell resumes
            raise


def log_tail(path, n=3):
    with open(path, errors="replace") as fh:
        return [line.rstrip() for line in fh if line.strip()][-n:]


def run_grid(grid, out, data, extra):
    """Run every unfinished cell; the (cell, command, exit status) of those that failed."""
    from tqdm import tqdm
    failures = []
    bar = tqdm(grid, unit="cell", desc="table", dynamic_ncols=True)
    for cell in bar:
        folder, label = run_folder(out, cell), f"{cell.dataset} {cell_name(cell)}"
        bar.set_description(label)
        state = folder_status(folder)
        if state == "finished":
            tqdm.write(f"skipped {label}: finished ({os.path.join(folder, 'results.json')})")
            continue
        cmd, log = command(cell, out, data, extra, resume=state == "interrupted"), os.path.join(folder, "log.txt")
        tqdm.write(f"{'resuming' if state == 'interrupted' else 'running'} {label}; output in {log}")
        status = run_cell(cmd, log)
        if status:
            failures.append((cell, cmd, status))
            tqdm.write(f"FAILED {label} (exit status {status}): {shlex.join(cmd)}\n  "
                       + "\n  ".join(log_tail(log)))
        else:
            record = read_result(os.path.join(folder, "results.json"))
            tqdm.write(f"finished {label}: test mAP@100 {record['value']:.2f}%" if record else f"finished {label}")
    bar.close()
    return failures


def read_result(path):
    """The cell and our number (100 x test mAP@100) of one results.json, from its contents; None if unusable."""
    try:
        with open(path) as fh:
            res = json.load(fh)
        args, variant = res["args"], str(res["variant"])
        return {"method": VARIANT_KEYS.get(variant.lower(), variant.lower()),
                "dataset": str(args.get("dataset", res.get("dataset"))), "bits": int(args["dim"]),
                "seed": int(args.get("seed", 0)), "value": 100.0 * float(res["test"]["mAP@100"]),
                "folder": os.path.dirname(os.path.abspath(path))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"warning: skipped {path}: not a run's results.json ({type(err).__name__}: {err})")
        return None


def collect(root):
    paths = sorted(os.path.join(d, "results.json") for d, _, files in os.walk(root) if "results.json" in files)
    if not paths:
        raise UserError(f"no results.json under {root}; pass the folder holding finished run folders")
    by_cell = {}
    for path in sorted(paths, key=os.path.getmtime):  # a cell found twice keeps its newest run
        rec = read_result(path)
        if rec is None:
            continue
        key = (rec["method"], rec["dataset"], rec["bits"], rec["seed"])
        if key in by_cell:
            print(f"warning: {by_cell[key]['folder']} and {rec['folder']} are the same cell; using the newer")
        by_cell[key] = rec
    return list(by_cell.values())


def ordered(found, paper_order):
    """Known names in the paper's order, then the others in the order given."""
    return [x for x in paper_order if x in found] + [x for x in dict.fromkeys(found) if x not in paper_order]


def aggregate(records, methods, datasets, bits):
    """One row per method x dataset x bits: mean, sample std, paper value and difference, per-seed values."""
    rows = []
    for m in methods:
        for d in datasets:
            for b in bits:
                runs = sorted((r for r in records if (r["method"], r["dataset"], r["bits"]) == (m, d, b)),
                              key=lambda r: r["seed"])
                vals = [r["value"] for r in runs]
                mean = statistics.mean(vals) if vals else None
                std = statistics.stdev(vals) if len(vals) > 1 else None
                paper = PAPER.get(d, {}).get(m, {}).get(b)
                rows.append({"method": METHODS[m][0] if m in METHODS else m, "key": m, "dataset": d, "bits": b,
                             "n_seeds": len(vals), "mean": mean, "std": std, "paper": paper,
                             "diff": None if mean is None or paper is None else mean - paper,
                             "seeds": [r["seed"] for r in runs],
                             "runs": [{"seed": r["seed"], "value": r["value"], "folder": r["folder"]} for r in runs]})
    return rows


def format_cell(row):
    ours = "—" if row["mean"] is None else f"{row['mean']:.2f}"
    if row["n_seeds"] > 1:
        ours += f" ± {row['std']:.2f} (n={row['n_seeds']})"
    if row["paper"] is None:
        return ours
    return f"{ours} (paper {row['paper']:.2f}" + ("" if row["diff"] is None else f", {row['diff']:+.2f}") + ")"


def write_md(path, rows, failures=()):
    cols = list(dict.fromkeys((r["dataset"], r["bits"]) for r in rows))
    # As in the paper: the dataset named over its first bit length only ("NWPU-RESISC45 16 bits | 32 | ...").
    heads = [f"{d} {b} bits" if k == 0 or cols[k - 1][0] != d else str(b) for k, (d, b) in enumerate(cols)]
    lines = [HEADER, "", "| method | " + " | ".join(heads) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for label in dict.fromkeys(r["method"] for r in rows):
        cells_ = {(r["dataset"], r["bits"]): format_cell(r) for r in rows if r["method"] == label}
        lines.append(f"| {label} | " + " | ".join(cells_[c] for c in cols) + " |")
    lines += [""] + [f"Failed: {c.method} {c.dataset} {c.bits} bits seed {c.seed} (exit status {s}): "
                     f"`{shlex.join(cmd)}`" for c, cmd, s in failures]
    with open(path, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")


def _num(x):
    return "" if x is None else round(x, 4)


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "dataset", "bits", "n_seeds", "mean", "std", "paper", "diff", "seeds", "key"])
        for r in rows:
            w.writerow([r["method"], r["dataset"], r["bits"], r["n_seeds"], _num(r["mean"]), _num(r["std"]),
                        _num(r["paper"]), _num(r["diff"]), " ".join(map(str, r["seeds"])), r["key"]])


def write_json(path, rows, failures=()):
    with open(path, "w") as fh:
        json.dump({"metric": HEADER, "rows": rows,
                   "failed": [{"cell": c._asdict(), "command": cmd, "exit_status": s} for c, cmd, s in failures]},
                  fh, indent=2)


def write_report(folder, rows, failures=()):
    os.makedirs(folder, exist_ok=True)
    paths = {ext: os.path.join(folder, f"table.{ext}") for ext in ("md", "csv", "json", "png")}
    write_md(paths["md"], rows, failures)
    write_csv(paths["csv"], rows)
    write_json(paths["json"], rows, failures)
    mAP_against_bits(paths["png"], rows)
    return paths


def print_commands(grid, out, data, extra):
    """One shell line per unfinished cell on stdout (nothing else there, for a scheduler)."""
    for cell in grid:
        state = folder_status(run_folder(out, cell))
        if state != "finished":
            print(shlex.join(command(cell, out, data, extra, resume=state == "interrupted")))
    print(f"# run folders under {out}; gather them with: python -m utils.table --collect {shlex.quote(out)}",
          file=sys.stderr)


def collected(args):
    """The records under --collect that match the flags given, and the methods, datasets, bits to show."""
    wanted = (("method", args.methods), ("dataset", args.dataset), ("bits", args.bits), ("seed", args.seeds))
    records = [r for r in collect(args.collect) if all(f is None or r[k] in f for k, f in wanted)]
    if not records:
        raise UserError(f"no results under {args.collect} match the --dataset/--bits/--methods/--seeds given; "
                        f"drop or widen them")
    return (records, ordered(args.methods or [r["method"] for r in records], list(METHODS)),
            args.dataset or [r["dataset"] for r in records], args.bits or {r["bits"] for r in records})


@exit_on_user_error
def main(argv=None):
    args, extra = parse_args(argv)
    methods, datasets = args.methods or list(METHODS), args.dataset or list(PAPER)
    grid = cells(methods, datasets, args.bits or list(PAPER_BITS), args.seeds or [0])
    if args.print_commands:
        return print_commands(grid, args.out, args.data, extra) or 0
    report = os.path.abspath(args.report or args.collect or args.out)
    print(f"report: {os.path.join(report, 'table.{md,csv,json,png}')}")
    failures = []
    if args.collect:
        records, methods, datasets, bits = collected(args)
    else:
        print(f"run folders: {os.path.join(args.out, '<dataset>', '<method>_<bits>bit_seed<seed>')} "
              f"(each run's output in its log.txt)")
        try:
            failures = run_grid(grid, args.out, args.data, extra)
        except KeyboardInterrupt:
            print("\ninterrupted; run the same command again to resume the grid", file=sys.stderr)
            return 130
        done = [run_folder(args.out, c) for c in grid if folder_status(run_folder(args.out, c)) == "finished"]
        records = [r for r in (read_result(os.path.join(f, "results.json")) for f in done) if r]
        bits = {c.bits for c in grid}
    rows = aggregate(records, methods, ordered(datasets, list(PAPER)), sorted(set(bits)))
    paths = write_report(report, rows, failures)
    print("wrote " + ", ".join(paths.values()))
    if failures:
        print(f"{len(failures)} cell(s) failed:\n" + "\n".join(f"  exit status {s}: {shlex.join(cmd)}"
                                                                for _, cmd, s in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
