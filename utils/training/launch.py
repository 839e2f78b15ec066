"""torchrun that stops quietly: `python -m utils.launch` takes torchrun's arguments.

    python -m utils.launch --standalone --nproc_per_node=4 train/main.py --dataset NWPU-RESISC45

On SIGTERM or SIGINT torchrun already passes the signal on to the training processes, which
save a checkpoint and stop, but then exits 1 with a traceback of its own. Here it exits
128 + the signal's number, with one line. SIGUSR1 (Slurm's warning before a time limit) is
passed on the same way; plain torchrun would die of it and leave the workers behind.
"""
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def _pass_on(signum, frame):
    # torchrun's agent answers SignalException by sending this signal to every worker and
    # waiting (up to 30 s) for them to exit.
    raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))


def main(argv=None):
    signal.signal(signal.SIGUSR1, _pass_on)
    try:
        torchrun(argv)
    except SignalException as stop:
        print(f"launcher: stopped by {stop.sigval.name}; the training processes were asked to save a "
              "checkpoint and stop (their last lines say where)", file=sys.stderr)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
