"""From run records to the table's rows (seeds averaged, a learning rate chosen on val, the cost)
and to table.md, table.csv, table.json and the figures."""
import csv
import json
import os
import shlex
import statistics

from utils.errors import UserError
from utils.table.cells import FEATURE_IGNORED, FEATURE_METHODS, IGNORED, METHODS, grid_rates
from utils.table.identity import identity, ran_pipeline
from utils.training.checkpoint import write_atomically, write_json_atomic

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
HEADER = ("Test mAP@100 (%), R = 100, database = train split, queries = test split. Each cell: ours "
          "(mean ± sample std over seeds, n = seeds), the paper's Table I value and ours minus the paper's.")
LR_NOTE = ("With --lr-grid, each trained cell shows the learning rate chosen by the best mean val mAP@100 over "
           "seeds (lr_grid in table.json: {lr: val mAP@100 in %}); only the chosen rate's test number is shown.")
# --ties: which test mAP@100 (and precision-at-K curve) the table reports; one line of table.md says which.
TIES_NOTE = {
    "index": ("Ties: items at equal Hamming distance ranked by database index (--ties index; "
              "docs/method.md section 6)."),
    "expected": ("Ties: tie-aware, the expectation over random orders within each group of items at equal "
                 "Hamming distance (--ties expected; McSherry and Najork, ECIR 2008; docs/method.md section 6). "
                 "With --lr-grid the rates are still chosen on the index-order val mAP@100."),
}
COST_HEADER = ("Cost: training seconds of each cell's runs (all seeds and learning rates; the sum of their epoch "
               "times, x processes under DDP; LSH/ITQ: encoding the train split and the fit), on the device named.")


# The environment's parts in a row's settings (utils/table/identity.py): shown as "?" where a run
# did not record them.
ENV_KEYS = ("device", "world_size", "torch", "cpu_threads", "cuda", "cudnn", "amp_dtype", "timm")


def settings(record, lr_grid):
    """What a run computed with, but the seed (and the rate when a grid chooses it): the flags that can
    change its number, the pipeline that ran, the weights by content, and the environment (every part
    of a resumed run: values joined by +). Runs that differ in any of it are never averaged."""
    args = record["args"]
    skip = (FEATURE_IGNORED if record["method"] in FEATURE_METHODS else IGNORED) | {"seed", "pipeline"}
    if lr_grid:
        skip = skip | {"lr"}
    if args.get("weights_sha256"):  # the file's content, not its path
        skip = skip | {"weights"}
    out = {k: json.dumps(v) for k, v in args.items() if k not in skip}
    device = str(record.get("device")).split()[0] if record.get("device") else None
    out["pipeline"] = json.dumps(ran_pipeline(args, device) or args.get("pipeline"))
    trains = record["method"] not in FEATURE_METHODS
    parts = [identity(env, args, trains, record.get("device"), record.get("world_size_recorded"))
             for env in record.get("environments") or [{}]]
    for key in dict.fromkeys(k for part in parts for k in part):
        values = list(dict.fromkeys(part.get(key) for part in parts))
        out[key] = json.dumps(values[0] if len(values) == 1 else "+".join(map(str, values)))
    return tuple(sorted(out.items()))


def with_ties(records, ties):
    """The records with the test mAP@100 and precision-at-K curve that --ties names: as read (index
    order), or each run's test_tie_aware. The val score that chooses a rate stays the index-order one,
    as the best epoch was chosen, so both tables report the same runs. Runs whose results.json has no
    tie-aware metrics (made before runs recorded them) are refused, never reported as tie-aware."""
    if ties == "index":
        return records
    out, missing = [], []
    for r in records:
        if r.get("diverged"):  # no numbers of either kind
            out.append(r)
            continue
        try:
            with open(os.path.join(r["folder"], "results.json")) as fh:
                test = json.load(fh).get("test_tie_aware")
            value = 100.0 * float(test["mAP@100"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            missing.append(r["folder"])
            continue
        pk = test.get("precision_at_k")
        out.append(dict(r, value=value, pk={"k": pk["k"], "precision": pk["precision"]} if pk else None))
    if missing:
        raise UserError(f"--ties expected: {len(missing)} run(s) have no test_tie_aware in results.json (made before "
                        f"runs recorded it), e.g. {missing[0]}; train them again (move the folders aside first) or "
                        f"report --ties index")
    return out


def _groups(records, lr_grid):
    """{(method, dataset, bits): {settings: [records]}}; of two runs of one cell, the newer is kept."""
    out = {}
    for rec in sorted(records, key=lambda r: _mtime(r["folder"])):
        part = out.setdefault((rec["method"], rec["dataset"], rec["bits"]), {}).setdefault(settings(rec, lr_grid), [])
        same = [r for r in part if r["seed"] == rec["seed"] and (not lr_grid or r["lr"] == rec["lr"])]
        for old in same:
            print(f"warning: {old['folder']} and {rec['folder']} are the same cell; using the newer")
            part.remove(old)
        part.append(rec)
    return out


def _mtime(folder):
    try:
        return os.path.getmtime(os.path.join(folder, "results.json"))
    except OSError:
        return 0.0


def _label(method, part_settings, all_settings):
    """The paper's row name; with runs of one cell made with other flags, those flags too."""
    name = METHODS[method][0] if method in METHODS else method
    if len(all_settings) < 2:
        return name
    dicts = [dict(s) for s in all_settings]
    mine = dict(part_settings)
    differing = sorted(k for k in set().union(*dicts) if len({d.get(k) for d in dicts}) > 1)
    def shown(k):
        value = json.loads(mine[k]) if k in mine else None
        return "?" if value is None and (k in ENV_KEYS or k not in mine) else value
    return name + " [" + ", ".join(f"{k}={shown(k)}" for k in differing) + "]"


def choose_lr(runs, order=()):
    """(chosen lr, {lr: mean val mAP@100, or "diverged"}): among the rates with the most finished seeds,
    the best mean val score; a rate at which any seed diverged (a non-finite loss) is out of the choice
    (None when every rate is); a tie goes to the rate first in `order` (the --lr-grid). Test numbers
    play no part."""
    by_lr = {}
    for r in sorted(runs, key=lambda r: list(order).index(r["lr"]) if r["lr"] in order else len(order)):
        by_lr.setdefault(r["lr"], []).append(None if r.get("diverged") else r["val"])
    most = max(len(v) for v in by_lr.values())
    scores = {lr: "diverged" if None in v else statistics.mean(v) for lr, v in by_lr.items()}
    usable = [lr for lr, v in by_lr.items() if len(v) == most and scores[lr] != "diverged"]
    return (max(usable, key=lambda lr: scores[lr]) if usable else None), scores


def _mean_curve(runs, key, x, y):
    curves = [r[key] for r in runs if r.get(key)]
    curves = [c for c in curves if len(c[x]) == len(curves[0][x])] if curves else []
    if not curves:
        return None
    return {x: [statistics.mean(v) for v in zip(*(c[x] for c in curves))],
            y: [statistics.mean(v) for v in zip(*(c[y] for c in curves))]}


def aggregate(records, methods, datasets, bits, lr_grid=None):
    """One row per method x dataset x bits (and per set of other flags, when runs disagree): mean and sample
    std over seeds, the paper's value and the difference, the chosen learning rate, the cost, the curves."""
    groups, rows = _groups(records, lr_grid), []
    for m in methods:
        for d in datasets:
            for b in bits:
                parts = groups.get((m, d, b)) or {(): []}
                for part_settings, runs in parts.items():
                    rows.append(_row(m, d, b, runs, _label(m, part_settings, list(parts)), lr_grid))
    return rows


def _row(m, d, b, all_runs, label, lr_grid):
    lr, scores = (None, None)
    runs = all_runs
    if lr_grid and all_runs and m not in FEATURE_METHODS:
        lr, scores = choose_lr(all_runs, grid_rates(m, lr_grid))
        runs = [r for r in all_runs if r["lr"] == lr]
    runs = sorted(runs, key=lambda r: r["seed"])
    diverged = [r for r in runs if r.get("diverged")]  # without a grid: the row has no mean
    vals = [] if diverged else [r["value"] for r in runs]
    mean = statistics.mean(vals) if vals else None
    paper = PAPER.get(d, {}).get(m, {}).get(b)
    timed = [r for r in all_runs if r["seconds"] is not None]
    row = {"method": label, "key": m, "dataset": d, "bits": b, "n_seeds": len(vals), "mean": mean,
           "std": statistics.stdev(vals) if len(vals) > 1 else None, "paper": paper,
           "diff": None if mean is None or paper is None else mean - paper, "seeds": [r["seed"] for r in runs if not diverged],
           "runs": [{"seed": r["seed"], "lr": r["lr"], "value": r["value"], "val": r["val"], "folder": r["folder"]}
                    | ({"diverged": r["diverged"]} if r.get("diverged") else {}) for r in runs],
           "diverged": [f"seed {r['seed']}: {r['diverged']}" for r in diverged]
                       or (["every rate of the grid"] if lr_grid and all_runs and lr is None and m not in FEATURE_METHODS
                           else []),
           "seconds": sum(r["seconds"] * r["world_size"] for r in timed) if timed else None,
           "untimed_runs": len(all_runs) - len(timed),
           "devices": sorted({r["device"] for r in timed if r["device"]}),
           "environments": environments(runs),
           # Runs taken with --accept-environment although they ran in another environment: marked in table.md.
           "environment_accepted": [f"seed {r['seed']}" + ("" if r.get("lr") is None or not lr_grid else f" lr {r['lr']:g}")
                                    + f" {r['environment_accepted']}" for r in runs if r.get("environment_accepted")],
           "pr_curve": _mean_curve(runs, "pr", "recall", "precision"),
           "precision_at_k": _mean_curve(runs, "pk", "k", "precision")}
    if lr_grid:
        row["lr"] = lr
        row["lr_grid"] = None if scores is None else {repr(float(k)): v for k, v in scores.items()}
    return row


def environments(runs):
    """The distinct environments the runs of a row ran under, every resumed part of a run included, as
    far as they change numbers (utils/table/identity.py: the CPU threads only on the CPU, CUDA
    and cuDNN only on a GPU); runs from before the record are left out."""
    seen = {}
    for r in runs:
        trains = r["method"] not in FEATURE_METHODS
        for env in r.get("environments") or ():
            part = identity(env, r["args"], trains, r.get("device"), r.get("world_size_recorded"))
            seen.setdefault(json.dumps(part, sort_keys=True), part)
    return [seen[k] for k in sorted(seen)]


def mixed_environments(rows):
    """One line per row whose seeds ran under different environments: a spread that is not only
    the seeds'."""
    lines = []
    for r in rows:
        if len(r["environments"]) > 1:
            keys = [k for k in r["environments"][0] if len({str(e.get(k)) for e in r["environments"]}) > 1]
            seen = "; ".join(", ".join(f"{k} {e.get(k)}" for k in keys) for e in r["environments"])
            lines.append(f"{r['method']} on {r['dataset']} at {r['bits']} bits: its runs differ in {seen}, "
                         f"so its spread is not only the seeds'")
    return lines


ACCEPTED_MARK = "†"  # a cell whose run ran in another environment, taken with --accept-environment


def format_cell(row):
    ours = ("diverged" if row.get("diverged") else "—") if row["mean"] is None else f"{row['mean']:.2f}"
    if row["n_seeds"] > 1:
        ours += f" ± {row['std']:.2f} (n={row['n_seeds']})"
    if row.get("lr") is not None:
        ours += f" lr {row['lr']:g}"
    if row.get("environment_accepted"):
        ours += f" {ACCEPTED_MARK}"
    if row["paper"] is None:
        return ours
    return f"{ours} (paper {row['paper']:.2f}" + ("" if row["diff"] is None else f", {row['diff']:+.2f}") + ")"


def format_seconds(row):
    if row["seconds"] is None:
        return "—"
    text = f"{row['seconds']:.0f} s" if row["seconds"] >= 10 else f"{row['seconds']:.1f} s"
    return text + (f" (+{row['untimed_runs']} untimed)" if row["untimed_runs"] else "")


def totals(rows):
    """Seconds of the whole grid per device kind, and how many runs recorded none."""
    out = {}
    for r in rows:
        if r["seconds"] is not None:
            kind = " + ".join(r["devices"]) or "unknown device"
            out[kind] = out.get(kind, 0.0) + r["seconds"]
    return {"seconds_by_device": out, "untimed_runs": sum(r["untimed_runs"] for r in rows)}


def _grid(rows, cell_text):
    cols = list(dict.fromkeys((r["dataset"], r["bits"]) for r in rows))
    # As in the paper: the dataset named over its first bit length only ("NWPU-RESISC45 16 bits | 32 | ...").
    heads = [f"{d} {b} bits" if k == 0 or cols[k - 1][0] != d else str(b) for k, (d, b) in enumerate(cols)]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in dict.fromkeys(r["method"] for r in rows):
        cells = {(r["dataset"], r["bits"]): cell_text(r) for r in rows if r["method"] == label}
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "—") for c in cols) + " |")
    return lines


def write_md(path, rows, failures=(), lr_grid=None, ties="index"):
    lines = [HEADER, TIES_NOTE[ties]] + ([LR_NOTE] if lr_grid else []) + [""] + _grid(rows, format_cell)
    total = totals(rows)
    spent = ", ".join(f"{s:.0f} s on {k}" for k, s in total["seconds_by_device"].items()) or "no recorded time"
    lines += ["", COST_HEADER, ""] + _grid(rows, format_seconds) + ["", f"Total: {spent}"
              + (f" ({total['untimed_runs']} run(s) without a recorded time)" if total["untimed_runs"] else "") + "."]
    lines += [""] + [f"Note: {line}." for line in mixed_environments(rows)]
    lines += [f"Note: {ACCEPTED_MARK} {r['method']} on {r['dataset']} at {r['bits']} bits: accepted with "
              f"--accept-environment: {'; '.join(r['environment_accepted'])}." for r in rows if r.get("environment_accepted")]
    lines += [""] + [f"Failed: {label} (exit status {status}): `{shlex.join(cmd)}`" for label, cmd, status in failures]
    _write_text(path, "\n".join(lines).rstrip() + "\n")


def _num(x):
    return "" if x is None else round(x, 4)


def write_csv(path, rows, lr_grid=None):
    def write(fh):
        w = csv.writer(fh)
        w.writerow(["method", "dataset", "bits", "n_seeds", "mean", "std", "paper", "diff", "seeds", "key",
                    "lr", "seconds"])
        for r in rows:
            w.writerow([r["method"], r["dataset"], r["bits"], r["n_seeds"], _num(r["mean"]), _num(r["std"]),
                        _num(r["paper"]), _num(r["diff"]), " ".join(map(str, r["seeds"])), r["key"],
                        "" if r.get("lr") is None else r["lr"], _num(r["seconds"])])
    write_atomically(path, write, suffix=".csv", binary=False)


def write_json(path, rows, failures=(), lr_grid=None, made_by=None, ties="index"):
    """made_by: what made the report (the command, grid or --collect, and the options that shape the
    table), which a later --collect reads before it would replace the report (utils/table/command.py).
    ties: which test mAP@100 the rows hold (--ties)."""
    write_json_atomic(path, {"metric": HEADER, "ties": ties, "ties_note": TIES_NOTE[ties], "lr_grid": lr_grid,
                             "rows": rows, "cost": totals(rows),
                             "failed": [{"cell": label, "command": cmd, "exit_status": s} for label, cmd, s in failures],
                             "made_by": made_by})


def _write_text(path, text):
    write_atomically(path, lambda fh: fh.write(text), suffix=os.path.splitext(path)[1], binary=False)


def write_report(folder, rows, failures=(), lr_grid=None, figure_bits=None, made_by=None, ties="index"):
    """table.md/csv/json and the three figures (PNG and PDF); the paths written. ties: which test
    mAP@100 the rows hold (with_ties), said in table.md and table.json."""
    from utils.table.figures import pr_curves_figure, precision_at_k_figure, table_figure
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"table.{ext}") for ext in ("md", "csv", "json")]
    write_md(paths[0], rows, failures, lr_grid, ties)
    write_csv(paths[1], rows, lr_grid)
    write_json(paths[2], rows, failures, lr_grid, made_by, ties)
    bits = figure_bits or max((r["bits"] for r in rows), default=None)
    paths += table_figure(os.path.join(folder, "table"), rows, ties)
    paths += pr_curves_figure(os.path.join(folder, "pr_curves"), rows, bits)
    paths += precision_at_k_figure(os.path.join(folder, "precision_at_k"), rows, bits, ties)
    return paths
