"""A few backbones on the digits demo: parameters, training images per second and test mAP@100
after the same epochs (CDNE(MB), random initialisation, every other flag the same).

    python benchmarks/bench_backbones.py --models resnet18 convnext_atto efficientnet_b0 vit_tiny_patch16_224

Each model trains with train_MB/main.py in its own subprocess (--no-pretrained --img-size 32 -b 64
--lr 0.01 --dim 32, --epochs as given); images per second = train images x epochs / the epochs'
training seconds (what the trainer prints; evaluation excluded). Then `python -m utils.retrieve
evaluate` recomputes the test metrics from the best checkpoint, and the table says whether they agree.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_header  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parameters(model, img_size):
    from utils.models import HashingNet
    net = HashingNet(model, num_classes=10, dim=32, pretrained=False, img_size=img_size)
    return sum(p.numel() for p in net.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "convnext_atto", "efficientnet_b0",
                                                   "vit_tiny_patch16_224"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--workdir", default=None, help="data and run folders (default: a temporary folder)")
    args = p.parse_args(argv)
    print_header()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_backbones_")
    rows = []
    for model in args.models:
        flags = ["--data", os.path.join(work, "data"), "--dataset", "digits", "--no-pretrained", "--img-size",
                 str(args.img_size), "-b", "64", "--lr", "0.01", "--dim", "32", "--epochs", str(args.epochs),
                 "--model", model, "--num_workers", "0", "--device", "cpu", "--out", os.path.join(work, "runs"),
                 "--name", model]
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train_MB", "main.py"), *flags],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{model}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1]}")
            continue
        seconds = sum(float(s) for s in re.findall(r"\(training ([0-9.]+) s\)", proc.stdout))
        run = os.path.join(work, "runs", model)
        results = json.load(open(os.path.join(run, "results.json")))
        n_train = results["test"].get("database_size") or _train_count(run)
        evaluated = os.path.join(work, f"{model}_eval.json")
        subprocess.run([sys.executable, "-m", "utils.retrieve", "evaluate", "--checkpoint",
                        os.path.join(run, "checkpoint_best.pth"), "--split", "test", "--device", "cpu",
                        "--json", evaluated], capture_output=True, text=True, cwd=REPO, check=True)
        again = json.load(open(evaluated))["metrics"]["mAP@100"]
        rows.append((model, parameters(model, args.img_size), n_train * args.epochs / seconds,
                     results["test"]["mAP@100"], again))
        print(f"{model}: done", flush=True)
    print(f"\n| backbone | parameters | train images/s | test mAP@100 after {args.epochs} epochs | "
          "retrieve evaluate |\n|---|---|---|---|---|")
    for model, n, speed, test, again in rows:
        print(f"| {model} | {n / 1e6:.2f} M | {speed:.0f} | {test:.4f} | "
              f"{'same' if abs(test - again) < 1e-6 else f'{again:.4f}'} |")


def _train_count(run):
    import torch
    return torch.load(os.path.join(run, "checkpoint_best.pth"), map_location="cpu", weights_only=True)["config"]["num_samples"]


if __name__ == "__main__":
    main()
