"""What a run records beside its numbers: the configuration a checkpoint must match (run_config), the
flags as plain data, the device and environment it ran in, and the sha256 of its input files."""
import functools
import hashlib
import os

import torch

from utils import distributed as dist


def run_config(method_name, model, data, splits):
    """What must match for a checkpoint to continue a run or to be used for retrieval: the method,
    the network (ModelSettings `model`, its head options included), the data it reads (DataSettings `data`) and the splits'
    classes, size, band statistics and input spec (the bands, their order and normalisation)."""
    config = {"variant": method_name, "arch": model.arch, "dim": model.dim, "num_classes": len(splits.classes),
              "in_channels": data.bands, "dataset": data.dataset, "num_samples": len(splits.train),
              "img_size": data.img_size, "classes": splits.classes}
    if model.head is not None:  # the method's head options (utils/models.py); absent: the paper's head
        config["head"] = dict(model.head)
    if getattr(splits, "band_stats", None):
        config["band_mean"], config["band_std"] = splits.band_stats
    if getattr(splits, "input", None) is not None:
        config["input"] = splits.input.as_dict()
    return config


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
    (utils/table/cells.py environment_difference)."""
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
    from utils.backbones.timm_models import TORCHVISION_NAMES
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
