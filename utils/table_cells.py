"""What one cell of the table is: its run folder, its command, and whether the run in that folder
was made with the flags the table asks for now (a cell is its settings, not its folder name), in
the environment its run would have now.

The flags asked for are those the cell's script WOULD run with: the table's command line for
the cell parsed in-process by that script's own parser (so every default is filled in), then
compared with the flags the run recorded (results.json "args", or the checkpoint's while the
run is unfinished). Flags that cannot change a number are not compared (IGNORED). Three are
compared by what they mean rather than as written: --pipeline by the pipeline that ran (auto
resolved as utils/flags.py choose_pipeline resolves it for this cell now), --weights by the
sha256 of the file, --split-file by the sha256 of the split's lists. The environment (device
type, processes, torch, CPU threads on the CPU, CUDA and cuDNN on a GPU, the --amp dtype, timm's
version for a timm backbone) is compared with the one a cell started now by the table would
get (cell_environment).
"""
import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
from collections import namedtuple

from utils.errors import UserError
from utils.flags import build_parser, choose_pipeline, image_extension

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
# The table sets these per cell (as the scripts' parsers name them: their dests); the same flag after --,
# in any spelling argparse takes for it, would silently put a run in the wrong cell.
RESERVED = ("data", "dataset", "dim", "seed", "out", "name", "resume", "method")
# Flags that cannot change a number: where the data and outputs are, how fast, how it resumes.
# (--split-file: the split's sha256, which runs record, is compared instead of its path.)
IGNORED = {"data", "out", "name", "resume", "num_workers", "device", "split_file"}
# ... and, for LSH and ITQ, the training flags: they fit once on the backbone's features.
FEATURE_IGNORED = IGNORED | {"epochs", "lr", "batch_size", "momentum", "weight_decay", "lr_step", "lr_gamma",
                             "eval_every", "amp", "topk"}
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


def flag_differences(method, wanted, recorded):
    """(--flag, asked, the run's) for each flag that can change a number and differs; epochs apart,
    and the pipeline and weights apart (pipeline_difference, weights_difference)."""
    parser = script_parser(method)
    names = {a.dest: next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions
             if any(o.startswith("--") for o in a.option_strings)}
    skip = (FEATURE_IGNORED if method in FEATURE_METHODS else IGNORED) | {"epochs"} | SEPARATE
    out = []
    for key, asked in wanted.items():
        if key in skip:
            continue
        if key not in recorded:  # a flag newer than the run: its default is what the run did
            if asked != parser.get_default(key):
                out.append((names.get(key, key), asked, "not recorded"))
            continue
        theirs = _normal(key, recorded[key], recorded)
        if asked != theirs:
            out.append((names.get(key, key), asked, theirs))
    return out


def ran_pipeline(recorded, device=None):
    """The pipeline a run computed with, or None where its record does not say. Runs record the
    one that --pipeline auto chose (utils/splits.py sets it before args.json, a checkpoint or
    results.json is written); a record that says auto was not made so, and is taken for pil only
    where choose_pipeline can have chosen nothing else (off CUDA, or multi-band input)."""
    value = recorded.get("pipeline")
    if value in ("pil", "cached"):
        return value
    if value == "auto" and ((device is not None and device != "cuda") or recorded.get("bands", 3) != 3):
        return "pil"
    return None


def resolve_pipeline(wanted, device):
    """(the pipeline the cell's run would choose now on this machine, why), as choose_pipeline chooses
    it in utils/splits.py: its image count from the split's lists (listed, not decoded); (None, why)
    where the dataset cannot be listed here and the choice depends on its size."""
    args = argparse.Namespace(pipeline=wanted.get("pipeline", "auto"), bands=wanted.get("bands", 3),
                              img_size=wanted.get("img_size", 256))
    if args.pipeline != "auto" or device != "cuda" or args.bands != 3:
        return choose_pipeline(args, _torch_device(device), 0)
    listing = current_split(wanted["data"], wanted["dataset"], wanted["imgEXT"], _normal("split_file", wanted.get(
        "split_file"), wanted))
    if listing is None:
        folder = os.path.join(wanted["data"], wanted["dataset"])
        return None, f"on CUDA it depends on the number of images, and {folder} cannot be listed here"
    # With --skip-bad-images the run counts the readable ones only: at most this many.
    return choose_pipeline(args, _torch_device(device), listing[1])


def _torch_device(kind):
    import torch
    return torch.device(kind if kind in ("cpu", "cuda", "mps") else "cpu")


def pipeline_difference(wanted, recorded, device_now, ran_device=None):
    """Why the pipeline the cell would run with is not the run's (None when it is). device_now: the
    device type the cell would get here, or None when the cells run elsewhere (--slurm,
    --print-commands), where --pipeline auto is the node's choice and any recorded one is taken."""
    if "pipeline" not in wanted:  # a script without the flag
        return None
    asked, ran = wanted["pipeline"], ran_pipeline(recorded, ran_device)
    if asked != "auto":
        return None if ran == asked else f"--pipeline {asked!r} asked, the run's {ran or recorded.get('pipeline')!r}"
    if device_now is None:
        return None
    now, why = resolve_pipeline(wanted, device_now)
    if ran is None:
        return (f"the run recorded --pipeline {recorded.get('pipeline', 'nothing')!r}, not the pipeline it ran "
                f"(runs of these scripts record the one auto chose), and auto gives {now or 'an unknown one'} here")
    if now is None:
        return f"--pipeline auto cannot be resolved here ({why}) to check the run's {ran}; pass -- --pipeline {ran}"
    return None if now == ran else f"--pipeline auto runs {now} here ({why}), the run ran {ran}"


def weights_difference(wanted, recorded):
    """Why the cell's --weights are not the run's (None when they are): a file by the sha256 of its
    content (runs record weights_sha256), torchgeo:ENUM and no weights by name."""
    from utils.run_state import file_sha256
    mine = _normal("weights", wanted.get("weights"), wanted)
    theirs = _normal("weights", recorded.get("weights"), recorded)
    files = [bool(w) and not w.startswith("torchgeo:") for w in (mine, theirs)]
    if not all(files):
        return None if (mine or None) == (theirs or None) else f"--weights {mine!r} asked, the run's {theirs!r}"
    recorded_sha = recorded.get("weights_sha256")
    try:
        now = file_sha256(mine)
    except OSError as err:
        return (f"--weights {mine} cannot be read now ({err.strerror}), so the run's weights "
                f"({'sha256 ' + recorded_sha[:12] + '...' if recorded_sha else theirs}) cannot be checked; put the "
                "file back or pass the weights to use")
    if not recorded_sha:
        return (f"the run recorded no sha256 of its --weights {theirs} (made before runs recorded it), so it cannot "
                f"be checked against {mine} now (sha256 {now[:12]}...)")
    if now != recorded_sha:
        return (f"--weights {mine} now holds other weights (sha256 {now[:12]}...) than the run's "
                f"(sha256 {recorded_sha[:12]}...)")
    return None


def split_difference(wanted, recorded):
    """Why the split the cell would use now is not the run's (None when it is): the sha256 of the
    lists, which runs record, where this machine can list the dataset; else the --split-file path."""
    mine, theirs = (_normal("split_file", f.get("split_file"), f) for f in (wanted, recorded))
    recorded_sha = recorded.get("split_sha256")
    now = None
    if recorded_sha and not wanted.get("skip_bad_images"):  # skipped images would change the lists
        listing = current_split(wanted["data"], wanted["dataset"], wanted["imgEXT"], mine)
        now = listing and listing[0]
    if now is not None:
        if now == recorded_sha:
            return None
        source = f"--split-file {mine}" if mine else f"the 70/10/20 split of {os.path.join(wanted['data'], wanted['dataset'])}"
        return f"the split now ({source}, sha256 {now[:12]}...) is not the run's (sha256 {recorded_sha[:12]}...)"
    return None if mine == theirs else f"--split-file {mine!r} asked, the run's {theirs!r}"


@functools.lru_cache(maxsize=None)
def current_split(data, dataset, ext, split_file):
    """(the sha256 of the train/val/test lists a run would use now, as utils.splits computes it, their
    number of images), or None where the dataset cannot be listed here (not downloaded yet, the
    digits demo not made)."""
    from utils.data import SceneDataset
    from utils.split_lists import lists_sha256, relative_lists
    try:
        sets = [SceneDataset(data, dataset, split, ext, split_file=split_file) for split in ("train", "val", "test")]
    except (UserError, OSError, ValueError):
        return None
    return lists_sha256(relative_lists(sets, os.path.join(data, dataset))), sum(len(s) for s in sets)


# What a cell's child process would see, asked of a child of the same interpreter with the table's
# variables (OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, ...): torch's default thread count is not
# OMP_NUM_THREADS as written (it is capped by the cores), and the table's own torch may have been
# set up under other variables.
_PROBE = r"""
import json, torch
cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
bf16 = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            bf16.append(bool(torch.cuda.is_bf16_supported()))
mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
print(json.dumps({"torch": str(torch.__version__), "cpu_threads": int(torch.get_num_threads()),
                  "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
                  "cudnn": None if cudnn is None else int(cudnn), "gpus_bf16": bf16, "mps": bool(mps)}))
"""


def probe():
    """What a child started now sees (torch, its threads, CUDA, cuDNN, each visible GPU's bfloat16);
    asked once per set of environment variables."""
    from utils.grid_runner import CHILD_ENV
    # Keyed by every variable but pytest's per-test one (a new probe per test would add seconds to each).
    env = {k: v for k, v in dict(os.environ, **CHILD_ENV).items() if k != "PYTEST_CURRENT_TEST"}
    return _probe(tuple(sorted(env.items())))


@functools.lru_cache(maxsize=8)
def _probe(env_items):
    why = "it did not start"
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=dict(env_items), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        raise UserError(f"cannot tell the environment the cells would run in: {sys.executable} -c 'import torch' "
                        f"failed ({why}); check that interpreter") from None


def cell_environment(wanted, trains=True, gpu=None):
    """The environment the cell's run would record, started now by the table here (as
    utils/run_state.py environment() records it): its child inherits the table's variables, with
    CUDA_VISIBLE_DEVICES=gpu under --gpus; one process (the table starts no torchrun)."""
    from utils.grid_runner import visible_gpus
    from utils.run_state import package_version, uses_timm
    seen = probe()
    name = str(wanted.get("device", "auto"))
    if name == "auto":  # as utils/flags.py select_device
        kind = "cuda" if (seen["gpus_bf16"] or gpu is not None) else "mps" if seen["mps"] else "cpu"
        index = 0
    else:
        kind = name.split(":")[0]
        index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
    if gpu is not None:  # the child sees that one GPU as cuda:0
        visible = visible_gpus()[0]
        index = visible.index(gpu) if gpu in visible else 0
    amp = None
    if trains and wanted.get("amp"):  # as utils/trainer.py Trainer chooses the autocast dtype
        bf16 = kind == "cpu" or (kind == "cuda" and index < len(seen["gpus_bf16"]) and seen["gpus_bf16"][index])
        amp = "bfloat16" if bf16 else "float16"
    try:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        world = 1
    env = {"torch": seen["torch"], "cpu_threads": seen["cpu_threads"], "cuda": seen["cuda"], "cudnn": seen["cudnn"],
           "device": kind, "world_size": world, "amp_dtype": amp}
    if uses_timm(wanted.get("model", "resnet18")):
        env["timm"] = package_version("timm")
    return env


def identity(env, args, trains=True, device=None, world_size=None):
    """The parts of a recorded environment that change a cell's numbers, None where the run did not
    record one: the device type, the processes (DDP: BatchNorm per rank's slice) and torch; the CPU
    threads on the CPU (on a GPU they do not do the arithmetic); CUDA and cuDNN on a GPU; the autocast
    dtype under --amp; timm's version for a timm backbone. device, world_size: what the results.json
    of a run older than those keys says (its "device", "world_size"). The GPU's model is not part of
    it: with cudnn.benchmark, runs on one GPU are not bit for bit the same either."""
    from utils.run_state import uses_timm
    kind = env.get("device") or (str(device).split()[0] if device else None) or _explicit_device(args)
    out = {"device": kind, "world_size": env.get("world_size", world_size), "torch": env.get("torch")}
    if kind in (None, "cpu"):
        out["cpu_threads"] = env.get("cpu_threads")
    if kind == "cuda":
        out["cuda"], out["cudnn"] = env.get("cuda"), env.get("cudnn")
    if trains and args.get("amp"):  # bfloat16 on a CPU: the trainer has always chosen so there
        out["amp_dtype"] = env.get("amp_dtype", "bfloat16" if kind == "cpu" else None)
    if uses_timm(args.get("model", "resnet18")):
        out["timm"] = env.get("timm")
    return out


def _explicit_device(args):
    name = str(args.get("device") or "auto").split(":")[0]
    return name if name in ("cpu", "cuda", "mps") else None


def environment_difference(now, recorded_envs, args, trains=True, device=None, world_size=None):
    """Why a run's environment (each of its parts: a resumed run records every one) is not the one
    the cell would run in now (`now`, cell_environment()), or ""."""
    if not recorded_envs:
        return "recorded no environment (made before runs recorded it)"
    mine = identity(now, args, trains)
    said = []
    for env in recorded_envs:
        theirs = identity(env, args, trains, device, world_size)
        for key, value in mine.items():
            if theirs.get(key) == value:
                continue
            text = (f"{key} not recorded (now {value})" if theirs.get(key) is None else
                    f"{key} {theirs[key]} (now {value})")
            if text not in said:
                said.append(text)
    return f"ran in another environment than a cell here would get: {', '.join(said)}" if said else ""


Assessment = namedtuple("Assessment", "state reason environment", defaults=("",))  # state: new, finished, resume, stale


def assess(cell, out, data=None, extra=(), gpu=None, here=True):
    """Whether the cell's folder holds the asked-for run: finished, resumable (interrupted, or
    asked for more epochs than it ran: resume takes a larger --epochs), new, or stale (made with
    other flags, or trained past the asked --epochs), with the reason; and, for a finished or
    resumable one, why its environment is not the one a cell started here now would get ("" when
    it is). gpu: the CUDA_VISIBLE_DEVICES a cell gets (--gpus); here=False: the cells run
    elsewhere (--slurm, --print-commands), whose environment is not known here: not compared."""
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
    now = cell_environment(wanted, trains, gpu) if here else None
    ran = int(record["args"].get("epochs", 0)) if record else None
    if ckpt is not None and (record is None or (trains and ckpt[0] > ran)):
        epoch, ckpt_args, envs, world = ckpt
        ran_device = next((e["device"] for e in reversed(envs) if e.get("device")), None) or _explicit_device(ckpt_args)
        why = _differences(cell, wanted, ckpt_args, "its checkpoint's", now, ran_device)
        if why:
            return Assessment("stale", why)
        if trains and epoch > wanted["epochs"]:
            return Assessment("stale", f"its checkpoint has trained {epoch} epochs, more than the --epochs "
                                       f"{wanted['epochs']} asked")
        env = environment_difference(now, envs, ckpt_args, trains, ran_device, world) if here else ""
        return Assessment("resume", "interrupted" if record is None else
                          f"its checkpoint has {epoch} epochs, more than its results.json's {ran}", env)
    envs = record.get("environments") or ([record["environment"]] if record.get("environment") else [])
    ran_device = (str(record["device"]).split()[0] if record.get("device") else None) or _explicit_device(record["args"])
    why = _differences(cell, wanted, record["args"], "the run's", now, ran_device)
    if why:
        return Assessment("stale", why)
    env = (environment_difference(now, envs, record["args"], trains, record.get("device"), record.get("world_size"))
           if here else "")
    if trains and wanted["epochs"] > ran:
        if ckpt is None:
            return Assessment("stale", f"--epochs {wanted['epochs']} asked, the run's {ran}, and it has no "
                                       f"checkpoint_last.pth to continue")
        if here and not env:  # the run goes on from its checkpoint, which holds every part's environment
            env = environment_difference(now, ckpt[2] or envs, ckpt[1], trains, ran_device, ckpt[3])
        return Assessment("resume", f"--epochs {wanted['epochs']} asked, the run has {ran}: trained on", env)
    if trains and wanted["epochs"] < ran:
        return Assessment("stale", f"--epochs {wanted['epochs']} asked, the run's {ran}")
    return Assessment("finished", "", env)


def _differences(cell, wanted, recorded, whose, now, ran_device):
    """Every way the recorded run is not the asked-for one, as one sentence ("" when none)."""
    parts = [f"{flag} {asked!r} asked, {whose} {theirs!r}"
             for flag, asked, theirs in flag_differences(cell.method, wanted, recorded)]
    parts += [p for p in (pipeline_difference(wanted, recorded, now and now["device"], ran_device),
                          weights_difference(wanted, recorded), split_difference(wanted, recorded)) if p]
    return ", ".join(parts)


def _read_json(path):
    try:
        with open(path) as fh:
            obj = json.load(fh)
        return obj if isinstance(obj, dict) and isinstance(obj.get("args"), dict) else None
    except (OSError, ValueError):
        return None


def _checkpoint_progress(path):
    """(epochs done, flags, environments, processes) of a checkpoint, read lazily (mmap: the weights stay
    on disk), or "unreadable". The processes: one RNG state per rank."""
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        rng = ckpt.get("rng")
        return (int(ckpt["epoch"]), dict(ckpt["args"]), list(ckpt.get("environments") or []),
                len(rng) if isinstance(rng, list) and rng else None)
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
                "world_size": int(res.get("world_size", 1)), "world_size_recorded": res.get("world_size"),
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
