"""The training loop and the step, for any `Method` (utils/method.py).

    network forward -> method.losses -> backward -> method.after_backward
    -> optimiser step -> method.after_step

The trainer knows nothing of memories or key encoders: a method owns its state.
"""
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from utils import distributed as dist
from utils.data.splits import Splits
from utils.errors import UserError, exit_on_user_error
from utils.evaluation.encoding import evaluate, log_test_pictures, precision_at_k_curves, tb_tag
from utils.method import StepBatch
from utils.models import network_for
from utils.training import checkpoint as ckpt_io
from utils.training.checkpoint import write_json_atomic
from utils.training.flags import build_parser, check_amp, check_args, seed_everything, select_device
from utils.training.records import device_kind, environment, plain_args, run_config, weights_sha256
from utils.training.resume import check_variant, resume_args, resume_command
from utils.training.run_folder import RunFolder
from utils.training.settings import record_splits, resolve
from utils.training.state import restore, training_state
from utils.training.stop_signals import StopRequested, StopSignals, all_ranks_finite


class Trainer:
    """Trains `method_cls` with the flags `args`, resolved once into RunSettings (self.settings,
    utils/training/settings.py); the method reads its own flags from `args`, and the run records
    them all. `splits` replaces the run's own (a benchmark's synthetic batches)."""

    def __init__(self, args, method_cls, splits=None, resume=None):
        self.args = args  # for the method's own flags and the record; the rest reads self.settings
        self.settings = s = resolve(args, method_cls.name, method_cls.head)
        self.device = s.device
        if resume is None and s.resume:
            resume = ckpt_io.load_checkpoint(s.resume)
        band_stats = (resume["config"]["band_mean"], resume["config"]["band_std"]) \
            if resume is not None and "band_mean" in resume["config"] else None
        self.splits = splits if splits is not None else Splits(s.data, s.loader, s.input, band_stats)
        record_splits(args, self.splits)

        # Identical initial weights and method state on every rank; DDP also broadcasts rank 0's.
        seed_everything(s.seed)
        # A resumed run loads its own weights: no download, no --weights file needed.
        model = network_for(s.model, len(self.splits.classes), s.input.channels,
                            pretrained=False if resume is not None else None).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the network itself: evaluated and saved
        self.method = method_cls(args, model, self.splits.train.labels.to(self.device)).to(self.device)
        if not method_cls.uses_logits:
            model.fc2.requires_grad_(False)  # DDP requires a gradient for every trained parameter
        self.ddp_model = model  # what the step runs: the network, wrapped under torchrun
        if dist.is_distributed():
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            seed_everything(s.seed + dist.rank())  # own streams per rank (augmentations draw from per-sample seeds)
        o = s.optim
        self.optimizer, self.method_params = optimizer_for(o, model, self.method)
        # Stepped after every epoch, or after every optimiser step with --lr-step-unit step.
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=o.lr_step, gamma=o.lr_gamma)
        self.lr_per_step = o.lr_step_unit == "step"
        self.amp_dtype = None
        if s.amp:
            bf16 = self.device.type == "cpu" or (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.config = run_config(method_cls.name, s.model, s.data, self.splits)
        self.epoch, self.step_in_epoch, self.epoch_sums = 0, 0, {}
        self.best = {"score": float("-inf"), "epoch": -1, "metrics": None}
        self.train_seconds = 0.0  # training time of all epochs so far, resumed parts included (the run's cost)
        # Every distinct environment the run's parts ran under (resumes add theirs).
        self.environments = [environment(self.device, self.amp_dtype, s.model.arch)]
        self.stop = StopSignals()
        self.run = RunFolder(s.out, s.name, s.resume, method_cls.name, s.default_name)
        if resume is not None:
            restore(self, resume, s.resume)
            if dist.is_main():
                where = f"after epoch {self.epoch}" + (f", at step {self.step_in_epoch} of epoch {self.epoch + 1}"
                                                       if self.step_in_epoch else "")
                print(f"resumed from {s.resume} {where}")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def save(self, best=False):
        self.run.save(training_state(self), best)  # collective: every rank takes part

    # -- one step
    def train_step(self, batch):
        img = batch["img"].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            img = img.contiguous(memory_format=torch.channels_last)
        label = torch.as_tensor(batch["label"], device=self.device)
        idx = torch.as_tensor(batch["idx"], device=self.device)
        with self.autocast():
            f, e, logits = self.ddp_model(img)
        # Losses in float32 whatever the autocast dtype.
        step = StepBatch(img, label, idx, f.float(), e.float(), logits.float(), self.autocast)
        terms = self.method.losses(step)
        total = terms["total"]
        if dist.is_distributed():
            # DDP averages the ranks' gradients; weight each rank by its share of the global
            # batch so that the result is the mean over the whole batch, even when uneven.
            n_all = dist.all_reduce_sum(torch.tensor([float(len(idx))], device=self.device))
            total = total * (len(idx) * dist.world_size() / n_all[0])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.method_params and dist.is_distributed():
            # DDP averages the network's gradients only; the method's own parameters get the same mean.
            for p in self.method_params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = dist.all_reduce_sum(grad) / dist.world_size()
        self.method.after_backward(step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_per_step:
            self.scheduler.step()
        self.method.after_step(self.model)
        return {k: v.detach() for k, v in terms.items()}, len(idx)

    def train_epoch(self, writer):
        epoch, s = self.epoch, self.settings
        self.method.start_epoch(epoch)
        self.ddp_model.train()
        loader = self.splits.train_loader(epoch, self.step_in_epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s.epochs} train", disable=not dist.is_main())
        for batch in bar:
            terms, n = self.train_step(batch)
            if not all_ranks_finite(terms["total"], self.device):
                self.diverged(terms["total"].item(), epoch)
            for k, v in terms.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v.item() * n
            self.epoch_sums["n"] = self.epoch_sums.get("n", 0) + n
            self.step_in_epoch += 1
            bar.set_postfix(loss=f"{terms['total'].item():.3f}")
            if self.stop.agreed(self.device):
                raise StopRequested
        # Means over all ranks' samples for the log.
        names = sorted(k for k in self.epoch_sums if k != "n")
        sums = torch.tensor([self.epoch_sums[k] for k in names] + [self.epoch_sums.get("n", 0)],
                            dtype=torch.float64, device=self.device)
        sums = dist.all_reduce_sum(sums)
        if writer is not None:
            for k, v in zip(names, sums[:-1] / sums[-1].clamp(min=1)):
                writer.add_scalar(f"train/loss_{k}", v.item(), epoch + 1)
            # The heads' rate (the last group): --lr as scheduled; the trunk's is --backbone-lr-mult times it.
            writer.add_scalar("train/lr", self.optimizer.param_groups[-1]["lr"], epoch + 1)

    # -- the whole run
    def fit(self):
        s = self.settings
        writer = None
        if dist.is_main():
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(self.run.tensorboard)
            write_json_atomic(os.path.join(self.run.path, "args.json"), plain_args(self.args))
            self.run.announce()
        self.stop.install()
        try:
            while self.epoch < s.epochs:
                started = time.perf_counter()
                try:
                    self.train_epoch(writer)
                finally:  # a stopped epoch's part counts too: its checkpoint carries the seconds on
                    seconds = time.perf_counter() - started
                    self.train_seconds += seconds
                if not self.lr_per_step:
                    self.scheduler.step()
                self.epoch, self.step_in_epoch, self.epoch_sums = self.epoch + 1, 0, {}
                if writer is not None:
                    writer.add_scalar("train/epoch_seconds", seconds, self.epoch)
                improved = False
                if self.epoch % s.eval_every == 0 or self.epoch == s.epochs:
                    improved = self.validate(writer, f"  (training {seconds:.1f} s)")
                self.save(best=improved)
                if self.epoch < s.epochs and self.stop.agreed(self.device):  # signalled during validation
                    raise StopRequested
            if self.best["epoch"] < 0:
                # Resumed with no more epochs to train before any evaluation: evaluate now.
                self.save(best=self.validate(writer))
            results = self.final_test(writer)
        except StopRequested:
            self.save()
            if dist.is_main():
                print(f"stopped by {self.stop.name} at step {self.step_in_epoch} of epoch {self.epoch + 1} "
                      f"({self.epoch} finished); continue with: "
                      f"{resume_command(self.config['variant'], self.run.last)}")
            return self.stop.exit_status()
        except BaseException:
            if writer is not None:
                writer.close()
                writer = None
            self.run.discard_if_unused()  # a run that failed before its first checkpoint leaves no folder
            raise
        finally:
            self.stop.restore()
            if writer is not None:
                writer.close()  # also on errors: the events so far are kept
        if dist.is_main():
            write_json_atomic(self.run.results, results)
            if os.path.exists(self.run.diverged):  # an earlier try in this folder diverged; this one finished
                os.remove(self.run.diverged)
            key = f"mAP@{s.topk}"
            print(f"best epoch {results['best_epoch']}: val {key} {results['val'][key]:.4f}; "
                  f"test {key} {results['test'][key]:.4f}  P@20 {results['test']['P@20']:.4f}\n"
                  f"results written to {self.run.results}")
        return 0

    def validate(self, writer, note=""):
        """Val metrics of the network after self.epoch epochs; True when they beat the best so
        far (the earliest best is kept)."""
        epoch = self.epoch
        key = f"mAP@{self.settings.topk}"
        # Both ways from one counting pass; the index-order mAP@R chooses the best epoch (docs/method.md section 6).
        metrics, tie_aware = evaluate(self.model, self.splits, "val", self.device, self.settings.topk, self.autocast,
                                      tie_aware=True)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float):
                    writer.add_scalar(f"val/{tb_tag(k)}", v, epoch)
            print(f"epoch {epoch}: val {key} {metrics[key]:.4f}  P@20 {metrics['P@20']:.4f}{note}")
        if metrics[key] > self.best["score"]:
            self.best = {"score": metrics[key], "epoch": epoch, "metrics": metrics, "metrics_tie_aware": tie_aware}
            return True
        return False

    def final_test(self, writer=None):
        """Test-split metrics of the best checkpoint (database = train split), and pictures."""
        # Rank 0 reads the best weights for all; self.best is what that checkpoint recorded.
        holder = [ckpt_io.load_checkpoint(self.run.best)["model"] if dist.is_main() else None]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(holder, src=0)
        self.model.load_state_dict(holder[0])
        best_info = self.best
        test, test_tie_aware, q_codes, db_codes = evaluate(self.model, self.splits, "test", self.device,
                                                           self.settings.topk, self.autocast, return_codes=True,
                                                           tie_aware=True)
        device, s = self.device, self.settings
        curves = precision_at_k_curves(q_codes, self.splits.test.labels.to(device), db_codes,
                                       self.splits.db.labels.to(device))
        test["precision_at_k"], test_tie_aware["precision_at_k"] = curves["index"], curves["expected"]
        val_tie_aware = best_info.get("metrics_tie_aware")
        if val_tie_aware is None:  # a best epoch recorded before tie-aware metrics were: its weights are loaded
            _, val_tie_aware = evaluate(self.model, self.splits, "val", device, s.topk, self.autocast, tie_aware=True)
        if writer is not None:
            for k, v in test.items():
                if isinstance(v, float):
                    writer.add_scalar(f"test/{tb_tag(k)}", v, best_info["epoch"])
            log_test_pictures(writer, self.splits, test, q_codes, db_codes, s.data.bands, best_info["epoch"])
        return {"variant": self.config["variant"], "dataset": s.data.dataset, "run_dir": self.run.path,
                "best_epoch": best_info["epoch"], "val": best_info["metrics"], "test": test,
                "val_tie_aware": val_tie_aware, "test_tie_aware": test_tie_aware,
                "args": plain_args(self.args), "train_seconds": self.train_seconds,
                "device": device_kind(device), "world_size": dist.world_size(),
                "environment": environment(device, self.amp_dtype, s.model.arch),
                "environments": self.environments}


    def diverged(self, loss, epoch):
        """Stop on a non-finite loss. diverged.json records where, with the run's flags, so that a grid
        (python -m utils.table --lr-grid) counts the rate as diverged rather than as a failed cell."""
        kept = (f"the last good checkpoint is kept at {self.run.last}" if os.path.exists(self.run.last)
                else "no checkpoint had been written yet")
        if dist.is_main():
            write_json_atomic(self.run.diverged,
                              {"variant": self.config["variant"], "dataset": self.settings.data.dataset,
                               "loss": str(loss), "epoch": epoch + 1, "step": self.step_in_epoch,
                               "args": plain_args(self.args), "device": device_kind(self.device),
                               "world_size": dist.world_size(), "environments": self.environments})
        raise UserError(f"the loss became {loss} at step {self.step_in_epoch} of epoch {epoch + 1}; {kept}; "
                        f"lower --lr (or drop --amp) and resume or restart")


def optimizer_for(optim, model, method):
    """The optimiser of OptimSettings `optim` (docs/method.md section 5) over the network's trainable
    parameters and the method's own (those it holds beyond the network's, requires_grad set), and the
    list of the latter. With --backbone-lr-mult 1 one group in the network's parameter order, as before
    the flag existed (an older checkpoint's optimiser state then loads); otherwise two: the trunk
    (model.backbone) at lr x backbone_lr_mult, then the heads and the method's parameters at lr."""
    network = {id(p) for p in model.parameters()}
    own = [p for p in method.parameters() if p.requires_grad and id(p) not in network]
    if optim.backbone_lr_mult == 1:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad] + own}]
    else:
        trunk = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad],
                   "lr": optim.lr * optim.backbone_lr_mult},
                  {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in trunk] + own}]
    kind, decay = optim.optimizer, optim.weight_decay
    if kind == "sgd":
        opt = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=decay,
                              nesterov=optim.nesterov and optim.momentum > 0)
    elif kind == "adam":  # --momentum is beta1; beta2 torch's (and the authors') 0.999
        opt = torch.optim.Adam(groups, lr=optim.lr, betas=(optim.momentum, 0.999), weight_decay=decay)
    elif kind == "rmsprop":  # torch's alpha 0.99 and eps 1e-8
        opt = torch.optim.RMSprop(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=decay)
    else:
        raise UserError(f"--optimizer {kind!r} is not one of sgd, adam, rmsprop")
    return opt, own


def run(method_cls, description, argv=None, script=None, add_flags=None, train=None):
    """Parse flags, train, evaluate: the body of every training script's main().
    add_flags(parser) adds a script's own flags; train(method_cls, args) replaces the
    Trainer for methods that train nothing."""

    @exit_on_user_error
    def _main():
        parser = build_parser(description, method_cls, epilog=examples(script or "train_MB/main.py"))
        if add_flags is not None:
            add_flags(parser)
        args, resume = resume_args(parser, argv, parser.parse_args(argv))
        if resume is not None:  # another method's run is refused first, finished or not
            check_variant(resume, method_cls.name, args.resume)
        results = os.path.join(os.path.dirname(os.path.abspath(args.resume or ".")), "results.json")
        # A finished run is left alone: nothing to train, nothing rewritten. (For methods that
        # train nothing, any resumed run with results is finished.)
        if resume is not None and os.path.exists(results) and (train is not None or resume["epoch"] >= args.epochs):
            if dist.is_main():
                trained = "" if train is not None else f" after {resume['epoch']} of {args.epochs} epochs"
                print(f"the run in {os.path.dirname(os.path.abspath(args.resume))} is finished{trained}; its "
                      f"results are in {results}; nothing to do"
                      + ("" if train is not None else " (pass a larger --epochs to train on)"))
            return 0
        check_args(args)
        if resume is None:
            # --weights by content, not by path (the table compares this): a file overwritten with other
            # weights is another run. A resumed run keeps the hash it recorded: it loads its own weights.
            args.weights_sha256 = weights_sha256(args.weights)
        args.device_obj = select_device(args.device)
        check_amp(args, args.device_obj)
        dist.init(args.device_obj.type)
        if args.device_obj.type == "cuda":
            torch.cuda.set_device(args.device_obj)
            torch.backends.cudnn.benchmark = True
        try:
            if train is not None:
                return train(method_cls, args)
            return Trainer(args, method_cls, resume=resume).fit()
        finally:
            dist.cleanup()

    return _main()


def examples(script):
    return (f"examples:\n  python {script} --dataset UCMerced --dim 64\n"
            f"  python {script} --dataset digits --no-pretrained --img-size 32 -b 64 --lr 0.01 --dim 32 --epochs 5")
