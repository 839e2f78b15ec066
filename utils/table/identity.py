"""Whether the run in a cell's folder is the one the table asks for now: made with the flags the
cell's script would run with, in the environment its run would have now.

The flags asked for are those the cell's script WOULD run with: the table's command line for
the cell parsed in-process by that script's own parser (so every default is filled in), then
compared with the flags the run recorded (results.json "args", or the checkpoint's while the
run is unfinished). Flags that cannot change a number are not compared (cells.IGNORED). Three
are compared by what they mean rather than as written: --pipeline by the pipeline that ran
(auto resolved as utils/data/pipeline.py choose_pipeline resolves it for this cell now),
--weights by the sha256 of the file, --split-file by the sha256 of the split's lists. The
environment (device type, processes, torch, CPU threads on the CPU, CUDA and cuDNN on a GPU, the
--amp dtype, timm's version for a timm backbone) is compared with the one a cell started now by
the table would get (cell_environment).
"""
import functools
import json
import os
import subprocess
import sys
from collections import namedtuple

from utils import REPO_ROOT
from utils.data.pipeline import choose_pipeline
from utils.errors import UserError
from utils.table import cells  # cells.script_parser: looked up at the call (tests replace it)
from utils.table.cells import FEATURE_IGNORED, FEATURE_METHODS, IGNORED, SEPARATE, normal_flag, read_json, run_folder


def flag_differences(method, wanted, recorded):
    """(--flag, asked, the run's) for each flag that can change a number and differs; epochs apart,
    and the pipeline and weights apart (pipeline_difference, weights_difference)."""
    parser = cells.script_parser(method)
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
        theirs = normal_flag(key, recorded[key], recorded)
        if asked != theirs:
            out.append((names.get(key, key), asked, theirs))
    return out


def ran_pipeline(recorded, device=None):
    """The pipeline a run computed with, or None where its record does not say. Runs record the
    one that --pipeline auto chose (utils/data/splits.py sets it before args.json, a checkpoint or
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
    it in utils/data/splits.py: its image count from the split's lists (listed, not decoded); (None, why)
    where the dataset cannot be listed here and the choice depends on its size."""
    asked, bands, size = wanted.get("pipeline", "auto"), wanted.get("bands", 3), wanted.get("img_size", 256)
    if asked != "auto" or device != "cuda" or bands != 3:
        return choose_pipeline(asked, _torch_device(device), 0, bands, size)
    listing = current_split(wanted["data"], wanted["dataset"], wanted["imgEXT"], normal_flag("split_file", wanted.get(
        "split_file"), wanted))
    if listing is None:
        folder = os.path.join(wanted["data"], wanted["dataset"])
        return None, f"on CUDA it depends on the number of images, and {folder} cannot be listed here"
    # With --skip-bad-images the run counts the readable ones only: at most this many.
    return choose_pipeline(asked, _torch_device(device), listing[1], bands, size)


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
    from utils.training.records import file_sha256
    mine = normal_flag("weights", wanted.get("weights"), wanted)
    theirs = normal_flag("weights", recorded.get("weights"), recorded)
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
    mine, theirs = (normal_flag("split_file", f.get("split_file"), f) for f in (wanted, recorded))
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
    """(the sha256 of the train/val/test lists a run would use now, as utils.data.splits computes it, their
    number of images), or None where the dataset cannot be listed here (not downloaded yet, the
    digits demo not made)."""
    from utils.data.scenes import SceneDataset
    from utils.data.split_files import lists_sha256, relative_lists
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
    from utils.table.grid_runner import CHILD_ENV
    # Keyed by every variable but pytest's per-test one (a new probe per test would add seconds to each).
    env = {k: v for k, v in dict(os.environ, **CHILD_ENV).items() if k != "PYTEST_CURRENT_TEST"}
    return _probe(tuple(sorted(env.items())))


@functools.lru_cache(maxsize=8)
def _probe(env_items):
    why = "it did not start"
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=dict(env_items), cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300)
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        raise UserError(f"cannot tell the environment the cells would run in: {sys.executable} -c 'import torch' "
                        f"failed ({why}); check that interpreter") from None


def cell_environment(wanted, trains=True, gpu=None):
    """The environment the cell's run would record, started now by the table here (as
    utils/training/records.py environment() records it): its child inherits the table's variables, with
    CUDA_VISIBLE_DEVICES=gpu under --gpus; one process (the table starts no torchrun)."""
    from utils.table.grid_runner import visible_gpus
    from utils.training.records import package_version, uses_timm
    seen = probe()
    name = str(wanted.get("device", "auto"))
    if name == "auto":  # as utils/training/flags.py select_device
        kind = "cuda" if (seen["gpus_bf16"] or gpu is not None) else "mps" if seen["mps"] else "cpu"
        index = 0
    else:
        kind = name.split(":")[0]
        index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
    if gpu is not None:  # the child sees that one GPU as cuda:0
        visible = visible_gpus()[0]
        index = visible.index(gpu) if gpu in visible else 0
    amp = None
    if trains and wanted.get("amp"):  # as utils/training/trainer.py Trainer chooses the autocast dtype
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
    from utils.training.records import uses_timm
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


# state: new, finished, resume, stale, or diverged (a non-finite loss stopped it: the rate is out of the choice)
Assessment = namedtuple("Assessment", "state reason environment", defaults=("",))


def assess(cell, out, data=None, extra=(), gpu=None, here=True):
    """Whether the cell's folder holds the asked-for run: finished, resumable (interrupted, or
    asked for more epochs than it ran: resume takes a larger --epochs), new, or stale (made with
    other flags, or trained past the asked --epochs), with the reason; and, for a finished or
    resumable one, why its environment is not the one a cell started here now would get ("" when
    it is). gpu: the CUDA_VISIBLE_DEVICES a cell gets (--gpus); here=False: the cells run
    elsewhere (--slurm, --print-commands), whose environment is not known here: not compared."""
    folder = run_folder(out, cell)
    results, last = os.path.join(folder, "results.json"), os.path.join(folder, "checkpoint_last.pth")
    wanted = cells.wanted_flags(cell, data, extra)
    trains = cell.method not in FEATURE_METHODS
    record = read_json(results) if os.path.exists(results) else None
    ckpt = _checkpoint_progress(last) if os.path.exists(last) else None
    if ckpt == "unreadable":
        return Assessment("stale", f"its {last} cannot be read")
    diverged = read_json(os.path.join(folder, "diverged.json")) if record is None else None
    if diverged is not None:  # before its checkpoint: resuming would diverge again
        now = cell_environment(wanted, trains, gpu) if here else None
        why = _differences(cell, wanted, diverged["args"], "the diverged run's", now, diverged.get("device"))
        return Assessment("stale", why) if why else Assessment(
            "diverged", f"loss {diverged.get('loss')} at step {diverged.get('step')} of epoch {diverged.get('epoch')}")
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
