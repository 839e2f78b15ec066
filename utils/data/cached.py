"""The cached input pipeline: decode every image once into RAM, augment whole batches as tensors.

What it computes. Eval batches are eval_transform's output: Resize((S, S)), ToTensor, Normalize.
Train batches are train_transform's (docs/method.md section 1):

    Resize((S, S)) -> RandomGrayscale(p=0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4)
    -> RandomHorizontalFlip() -> ToTensor (/255) -> Normalize(ImageNet mean, std)

with every random choice drawn per image as those transforms draw them (sample_augmentation:
grayscale and flip flags, a random order of the four jitter ops, their factors), and each op
computed with the formulas of torchvision.transforms.functional on float tensors in [0, 1]
(TF.rgb_to_grayscale, TF.adjust_brightness, _contrast, _saturation, _hue, TF.hflip): for the same
choices, a batch equals those functions applied image by image, to float rounding (the tests
check it). The Pillow pipeline (--pipeline pil) applies the same ops to 8-bit Pillow images,
which round after every op (truncating blends, an 8-bit HSV round trip for the hue), so for the
same choices its pixels differ from these by that rounding: about 1.5/255 on average on
colour images, up to about 25/255 on a few pixels. (This module used to reproduce Pillow's 8-bit
arithmetic exactly on the CPU; it was no faster than these formulas, so it went:
docs/benchmarks.md section 4.2.)

How. The resize (the same Pillow resize as transforms.Resize((S, S))) is done once, into one
uint8 tensor (CachedImages); CachedBatches gathers each batch from it and augments the batch
on its device, on the CPU optionally in DataLoader worker processes.
"""
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF
from tqdm import tqdm

from utils.data.loader_workers import ignore_stop_signals, sample_seed
from utils.data.scenes import read_rgb
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD

GRAYSCALE_P = 0.2
BRIGHTNESS = CONTRAST = SATURATION = (0.6, 1.4)  # ColorJitter(0.4, ...): factors in [1 - 0.4, 1 + 0.4]
HUE = (-0.4, 0.4)
FLIP_P = 0.5


# ---------------------------------------------------------------------------
# Decode once


class _Decode(Dataset):
    def __init__(self, samples, size):
        self.samples, self.size = samples, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        # TF.resize on a Pillow image is what transforms.Resize((S, S)) does: Pillow bilinear, antialiased.
        img = TF.resize(read_rgb(self.samples[i][0]), [self.size, self.size])
        return TF.pil_to_tensor(img)  # 3 x S x S uint8


class CachedImages:
    """Every image of a SceneDataset, decoded and resized to size x size, as one uint8 tensor.

    `images`: N x 3 x S x S uint8 (in the dataset's index order), `labels`: N labels.
    Memory: N * 3 * S * S bytes, e.g. 22,005 NWPU-RESISC45 train images at S = 256 take 4.3 GB
    (float32 would take four times that). Decoding runs in `num_workers` DataLoader workers.
    """

    def __init__(self, dataset, size=256, num_workers=0, batch_size=64, progress=True, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.size = int(size)
        self.mean, self.std = tuple(mean), tuple(std)  # the backbone's normalisation, applied per batch
        self.labels = dataset.labels.clone()
        self.images = torch.empty(len(dataset.samples), 3, self.size, self.size, dtype=torch.uint8)
        loader = DataLoader(_Decode(dataset.samples, self.size), batch_size=batch_size,
                            num_workers=num_workers, worker_init_fn=ignore_stop_signals)
        pos = 0
        for batch in tqdm(loader, desc=f"decoding {len(self.images)} images", disable=not progress,
                          leave=False):
            self.images[pos:pos + len(batch)] = batch
            pos += len(batch)

    def __len__(self):
        return len(self.images)


# ---------------------------------------------------------------------------
# Batched colour ops: x is B x 3 x H x W float in [0, 1], factors are B-vectors.
# The formulas are those of torchvision's tensor implementations, clamped to
# [0, 1] after each op as torchvision does. They work in place on x (callers
# pass their own copies): on the CPU a fresh buffer per op costs more than the op.
# They use 0/1 float masks and arithmetic instead of torch.where, which is
# several times slower than arithmetic on the CPU.


def _per_image(f, x):
    return torch.as_tensor(f, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def _mask(a, b):
    """a == b as a 0/1 float tensor."""
    return torch.eq(a, b, out=torch.empty_like(a))


def rgb_to_grayscale(x):
    """B x 1 x H x W luma, torchvision's weights."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_brightness_(x, factor):
    # torchvision: blend with black, f x + (1 - f) 0 = f x.
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x, factor):
    # torchvision: blend with the mean of the image's grayscale version.
    f = _per_image(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation_(x, factor):
    # torchvision: blend with the grayscale image.
    f = _per_image(factor, x)
    gray = rgb_to_grayscale(x).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def adjust_hue_(x, factor):
    # torchvision: RGB -> HSV, H <- (H + f) mod 1, HSV -> RGB. A hue shift keeps V = max(r, g, b)
    # and the chroma C = V - min(r, g, b), so this goes straight from the shifted hue back to RGB
    # with the closed form  channel = V - C clamp(min(k, 4 - k), 0, 1),  k = (n + 6 H) mod 6,
    # n = 5, 3, 1 for r, g, b: torchvision's values (to float rounding) in fewer passes.
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # 6 H from the channel that is the max (ties as torchvision: r first, then g).
    is_r = _mask(maxc, r)
    is_g = _mask(maxc, g).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hue6 = (g - b).mul_(is_r).add_((b - r).mul_(is_g)).add_((r - g).mul_(is_b))
    hue6.div_(chroma + _mask(chroma, torch.zeros_like(chroma)))  # grays (C = 0): any hue works
    hue6.add_(is_g.mul_(2.0)).add_(is_b.mul_(4.0)).add_(6.0 * _per_image(factor, x)[:, 0])
    k = hue6.unsqueeze(-3) + torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k.sub_(torch.floor(k / 6.0).mul_(6.0))  # mod 6
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.sub(maxc.unsqueeze(-3), t.mul_(chroma.unsqueeze(-3)), out=x)


# ColorJitter's op ids: its get_params draws a permutation of these.
JITTER_OPS = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)


def sample_augmentation(batch_size, generator=None):
    """The random choices of the train augmentations for a batch, drawn on the CPU (so that a
    seeded generator gives the same batch on any device): grayscale and flip flags, the jitter
    order (a random permutation of the 4 ops per image) and the 4 jitter factors per image."""
    def uniform(lo, hi):
        return torch.rand(batch_size, generator=generator) * (hi - lo) + lo

    return {
        "grayscale": torch.rand(batch_size, generator=generator) < GRAYSCALE_P,
        "order": torch.rand(batch_size, 4, generator=generator).argsort(dim=1),
        "factors": torch.stack([uniform(*BRIGHTNESS), uniform(*CONTRAST), uniform(*SATURATION),
                                uniform(*HUE)], dim=1),  # B x 4, in JITTER_OPS order
        "flip": torch.rand(batch_size, generator=generator) < FLIP_P,
    }


def apply_augmentation_(x, params):
    """Apply sampled choices (CPU tensors, from sample_augmentation) to x, B x 3 x H x W float
    in [0, 1] on any device, in place. Which images get which op is worked out on the CPU, so a
    GPU batch never waits for the host."""
    def select(mask):  # indices on x's device, or None
        rows = mask.nonzero().squeeze(1)
        return (rows, rows.to(x.device, non_blocking=True)) if len(rows) else (None, None)

    _, gray = select(params["grayscale"])
    if gray is not None:
        x.index_copy_(0, gray, rgb_to_grayscale(x.index_select(0, gray)).expand(-1, 3, -1, -1))
    # Every image gets all four jitter ops, in its own order: at each position apply each op
    # to the images that have it there.
    for position in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            rows, sel = select(params["order"][:, position] == op_id)
            if sel is not None:
                x.index_copy_(0, sel, op(x.index_select(0, sel), params["factors"][rows, op_id]))
    _, flip = select(params["flip"])
    if flip is not None:
        x.index_copy_(0, flip, x.index_select(0, flip).flip(-1))
    return x


def _to_unit_(x_uint8, out):
    # ToTensor's .float().div(255), written straight into the output buffer (same values).
    return torch.div(x_uint8, 255, out=out)


def _normalize_(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    # Normalize's sub_/div_, so eval outputs are identical to eval_transform's.
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _sub_batches(x):
    # On the CPU, work through about 2**19 pixels (eight 256 x 256 images) at a time: their
    # buffers stay in cache and are recycled by the allocator. On a GPU, one pass is fastest.
    n = len(x)
    step = max(1, 2 ** 19 // (x.shape[-2] * x.shape[-1])) if x.device.type == "cpu" else max(1, n)
    return [slice(a, a + step) for a in range(0, n, step)]


def normalize_batch(x_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Eval: uint8 B x 3 x S x S -> normalised float, equal to eval_transform on each image."""
    out = torch.empty(x_uint8.shape, dtype=torch.float32, device=x_uint8.device)
    for part in _sub_batches(x_uint8):
        _normalize_(_to_unit_(x_uint8[part], out[part]), mean, std)
    return out


def augment_batch(x_uint8, generator=None, out=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Train: uint8 B x 3 x S x S -> augmented, normalised float32 on the same device (into `out`
    when given). The per-image random choices come from `generator` (a CPU torch.Generator) or
    torch's global RNG."""
    return _augment(x_uint8, sample_augmentation(len(x_uint8), generator), out, mean, std)


def _augment(x_uint8, params, out=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    if out is None:
        out = torch.empty(x_uint8.shape, dtype=torch.float32, device=x_uint8.device)
    for part in _sub_batches(x_uint8):
        x = _to_unit_(x_uint8[part], out[part])
        _normalize_(apply_augmentation_(x, {k: v[part] for k, v in params.items()}), mean, std)
    return out


# ---------------------------------------------------------------------------
# Batches


class _BatchJobs(Dataset):
    """For DataLoader workers: item (indices, params) -> the augmented batch, built in the worker
    from the cache (forked workers read it copy-on-write) straight into shared memory."""

    def __init__(self, cache):
        self.cache = cache

    def __getitem__(self, job):
        idx, params = job
        x = self.cache.images[idx]
        out = torch.empty(0, dtype=torch.float32)
        if torch.utils.data.get_worker_info() is not None:  # as default_collate does
            out = out.new(out._typed_storage()._new_shared(x.numel(), device=out.device))
        out = _augment(x, params, out.resize_(x.shape), self.cache.mean, self.cache.std)
        return {"img": out, "label": self.cache.labels[idx], "idx": idx}


def _one_thread(_):
    ignore_stop_signals()
    torch.set_num_threads(1)  # the workers already use the cores; threads within them only contend


class CachedBatches:
    """Batches {"img", "label", "idx"} from CachedImages, like a DataLoader over SceneDataset.

    batches: an iterable of index lists (e.g. the training engine's batch sampler; it is iterated
    afresh on every pass, so a sampler gives a new order each epoch). Each batch is gathered from
    the cache (in RAM), moved to `device` as uint8 and augmented (augment=True) or only normalised
    there. With augment=True on the CPU and num_workers > 0, whole batches are augmented in that
    many DataLoader worker processes (one thread each), ahead of the consumer; the random choices
    are still drawn in this process: from `generator`, in batch order, or with `seed` given,
    each image's from (seed, epoch, its index) alone, as the Pillow pipeline draws them.
    """

    def __init__(self, cache, batches, device="cpu", augment=False, generator=None, num_workers=0,
                 seed=None, epoch=0):
        self.cache, self.batches = cache, batches
        self.device, self.augment, self.generator = torch.device(device), augment, generator
        self.num_workers, self.seed, self.epoch = num_workers, seed, epoch

    def __len__(self):
        return len(self.batches)

    def _jobs(self):
        for batch in self.batches:
            idx = torch.as_tensor(list(batch), dtype=torch.long)
            if not self.augment:
                yield idx, None
            elif self.seed is None:
                yield idx, sample_augmentation(len(idx), self.generator)
            else:
                draws = [sample_augmentation(1, torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i)))
                         for i in idx.tolist()]
                yield idx, {k: torch.cat([d[k] for d in draws]) for k in draws[0]}

    def __iter__(self):
        if self.augment and self.device.type == "cpu" and self.num_workers > 0:
            yield from DataLoader(_BatchJobs(self.cache), batch_size=None, sampler=self._jobs(),
                                  num_workers=self.num_workers, worker_init_fn=_one_thread)
            return
        for idx, params in self._jobs():
            x = self.cache.images[idx]
            if self.device.type == "cuda":
                x = x.pin_memory()  # lets the copy below run asynchronously
            x = x.to(self.device, non_blocking=True)
            norm = self.cache.mean, self.cache.std
            img = _augment(x, params, None, *norm) if self.augment else normalize_batch(x, *norm)
            yield {"img": img, "label": self.cache.labels[idx], "idx": idx}
