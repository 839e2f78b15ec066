"""Time utils.metrics.retrieval_metrics against the per-query numpy reference.

    python benchmarks/bench_metrics.py --queries 10000 --db 100000 --bits 64 --ref-queries 200

Random (seeded) real-valued codes and single-label classes. The reference runs on the
first --ref-queries queries only and its time is scaled to all queries; the values of
both are compared on that subset (they must agree to 1e-6).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.reference_metrics import reference_metrics  # noqa: E402
from utils.metrics import retrieval_metrics  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--db", type=int, default=100000)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ref-queries", type=int, default=200)
    p.add_argument("--topk", type=int, nargs="+", default=[20, 100])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="time retrieval_metrics this many times, report the best")
    args = p.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    q_codes = torch.randn(args.queries, args.bits, generator=g)
    db_codes = torch.randn(args.db, args.bits, generator=g)
    q_labels = torch.randint(0, args.classes, (args.queries,), generator=g)
    db_labels = torch.randint(0, args.classes, (args.db,), generator=g)
    topk = tuple(args.topk)
    dev = torch.device(args.device)
    qd, qld, dbd, dbld = (t.to(dev) for t in (q_codes, q_labels, db_codes, db_labels))

    print(f"{args.queries} queries x {args.db} database items x {args.bits} bits, {args.classes} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}")

    times = []
    for _ in range(max(1, args.repeat)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ours = retrieval_metrics(qd, qld, dbd, dbld, topk=topk, with_pr=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t_ours = min(times)

    n_ref = min(args.ref_queries, args.queries)
    t0 = time.perf_counter()
    ref = reference_metrics(q_codes[:n_ref].numpy(), q_labels[:n_ref].numpy(), db_codes.numpy(),
                            db_labels.numpy(), topk=topk)
    t_ref = (time.perf_counter() - t0) * args.queries / n_ref
    sub = retrieval_metrics(qd[:n_ref], qld[:n_ref], dbd, dbld, topk=topk, with_pr=True)

    print(f"\nvalues on the first {n_ref} queries (torch vs numpy reference)")
    print(f"{'metric':>14} {'torch':>12} {'reference':>12} {'|diff|':>9}")
    worst = 0.0
    for key in ref:
        a, b = np.asarray(sub[key]), np.asarray(ref[key])
        diff = float(np.abs(a - b).max())
        worst = max(worst, diff)
        if a.ndim == 0:
            print(f"{key:>14} {float(a):12.6f} {float(b):12.6f} {diff:9.1e}")
        else:
            print(f"{key:>14} {'(' + str(a.size) + ' radii)':>12} {'':>12} {diff:9.1e}")
    ok = worst <= 1e-6
    print(f"max |diff| {worst:.1e}: {'agree to 1e-6' if ok else 'DISAGREE'}")

    print(f"\nall {args.queries} queries, all metrics of retrieval_metrics (incl. full mAP and PR curve)")
    print(f"{'':>28} {'seconds':>9}")
    print(f"{'torch retrieval_metrics':>28} {t_ours:9.2f}" + (f"   (best of {len(times)})" if len(times) > 1 else ""))
    print(f"{'numpy reference (scaled)':>28} {t_ref:9.2f}   (timed on {n_ref} queries, x{args.queries / n_ref:g})")
    print(f"{'speed-up':>28} {t_ref / t_ours:9.1f}x")
    print("\nfull-size torch values: " + ", ".join(f"{k} {v:.4f}" for k, v in ours.items() if isinstance(v, float)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
