"""Continuing a run: the flags of a resumed run (the checkpoint's, with the safe overrides given), the
script that made a checkpoint, and the command line that continues it."""
import argparse
import os
import shlex
import sys

from utils import REPO_ROOT
from utils.errors import UserError
from utils.training import checkpoint as ckpt_io
from utils.training.flags import FLAGS_BEFORE

# The script that trains each method (utils.trainer.run's `script`), for messages that say how to go on.
SCRIPTS = {"MB": "train_MB/main.py", "MU": "train/main.py"}


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


# Flags that may differ from the checkpoint's when a run is resumed: they change how the run
# goes on, not what it computes (--data: the same dataset, moved; --out/--name: where to find it;
# --split-file: the same split, moved, which utils.data.splits checks by the hash the run recorded).
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
    if saved:  # a checkpoint older than a flag ran with the flag's value of before (FLAGS_BEFORE)
        saved = {**{k: v for k, v in FLAGS_BEFORE.items() if k in vars(args)}, **saved}
    given = given_flags(parser, argv)
    # --nesterov, not --no-nesterov, for a flag that has both: the message gives the value.
    names = {a.dest: max([o for o in a.option_strings if not o.startswith("--no-")] or a.option_strings, key=len)
             for a in parser._actions if a.option_strings}

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
