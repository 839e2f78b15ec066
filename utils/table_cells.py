"""What one cell of the table is: its run folder, its command, and whether the run in that folder
was made with the flags the table asks for now (a cell is its settings, not its folder name).

The flags asked for are those the cell's script WOULD run with: the table's command line for
the cell parsed in-process by that script's own parser (so every default is filled in), then
compared with the flags the run recorded (results.json "args", or the checkpoint's while the
run is unfinished). Flags that cannot change a number are not compared (IGNORED).
"""
import functools
import importlib.util
import json
import os
import sys
from collections import namedtuple

from utils.errors import UserError
from utils.flags import build_parser, image_extension

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
FEATURE_METHODS = ("itq", "lsh")  # train nothing: one run whatever the learning rates or epochs
# The table sets these per cell; the same flag after -- would silently put a run in the wrong cell.
RESERVED = ("--data", "--dataset", "--dim", "--seed", "--out", "--name", "--resume", "--method")
# Flags that cannot change a number: where the data and outputs are, how fast, how it resumes.
# (--split-file: the split's sha256, which runs record, is compared instead of its path.)
IGNORED = {"data", "out", "name", "resume", "num_workers", "device", "split_file"}
# ... and, for LSH and ITQ, the training flags: they fit once on the backbone's features.
FEATURE_IGNORED = IGNORED | {"epochs", "lr", "batch_size", "momentum", "weight_decay", "lr_step", "lr_gamma",
                             "eval_every", "amp", "topk"}
STALE_MARK = ".stale-"  # folders set aside by --rerun-stale: <folder>.stale-<time>

Cell = namedtuple("Cell", "method dataset bits seed lr", defaults=(None,))


def cell_name(cell):
    lr = "" if cell.lr is None else f"_lr{float(cell.lr)!r}"  # repr: two rates never share a folder
    return f"{cell.method}_{cell.bits}bit{lr}_seed{cell.seed}"


def cell_label(cell):
    return f"{cell.dataset} {cell_name(cell)}"


def run_folder(out, cell):
    return os.path.join(out, cell.dataset, cell_name(cell))


def command(cell, out, data=None, extra=(), resume=False):
    """The cell's command line; resume: False, True (its checkpoint_last.pth) or "auto"."""
    script = METHODS[cell.method][1]
    cmd = [sys.executable, script] + (["--method", cell.method] if script == BASELINES else [])
    cmd += (["--data", data] if data else []) + ["--dataset", cell.dataset, "--dim", str(cell.bits),
                                                 "--seed", str(cell.seed), "--out", os.path.join(out, cell.dataset),
                                                 "--name", cell_name(cell)]
    cmd += list(extra) + ([] if cell.lr is None else ["--lr", repr(float(cell.lr))])
    if resume:  # after the passthrough flags: a resumed run takes e.g. a larger --epochs from them
        cmd += ["--resume", "auto" if resume == "auto" else os.path.join(run_folder(out, cell), "checkpoint_last.pth")]
    return cmd


@functools.lru_cache(maxsize=None)
def script_parser(method):
    """The argument parser of the cell's script, built as the script builds it."""
    label, script, variant = METHODS[method]
    if script == BASELINES:
        from baselines.main import DESCRIPTIONS, METHODS as BASELINE_METHODS
        parser = build_parser(DESCRIPTIONS[method], BASELINE_METHODS[method])
        parser.add_argument("--method", choices=sorted(BASELINE_METHODS), required=True)
    else:
        parser = build_parser(label, _method_class(script, variant))
    parser.prog = os.path.relpath(script, REPO) + (f" --method {method}" if script == BASELINES else "")
    return parser


def _method_class(script, variant):
    """The Method subclass that `script` trains (its `name` is the variant), loaded without running it."""
    from utils.method import Method
    spec = importlib.util.spec_from_file_location(f"_table_script_{variant}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts train only under __main__
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Method) and getattr(obj, "name", None) == variant:
            return obj
    raise UserError(f"{script} defines no method named {variant!r}; the table cannot check its cells' flags")


def wanted_flags(cell, data=None, extra=()):
    """Every flag the cell's script would run with (defaults filled in), as the run records them."""
    parser = script_parser(cell.method)
    args = vars(parser.parse_args(command(cell, "/out", data, extra)[2:]))
    return {k: _normal(k, v, args) for k, v in args.items()}


def _normal(key, value, flags):
    if key == "imgEXT":  # recorded after the script resolved the dataset's own extension
        return image_extension(flags.get("dataset", ""), value)
    if key in ("weights", "split_file") and value and ":" not in value:  # a path; cells run from the repository
        return os.path.normpath(os.path.join(REPO, value))
    return list(value) if isinstance(value, tuple) else value


def flag_differences(method, wanted, recorded):
    """(--flag, asked, the run's) for each flag that can change a number and differs; epochs apart."""
    parser = script_parser(method)
    names = {a.dest: next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions
             if any(o.startswith("--") for o in a.option_strings)}
    skip = (FEATURE_IGNORED if method in FEATURE_METHODS else IGNORED) | {"epochs"}
    out = []
    for key, asked in wanted.items():
        if key in skip:
            continue
        if key not in recorded:  # a flag newer than the run: its default is what the run did
            if asked != parser.get_default(key):
                out.append((names.get(key, key), asked, "not recorded"))
            continue
        theirs = _normal(key, recorded[key], recorded)
        if key == "pipeline" and "auto" in (asked, theirs):  # auto picks per machine: same numbers either way
            continue
        if asked != theirs:
            out.append((names.get(key, key), asked, theirs))
    return out


def split_difference(wanted, recorded):
    """Why the split the cell would use now is not the run's (None when it is): the sha256 of the
    lists, which runs record, where this machine can list the dataset; else the --split-file path."""
    mine, theirs = (_normal("split_file", f.get("split_file"), f) for f in (wanted, recorded))
    recorded_sha = recorded.get("split_sha256")
    now = None
    if recorded_sha and not wanted.get("skip_bad_images"):  # skipped images would change the lists
        now = current_split_sha256(wanted["data"], wanted["dataset"], wanted["imgEXT"], mine)
    if now is not None:
        if now == recorded_sha:
            return None
        source = f"--split-file {mine}" if mine else f"the 70/10/20 split of {os.path.join(wanted['data'], wanted['dataset'])}"
        return f"the split now ({source}, sha256 {now[:12]}...) is not the run's (sha256 {recorded_sha[:12]}...)"
    return None if mine == theirs else f"--split-file {mine!r} asked, the run's {theirs!r}"


@functools.lru_cache(maxsize=None)
def current_split_sha256(data, dataset, ext, split_file):
    """The sha256 of the train/val/test lists a run would use now (as utils.splits computes it), or
    None where the dataset cannot be listed here (not downloaded yet, the digits demo not made)."""
    from utils.data import SceneDataset
    from utils.split_lists import lists_sha256, relative_lists
    try:
        sets = [SceneDataset(data, dataset, split, ext, split_file=split_file) for split in ("train", "val", "test")]
    except (UserError, OSError, ValueError):
        return None
    return lists_sha256(relative_lists(sets, os.path.join(data, dataset)))


Assessment = namedtuple("Assessment", "state reason")  # state: new, finished, resume, stale


def assess(cell, out, data=None, extra=()):
    """Whether the cell's folder holds the asked-for run: finished, resumable (interrupted, or
    asked for more epochs than it ran: resume takes a larger --epochs), new, or stale (made with
    other flags, or trained past the asked --epochs), with the reason."""
    folder = run_folder(out, cell)
    results, last = os.path.join(folder, "results.json"), os.path.join(folder, "checkpoint_last.pth")
    wanted = wanted_flags(cell, data, extra)
    trains = cell.method not in FEATURE_METHODS
    record = _read_json(results) if os.path.exists(results) else None
    ckpt = _checkpoint_progress(last) if os.path.exists(last) else None
    if ckpt == "unreadable":
        return Assessment("stale", f"its {last} cannot be read")
    if record is None and os.path.exists(results) and ckpt is None:
        return Assessment("stale", f"its {results} cannot be read and there is no checkpoint to resume")
    if record is None and ckpt is None:
        return Assessment("new", "")
    ran = int(record["args"].get("epochs", 0)) if record else None
    if ckpt is not None and (record is None or (trains and ckpt[0] > ran)):
        epoch, ckpt_args = ckpt
        diffs = flag_differences(cell.method, wanted, ckpt_args)
        if diffs or split_difference(wanted, ckpt_args):
            return Assessment("stale", _say(diffs, "its checkpoint's", split_difference(wanted, ckpt_args)))
        if trains and epoch > wanted["epochs"]:
            return Assessment("stale", f"its checkpoint has trained {epoch} epochs, more than the --epochs "
                                       f"{wanted['epochs']} asked")
        return Assessment("resume", "interrupted" if record is None else
                          f"its checkpoint has {epoch} epochs, more than its results.json's {ran}")
    diffs = flag_differences(cell.method, wanted, record["args"])
    if diffs or split_difference(wanted, record["args"]):
        return Assessment("stale", _say(diffs, "the run's", split_difference(wanted, record["args"])))
    if trains and wanted["epochs"] > ran:
        if ckpt is None:
            return Assessment("stale", f"--epochs {wanted['epochs']} asked, the run's {ran}, and it has no "
                                       f"checkpoint_last.pth to continue")
        return Assessment("resume", f"--epochs {wanted['epochs']} asked, the run has {ran}: trained on")
    if trains and wanted["epochs"] < ran:
        return Assessment("stale", f"--epochs {wanted['epochs']} asked, the run's {ran}")
    return Assessment("finished", "")


def _say(diffs, whose, split=None):
    return ", ".join([f"{flag} {asked!r} asked, {whose} {theirs!r}" for flag, asked, theirs in diffs]
                     + ([split] if split else []))


def _read_json(path):
    try:
        with open(path) as fh:
            obj = json.load(fh)
        return obj if isinstance(obj, dict) and isinstance(obj.get("args"), dict) else None
    except (OSError, ValueError):
        return None


def _checkpoint_progress(path):
    """(epochs done, flags) of a checkpoint, read lazily (mmap: the weights stay on disk), or "unreadable"."""
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"]), dict(ckpt["args"])
    except Exception:  # noqa: BLE001 - truncated, not a torch file, another format: not resumable
        return "unreadable"


def read_result(path):
    """One results.json as a record: the cell, our number (100 x test mAP@100), the val score that
    chooses a learning rate, the flags, the cost and the test curves; None if unusable."""
    try:
        with open(path) as fh:
            res = json.load(fh)
        args, variant = res["args"], str(res["variant"])
        test = res["test"]
        pk = test.get("precision_at_k")
        return {"method": VARIANT_KEYS.get(variant.lower(), variant.lower()),
                "dataset": str(args.get("dataset", res.get("dataset"))), "bits": int(args["dim"]),
                "seed": int(args.get("seed", 0)), "lr": args.get("lr"), "value": 100.0 * float(test["mAP@100"]),
                "val": 100.0 * float(res["val"]["mAP@100"]), "args": args,
                "seconds": res.get("train_seconds"), "device": res.get("device"),
                "world_size": int(res.get("world_size", 1)),
                "environments": res.get("environments") or ([res["environment"]] if res.get("environment") else []),
                "pr": {"precision": test["pr_precision"], "recall": test["pr_recall"]} if "pr_recall" in test else None,
                "pk": {"k": pk["k"], "precision": pk["precision"]} if pk else None,
                "folder": os.path.dirname(os.path.abspath(path))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"warning: skipped {path}: not a run's results.json ({type(err).__name__}: {err})")
        return None


def collect(root):
    """Every usable results.json under root, but not those of folders set aside by --rerun-stale."""
    paths, aside = [], 0
    for d, dirs, files in os.walk(root):
        kept = [x for x in dirs if STALE_MARK not in x]
        aside += len(dirs) - len(kept)
        dirs[:] = sorted(kept)
        if "results.json" in files:
            paths.append(os.path.join(d, "results.json"))
    if aside:
        print(f"left out {aside} folder(s) set aside by --rerun-stale (*{STALE_MARK}*)")
    if not paths:
        raise UserError(f"no results.json under {root}; pass the folder holding finished run folders")
    return [r for r in map(read_result, sorted(paths)) if r]
