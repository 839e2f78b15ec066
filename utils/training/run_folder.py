"""The run folder: <out>/<name>/ with args.json, tensorboard/, checkpoint_last.pth, checkpoint_best.pth
and results.json."""
import os
import shutil
import time

import torch

from utils import distributed as dist
from utils.errors import UserError
from utils.training import checkpoint as ckpt_io
from utils.training.resume import resume_command


class RunFolder:
    """<out>/<name>/ with args.json, tensorboard/, checkpoint_last.pth, checkpoint_best.pth
    and results.json. Chosen and checked on rank 0; every rank gets the same folder or the
    same error."""

    def __init__(self, out, name, resume, method_name, default_name):
        """out/name (--out, --name), or the folder of the checkpoint `resume` continues; without a
        name, default_name followed by the time (e.g. MB_UCMerced_resnet18_64bit_20261207-101500)."""
        answer = [self._make(out, name, resume, method_name, default_name) if dist.is_main() else None]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(answer, src=0)
        self.path, error, self.created = answer[0]
        if error:
            raise UserError(error)
        self.last = os.path.join(self.path, "checkpoint_last.pth")
        self.best = os.path.join(self.path, "checkpoint_best.pth")
        self.results = os.path.join(self.path, "results.json")
        self.diverged = os.path.join(self.path, "diverged.json")  # a non-finite loss stopped it (trainer.py)
        self.tensorboard = os.path.join(self.path, "tensorboard")

    @staticmethod
    def _make(out, name, resume, method_name, default_name):
        """(folder, None, whether this run created it), or (None, the problem, False) without raising."""
        if resume:
            path = os.path.dirname(os.path.abspath(resume))
        else:
            path = os.path.join(out, name or f"{default_name}_" + time.strftime("%Y%m%d-%H%M%S"))
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
                os.path.exists(p) for p in (self.last, self.best, self.results, self.diverged)):
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
