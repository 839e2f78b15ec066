"""Why DHCNN's codes collapse on the digits demo at lr 0.01 (docs/benchmarks.md section 3.1).

    python benchmarks/dhcnn_collapse.py --data DATA                 # 16/32/64 bits, lr 0.01 and 0.001

Part 1, at initialisation (the run's seed, first training batch, random-init ResNet-18 at
32x32, -b 64): the scale of the trunk feature x and of u = FC1(x), of theta_ij = u_i . u_j / 2,
how many pairs sit where softplus saturates (|theta| > 5), and the gradient each term of the
loss sends to u and to FC1's weight; FC1/FC2 drawn as docs/method.md section 2 says (kaiming_normal_)
and with nn.Linear's default init (what the authors' hashing layer uses).
Part 2, the first epoch at each --lr: per step |u|, mean |theta_ij|, the fraction of distinct
codes in the batch, bit balance (mean over bits of |mean over the batch of b|: 0 balanced, 1
every sample the same bit) and |grad FC1|; after the epoch the same for the val codes, and val P@20.
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from baselines.dhcnn import DHCNN  # noqa: E402
from baselines.dpsh import quantization_loss  # noqa: E402
from benchmarks.common import print_header  # noqa: E402
from utils.evaluation.encoding import evaluate  # noqa: E402
from utils.training.flags import build_parser, check_args, select_device  # noqa: E402
from utils.training.trainer import Trainer  # noqa: E402


def code_stats(u):
    """Fraction of distinct codes and bit balance of the rows of u."""
    b = u > 0
    return len(set(map(tuple, b.int().tolist()))) / len(b), b.float().mul(2).sub(1).mean(0).abs().mean().item()


class TracedDHCNN(DHCNN):
    """DHCNN, recording the statistics of every step's codes."""

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.trace = []

    def losses(self, batch):
        u = batch.f.detach()
        off = ~torch.eye(len(u), dtype=torch.bool, device=u.device)
        distinct, balance = code_stats(u)
        self.trace.append({"|u|": u.norm(dim=1).mean().item(), "|theta_ij|": (u @ u.t() / 2)[off].abs().mean().item(),
                           "distinct": distinct, "balance": balance})
        return super().losses(batch)


def trainer(data, dim, lr, init):
    argv = ["--dataset", "digits", "--data", data, "--no-pretrained", "--img-size", "32", "-b", "64", "--lr", str(lr),
            "--num_workers", "0", "--dim", str(dim), "--device", "cpu", "--epochs", "1", "--out", tempfile.mkdtemp()]
    args = build_parser("DHCNN collapse", DHCNN).parse_args(argv)
    check_args(args)
    args.device_obj = select_device("cpu")
    t = Trainer(args, TracedDHCNN)
    if init == "default":
        t.model.fc1.reset_parameters()
        t.model.fc2.reset_parameters()
    return t


def at_init(t):
    model = t.model.train()
    batch = next(iter(t.splits.train_loader(0)))
    img, label = batch["img"], torch.as_tensor(batch["label"])
    x = model.backbone(img)
    u = model.fc1(x)
    logits = model.fc2(u)
    n = len(u)
    off = ~torch.eye(n, dtype=torch.bool)
    s = (label[:, None] == label[None]).float()
    theta = u @ u.t() / 2
    pair = F.softplus(theta) - s * theta
    xn = F.normalize(x.detach(), dim=1)
    row = {"|x|": x.norm(dim=1).mean().item(), "cos(x_i, x_j)": (xn @ xn.t())[off].mean().item(),
           "|u|": u.norm(dim=1).mean().item(), "theta_ii": theta.diag().mean().item(),
           "theta_ij (i!=j)": theta[off].mean().item(), "|theta_ij|>5": (theta[off].abs() > 5).float().mean().item()}
    terms = {"pairwise i!=j": pair[off].sum() / n ** 2, "pairwise i=j": pair.diag().sum() / n ** 2,
             "ce": F.cross_entropy(logits, label), "eta*quant": t.method.eta * quantization_loss(u)}
    for name, term in terms.items():
        du, dw = torch.autograd.grad(term, [u, model.fc1.weight], retain_graph=True)
        row[f"|d {name}/du|"], row[f"|d {name}/dW1|"] = du.norm().item(), dw.norm().item()
    return row


def first_epoch(t, show_steps):
    grads = []
    step = t.train_step

    def traced_step(batch):
        out = step(batch)
        grads.append(t.model.fc1.weight.grad.norm().item())
        return out

    t.train_step = traced_step
    t.train_epoch(None)
    metrics, q_codes, _ = evaluate(t.model, t.splits, "val", t.device, t.settings.topk, t.autocast, return_codes=True)
    for i, (rec, g) in enumerate(zip(t.method.trace, grads)):
        if i in show_steps or i == len(grads) - 1:
            print(f"    step {i:2d}: |u| {rec['|u|']:8.2f}  |theta_ij| {rec['|theta_ij|']:9.2f}  distinct codes "
                  f"{rec['distinct']:.3f}  bit balance {rec['balance']:.3f}  |grad FC1| {g:8.2f}")
    distinct, balance = code_stats(q_codes.float())
    print(f"    after epoch 1: val P@20 {metrics['P@20']:.4f}, val codes distinct {distinct:.4f}, bit balance {balance:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="data folder (the digits demo is created there if missing)")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--inits", nargs="+", default=["kaiming", "default"], choices=["kaiming", "default"])
    args = p.parse_args()
    print_header()
    rows = {(d, i): at_init(trainer(args.data, d, 0.01, i)) for d in args.dims for i in args.inits}
    print("\nPart 1, at initialisation:\n" + "quantity".ljust(22) + "".join(f"{d} bits {i}".rjust(17) for d, i in rows))
    for key in next(iter(rows.values())):
        print(key.ljust(22) + "".join(f"{r[key]:17.4g}" for r in rows.values()))
    print("\nPart 2, the first epoch:")
    for d in args.dims:
        for lr in args.lrs:
            for init in args.inits:
                print(f"  {d} bits, lr {lr}, FC1 init {init}:")
                first_epoch(trainer(args.data, d, lr, init), show_steps=range(6))


if __name__ == "__main__":
    main()
