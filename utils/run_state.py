"""The run folder and what a checkpoint holds: everything needed to continue a run exactly
(network, method state, optimiser, schedule, progress, best score, every rank's RNG states),
and a fingerprint of the method's shared state from every rank."""
import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

import torch

from . import checkpoint as ckpt_io
from . import distributed as dist
from .errors import UserError


class RunFolder:
    """<out>/<name>/ with args.json, tensorboard/, checkpoint_last.pth, checkpoint_best.pth
    and results.json. Chosen and checked on rank 0; every rank gets the same folder or the
    same error."""

    def __init__(self, args, method_name):
        answer = [self._make(args, method_name) if dist.is_main() else None]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(answer, src=0)
        self.path, error, self.created = answer[0]
        if error:
            raise UserError(error)
        self.last = os.path.join(self.path, "checkpoint_last.pth")
        self.best = os.path.join(self.path, "checkpoint_best.pth")
        self.results = os.path.join(self.path, "results.json")
        self.tensorboard = os.path.join(self.path, "tensorboard")

    @staticmethod
    def _make(args, method_name):
        """(folder, None, whether this run created it), or (None, the problem, False) without raising."""
        if args.resume:
            path = os.path.dirname(os.path.abspath(args.resume))
        else:
            name = args.name or f"{method_name}_{args.dataset}_{args.model}_{args.dim}bit_" + time.strftime("%Y%m%d-%H%M%S")
            path = os.path.join(args.out, name)
            if os.path.exists(os.path.join(path, "checkpoint_last.pth")):
                return None, (f"run folder {path} already holds a checkpoint; continue it with: "
                              f"{resume_command(method_name, os.path.join(path, 'checkpoint_last.pth'))} "
                              "(or --resume auto), or choose another --name"), False
        created = not os.path.exists(path)
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".write-test")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
        except OSError as err:
            return None, f"cannot write to the run folder {path} ({err.strerror}); pass a writable --out", False
        return path, None, created

    def announce(self):
        print(f"run folder:   {self.path}\n"
              f"  tensorboard: tensorboard --logdir {self.tensorboard}\n"
              f"  checkpoints: {self.last}, {self.best}\n"
              f"  results:     {self.results}")

    def discard_if_unused(self):
        """Remove the folder this run created when the run failed before its first checkpoint:
        only what the trainer writes first (args.json, tensorboard/), and the folder if that
        leaves it empty. A folder with a checkpoint or results, or one that existed before, stays."""
        if not (dist.is_main() and self.created) or any(
                os.path.exists(p) for p in (self.last, self.best, self.results)):
            return
        if os.path.isfile(os.path.join(self.path, "args.json")):
            os.remove(os.path.join(self.path, "args.json"))
        shutil.rmtree(self.tensorboard, ignore_errors=True)
        try:
            os.rmdir(self.path)
        except OSError:  # something else is in there: not ours to remove
            pass

    def save(self, state, best=False):
        if dist.is_main():
            try:
                ckpt_io.atomic_save(state, self.last)
                if best:
                    ckpt_io.atomic_duplicate(self.last, self.best)
            except UserError as err:  # the last good checkpoint is still there: say how to go on from it
                if not os.path.isfile(self.last):
                    raise
                variant = state.get("config", {}).get("variant")
                how = resume_command(variant, self.last) if variant else f"--resume {self.last}"
                raise UserError(f"{err}; then continue the run with: {how}") from None


# The script that trains each method (utils.trainer.run's `script`), for messages that say how to go on.
SCRIPTS = {"MB": "train_MB/main.py", "MU": "train/main.py"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_of(variant):
    """The command (script and flags) that trains `variant`, e.g. 'train_MB/main.py' or
    'baselines/main.py --method dpsh', the script's path relative to the working directory."""
    script, *flags = (SCRIPTS.get(variant) or f"baselines/main.py --method {variant.lower()}").split()
    return " ".join([shlex.quote(os.path.relpath(os.path.join(REPO_ROOT, script)))] + flags)


def interpreter():
    """The running interpreter by its absolute path, shell-quoted: a printed command works outside an
    activated virtual environment too (a bare `python` may be another one, or none)."""
    return shlex.quote(os.path.abspath(sys.executable))


def resume_command(variant, checkpoint):
    """The full command line that continues a run of `variant` from `checkpoint`."""
    return f"{interpreter()} {script_of(variant)} --resume {shlex.quote(checkpoint)}"


def check_variant(ckpt, variant, path):
    """Refuse a checkpoint made by another method's script, naming the one that made it
    (before anything else looks at it: a finished run of another method is not "finished" here)."""
    made = ckpt.get("config", {}).get("variant")
    if made is not None and made != variant:
        raise UserError(f"checkpoint {path} was made by {script_of(made)} ({made}), not by this script "
                        f"({variant}); continue it with: {resume_command(made, path)}")


def run_config(args, method_name, splits):
    """What must match for a checkpoint to continue a run or to be used for retrieval."""
    config = {"variant": method_name, "arch": args.model, "dim": args.dim, "num_classes": len(splits.classes),
              "in_channels": args.bands, "dataset": args.dataset, "num_samples": len(splits.train),
              "img_size": args.img_size, "classes": splits.classes}
    if getattr(splits, "band_stats", None):
        config["band_mean"], config["band_std"] = splits.band_stats
    if getattr(splits, "input", None):  # bands, their order and normalisation (utils/weights.py input_spec)
        config["input"] = splits.input
    return config


def write_json_atomic(path, obj):
    """JSON written atomically: a kill mid-write leaves the previous file (or none), never half
    a file that the table cannot read."""
    ckpt_io.write_atomically(path, lambda fh: json.dump(obj, fh, indent=2), suffix=".json", binary=False)


def device_kind(device):
    """What a run's seconds were spent on: "cpu", or "cuda" with the GPU's name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def environment(device=None, amp_dtype=None, model=None):
    """What besides the flags can move a run's numbers: the torch version, the CPU threads of the
    process (the order of float sums in its kernels), CUDA and cuDNN, the device type it computed
    on, the processes (DDP: BatchNorm sees each rank's slice), the autocast dtype that --amp gave
    (bfloat16 or float16, chosen by the GPU) and, for a timm backbone, timm's version (its model
    code and its default pretrained tag). The table compares these with the cells' environment
    (utils/table_cells.py environment_difference)."""
    # Plain str and int: a checkpoint holds nothing else (torch.__version__ is a TorchVersion).
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env = {"torch": str(torch.__version__), "cpu_threads": int(torch.get_num_threads()),
           "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
           "cudnn": None if cudnn is None else int(cudnn),
           "device": None if device is None else str(device.type), "world_size": int(dist.world_size()),
           "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", "")}
    if model is not None and uses_timm(model):
        env["timm"] = package_version("timm")
    return env


def uses_timm(model):
    from .backbones import TORCHVISION_NAMES
    return model not in TORCHVISION_NAMES


def package_version(name):
    from importlib import metadata
    try:
        return str(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def file_sha256(path):
    """The sha256 (hex) of a file, read once per file and state: cached by its path, size and
    modification time, so a table of many cells with one --weights file reads it once, and a
    file overwritten since is read again."""
    st = os.stat(path)
    return _file_sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(weights):
    """What identifies --weights by content: the sha256 of a file; None for no file and for
    torchgeo:ENUM (identified by its name: its download is checked against the hash torch.hub
    verifies) and for a path that is not a file (the backbone's loader says so in one line)."""
    if not weights or weights.startswith("torchgeo:") or not os.path.isfile(weights):
        return None
    return file_sha256(weights)


def plain_args(args):
    """The flags as plain data (what args.json and checkpoints record)."""
    def plain(v):
        return isinstance(v, (str, int, float, bool, type(None))) or (
            isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if plain(v)}


# Flags that may differ from the checkpoint's when a run is resumed: they change how the run
# goes on, not what it computes (--data: the same dataset, moved; --out/--name: where to find it;
# --split-file: the same split, moved, which utils.splits checks by the hash the run recorded).
RESUME_OVERRIDES = ("epochs", "num_workers", "device", "eval_every", "data", "out", "name", "resume", "split_file")


def given_flags(parser, argv):
    """The dests of the flags that appear on the command line (not left at their defaults)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]


def resume_args(parser, argv, args):
    """The flags of a resumed run: the checkpoint's, with the safe overrides given on the
    command line; another value of any other flag is refused. `--resume auto` picks the
    run folder's checkpoint_last.pth when it exists and starts fresh otherwise.
    Returns the flags and the loaded checkpoint (None for a fresh start)."""
    if args.resume == "auto":
        if not args.name:
            raise UserError("--resume auto needs --name: the run folder under --out to continue, or to create")
        last = os.path.join(args.out, args.name, "checkpoint_last.pth")
        if not os.path.exists(last):
            args.resume = ""
            return args, None
        args.resume = last
    if not args.resume:
        return args, None
    ckpt = ckpt_io.load_checkpoint(args.resume)
    saved = ckpt.get("args", {})
    given = given_flags(parser, argv)
    names = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}

    def differs(k):  # against the stored value, which is the resolved one
        value = getattr(args, k)
        if k == "pipeline" and value == "auto":
            return False
        return (value.lstrip(".") if k == "imgEXT" and value else value) != saved[k]

    clashes = [f"{names.get(k, k)} {getattr(args, k)!r} (the run's: {saved[k]!r})" for k in sorted(given)
               if k not in RESUME_OVERRIDES and k in saved and differs(k)]
    if clashes:
        raise UserError(f"checkpoint {args.resume} continues a run with other flags: {', '.join(clashes)}; "
                        "drop them to resume with the run's own, or start a new run with another --name")
    merged = {**vars(args), **saved, **{k: getattr(args, k) for k in given if k in RESUME_OVERRIDES}}
    return argparse.Namespace(**merged), ckpt


def training_state(trainer):
    """The checkpoint of a trainer. Collective in distributed runs: every rank takes part."""
    # Each rank has its own augmentation RNG: keep them all.
    per_rank = {"rng": ckpt_io.rng_state(), "fingerprint": trainer.method.fingerprint()}
    gathered = [per_rank]
    if dist.is_distributed():
        gathered = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, per_rank)
        if any(g["fingerprint"] != gathered[0]["fingerprint"] for g in gathered):
            raise RuntimeError(f"the method's state differs between ranks: {[g['fingerprint'] for g in gathered]}")
    return {"format": ckpt_io.FORMAT, "version": 2, "config": trainer.config, "args": plain_args(trainer.args),
            "epoch": trainer.epoch, "step": trainer.step_in_epoch, "epoch_sums": trainer.epoch_sums,
            "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "best": trainer.best, "train_seconds": trainer.train_seconds,
            "environments": trainer.environments,
            "rng": [g["rng"] for g in gathered],
            "fingerprints": [g["fingerprint"] for g in gathered]}


def restore(trainer, ckpt, path):
    """Put a trainer back in the state of checkpoint `ckpt` (read from `path`)."""
    ckpt_io.check_config(ckpt["config"], trainer.config, path)
    trainer.model.load_state_dict(ckpt["model"])
    trainer.method.load_state_dict(method_state(ckpt))
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] and trainer.scaler.is_enabled():  # empty when the run had no float16 scaling
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.epoch, trainer.step_in_epoch = ckpt["epoch"], ckpt["step"]
    trainer.epoch_sums, trainer.best = ckpt["epoch_sums"], ckpt["best"]
    trainer.train_seconds = ckpt.get("train_seconds", 0.0)  # older checkpoints did not count
    now = environment(trainer.device, trainer.amp_dtype, trainer.args.model)
    earlier = list(ckpt.get("environments", []))  # older checkpoints did not record them
    trainer.environments = earlier + ([now] if now not in earlier else [])
    rng = ckpt["rng"]
    ckpt_io.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])


def method_state(ckpt):
    """The method's state_dict; checkpoints of version 1 nested it per part under "variant"."""
    if "method" in ckpt:
        return ckpt["method"]
    return {f"{part}.{k}": v for part, state in ckpt["variant"].items() for k, v in state.items()}
