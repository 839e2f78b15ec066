"""Time the tie-aware metrics (utils/metrics/ties.py) at a dataset's size on the CPU.

    python benchmarks/bench_ties.py --queries 3150 --db 22050 --bits 128 --classes 45   # NWPU val
    python benchmarks/bench_ties.py --queries 3150 --db 22050 --bits 16 --classes 45    # more ties

Codes as benchmarks/bench_metrics.py makes them (a +-1 prototype per class plus noise). Per round:
the counting pass (RankCounts, which both orders share), the index-order metrics read off it, the
tie-aware ones computed from its per-distance counts, and retrieval_metrics end to end with
ties="index" and with ties="expected".
"""
import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_metrics import codes_like_a_network  # noqa: E402
from benchmarks.common import print_header, spread  # noqa: E402
from utils.metrics import metrics_of, retrieval_metrics  # noqa: E402
from utils.metrics.rank_counting import RankCounts  # noqa: E402


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3150)
    p.add_argument("--db", type=int, default=22050)
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--classes", type=int, default=45)
    p.add_argument("--noise", type=float, default=1.5, help="mean std of the codes' noise")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print_header()
    print(f"{args.queries:,} queries x {args.db:,} database items x {args.bits} bits, {args.classes} classes, "
          f"noise {args.noise}, on the CPU ({torch.get_num_threads()} threads), {args.rounds} rounds")
    case = codes_like_a_network(args.queries, args.db, args.bits, args.classes, args.noise, args.seed)
    kw = dict(topk=(20, 100), with_pr=True)
    times = {k: [] for k in ("counting pass", "index metrics", "tie-aware metrics", "retrieval_metrics index",
                             "retrieval_metrics expected")}
    for _ in range(args.rounds):
        s, t = timed(lambda: RankCounts(*case, (20, 100), 2))
        times["counting pass"].append(t)
        index, t = timed(lambda: metrics_of(s, "index", True))
        times["index metrics"].append(t)
        expected, t = timed(lambda: metrics_of(s, "expected", True))
        times["tie-aware metrics"].append(t)
        times["retrieval_metrics index"].append(timed(lambda: retrieval_metrics(*case, **kw))[1])
        times["retrieval_metrics expected"].append(timed(lambda: retrieval_metrics(*case, ties="expected", **kw))[1])
    print("index:     " + ", ".join(f"{k} {v:.4f}" for k, v in index.items() if isinstance(v, float)))
    print("tie-aware: " + ", ".join(f"{k} {v:.4f}" for k, v in expected.items() if isinstance(v, float)))
    for name, ts in times.items():
        print(f"{name:>26}: {spread(ts)} s, all: {', '.join(f'{t:.3f}' for t in ts)}")


if __name__ == "__main__":
    main()
