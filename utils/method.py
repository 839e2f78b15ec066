"""What a training method is, as the trainer sees it.

A method turns one batch's network outputs into named loss terms and owns whatever
per-step state it keeps (a memory, a key encoder, a buffer of codes). The trainer runs the
network, asks the method for its terms, back-propagates `terms["total"]`, steps the
optimiser, logs every term, and calls the method's hooks around the step. It never touches
the method's state, so adding a method is one file: a `Method` subclass.

Under DistributedDataParallel every rank holds the method's state; `StepBatch.gather`
gives the whole global batch in the same order on every rank, so a state updated from
gathered values stays identical on all ranks (the trainer checks this at every
checkpoint through `fingerprint`). A loss over pairs or triplets of the batch is computed
on `StepBatch.gather_with_grad`: every rank then computes the loss of the whole global
batch, and the gradient reaching each parameter is that of one process holding it.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from utils import distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    """all_gather (rank order, uneven sizes allowed) whose backward is its true derivative:
    every rank's gradient of the gathered tensor, summed, restricted to this rank's rows.

    Why this is exactly right under the trainer: rank r's loss is weighted by w_r = G B_r / N
    (its share of the global batch times G) and DDP averages the G ranks' gradients. When
    every rank computes the same global loss L from the gathered tensor, the rows of rank r
    receive sum_r' w_r' dL/du_r = G dL/du_r, and DDP's 1/G leaves sum_r dL/du_r through
    each rank's own rows: the single-process gradient of L."""

    @staticmethod
    def forward(ctx, t):
        sizes = dist.all_gather(torch.tensor([t.shape[0]], device=t.device))
        ctx.start, ctx.rows = int(sizes[:dist.rank()].sum()), t.shape[0]
        return dist.all_gather(t)

    @staticmethod
    def backward(ctx, grad):
        grad = dist.all_reduce_sum(grad.contiguous().clone())
        return grad[ctx.start:ctx.start + ctx.rows]


@dataclass
class StepBatch:
    """One rank's share of a training step: inputs and network outputs (float32)."""

    img: torch.Tensor      # the (augmented) images, on the training device
    label: torch.Tensor    # class ids
    idx: torch.Tensor      # training-set indices (rows of a memory)
    f: torch.Tensor        # relaxed codes u = FC1(pool(x)); bit k is 1 iff f_k > 0
    e: torch.Tensor        # f / ||f||
    logits: torch.Tensor   # FC2(f)
    autocast: Callable = field(default=None, repr=False)  # context factory of the run's --amp setting
    _gathered: dict = field(default_factory=dict, repr=False)
    _gathered_live: dict = field(default_factory=dict, repr=False)

    def gather(self, name):
        """The global batch's `name` ("idx", "label", "e", "f", or any tensor attribute),
        detached, concatenated over the ranks in rank order; computed once per step."""
        if name not in self._gathered:
            self._gathered[name] = dist.all_gather(getattr(self, name).detach())
        return self._gathered[name]

    def gather_with_grad(self, name):
        """The global batch's `name` like `gather`, but differentiable: the loss of the whole
        global batch computed from it on every rank trains each rank's own rows with the
        single-process gradient (see _GatherWithGrad). In one process: the tensor itself."""
        if not dist.is_distributed():
            return getattr(self, name)
        if name not in self._gathered_live:
            self._gathered_live[name] = _GatherWithGrad.apply(getattr(self, name))
        return self._gathered_live[name]


class Method(nn.Module):
    """Base class of a training method. Subclasses set `name` and implement `losses`.

    Its buffers and sub-modules are saved in checkpoints (state_dict) and moved to the
    training device with the network. Parameters it holds with requires_grad set are trained
    by the optimiser at --lr, with the heads (under DDP their gradients are averaged over the
    ranks like the network's); freeze the others (a key encoder, say).

    `defaults` gives the method's own defaults of the shared flags (argparse dests: "optimizer",
    "lr", "momentum", "nesterov", "weight_decay", "backbone_lr_mult", "lr_step", "lr_step_unit",
    "lr_gamma", "batch_size", "epochs", ...), its authors' values: build_parser sets them after
    add_arguments, so --help shows them and the runs record them (docs/method.md section 5). `head`
    gives the options of the network's head (utils/models.py HashingNet: fc1_bias, fc1_bn,
    fc1_init, fc2_bias, codewords); the checkpoint records them (config["head"]) and retrieval
    rebuilds the same network. None for both: the paper's values and head.
    """

    name = "?"  # the run-folder prefix and the checkpoint's "variant"
    uses_logits = True  # False: the classifier FC2 is frozen (no gradient would reach it)
    defaults = None  # e.g. {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "backbone_lr_mult": 0.01}
    head = None  # e.g. {"fc1_bias": False, "fc1_bn": True, "fc1_init": 0.01}

    def __init__(self, args, model, train_labels):
        super().__init__()
        self.args = args

    @staticmethod
    def add_arguments(parser):
        """The method's own flags."""

    def start_epoch(self, epoch):
        """Called before each epoch (0-based)."""

    def losses(self, batch: StepBatch) -> dict:
        """Named scalar loss terms with "total" the one trained on: means over this rank's
        batch (the trainer weights them into the global batch's mean), or terms of the whole
        global batch computed from `batch.gather_with_grad` (equal on every rank)."""
        raise NotImplementedError

    def after_backward(self, batch: StepBatch):
        """Update state from the step's batch (before the optimiser step: a memory is
        written with what the step saw)."""

    def after_step(self, model):
        """Called after the optimiser step with the raw (unwrapped) network."""

    def synced_buffers(self):
        """The state that must be identical on every rank (memories, code buffers); the
        trainer compares its fingerprint across ranks at every checkpoint."""
        return []

    @torch.no_grad()
    def fingerprint(self):
        """A few sums of synced_buffers(): equal on every rank when the ranks agree."""
        total = [0.0, 0.0, 0.0]
        for buf in self.synced_buffers():
            b = buf.double().reshape(len(buf), -1)
            weights = torch.arange(1, b.shape[0] + 1, device=b.device, dtype=torch.float64)
            total[0] += b.sum().item()
            total[1] += b.square().sum().item()
            total[2] += (weights @ b).sum().item()
        return total
