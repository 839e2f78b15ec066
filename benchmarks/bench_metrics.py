"""Time utils.metrics.retrieval_metrics (counting rank) against reference_metrics (stable sort).

    python benchmarks/bench_metrics.py --preset nwpu      # 6,300 x 22,005 x 128 bits, 45 classes
    python benchmarks/bench_metrics.py --preset ucm       # 420 x 1,470, 21 classes
    python benchmarks/bench_metrics.py --queries 3195 --db 22005 --bits 128 --classes 45

Codes as a trained network gives them, roughly: one random +-1 prototype per class, and each
item's real-valued code is its class's prototype plus Gaussian noise whose std is the item's own,
uniform on [0, 2 --noise] (some items sit on their prototype, some far from it; --noise 1.5
gives mAP 0.70, mAP@100 0.92, P@H<=2 0.17 at the NWPU size). Labels uniform over the classes.
Both functions compute every metric (topk 20 and 100, P@H<=2, the PR curve) on all queries;
--rounds alternate them and the speed-up is taken within each round (the machine's other load
shifts both alike). Their values must agree to 1e-9.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import print_header, spread  # noqa: E402
from utils.metrics import reference_metrics, retrieval_metrics  # noqa: E402

# (queries, database, classes) of the test split against the train split (the split of docs/method.md section 1)
PRESETS = {"nwpu": (6300, 22005, 45), "ucm": (420, 1470, 21), "digits": (360, 1257, 10)}


def codes_like_a_network(n_queries, n_db, bits, classes, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(classes, bits, generator=g).sign()
    yq = torch.randint(0, classes, (n_queries,), generator=g)
    yd = torch.randint(0, classes, (n_db,), generator=g)
    q_std = 2 * noise * torch.rand(n_queries, 1, generator=g)
    db_std = 2 * noise * torch.rand(n_db, 1, generator=g)
    q = proto[yq] + q_std * torch.randn(n_queries, bits, generator=g)
    db = proto[yd] + db_std * torch.randn(n_db, bits, generator=g)
    return q, yq, db, yd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="sets --queries, --db and --classes")
    p.add_argument("--queries", type=int, default=6300)
    p.add_argument("--db", type=int, default=22005)
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--classes", type=int, default=45)
    p.add_argument("--noise", type=float, default=1.5, help="mean std of the codes' noise")
    p.add_argument("--topk", type=int, nargs="+", default=[20, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset:
        args.queries, args.db, args.classes = PRESETS[args.preset]

    print_header()
    print(f"{args.queries:,} queries x {args.db:,} database items x {args.bits} bits, {args.classes} classes, "
          f"noise {args.noise}, on {args.device}, {args.rounds} rounds")
    dev = torch.device(args.device)
    case = [t.to(dev) for t in codes_like_a_network(args.queries, args.db, args.bits, args.classes,
                                                     args.noise, args.seed)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    kw = dict(topk=tuple(args.topk), with_pr=True)
    times = {"retrieval_metrics": [], "reference_metrics": []}
    for _ in range(args.rounds):
        for name, f in (("retrieval_metrics", retrieval_metrics), ("reference_metrics", reference_metrics)):
            sync()
            start = time.perf_counter()
            out = f(*case, **kw)
            sync()
            times[name].append(time.perf_counter() - start)
            if name == "retrieval_metrics":
                fast = out
            else:
                ref = out

    worst = max(float(np.abs(np.asarray(fast[k]) - np.asarray(ref[k])).max()) for k in ref)
    print("values: " + ", ".join(f"{k} {v:.4f}" for k, v in fast.items() if isinstance(v, float)))
    print(f"max |retrieval_metrics - reference_metrics| over all values: {worst:.1e} "
          f"({'agree to 1e-9' if worst <= 1e-9 else 'DISAGREE'})")
    for name, ts in times.items():
        print(f"{name:>18}: {spread(ts)} s, all: {', '.join(f'{t:.2f}' for t in ts)}")
    ratios = [r / f for f, r in zip(times["retrieval_metrics"], times["reference_metrics"])]
    saved = [r - f for f, r in zip(times["retrieval_metrics"], times["reference_metrics"])]
    print(f"reference / counting rank, per round: {spread(ratios)}x; seconds saved per evaluation: {spread(saved)}")
    sys.exit(0 if worst <= 1e-9 else 1)


if __name__ == "__main__":
    main()
