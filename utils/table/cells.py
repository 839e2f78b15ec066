"""What one cell of the table is: its run folder, its command, the flags its script would run
with, and the records of finished runs (results.json). Whether a folder's run is the one asked
for is utils/table/identity.py's question.
"""
import argparse
import functools
import importlib.util
import json
import os
import sys
from collections import namedtuple

from utils import REPO_ROOT
from utils.errors import UserError
from utils.training.flags import build_parser, image_extension

BASELINES = os.path.join(REPO_ROOT, "baselines", "main.py")
# key -> (row label in the paper, script, "variant" of results.json); in the paper's row order.
METHODS = {
    "mb": ("CDNE(MB)", os.path.join(REPO_ROOT, "train_MB", "main.py"), "MB"),
    "mu": ("CDNE(MU)", os.path.join(REPO_ROOT, "train", "main.py"), "MU"),
    "dhcnn": ("DHCNN", BASELINES, "DHCNN"), "triplet": ("Triplet", BASELINES, "Triplet"),
    "dpsh": ("DPSH", BASELINES, "DPSH"),
    "itq": ("CNN+PCA-ITQ", BASELINES, "ITQ"),
    "lsh": ("CNN+LSH", BASELINES, "LSH"),
    # Not in the paper's Table I (no paper value): later methods, each as its authors' public code has it.
    "csq": ("CSQ", BASELINES, "CSQ"), "orthohash": ("OrthoHash", BASELINES, "OrthoHash"),
    "dpn": ("DPN", BASELINES, "DPN"), "greedyhash": ("GreedyHash", BASELINES, "GreedyHash"),
    "hashnet": ("HashNet", BASELINES, "HashNet"), "dch": ("DCH", BASELINES, "DCH"),
    "onehot": ("Classifier (one-hot)", BASELINES, "OneHot"),
}
VARIANT_KEYS = {variant.lower(): key for key, (_, _, variant) in METHODS.items()}
PAPER_METHODS = ("mb", "mu", "dhcnn", "triplet", "dpsh", "itq", "lsh")  # the paper's Table I: the default
FEATURE_METHODS = ("itq", "lsh")  # train nothing: one run whatever the learning rates or epochs
# The table sets these per cell (as the scripts' parsers name them: their dests); the same flag after --,
# in any spelling argparse takes for it, would silently put a run in the wrong cell.
RESERVED = ("data", "dataset", "dim", "seed", "out", "name", "resume", "method")
# Flags that cannot change a number: where the data and outputs are, how fast, how it resumes.
# (--split-file: the split's sha256, which runs record, is compared instead of its path.)
IGNORED = {"data", "out", "name", "resume", "num_workers", "device", "split_file"}
# ... and, for LSH and ITQ, the training flags: they fit once on the backbone's features.
FEATURE_IGNORED = IGNORED | {"epochs", "lr", "batch_size", "momentum", "weight_decay", "lr_step", "lr_gamma",
                             "eval_every", "amp", "topk", "optimizer", "nesterov", "backbone_lr_mult",
                             "lr_step_unit"}
# Compared on their own (differences): the pipeline as it resolves, the weights by their file's content.
SEPARATE = {"pipeline", "weights"}
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
        from baselines.main import DESCRIPTIONS
        from baselines.main import METHODS as BASELINE_METHODS
        parser = build_parser(DESCRIPTIONS[method], BASELINE_METHODS[method])
        parser.add_argument("--method", choices=sorted(BASELINE_METHODS), required=True)
    else:
        parser = build_parser(label, _method_class(script, variant))
    parser.prog = os.path.relpath(script, REPO_ROOT) + (f" --method {method}" if script == BASELINES else "")
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
    return {k: normal_flag(k, v, args) for k, v in args.items()}


def normal_flag(key, value, flags):
    if key == "imgEXT":  # recorded after the script resolved the dataset's own extension
        return image_extension(flags.get("dataset", ""), value)
    if key in ("weights", "split_file") and value and ":" not in value:  # a path; cells run from the repository
        return os.path.normpath(os.path.join(REPO_ROOT, value))
    return list(value) if isinstance(value, tuple) else value


def reserved_clash(methods, extra, lr_grid=False):
    """Why the flags after -- may not be passed (None when they may): one that a cell script's own parser
    takes for a flag the table sets per cell, abbreviations included (argparse takes --see for --seed)."""
    reserved = set(RESERVED) | ({"lr"} if lr_grid else set())
    if not any(str(word).startswith("-") for word in extra):
        return None
    for method in methods:
        parser = script_parser(method)
        clashes = [a for a in parser._actions if a.dest in _given_dests(parser, list(extra)) & reserved]
        if clashes:  # the first one as written
            where, word, action = min(_spelling(extra, a) + (a,) for a in clashes)
            full = max(action.option_strings, key=len)
            spelled = "" if word in action.option_strings else f" (argparse takes {word} for it)"
            return (f"{word} after -- clashes with the cell's own flag {full}{spelled}; use the table's "
                    f"--dataset/--bits/--seeds/--lr-grid/--data/--out instead")
    return None


def _spelling(words, action):
    """(position, word) of the word that argparse took for `action`: one of its flags, or a prefix of a long one."""
    for i, word in enumerate(map(str, words)):
        flag = word.split("=")[0]
        if flag in action.option_strings or (flag.startswith("--") and len(flag) > 2 and any(
                o.startswith("--") and o.startswith(flag) for o in action.option_strings)):
            return i, flag
    return len(words), max(action.option_strings, key=len)


def _given_dests(parser, argv):
    """The dests of the flags in argv as the parser matches them (its abbreviations too), whatever
    else is missing or unknown; the parser is left as it was."""
    saved = [(a, a.default, a.required) for a in parser._actions]
    try:
        for a in parser._actions:
            a.default, a.required = argparse.SUPPRESS, False
        known, _ = parser.parse_known_args(argv)
        return set(vars(known))
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required


def grid_rate(word):
    """One --lr-grid entry: a learning rate (0.01), or a factor of each method's own default rate (x10)."""
    text = str(word).strip()
    value = float(text[1:]) if text[:1] in "x×" else float(text)  # ValueError: argparse's one-line error
    if not value > 0 or value == float("inf"):
        raise ValueError(text)
    return f"x{value:g}" if text[:1] in "x×" else value


def grid_rates(method, lr_grid):
    """The learning rates a grid runs for `method` ([None]: its script's own, for LSH, ITQ and no grid):
    x<F> entries are F times the method's default --lr (its authors', methods' `defaults`)."""
    if not lr_grid or method in FEATURE_METHODS:
        return [None]
    default = script_parser(method).get_default("lr")
    rates = [float(f"{default * float(r[1:]):.6g}") if isinstance(r, str) else float(r) for r in lr_grid]
    return list(dict.fromkeys(rates))


def read_json(path):
    try:
        with open(path) as fh:
            obj = json.load(fh)
        return obj if isinstance(obj, dict) and isinstance(obj.get("args"), dict) else None
    except (OSError, ValueError):
        return None


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
                "world_size": int(res.get("world_size", 1)), "world_size_recorded": res.get("world_size"),
                "environments": res.get("environments") or ([res["environment"]] if res.get("environment") else []),
                "pr": {"precision": test["pr_precision"], "recall": test["pr_recall"]} if "pr_recall" in test else None,
                "pk": {"k": pk["k"], "precision": pk["precision"]} if pk else None,
                "folder": os.path.dirname(os.path.abspath(path))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"warning: skipped {path}: not a run's results.json ({type(err).__name__}: {err})")
        return None


def read_diverged(path):
    """A diverged.json (the trainer's record of a non-finite loss) as a record with no numbers; None if unusable."""
    res = read_json(path)
    try:
        args = res["args"]
        return {"method": VARIANT_KEYS.get(str(res["variant"]).lower(), str(res["variant"]).lower()),
                "dataset": str(args.get("dataset", res.get("dataset"))), "bits": int(args["dim"]),
                "seed": int(args.get("seed", 0)), "lr": args.get("lr"), "value": None, "val": None, "args": args,
                "diverged": f"loss {res.get('loss')} at step {res.get('step')} of epoch {res.get('epoch')}",
                "seconds": None, "device": res.get("device"), "world_size": int(res.get("world_size", 1)),
                "world_size_recorded": res.get("world_size"), "environments": res.get("environments") or [],
                "pr": None, "pk": None, "folder": os.path.dirname(os.path.abspath(path))}
    except (KeyError, TypeError, ValueError, AttributeError):
        print(f"warning: skipped {path}: not a run's diverged.json")
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
        elif "diverged.json" in files:
            paths.append(os.path.join(d, "diverged.json"))
    if aside:
        print(f"left out {aside} folder(s) set aside by --rerun-stale (*{STALE_MARK}*)")
    if not any(p.endswith("results.json") for p in paths):
        raise UserError(f"no results.json under {root}; pass the folder holding finished run folders")
    return [r for r in (read_result(p) if p.endswith("results.json") else read_diverged(p) for p in sorted(paths))
            if r]
