"""Command-line flags shared by every training script, their checks, and the device choice.

Each script builds its parser with `build_parser(description, method_cls)`: the published
scripts' flags (same names and defaults), ours, and the method's own (`add_arguments`).
"""
import argparse
import os

import torch

from utils import REPO_ROOT
from utils import distributed as dist
from utils.errors import UserError

# File extension of each dataset as prepared by data/prepare.py (data/catalog.py; a test keeps
# the two in step); others default to tif.
DATASET_EXTENSIONS = {"digits": "png", "UCMerced": "tif", "EuroSAT": "jpg", "EuroSAT_MS": "tif",
                      "AID": "jpg", "NWPU-RESISC45": "jpg"}


OPTIMIZERS = ("sgd", "adam", "rmsprop")
# What the runs made before these flags existed computed with (SGD, Nesterov, one rate, steps per epoch): a
# checkpoint that does not record them continues with these, whatever a method's defaults are now.
FLAGS_BEFORE = {"optimizer": "sgd", "nesterov": True, "backbone_lr_mult": 1.0, "lr_step_unit": "epoch"}


def image_extension(dataset, ext=None):
    """--imgEXT as given (without a leading dot), else the dataset's own, else tif."""
    return (ext or DATASET_EXTENSIONS.get(dataset, "tif")).lstrip(".")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once, and only when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == "" or d is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags get one line, like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(description, method_cls=None, epilog=None):
    """The flags of the published scripts (same names and defaults), ours, and the method's."""
    p = ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data"), help="folder holding the datasets")
    p.add_argument("--dataset", default="UCMerced", help="dataset folder under --data (digits: the offline demo)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="global batch size (split across GPUs)")
    p.add_argument("--num_workers", type=int, default=4, help="data-loading worker processes")
    p.add_argument("--epochs", type=int, default=130, help="epochs to train")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.1, help="initial learning rate")
    p.add_argument("--resume", default="", metavar="PATH",
                   help="checkpoint to continue from, taking the run's flags from it; 'auto': the run "
                        "folder's checkpoint_last.pth (--out/--name) when it exists, else a fresh start")
    p.add_argument("--dim", type=int, default=128, help="hash code length L in bits")
    p.add_argument("--imgEXT", default=None, help="image file extension (default: the dataset's own, else tif)")
    p.add_argument("--model", default="resnet18", metavar="NAME",
                   help="backbone: resnet18 or resnet50 (torchvision, ImageNet V1 weights: the paper's) or any "
                        "timm model name, e.g. convnext_atto, efficientnet_b0, vit_tiny_patch16_224 (trained at "
                        "--img-size); list timm's names with "
                        "python -c \"import timm; print(timm.list_models('convnext*'))\"")
    # Additions.
    p.add_argument("--img-size", type=int, default=256, help="images are resized to S x S")
    p.add_argument("--bands", type=int, default=3,
                   help="input bands: 3 reads RGB images; another number reads multi-band TIFFs "
                        "(e.g. 13 for EuroSAT_MS) with per-band normalisation")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and augmentation")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs"), help="root folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: method_dataset_model_bits_time)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random initialisation instead of pretrained weights (ImageNet's, timm's default tag)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="start from a state_dict file of the backbone (torch.save or .safetensors, timm's or "
                        "torchvision's key names; with --bands N a first layer of N bands is kept), or "
                        "torchgeo:ENUM, e.g. torchgeo:ResNet18_Weights.SENTINEL2_ALL_MOCO (Sentinel-2 weights, "
                        "downloaded and verified; bands reordered to the weights' order, their own scaling)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate on val every N epochs (and after the last)")
    p.add_argument("--topk", type=int, default=100, help="R of mAP@R, the model-selection score")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 where supported, else float16)")
    p.add_argument("--split-file", default=None, metavar="PATH",
                   help="JSON file of the train/val/test image lists, paths relative to <data>/<dataset> "
                        "(README: Datasets; data/prepare.py split writes ours); default: 70/10/20 per class, seed 42")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="check every image first and leave out unreadable ones (with a warning and a count)")
    p.add_argument("--pipeline", default="auto", choices=("auto", "pil", "cached"),
                   help="pil: decode with Pillow per image per epoch; cached: decode once into RAM, "
                        "augment whole batches as tensors on the training device; auto: cached on CUDA "
                        "when the decoded splits fit in half of the available RAM, else pil")
    # The defaults shown are the method's (Method.defaults: its authors' values); CDNE's are the paper's.
    g = p.add_argument_group("optimisation (the method's values; CDNE's: the paper's)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd (torch.optim.SGD), adam (torch.optim.Adam: coupled L2 weight decay, not AdamW) or "
                        "rmsprop (torch.optim.RMSprop: alpha 0.99, eps 1e-8)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="sgd: its momentum; rmsprop: its momentum (0: plain RMSprop); adam: beta1 (in [0, 1); "
                        "beta2 is 0.999)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum; sgd with --momentum > 0 only (adam and rmsprop have none)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay, added to the gradient")
    g.add_argument("--backbone-lr-mult", type=float, default=1.0,
                   help="the trunk trains at --lr times this; FC1, FC2, a head BatchNorm and the method's own "
                        "trainable parameters at --lr")
    g.add_argument("--lr-step", type=int, default=30,
                   help="the learning rate is multiplied by --lr-gamma every N epochs (or steps: --lr-step-unit)")
    g.add_argument("--lr-step-unit", choices=("epoch", "step"), default="epoch",
                   help="what --lr-step counts: epochs, or optimiser steps (HashNet's schedule)")
    g.add_argument("--lr-gamma", type=float, default=0.5, help="factor of each learning-rate step")
    if method_cls is not None:
        method_cls.add_arguments(p.add_argument_group(f"{method_cls.name} method"))
        apply_method_defaults(p, method_cls)
    return p


def apply_method_defaults(parser, method_cls):
    """The method's own defaults of the shared flags (Method.defaults, its authors' values), set after
    its add_arguments (so they may also name its own flags): --help shows them and the table's stale-cell rule, which parses a cell's flags
    with this parser, compares a run with them."""
    defaults = dict(getattr(method_cls, "defaults", None) or {})
    unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
    if unknown:  # a class attribute: a programming error, not a user's
        raise ValueError(f"{method_cls.__name__}.defaults names no flag: {unknown}")
    # On the actions, not parser.set_defaults: that also keeps them as parser-level defaults, which
    # argparse fills in even where the actions' defaults are suppressed, so resume_args and the table
    # (which suppress them to find the flags given) would take them for given flags.
    for action in parser._actions:
        if action.dest in defaults:
            action.default = defaults[action.dest]


def check_args(args):
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--dim": args.dim,
                "--lr": args.lr, "--img-size": args.img_size, "--eval-every": args.eval_every,
                "--topk": args.topk, "--bands": args.bands, "--lr-step": args.lr_step}
    if hasattr(args, "temperature"):
        positive["--temperature"] = args.temperature
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    non_negative = {"--num_workers": args.num_workers, "--weight-decay": args.weight_decay,
                    "--momentum": args.momentum, "--lr-gamma": args.lr_gamma,
                    "--backbone-lr-mult": args.backbone_lr_mult, "--margin": getattr(args, "margin", 0)}
    for flag, value in non_negative.items():
        if not value >= 0:
            raise UserError(f"{flag} must be 0 or more, got {value}")
    if args.optimizer == "adam" and not args.momentum < 1:  # Adam takes it for beta1
        raise UserError(f"--momentum is Adam's beta1 with --optimizer adam and must be below 1, got {args.momentum}")
    for flag in ("memory_momentum", "key_momentum"):
        value = getattr(args, flag, None)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{flag.replace('_', '-')} must be in [0, 1], got {value}")
    if len(getattr(args, "momentum_epochs", ())) != len(getattr(args, "momentum_values", ())):
        raise UserError("--momentum-epochs and --momentum-values must have as many entries each")
    if args.bands != 3 and args.pipeline == "cached":
        raise UserError("--pipeline cached reads RGB images only; use --pipeline pil with --bands")
    if args.no_pretrained and args.weights:
        raise UserError("--no-pretrained and --weights contradict each other; pass one of them")
    from utils.backbones.timm_models import check_model_name  # timm is imported only for names other than the paper's
    check_model_name(args.model)
    args.imgEXT = image_extension(args.dataset, args.imgEXT)


def select_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but MPS is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank())
    return device


def cpu_supports_bf16():
    """True where the processor itself computes in bfloat16 (AVX512-BF16 or AMX on x86, the
    BF16 extension on Arm); elsewhere bfloat16 autocast is emulated and far slower than float32."""
    try:
        with open("/proc/cpuinfo") as fh:
            words = set(fh.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def check_amp(args, device):
    if args.amp and device.type == "cpu" and not cpu_supports_bf16():
        raise UserError("--amp on this CPU would emulate bfloat16 (it has no AVX512-BF16, AMX or Arm BF16), "
                        "which is many times slower than float32; drop --amp: training runs in float32 without it")


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
