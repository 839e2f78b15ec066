"""CUDA check: training steps of both variants on synthetic 256x256 batches, with and
without --amp, printing images per second and peak GPU memory.

    python benchmarks/gpu_check.py --steps 200

Synthetic tensors keep the input pipeline out of the measurement; the steps are
the real ones (Trainer.train_step: network, memory, losses, key encoder, EMA).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.training.flags import build_parser, check_args, select_device  # noqa: E402
from utils.training.trainer import Trainer  # noqa: E402


def load_variant(folder):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cdne_{folder}", os.path.join(REPO, folder, "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Labels:
    """A training split as the Trainer sees it: its labels and its length."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)


class SyntheticData:
    """Stands in for utils.data.splits.Splits: N training labels and random image batches on the device."""

    def __init__(self, n, num_classes, batch_size, size, device):
        self.classes = [str(c) for c in range(num_classes)]
        self.train = Labels(torch.arange(n) % num_classes)
        self.n, self.batch_size, self.size, self.device = n, batch_size, size, device

    def batch(self, g):
        idx = torch.randperm(self.n, device=self.device, generator=g)[:self.batch_size]
        img = torch.randn(self.batch_size, 3, self.size, self.size, device=self.device, generator=g)
        return {"img": img, "label": idx % len(self.classes), "idx": idx}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant, amp, args, device):
    module = load_variant({"MU": "train", "MB": "train_MB"}[variant])
    method_cls = module.MemoryUnitCDNE if variant == "MU" else module.MemoryBankCDNE
    flags = ["--no-pretrained", "--device", str(device), "-b", str(args.batch_size), "--model", args.model,
             "--lr", str(args.lr),
             "--out", tempfile.mkdtemp(), "--name", "gpu_check"] + (["--amp"] if amp else [])
    targs = build_parser("gpu check", method_cls).parse_args(flags)
    check_args(targs)
    targs.device_obj = device
    data = SyntheticData(args.num_samples, 45, args.batch_size, args.img_size, device)
    trainer = Trainer(targs, method_cls, splits=data)
    trainer.ddp_model.train()
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.warmup):
        trainer.train_step(data.batch(g))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        losses, _ = trainer.train_step(data.batch(g))
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return args.steps * args.batch_size / seconds, peak, losses["total"].item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=31500, help="memory rows (all 31,500 NWPU-RESISC45 images; its train split holds 22,005)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--lr", type=float, default=0.01, help="random init on noise diverges at the paper's 0.1")
    p.add_argument("--device", default="cuda", help="cuda (the point of this check) or cpu (a smoke test)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; this check needs one (or --device cpu for a smoke test)")
    device = select_device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.img_size}x{args.img_size}, {args.model}, {args.num_samples} memory rows, {args.steps} steps")
    print(f"{'variant':8}{'amp':6}{'img/s':>10}{'peak GiB':>10}{'loss':>9}")
    for variant in ("MB", "MU"):
        for amp in (False, True):
            ips, peak, loss = measure(variant, amp, args, device)
            print(f"{variant:8}{str(amp):6}{ips:10.0f}{peak:10.2f}{loss:9.3f}", flush=True)
            if loss != loss:
                sys.exit("error: the loss became nan")


if __name__ == "__main__":
    main()
