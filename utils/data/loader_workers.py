"""What both input pipelines (utils/data/splits.py, utils/data/cached.py) share: the seed of each sample's
augmentation, and how loader workers treat the stop signals and are ended."""
import atexit
import multiprocessing
import signal


def sample_seed(seed, epoch, index):
    """The seed of one sample's augmentation in one epoch."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + index


def ignore_stop_signals(_=None):
    """Loader workers leave SIGINT, SIGTERM and SIGUSR1 to the main process, which stops the
    run cleanly and then shuts them down (a signal to the process group reaches them too)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


@atexit.register
def _kill_leftover_workers():
    """Loader workers that an error left running are killed at exit. multiprocessing's own exit
    handler would send them SIGTERM, which they ignore, and wait for them forever."""
    workers = multiprocessing.active_children()
    if workers:
        # The loader's SIGCHLD handler would report the kills as a crash, with a traceback.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join(timeout=5)
