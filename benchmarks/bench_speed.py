"""Speed and memory of the chunked CDNE loss and of the cached input pipeline, against the
straightforward versions.

    python benchmarks/bench_speed.py loss --rows 22005 65537 1000000     # B = 256, L = 128
    python benchmarks/bench_speed.py pipeline --images 512 --workers 0 2  # colour 256x256 JPEGs
    python benchmarks/bench_speed.py loss --device cuda --rows 1000000    # on a GPU
    python benchmarks/bench_speed.py pipeline --device cuda               # cached batches augmented on a GPU

loss: forward + backward of the CDNE loss, B x L embeddings against an N x L memory, for each N
   of --rows. `direct` is the unchunked training path, CDNELoss on the full B x N scores
   e.float() @ memory.T / T (as MemoryBank.forward makes them); `chunked` is
   utils.losses.chunked_cdne_loss (the training engine uses it when B * N > 2**24). On the CPU each
   (variant, N) runs in a fresh subprocess, so that its peak resident memory (ru_maxrss, less the
   peak after building the memory) is its own; --rounds alternate the two variants, and the
   time ratio is taken within each round (the machine's other load shifts both alike).
pipeline: images per second of the training input pipeline on --images colour JPEGs (made here,
   smooth colour fields with texture, like aerial scenes) of --size x --size pixels, batches of
   --batch, each variant with each --workers count, alternating in --rounds rounds:
     pil     SceneDataset + utils.data.train_transform in a DataLoader (decode, resize and augment
             every image with Pillow, every epoch: --pipeline pil)
     cached  utils.data.cached.CachedBatches over CachedImages (decoded once; the decode time is
             printed separately): torchvision's float formulas on whole uint8 batches
     v2      torchvision.transforms.v2 per uint8 image of the same cache, in a DataLoader
     exact   with --exact-module FILE only: CachedBatches from that file, e.g. the Pillow-exact
             8-bit CPU arithmetic that fast_data.py had until commit 6365800:
             git show 6365800:utils/fast_data.py > /tmp/fast_data_exact.py
"""
import argparse
import contextlib
import importlib.util
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

from benchmarks.common import print_header, spread  # noqa: E402
from utils.losses import CDNELoss, chunked_cdne_loss, use_chunked_loss  # noqa: E402

T = 0.05


# ----------------------------------------------------------------------------- loss

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
    e, memory, labels, idx = loss_case(args.rows[0], args.batch, args.dim, args.classes)
    before = peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        e.grad = None
        start = time.perf_counter()
        value = run_loss(args.loss_child, e, memory, labels, idx)
        times.append(time.perf_counter() - start)
    torch.save({"loss": value, "grad": e.grad}, args.out)
    print(json.dumps({"time": min(times), "peak_mb": peak_rss_mb() - before, "baseline_mb": before}))


def bench_loss_cpu(args, rows, tmp):
    print(f"\nN = {rows:,} (B x N = {args.batch * rows:,}: the engine uses the "
          f"{'chunked' if use_chunked_loss(args.batch, rows) else 'direct'} loss)")
    runs = {"direct": [], "chunked": []}
    for _ in range(args.rounds):
        for variant in runs:
            out = os.path.join(tmp, variant + ".pt")
            cmd = [sys.executable, os.path.abspath(__file__), "loss", "--loss-child", variant, "--out", out,
                   "--rows", str(rows), "--batch", str(args.batch), "--dim", str(args.dim),
                   "--classes", str(args.classes), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} loss run failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(torch.load(out))
            runs[variant].append(r)
    d, c = runs["direct"][-1], runs["chunked"][-1]
    for name, rs in runs.items():
        print(f"  {name:8s} time {spread([r['time'] for r in rs], '{:.3f}')} s   peak RSS increase "
              f"{spread([r['peak_mb'] for r in rs], '{:.0f}')} MB   (memory etc. before: {rs[0]['baseline_mb']:.0f} MB)")
    ratios = [cr["time"] / dr["time"] for dr, cr in zip(runs["direct"], runs["chunked"])]
    mem = [cr["peak_mb"] / max(dr["peak_mb"], 1e-9) for dr, cr in zip(runs["direct"], runs["chunked"])]
    print(f"  chunked / direct: time {spread(ratios)}x, peak memory {spread(mem, '{:.3f}')}x")
    print(f"  |loss difference| {abs(d['loss'] - c['loss']):.1e}, max |grad difference| "
          f"{(d['grad'] - c['grad']).abs().max().item():.1e} (max |grad| {d['grad'].abs().max().item():.1e})")


def bench_loss_cuda(args, rows):
    print(f"\nN = {rows:,} on {torch.cuda.get_device_name()}")
    e, memory, labels, idx = loss_case(rows, args.batch, args.dim, args.classes, device="cuda")
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
    print(f"  chunked / direct: time {ct / dt:.2f}x, peak memory {cp / max(dp, 1e-9):.3f}x; "
          f"|loss difference| {abs(dv - cv):.1e}, max |grad difference| {(dg - cg).abs().max().item():.1e}")


def bench_loss(args):
    if args.loss_child:
        return loss_child(args)
    print_header()
    print(f"CDNE loss, forward + backward: B = {args.batch}, L = {args.dim}, {args.classes} classes, T = {T}, "
          f"on {args.device}; best of {args.repeats} passes per process, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            if args.device.startswith("cuda"):
                bench_loss_cuda(args, rows)
            else:
                bench_loss_cpu(args, rows, tmp)


# ----------------------------------------------------------------------------- pipeline

def make_colour_images(root, n, size, classes=8, seed=0):
    """n colour JPEGs (quality 90) in <root>/colour/<class>/: smooth random colour fields (bicubic
    upsampling of 8 x 8 noise) plus fine texture, so the colour ops meet real hues and saturations."""
    import torch.nn.functional as F
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        low = torch.rand(1, 3, 8, 8, generator=g)
        x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0]
        x = (x + 0.08 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
        folder = os.path.join(root, "colour", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def load_module_file(path):
    """A copy of a utils module from another commit, imported inside the utils package."""
    spec = importlib.util.spec_from_file_location("utils._bench_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _V2Images(torch.utils.data.Dataset):
    """torchvision.transforms.v2 on each uint8 image of a cache (not Pillow-exact either)."""

    def __init__(self, cache):
        from torchvision.transforms import v2

        from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        self.cache = cache
        self.transform = v2.Compose([v2.RandomGrayscale(0.2), v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
                                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return {"img": self.transform(self.cache.images[i]), "label": self.cache.labels[i], "idx": i}


def _one_thread(_):
    torch.set_num_threads(1)


def bench_pipeline(args):
    from torch.utils.data import DataLoader, RandomSampler

    from utils.data.cached import CachedImages
    from utils.data.scenes import SceneDataset
    from utils.data.transforms import train_transform

    if args.threads:
        torch.set_num_threads(args.threads)
    print_header()
    print(f"input pipeline: {args.images} colour {args.size}x{args.size} JPEGs, batches of {args.batch}, "
          f"{args.batches} timed batches after the prefetched ones, {args.rounds} rounds, "
          f"main process with {torch.get_num_threads()} threads, workers with 1, cached batches augmented on {args.device}")
    exact = load_module_file(args.exact_module) if args.exact_module else None
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        make_colour_images(tmp, args.images, args.size)
        dataset = SceneDataset(tmp, "colour", "train", ext="jpg", transform=train_transform(args.size))
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            cache = CachedImages(SceneDataset(tmp, "colour", "train", ext="jpg"), size=args.size,
                                 num_workers=max(args.workers), progress=False)
        decode = time.perf_counter() - start
        n_timed = args.batches * args.batch

        def loader(variant, workers, g):
            # Batches with replacement, so that warm-up + timed batches never reach an epoch end.
            warmup = 2 * workers + 1
            total = (warmup + args.batches) * args.batch
            if variant in ("pil", "v2"):
                ds = dataset if variant == "pil" else _V2Images(cache)
                sampler = RandomSampler(ds, replacement=True, num_samples=total, generator=g)
                return warmup, DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=workers,
                                          worker_init_fn=_one_thread)
            batches = torch.randint(0, len(cache), (total // args.batch, args.batch), generator=g).tolist()
            module = exact if variant == "exact" else sys.modules["utils.data.cached"]
            return warmup, module.CachedBatches(cache, batches, device=device, augment=True, generator=g,
                                                num_workers=workers)

        variants = [(v, w) for v in ["pil", "cached", "v2"] + (["exact"] if exact else []) for w in args.workers]
        rates = {key: [] for key in variants}
        for r in range(args.rounds):
            for variant, workers in variants:
                warmup, batches = loader(variant, workers, torch.Generator().manual_seed(r))
                it = iter(batches)
                for _ in range(warmup):
                    next(it)
                sync()
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(it)["img"].to(device)  # the Pillow batches travel to the device too
                sync()
                rates[variant, workers].append(n_timed / (time.perf_counter() - start))
                del it, batches
    print(f"\n{'variant':>8} {'workers':>7}   {'images/s: median (min-max, runs)':34s} ratio per round, same workers: "
          f"{'/ pil':28s} / cached")
    for (variant, workers), rs in rates.items():
        ratios = [spread([a / b for a, b in zip(rs, rates[base, workers])]) + "x" for base in ("pil", "cached")]
        print(f"{variant:>8} {workers:7d}   {spread(rs, '{:.0f}'):34s} {ratios[0]:28s} {ratios[1]}")
    print(f"one-off decode of {len(cache)} images into the cache: {decode:.2f} s "
          f"({cache.images.numel() / 2 ** 20:.0f} MB uint8)")
    diff = pillow_difference(cache.images[:64])
    print(f"cached vs Pillow ops for the same random choices, {len(diff)} images: |difference| "
          f"{float(diff.mean()):.2f}/255 on average, {float(diff.max()):.1f}/255 at most")


def pillow_difference(x_uint8):
    """|cached augmentation - train_transform's Pillow ops| for the same choices, in 1/255 steps."""
    from torchvision.transforms import functional as TF

    from utils.data.cached import _augment, sample_augmentation
    from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    params = sample_augmentation(len(x_uint8), torch.Generator().manual_seed(0))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    pil = []
    for i, img in enumerate(x_uint8):
        img = TF.to_pil_image(img)
        if params["grayscale"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        for op in params["order"][i].tolist():
            img = ops[op](img, float(params["factors"][i, op]))
        pil.append(TF.to_tensor(TF.hflip(img) if params["flip"][i] else img))
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_STD, IMAGENET_MEAN))
    return ((_augment(x_uint8, params) * std + mean - torch.stack(pil)).abs() * 255)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loss", help="chunked vs direct CDNE loss")
    lo.add_argument("--rows", type=int, nargs="+", default=[22005, 65537, 1_000_000], help="memory rows N")
    lo.add_argument("--batch", type=int, default=256, help="B")
    lo.add_argument("--dim", type=int, default=128, help="L")
    lo.add_argument("--classes", type=int, default=45)
    lo.add_argument("--repeats", type=int, default=2, help="passes per process (the best is kept)")
    lo.add_argument("--rounds", type=int, default=3, help="processes per variant and N, alternating")
    lo.add_argument("--device", default="cpu")
    lo.add_argument("--loss-child", choices=["direct", "chunked"], help=argparse.SUPPRESS)
    lo.add_argument("--out", help=argparse.SUPPRESS)
    pi = sub.add_parser("pipeline", help="cached vs Pillow input pipeline on the CPU")
    pi.add_argument("--images", type=int, default=512)
    pi.add_argument("--size", type=int, default=256)
    pi.add_argument("--batch", type=int, default=64)
    pi.add_argument("--batches", type=int, default=4, help="timed batches per run")
    pi.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    pi.add_argument("--rounds", type=int, default=3)
    pi.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: default)")
    pi.add_argument("--exact-module", help="a fast_data.py from another commit, timed as `exact`")
    pi.add_argument("--device", default="cpu", help="where the cached batches are augmented (e.g. cuda)")
    args = p.parse_args()
    bench_loss(args) if args.what == "loss" else bench_pipeline(args)


if __name__ == "__main__":
    main()
