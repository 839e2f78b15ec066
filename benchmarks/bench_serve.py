"""Load test of `python -m utils.retrieve serve` at archive scale (a benchmark, not a test).

    python benchmarks/bench_serve.py                                         # 10^6 x 64 bits, 16 clients, 30 s
    python benchmarks/bench_serve.py --size 100000 --clients 4 --seconds 5   # a quick look

It writes a synthetic index folder under --work (a temporary folder by default, removed at the
end): random codes, 45 classes drawn at random, a path per item, written by IndexWriter as
`retrieve index` writes an index, with small PNGs for the first --images items (the others'
files do not exist, and the load asks for no image). Then it starts the server on 127.0.0.1 (a
free port) as a user does, and runs:

1. one client alone for --baseline-seconds (the latency of an idle server);
2. --clients closed-loop clients for --seconds, each with its own keep-alive connection (threads
   of this process, on the same machine as the server): GET /api/search?id=I&k=K for a random
   item I, the next request once the answer is read; every answer must be a 200 whose JSON holds
   K results (checked in full for one answer in 20, by its length and status for the others);
3. thumbnails: --thumbnails items' GET /api/image/I, made (decoded, resized, written to the
   cache) and then again from the cache.

Reported: requests, requests per second, latency p50 / p90 / p99 / max, errors, the engine time
the server measured (search_ms), and the server's resident memory (VmRSS; RssFile is the
memory-mapped index and libraries, RssAnon the heap) after start and after the load.
"""
import argparse
import http.client
import json
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import print_header  # noqa: E402
from utils.retrieval.index_file import IndexWriter  # noqa: E402

CLASSES = 45  # NWPU-RESISC45's count


def build_index(folder, size, bits, images, seed):
    """A synthetic index folder of `size` random codes, and PNGs for its first `images` items."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size)
    root = os.path.join(folder, "synthetic")
    paths = [os.path.join(root, f"c{int(y):02d}", f"{i:07d}.png") for i, y in enumerate(labels.tolist())]
    header = {"bits": bits, "config": {"arch": "resnet18", "num_classes": CLASSES, "dim": bits, "in_channels": 3,
                                       "img_size": 64},
              "checkpoint": os.path.join(folder, "no-checkpoint.pth"), "weights_sha256": "synthetic",
              "classes": [f"c{c:02d}" for c in range(CLASSES)]}
    out = os.path.join(folder, "synthetic.index")
    writer = IndexWriter.create(out, header, paths, labels)
    rows = writer.open_rows()
    for start in range(0, size, 1 << 20):
        stop = min(size, start + (1 << 20))
        rows[start:stop] = rng.integers(0, 256, (stop - start, rows.shape[1]), dtype=np.uint8)
    rows.flush()
    del rows
    writer.finish()
    for i in range(min(images, size)):
        os.makedirs(os.path.dirname(paths[i]), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(paths[i])
    return out


def memory(pid):
    """VmRSS, RssAnon and RssFile of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def start_server(index, extra):
    proc = subprocess.Popen([sys.executable, "-m", "utils.retrieve", "serve", "--index", index, "--port", "0",
                             "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    started = time.time()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                raise SystemExit(f"the server stopped: {proc.stderr.read()[-2000:]}")
            continue
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return proc, int(found.group(1)), time.time() - started, line.strip()


def client(port, size, k, deadline, latencies, errors, engine_ms, seed, check_every=20):
    rng = random.Random(seed)
    conn, n = None, 0
    while time.perf_counter() < deadline:
        item = rng.randrange(size)
        started = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", f"/api/search?id={item}&k={k}")
            response = conn.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - started
            ok = response.status == 200
            if ok and n % check_every == 0:
                answer = json.loads(body)
                ok = len(answer["results"]) == k and answer["query"]["id"] == item
                engine_ms.append(answer["search_ms"])
        except (OSError, http.client.HTTPException, ValueError):
            elapsed, ok = time.perf_counter() - started, False
            conn = None
        n += 1
        (latencies if ok else errors).append(elapsed)


def load(port, size, k, clients, seconds, seed):
    latencies, errors, engine_ms = [], [], []
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(port, size, k, deadline, latencies, errors, engine_ms, seed + i))
               for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, engine_ms, time.perf_counter() - started


def summary(name, latencies, errors, engine_ms, wall):
    ms = np.array(latencies) * 1000
    q = np.percentile(ms, [50, 90, 99]) if len(ms) else [float("nan")] * 3
    n = len(latencies) + len(errors)
    line = (f"| {name} | {n} | {n / wall:.0f} | {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} | {ms.max() if len(ms) else 0:.1f} "
            f"| {len(errors)} | {statistics.median(engine_ms) if engine_ms else float('nan'):.2f} |")
    print(line, flush=True)
    return line


def thumbnails(port, count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for rounds in range(2):
        times = []
        for item in range(count):
            started = time.perf_counter()
            conn.request("GET", f"/api/image/{item}")
            response = conn.getresponse()
            body = response.read()
            times.append(time.perf_counter() - started)
            assert response.status == 200 and body.startswith(b"\x89PNG"), (response.status, body[:200])
        out.append(1000 * statistics.median(times))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="items in the index (default 10^6)")
    p.add_argument("--bits", type=int, default=64, help="bits per code (default 64)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=30, help="length of the load (default 30 s)")
    p.add_argument("--baseline-seconds", type=float, default=5, help="one client alone first (default 5 s)")
    p.add_argument("-k", type=int, default=20, help="results per query (default 20, the page's)")
    p.add_argument("--images", type=int, default=200, help="items given a real PNG (default 200)")
    p.add_argument("--thumbnails", type=int, default=100, help="thumbnails made, then read from the cache")
    p.add_argument("--work", default=None, help="folder for the index (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="more flags for serve, e.g. '--engine ivf'")
    args = p.parse_args()
    print_header()
    work = args.work or tempfile.mkdtemp(prefix="bench_serve_")
    proc = None
    try:
        started = time.perf_counter()
        index = build_index(work, args.size, args.bits, args.images, args.seed)
        print(f"built {index}: {args.size} x {args.bits} bits in {time.perf_counter() - started:.1f} s")
        proc, port, boot, line = start_server(index, args.serve_args.split())
        print(f"{line} (after {boot:.1f} s)")
        time.sleep(1)
        before = memory(proc.pid)
        print(f"server memory after start: {before}")
        print(f"load average before the load: {os.getloadavg()}")
        print("| run | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | engine ms (p50) |")
        print("|---|---|---|---|---|---|---|---|---|")
        if args.baseline_seconds > 0:
            summary("1 client", *load(port, args.size, args.k, 1, args.baseline_seconds, args.seed + 1000))
        result = load(port, args.size, args.k, args.clients, args.seconds, args.seed)
        summary(f"{args.clients} clients, {args.seconds:.0f} s", *result)
        after = memory(proc.pid)
        print(f"load average after the load: {os.getloadavg()}")
        print(f"server memory after the load: {after}")
        if args.thumbnails:
            made, cached = thumbnails(port, min(args.thumbnails, args.images, args.size))
            print(f"thumbnails (64x64 PNG): made {made:.1f} ms, from the cache {cached:.1f} ms (median)")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        print(f"server stopped by SIGTERM: exit {code}")
        if result[1]:
            raise SystemExit(f"{len(result[1])} errors")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
