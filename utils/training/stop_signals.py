"""Stopping a run at a step: the signals that ask for it, and the agreement of all ranks on it."""
import signal

import torch

from utils import distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    pass


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (preemption, `timeout`, torchrun passing one on) and SIGUSR1
    (Slurm's warning before the time limit) stop the run at the end of the current step, on
    every rank at the same step, with a checkpoint; the exit status is 128 + the signal.
    Loader workers ignore them (utils.data.loader_workers.ignore_stop_signals), so a signal to the
    whole process group does not kill them under the running step."""

    def __init__(self):
        self.name, self._saved = None, {}  # the signal received; a second one changes nothing

    def install(self):
        def handler(signum, frame):
            self.name = signal.Signals(signum).name
        self._saved = {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def restore(self):
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved = {}

    def agreed(self, device):
        """Whether any rank was signalled; every rank then adopts that signal (the largest number)."""
        if not dist.is_distributed():
            return bool(self.name)
        number = torch.tensor([int(signal.Signals[self.name]) if self.name else 0], device=device)
        torch.distributed.all_reduce(number, op=torch.distributed.ReduceOp.MAX)
        if number.item():
            self.name = signal.Signals(int(number.item())).name
        return bool(number.item())

    def exit_status(self):
        return 128 + signal.Signals[self.name]


def all_ranks_finite(loss, device):
    """Whether every rank's loss is finite (all ranks must stop together, or the others hang)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
    return dist.all_reduce_sum(bad).item() == 0
