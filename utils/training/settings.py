"""The flags of a run resolved once into small typed settings, passed down as plain values.

    flags (argparse Namespace) --resolve()--> RunSettings: data, loader, input, model, optim, ...

The scripts parse and check their flags; `resolve` turns what a run reads into the settings the
lower layers take (DataSettings and LoaderSettings for utils/data, InputSpec from the backbone
and its weights, ModelSettings for the network, OptimSettings for the optimiser, where the run
folder is), and no module below this one reads a flag. A method keeps reading its own flags
(`--temperature`, `--eta`, ...); checkpoints and results.json keep recording all of them.
"""
from dataclasses import dataclass

import torch

from utils.backbones.input_spec import InputSpec, resolve_input
from utils.data.settings import DataSettings, LoaderSettings
from utils.errors import UserError
from utils.models import ModelSettings


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser (--optimizer: sgd, adam or rmsprop) and its step schedule: lr x lr_gamma every
    lr_step epochs (lr_step_unit "epoch") or optimiser steps ("step"). The trunk trains at
    lr x backbone_lr_mult, the heads (and a method's own trainable parameters) at lr. momentum is
    SGD's and RMSprop's momentum and Adam's beta1; nesterov applies to SGD with momentum > 0
    (docs/method.md section 5)."""

    lr: float
    momentum: float
    weight_decay: float
    lr_step: int
    lr_gamma: float
    optimizer: str = "sgd"  # the defaults: the paper's optimiser
    nesterov: bool = True
    backbone_lr_mult: float = 1.0
    lr_step_unit: str = "epoch"


@dataclass(frozen=True)
class RunSettings:
    """Everything a run reads, resolved from its flags (the method's own flags apart)."""

    method: str             # the method's name: the run folder's prefix, the checkpoint's "variant"
    data: DataSettings
    loader: LoaderSettings
    input: InputSpec        # what the network sees, from --model, --weights, --bands, --dataset
    model: ModelSettings
    optim: OptimSettings
    device: torch.device
    seed: int
    epochs: int
    eval_every: int
    topk: int               # R of mAP@R, the model-selection score
    amp: bool
    out: str                # --out
    name: str | None        # --name
    resume: str             # the checkpoint continued ("" for a fresh start)

    @property
    def default_name(self):
        """The run folder's name without --name (the time is appended when it is made)."""
        return f"{self.method}_{self.data.dataset}_{self.model.arch}_{self.model.dim}bit"


def resolve(args, method_name, head=None):
    """RunSettings of checked flags `args` (utils/training/flags.py check_args, with the device
    chosen in args.device_obj) for a run of the method named `method_name`, whose network has the
    head options `head` (the method's Method.head; None: the paper's head)."""
    data = DataSettings(root=args.data, dataset=args.dataset, ext=args.imgEXT, bands=args.bands,
                        img_size=args.img_size, split_file=getattr(args, "split_file", None),
                        skip_bad_images=args.skip_bad_images)
    loader = LoaderSettings(batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                            device=args.device_obj, pipeline=args.pipeline)
    model = ModelSettings(arch=args.model, dim=args.dim, img_size=args.img_size,
                          pretrained=args.weights or (not args.no_pretrained), head=head)
    optim = OptimSettings(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                          lr_step=args.lr_step, lr_gamma=args.lr_gamma, optimizer=args.optimizer,
                          nesterov=args.nesterov, backbone_lr_mult=args.backbone_lr_mult,
                          lr_step_unit=args.lr_step_unit)
    return RunSettings(method=method_name, data=data, loader=loader,
                       input=resolve_input(args.model, args.weights, args.bands, args.dataset), model=model,
                       optim=optim, device=args.device_obj, seed=args.seed, epochs=args.epochs,
                       eval_every=args.eval_every, topk=args.topk, amp=args.amp, out=args.out, name=args.name,
                       resume=args.resume)


def record_splits(args, splits):
    """Write into the run's flags what its splits resolved (args.json, checkpoints and results.json
    record them): the pipeline that --pipeline auto chose and the sha256 of the split's lists. A
    resumed run whose recorded split differs from the one the folder gives now is refused."""
    digest = getattr(splits, "split_sha256", None)
    if digest is None:  # batches of a benchmark's own (benchmarks/gpu_check.py): no split to record
        return
    recorded = getattr(args, "split_sha256", None)
    if args.resume and recorded and recorded != digest:
        split_file = getattr(args, "split_file", None)
        source = f"split file {split_file}" if split_file else "the 70/10/20 split per class of the folder"
        raise UserError(f"checkpoint {args.resume} was trained on another split (sha256 {recorded[:12]}...) than "
                        f"{source} gives now ({digest[:12]}...); resume with the run's own split "
                        "file and dataset folder, or start a new run")
    args.split_sha256, args.pipeline = digest, splits.pipeline
