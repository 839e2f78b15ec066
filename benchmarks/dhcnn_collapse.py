"""Why DHCNN's codes collapse on the digits demo at lr 0.01, and whether the authors' DHCNN does
(docs/benchmarks.md section 3.1).

    python benchmarks/dhcnn_collapse.py --data DATA                     # both definitions, 16/32/64 bits
    python benchmarks/dhcnn_collapse.py --data DATA --pairs buffer --lrs 0.1 0.01 0.001

--pairs batch is the in-batch definition (DPSH's pairwise term within the batch, theta_ij = u_i . u_j / 2,
+ CE + 0.1 quantisation), --pairs buffer the authors' code (the batch against the buffer U of the train
set, theta_ij = u_i . U_j / 32, 0.8 (pairwise + 10 quantisation) + 0.2 CE): baselines/dhcnn.py.
--optim method trains with the method's defaults (the authors': plain SGD, no momentum, weight decay
1e-5), --optim section5 with docs/method.md section 5's (SGD, Nesterov momentum 0.9, weight decay 1e-4),
the optimiser the in-batch definition was measured with before issue 23.

Part 1, at initialisation (the run's seed, first training batch, random-init ResNet-18 at
32x32, -b 64): the scale of the trunk feature x and of u = FC1(x), of theta, how many pairs sit
where softplus saturates (|theta| > 5), and the gradient each term of the loss, with its weight in
the total, sends to u and to FC1's weight; FC1/FC2 drawn as docs/method.md section 2 says
(kaiming_normal_) and with nn.Linear's default init (what the authors' hashing layer uses). For
--pairs buffer at the first step U holds only the batch's own rows (the others are 0 and send nothing).
Part 2, the first epoch at each --lr: per step |u|, mean |theta_ij| (i != j; for buffer, over the
rows of U written so far), the fraction of distinct codes in the batch, bit balance (mean over bits of
|mean over the batch of b|: 0 balanced, 1 every sample the same bit) and |grad FC1|; after the epoch
the same for the val codes, and val P@20.
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
        terms = super().losses(batch)  # --pairs buffer: U holds the batch's rows from here on
        u = batch.f.detach()
        distinct, balance = code_stats(u)
        self.trace.append({"|u|": u.norm(dim=1).mean().item(),
                           "|theta_ij|": theta_off(self, u, batch.idx).abs().mean().item(),
                           "distinct": distinct, "balance": balance})
        return terms


def theta_off(method, u, idx):
    """The loss's theta_ij over its pairs i != j: within the batch (batch), or against the rows of U
    written so far, the batch's own row left out (buffer)."""
    if method.pairs == "batch":
        return (u @ u.t() / 2)[~torch.eye(len(u), dtype=torch.bool, device=u.device)]
    theta = u @ method.U.t() / method.theta_div
    keep = (method.U != 0).any(1).unsqueeze(0).expand_as(theta).clone()
    keep[torch.arange(len(u)), idx] = False
    return theta[keep]


SECTION5 = ["--momentum", "0.9", "--nesterov", "--weight-decay", "1e-4", "--lr-gamma", "0.5"]


def trainer(data, dim, lr, init, pairs, optim):
    argv = ["--dataset", "digits", "--data", data, "--no-pretrained", "--img-size", "32", "-b", "64", "--lr", str(lr),
            "--num_workers", "0", "--dim", str(dim), "--device", "cpu", "--epochs", "1", "--out", tempfile.mkdtemp(),
            "--pairs", pairs] + (SECTION5 if optim == "section5" else [])
    args = build_parser("DHCNN collapse", DHCNN).parse_args(argv)
    check_args(args)
    args.device_obj = select_device("cpu")
    t = Trainer(args, TracedDHCNN)
    if init == "default":
        t.model.fc1.reset_parameters()
        t.model.fc2.reset_parameters()
    return t


def at_init(t):
    model, m = t.model.train(), t.method
    batch = next(iter(t.splits.train_loader(0)))
    img, label = batch["img"], torch.as_tensor(batch["label"])
    idx = torch.as_tensor(batch["idx"])
    x = model.backbone(img)
    u = model.fc1(x)
    logits = model.fc2(u)
    n = len(u)
    off = ~torch.eye(n, dtype=torch.bool)
    s = (label[:, None] == label[None]).float()
    xn = F.normalize(x.detach(), dim=1)
    if m.pairs == "batch":
        theta = u @ u.t() / 2
        pair = (F.softplus(theta) - s * theta) / n ** 2
        quant = m.eta * (torch.where(u.detach() > 0, 1.0, -1.0) - u).square().mean()
        ce = m.ce_weight * F.cross_entropy(logits, label)
    else:
        # The first step: U holds the batch's rows only; the other N - B rows are 0 (theta 0, no gradient).
        big_n = len(m.U)
        theta = u @ u.detach().t() / m.theta_div
        pair = (1 - m.ce_mix) * (F.softplus(theta) - s * theta) / (big_n * n)
        quant = (1 - m.ce_mix) * m.lamda * (torch.sign(u.detach()) - u).square().sum() / (big_n * n)
        ce = m.ce_mix * F.cross_entropy(logits, label)
    row = {"|x|": x.norm(dim=1).mean().item(), "cos(x_i, x_j)": (xn @ xn.t())[off].mean().item(),
           "|u|": u.norm(dim=1).mean().item(), "theta_ii": theta.diag().mean().item(),
           "theta_ij (i!=j)": theta[off].mean().item(), "|theta_ij|>5": (theta[off].abs() > 5).float().mean().item()}
    terms = {"pairwise i!=j": pair[off].sum(), "pairwise i=j": pair.diag().sum(), "ce": ce, "quant": quant}
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
    print(f"    after epoch 1: val P@20 {metrics['P@20']:.4f}, val codes distinct {distinct:.4f}, "
          f"bit balance {balance:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="data folder (the digits demo is created there if missing)")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--inits", nargs="+", default=["kaiming", "default"], choices=["kaiming", "default"])
    p.add_argument("--pairs", nargs="+", default=["batch", "buffer"], choices=["batch", "buffer"])
    p.add_argument("--optims", nargs="+", default=["method"], choices=["method", "section5"],
                   help="method: the method's defaults (the authors' plain SGD); section5: docs/method.md section 5's")
    args = p.parse_args()
    print_header()
    for pairs in args.pairs:
        rows = {(d, i): at_init(trainer(args.data, d, 0.01, i, pairs, "method"))
                for d in args.dims for i in args.inits}
        print(f"\nPart 1, --pairs {pairs}, at initialisation:\n" + "quantity".ljust(22)
              + "".join(f"{d} bits {i}".rjust(17) for d, i in rows))
        for key in next(iter(rows.values())):
            print(key.ljust(22) + "".join(f"{r[key]:17.4g}" for r in rows.values()))
    print("\nPart 2, the first epoch:")
    for pairs in args.pairs:
        for optim in args.optims:
            for d in args.dims:
                for lr in args.lrs:
                    for init in args.inits:
                        print(f"  --pairs {pairs}, {optim} optimiser, {d} bits, lr {lr}, FC1 init {init}:")
                        first_epoch(trainer(args.data, d, lr, init, pairs, optim), show_steps=range(6))


if __name__ == "__main__":
    main()
