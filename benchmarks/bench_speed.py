"""Speed and memory of the two fast paths against the straightforward versions they replace.

    python benchmarks/bench_speed.py                 # N = 400,000 memory rows, digits at 256x256
    python benchmarks/bench_speed.py --quick         # a smaller, faster run
    python benchmarks/bench_speed.py --device cuda   # also the loss on the GPU, and GPU augmentation

1. CDNE loss, forward + backward, B x L embeddings against an N x L memory, on the CPU:
   `direct` is the training path without chunking, CDNELoss on the full B x N scores
   e.float() @ memory.T / T (MemoryBank.forward); `chunked` is utils.losses.chunked_cdne_loss.
   Each variant runs in its own fresh subprocess, so their peak resident memories
   (ru_maxrss, minus the peak after building the memory) do not mix.
2. Input pipeline on the sklearn digits demo resized to --size: the per-image Pillow
   DataLoader (SceneDataset + train_transform, --workers worker processes) against
   CachedImages (decoded once with --workers workers; decode time printed separately)
   + augment_batch on --device, in images per second over --batches batches after warm-up.
"""
import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.losses import CDNELoss, chunked_cdne_loss  # noqa: E402

T = 0.05


def direct_loss(e, memory, labels, idx, temperature=T, margin=0.0):
    """The unchunked loss: B x N scores as MemoryBank.forward makes them, then CDNELoss."""
    return CDNELoss(labels, margin, temperature)(e.float() @ memory.t() / temperature, idx)


def loss_case(rows, batch, dim, classes, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(rows, dim, generator=g)
    memory /= memory.norm(dim=1, keepdim=True)  # in place: no second N x L buffer in the baseline peak
    labels = torch.randint(0, classes, (rows,), generator=g)
    idx = torch.randperm(rows, generator=g)[:batch]
    e = torch.randn(batch, dim, generator=g)
    e = (e / e.norm(dim=1, keepdim=True)).to(device).requires_grad_()
    return e, memory.to(device), labels.to(device), idx.to(device)


def run_loss(variant, e, memory, labels, idx):
    if variant == "direct":
        loss = direct_loss(e, memory, labels, idx)
    else:
        loss = chunked_cdne_loss(e, memory, labels, idx, temperature=T)
    loss.backward()
    return loss.item()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def loss_child(args):
    """In a fresh process: time `repeats` forward + backward passes, report the peak RSS increase."""
    e, memory, labels, idx = loss_case(args.rows, args.batch, args.dim, args.classes)
    before = peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        e.grad = None
        start = time.perf_counter()
        value = run_loss(args.loss_child, e, memory, labels, idx)
        times.append(time.perf_counter() - start)
    torch.save({"loss": value, "grad": e.grad}, args.out)
    print(json.dumps({"times": times, "peak_mb": peak_rss_mb() - before, "baseline_mb": before}))


def bench_loss_cpu(args):
    print(f"\n== CDNE loss on the CPU: N = {args.rows:,} rows, B = {args.batch}, L = {args.dim}, "
          f"{args.classes} classes, T = {T}, forward + backward, best of {args.repeats} ==")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("direct", "chunked"):
            out = os.path.join(tmp, variant + ".pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--loss-child", variant, "--out", out,
                   "--rows", str(args.rows), "--batch", str(args.batch), "--dim", str(args.dim),
                   "--classes", str(args.classes), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} loss run failed:\n{proc.stderr}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].update(torch.load(out))
    d, c = results["direct"], results["chunked"]
    for name, r in results.items():
        print(f"  {name:8s} time {min(r['times']):7.3f} s (all: {', '.join(f'{t:.3f}' for t in r['times'])})   "
              f"peak RSS increase {r['peak_mb']:8.1f} MB   (memory etc. before: {r['baseline_mb']:.0f} MB)")
    print(f"  loss value: direct {d['loss']:.7f}, chunked {c['loss']:.7f}, |difference| {abs(d['loss'] - c['loss']):.2e}")
    print(f"  gradient w.r.t. e: max |difference| {(d['grad'] - c['grad']).abs().max().item():.2e} "
          f"(max |grad| {d['grad'].abs().max().item():.2e})")
    print(f"  chunked / direct: time {min(c['times']) / min(d['times']):.2f}x, "
          f"peak memory {c['peak_mb'] / max(d['peak_mb'], 1e-9):.3f}x")


def bench_loss_cuda(args):
    print(f"\n== CDNE loss on {torch.cuda.get_device_name()}: N = {args.rows:,}, B = {args.batch}, L = {args.dim}, "
          f"best of {args.repeats} ==")
    e, memory, labels, idx = loss_case(args.rows, args.batch, args.dim, args.classes, device="cuda")
    out = {}
    for variant in ("direct", "chunked"):
        run_loss(variant, e, memory, labels, idx)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            e.grad = None
            start = time.perf_counter()
            value = run_loss(variant, e, memory, labels, idx)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        out[variant] = (value, e.grad.clone(), min(times), peak)
        print(f"  {variant:8s} time {min(times) * 1000:8.2f} ms   peak allocated increase {peak:9.1f} MB")
    (dv, dg, dt, dp), (cv, cg, ct, cp) = out["direct"], out["chunked"]
    print(f"  |loss difference| {abs(dv - cv):.2e}, max |grad difference| {(dg - cg).abs().max().item():.2e}")
    print(f"  chunked / direct: time {ct / dt:.2f}x, peak memory {cp / max(dp, 1e-9):.3f}x")


def bench_pipeline(args):
    from torch.utils.data import DataLoader, RandomSampler

    from utils.data import SceneDataset, train_transform
    from utils.digits import make_digits
    from utils.fast_data import CachedBatches, CachedImages

    device = torch.device(args.device)
    print(f"\n== Input pipeline: digits demo at {args.size}x{args.size}, batches of {args.images_batch}, "
          f"{args.workers} workers, {args.batches} timed batches after warm-up, augmentation on {device} ==")
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar would garble the report
            make_digits(tmp, size=32)
        n_timed = args.batches * args.images_batch

        # Baseline: decode, resize and augment every image with Pillow in the workers. Sample with
        # replacement so that warm-up + timed batches never restart the workers at an epoch end;
        # the warm-up drains the batches the workers prefetched, so the timed ones are steady state.
        dataset = SceneDataset(tmp, "digits", "train", ext="png", transform=train_transform(args.size))
        prefetched = args.workers * 2 if args.workers > 0 else 0
        warmup = prefetched + 1
        sampler = RandomSampler(dataset, replacement=True, num_samples=(warmup + args.batches) * args.images_batch)
        loader = iter(DataLoader(dataset, batch_size=args.images_batch, sampler=sampler, num_workers=args.workers))
        for _ in range(warmup):
            next(loader)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(loader)["img"].to(device)
        base_rate = n_timed / (time.perf_counter() - start)
        del loader

        # Cached: decode once, then batched tensor augmentation.
        start = time.perf_counter()
        cache = CachedImages(SceneDataset(tmp, "digits", "train", ext="png"), size=args.size,
                             num_workers=args.workers, progress=False)
        decode = time.perf_counter() - start
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, len(cache), (args.images_batch,), generator=g).tolist()
                   for _ in range(warmup + args.batches)]
        # As the training engine builds it (--num_workers = --workers); the same warm-up as the baseline.
        fast = iter(CachedBatches(cache, batches, device=device, augment=True, generator=g,
                                  num_workers=args.workers))
        for _ in range(warmup):
            next(fast)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(args.batches):
            next(fast)["img"].to(device)
        sync()
        fast_rate = n_timed / (time.perf_counter() - start)

    print(f"  per-image Pillow DataLoader (train_transform): {base_rate:8.1f} images/s")
    print(f"  CachedImages + augment_batch on {device}:{' ' * max(0, 8 - len(str(device)))} {fast_rate:8.1f} images/s"
          f"   ({fast_rate / base_rate:.2f}x)")
    if device.type == "cpu":
        print("  (the digits are gray images: on those the cached CPU path works on one plane and skips "
              "saturation and hue, identities there; colour images cost it more)")
    print(f"  one-off decode of {len(cache)} images into the cache: {decode:.2f} s "
          f"({cache.images.numel() / 2 ** 20:.0f} MB uint8)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000, help="memory rows N for the loss")
    p.add_argument("--batch", type=int, default=256, help="B for the loss")
    p.add_argument("--dim", type=int, default=128, help="L for the loss")
    p.add_argument("--classes", type=int, default=45)
    p.add_argument("--repeats", type=int, default=3, help="loss runs per variant (best is reported)")
    p.add_argument("--size", type=int, default=256, help="image side for the pipeline")
    p.add_argument("--workers", type=int, default=2, help="DataLoader / decode workers")
    p.add_argument("--images-batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches (fewer gives noisy figures)")
    p.add_argument("--device", default="cpu", help="where the augmentation (and an extra loss run) happens")
    p.add_argument("--quick", action="store_true", help="N = 50,000, 128x128 images, 2 loss runs")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--skip-cpu-loss", action="store_true", help="with --device cuda: only the GPU loss run")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--loss-child", choices=["direct", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loss_child:
        return loss_child(args)
    if args.quick:
        args.rows, args.size, args.repeats = min(args.rows, 50_000), min(args.size, 128), min(args.repeats, 2)

    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    if not args.skip_loss:
        if not args.skip_cpu_loss:
            bench_loss_cpu(args)
        if args.device.startswith("cuda"):
            bench_loss_cuda(args)
    if not args.skip_pipeline:
        bench_pipeline(args)


if __name__ == "__main__":
    main()
