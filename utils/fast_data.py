"""A fast input pipeline: decode every image once into RAM, augment whole batches as tensors.

The per-image pipeline (SceneDataset + train_transform) decodes, resizes and
jitters each image with Pillow in DataLoader workers, every epoch. Here each
image is decoded and resized once (the same Pillow resize as
transforms.Resize((S, S))) into a uint8 tensor, and the SPEC section-1
augmentations are applied to a whole batch at once, on the batch's device:

    RandomGrayscale(p=0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4) -> RandomHorizontalFlip()
    -> /255 -> Normalize(ImageNet mean, std)

with every random choice drawn per image, as the per-image transforms draw them.
The colour ops are torchvision's tensor formulas with one factor per image; on
identical factors they equal torchvision.transforms.functional on each image (to
float rounding). That float path runs on GPUs. On the CPU the ops instead use Pillow's 8-bit
arithmetic (_augment_cpu, one image at a time), so for the same random choices the outputs
equal train_transform's (which applies them to Pillow images, rounding to 8 bits after each op);
CachedBatches(num_workers=N) runs that in N worker processes.
"""
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF
from tqdm import tqdm

from .data import IMAGENET_MEAN, IMAGENET_STD, read_rgb

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
    Memory: N * 3 * S * S bytes, e.g. 22,050 NWPU-RESISC45 train images at S = 256 take 4.3 GB
    (float32 would take four times that). Decoding runs in `num_workers` DataLoader workers.
    """

    def __init__(self, dataset, size=256, num_workers=0, batch_size=64, progress=True):
        self.size = int(size)
        self.labels = dataset.labels.clone()
        self.images = torch.empty(len(dataset.samples), 3, self.size, self.size, dtype=torch.uint8)
        loader = DataLoader(_Decode(dataset.samples, self.size), batch_size=batch_size,
                            num_workers=num_workers)
        pos = 0
        for batch in tqdm(loader, desc=f"decoding {len(self.images)} images", disable=not progress,
                          leave=False):
            self.images[pos:pos + len(batch)] = batch
            pos += len(batch)

    def __len__(self):
        return len(self.images)

    def to(self, device):
        """Move the cache (e.g. onto the GPU, when it fits there) and return self."""
        self.images = self.images.to(device)
        return self


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


def _normalize_(x):
    # Normalize's sub_/div_, so eval outputs are identical to eval_transform's.
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _sub_batches(x):
    # On the CPU, work through about 2**19 pixels (eight 256 x 256 images) at a time: their
    # buffers stay in cache and are recycled by the allocator. On a GPU, one pass is fastest.
    n = len(x)
    step = max(1, 2 ** 19 // (x.shape[-2] * x.shape[-1])) if x.device.type == "cpu" else max(1, n)
    return [slice(a, a + step) for a in range(0, n, step)]


def normalize_batch(x_uint8):
    """Eval: uint8 B x 3 x S x S -> normalised float, equal to eval_transform on each image."""
    out = torch.empty(x_uint8.shape, dtype=torch.float32, device=x_uint8.device)
    for part in _sub_batches(x_uint8):
        _normalize_(_to_unit_(x_uint8[part], out[part]))
    return out


# ---------------------------------------------------------------------------
# The CPU path: Pillow's 8-bit arithmetic, one image at a time.
#
# train_transform applies the colour ops to Pillow images, which hold 8 bits per channel and
# round after every op. On the CPU the cached pipeline does the same arithmetic (so for the same
# random choices its outputs equal train_transform's). It works on float32 planes holding the
# integers 0..255, straight in the output buffer (ToTensor + Normalize then is one pass at the
# end): elementwise float32 passes are several times cheaper here than int32 conversions and
# gathers (index_select costs 1-3 ns an element; a 256-entry lookup table loses to arithmetic).
#   grayscale   Pillow's RGB -> L:  L = (19595 R + 38470 G + 7471 B + 2**15) >> 16
#               (the integer sums stay below 2**24, so float32 holds them exactly)
#   brightness  Image.blend(black, img, f):      trunc(clip(f v))            (float32 arithmetic,
#   contrast    Image.blend(gray mean, img, f):  trunc(clip(m + f (v - m))),  as Pillow's blend)
#               m = int(mean(L) + 0.5)
#   saturation  Image.blend(L, img, f):          trunc(clip(L + f (v - L)))
#   hue         RGB -> HSV (8 bits), H += int(255 f) mod 256, HSV -> RGB, Pillow's conversions
#               through small tables (hue_tables; hsv_tables has them over all 2**24 inputs).
# Gray images (r = g = b, e.g. after RandomGrayscale) are worked on as one plane: brightness and
# contrast keep them gray (the same table on each channel, and L = v), and saturation and hue
# leave them unchanged (L = v, and Pillow's HSV gives s = 0, which converts back to (v, v, v)).
# The flip commutes with the colour ops (contrast's mean does not depend on pixel order), so it
# is applied first, to the uint8 image.

_HSV = {}


def hsv_tables():
    """(to_hsv, to_rgb): int32 tables of Pillow's RGB <-> HSV conversions over all 2**24 inputs.
    to_hsv[r << 16 | g << 8 | b] = h << 16 | s << 8 | v; to_rgb[h << 16 | s << 8 | v] = b << 16 | g << 8 | r. Built once per process (about 1-2 s, 128 MB); build it
    before forking workers and they share it."""
    if not _HSV:
        import numpy as np
        from PIL import Image
        c = np.arange(1 << 24, dtype=np.uint32)
        grid = np.stack([c >> 16, (c >> 8) & 255, c & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
        del c
        hsv = np.asarray(Image.fromarray(grid, "RGB").convert("HSV")).reshape(-1, 3).astype(np.int32)
        to_hsv = torch.from_numpy((hsv[:, 0] << 16) | (hsv[:, 1] << 8) | hsv[:, 2])
        del hsv
        rgb = np.asarray(Image.frombytes("HSV", (4096, 4096), grid.tobytes()).convert("RGB"))
        rgb = rgb.reshape(-1, 3).astype(np.int32)
        to_rgb = torch.from_numpy(rgb[:, 0] | (rgb[:, 1] << 8) | (rgb[:, 2] << 16))
        _HSV["tables"] = (to_hsv, to_rgb)
    return _HSV["tables"]


def luma_u8(x32):
    """Pillow's RGB -> L on int32 ... x 3 x H x W values 0..255: int32 ... x H x W."""
    r, g, b = x32.unbind(-3)
    return (r * 19595).add_(g, alpha=38470).add_(b, alpha=7471).add_(32768).bitwise_right_shift_(16)


def _f32(factor):
    # The factor as Pillow's blend sees it (a C float), as a Python float: products with 8-bit
    # integers are then exact in double, so float32 results do not depend on how torch casts it.
    return float(torch.tensor(float(factor), dtype=torch.float32))


def _luma_f(x, out=None):
    """Pillow's RGB -> L on a float32 3 x H x W image of integers: float32 H x W (exact)."""
    r, g, b = x.unbind(-3)
    out = torch.mul(r, 19595.0, out=out)
    return out.add_(g, alpha=38470.0).add_(b, alpha=7471.0).add_(32768.0).mul_(1.0 / 65536).floor_()


def _blend_(x, base, factor):
    # Image.blend(base, x, factor) = trunc(clip(base + factor (x - base))) in float32; base is a
    # number or a plane broadcast over the channels.
    return x.sub_(base).mul_(_f32(factor)).add_(base).clamp_(0.0, 255.0).trunc_()


def _brightness_f_(x, factor, gray=False):
    return x.mul_(_f32(factor)).clamp_(0.0, 255.0).trunc_()  # the blend with 0


def _contrast_f_(x, factor, gray=False):
    # On a gray image (one plane or three equal ones) L = v.
    luma = x[0] if gray else _luma_f(x)
    total = float(luma.sum(dtype=torch.float64))
    mean = int(total / (x.shape[-1] * x.shape[-2]) + 0.5)  # ImageEnhance.Contrast's mean (ImageStat)
    return _blend_(x, float(mean), factor)


def _saturation_f_(x, factor, gray=False):
    if gray:
        return x  # L = v: the blend gives v back
    return _blend_(x, _luma_f(x), factor)


_HUE = {}


def hue_tables():
    """Small tables of Pillow's 8-bit HSV round trip (see _hue_f_), built once per process
    (milliseconds, under 2 MB; build them before forking workers and they share them):
    hue_shl8[(r - g + 255) * 511 + (g - b + 255)] = h << 8 (Pillow's h depends only on differences),
    sat[v << 8 | min] = s, and weights[c][h << 8 | s], float64: channel c of HSV -> RGB is
    round(v * weights[c]) (1, 1 - s/255 or 1 - fs/255-type factors by hue sextant, as Pillow
    computes them; tests check all 2**24 inputs against Pillow's conversion)."""
    if not _HUE:
        import numpy as np
        from PIL import Image
        d1, d2 = torch.arange(-255, 256).view(-1, 1), torch.arange(-255, 256).view(1, -1)
        b = torch.maximum(-d2, -(d1 + d2)).clamp_(min=0)
        g, r = b + d2, b + d2 + d1
        rgb = torch.stack([r, g, b], -1).clamp_(max=255).to(torch.uint8).numpy()  # span > 255: unused
        hue = torch.from_numpy(np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))[..., 0].astype(np.int32))
        v, mn = torch.arange(256).view(-1, 1).expand(256, 256), torch.arange(256).view(1, -1).expand(256, 256)
        rgb = torch.stack([v, torch.minimum(mn, v), torch.minimum(mn, v)], -1).to(torch.uint8).numpy()
        sat = torch.from_numpy(np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))[..., 1].astype(np.int32))
        # Pillow's hsv2rgb: i = floor(h 6 / 255), f = (float)(h 6 / 255 - i), fs = f s (float),
        # p = round(v (1 - s / 255)), q = round(v (1 - fs / 255)), t = round(v (1 - (s - fs) / 255)).
        h = torch.arange(256, dtype=torch.float64).view(-1, 1)
        s = torch.arange(256, dtype=torch.float64).view(1, -1)
        i = torch.floor(h * 6.0 / 255.0)
        fs = (h * 6.0 / 255.0 - i).float() * s.float()
        one = torch.ones(256, 256, dtype=torch.float64)
        p = (1.0 - s / 255.0).expand(256, 256)
        q = 1.0 - fs.double() / 255.0
        t = 1.0 - (s.float() - fs).double() / 255.0
        sextant = (i % 6).expand(256, 256)
        weights = torch.zeros(3, 256, 256, dtype=torch.float64)
        for k, chans in enumerate([(one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q)]):
            for c in range(3):
                weights[c] = torch.where(sextant == k, chans[c], weights[c])
        weights[:, :, 0] = 1.0  # s = 0: (v, v, v)
        _HUE["tables"] = ((hue << 8).reshape(-1).contiguous(), sat.reshape(-1).contiguous(),
                          [w.reshape(-1).contiguous() for w in weights])
    return _HUE["tables"]


def _hue_f_(x, factor, gray=False):
    # Pillow's RGB -> HSV, H += shift, HSV -> RGB, through hue_tables(): five gathers from tables
    # that stay in cache, where one lookup into 2**24-entry tables misses it nearly every time.
    if gray:
        return x  # s = 0: Pillow's HSV -> RGB gives (v, v, v)
    shift = int(factor * 255) % 256  # np.int32(hue_factor * 255).astype(np.uint8): truncate, wrap
    hue_shl8, sat, weights = hue_tables()
    r, g, b = x.unbind(-3)
    diffs = torch.sub(g, b).add_(255.0 * 512).add_(torch.sub(r, g), alpha=511.0).to(torch.int32).view(-1)
    v = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.add(torch.minimum(torch.minimum(r, g), b), v, alpha=256.0).to(torch.int32).view(-1)
    hs = torch.index_select(hue_shl8, 0, diffs)
    hs.add_(shift << 8).bitwise_and_(0xFF00).bitwise_or_(torch.index_select(sat, 0, vmin))
    vd = v.view(-1).to(torch.float64)
    for c in range(3):  # round: half to even, never a tie here (tests check all inputs)
        x[c].view(-1).copy_(torch.index_select(weights[c], 0, hs).mul_(vd).round_())
    return x


JITTER_OPS_F = (_brightness_f_, _contrast_f_, _saturation_f_, _hue_f_)


def _via_float(op):
    def op_u8_(x, factor):
        """x: 3 x H x W uint8, in place (see JITTER_OPS_F)."""
        x.copy_(op(x.to(torch.float32), factor))
        return x
    op_u8_.__name__ = op.__name__.strip("_").replace("_f", "_u8_")
    return op_u8_


brightness_u8_, contrast_u8_, saturation_u8_, hue_u8_ = map(_via_float, JITTER_OPS_F)
JITTER_OPS_U8 = (brightness_u8_, contrast_u8_, saturation_u8_, hue_u8_)


def grayscale_u8_(x):
    """x: 3 x H x W uint8, in place: Pillow's convert("L") in all three channels."""
    x.copy_(_luma_f(x.to(torch.float32)).unsqueeze(0).expand_as(x))
    return x


def _is_gray(x):
    """Whether a 3 x H x W uint8 image has r = g = b everywhere."""
    flat = x.reshape(3, -1)
    if flat.shape[1] % 8 == 0:
        flat = flat.view(torch.int64)  # 8 pixels a compare
    return torch.equal(flat[0], flat[1]) and torch.equal(flat[1], flat[2])


def _augment_image(src, gray_flag, order, factors, flip, out):
    """One image: uint8 3 x H x W -> out (float32 3 x H x W), Pillow's arithmetic, normalised."""
    if flip:
        src = src.flip(-1)
    if gray_flag:
        plane = _luma_f(out.copy_(src), out=torch.empty(src.shape[1:]))[None]
        gray = True
    else:
        gray = _is_gray(src)
        plane = out[:1].copy_(src[:1]) if gray else out.copy_(src)
    for op_id in order:
        JITTER_OPS_F[op_id](plane, factors[op_id], gray)
    # ToTensor + Normalize in one pass: v / (255 std) - mean / std.
    if gray:
        for c in (2, 1, 0):  # channel 0 last: it may be the plane itself
            torch.mul(plane[0], _SCALE_LIST[c], out=out[c]).add_(_SHIFT_LIST[c])
    else:
        out.mul_(_SCALE).add_(_SHIFT)
    return out


_SCALE = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
_SCALE_LIST, _SHIFT_LIST = _SCALE.view(-1).tolist(), _SHIFT.view(-1).tolist()


def _augment_cpu(x_uint8, params, out=None):
    if out is None:
        out = torch.empty(x_uint8.shape, dtype=torch.float32)
    gray, order = params["grayscale"].tolist(), params["order"].tolist()
    factors, flip = params["factors"].tolist(), params["flip"].tolist()
    for i in range(len(x_uint8)):
        _augment_image(x_uint8[i], gray[i], order[i], factors[i], flip[i], out[i])
    return out


def augment_batch(x_uint8, generator=None, out=None):
    """Train: uint8 B x 3 x S x S -> augmented, normalised float on the same device.
    The per-image random choices come from `generator` (a CPU torch.Generator) or torch's global RNG.
    On the CPU the colour ops use Pillow's 8-bit arithmetic (as train_transform does); on other
    devices torchvision's float formulas (see apply_augmentation_)."""
    params = sample_augmentation(len(x_uint8), generator)
    if x_uint8.device.type == "cpu":
        return _augment_cpu(x_uint8, params, out)
    out = torch.empty(x_uint8.shape, dtype=torch.float32, device=x_uint8.device)
    for part in _sub_batches(x_uint8):
        x = _to_unit_(x_uint8[part], out[part])
        _normalize_(apply_augmentation_(x, {k: v[part] for k, v in params.items()}))
    return out


# ---------------------------------------------------------------------------
# Batches


class _BatchJobs(Dataset):
    """For DataLoader workers: item (indices, params) -> the augmented batch, built in the worker
    from the cache (forked workers read it, and the HSV tables, copy-on-write) into shared memory."""

    def __init__(self, cache):
        self.cache = cache

    def __getitem__(self, job):
        idx, params = job
        x = self.cache.images[idx]
        out = torch.empty(0, dtype=torch.float32)
        if torch.utils.data.get_worker_info() is not None:  # straight into shared memory, as default_collate does
            out = out.new(out._typed_storage()._new_shared(x.numel(), device=out.device))
        out = _augment_cpu(x, params, out.resize_(x.shape))
        return {"img": out, "label": self.cache.labels[idx], "idx": idx}


def _one_thread(_):
    torch.set_num_threads(1)  # the workers already use the cores; threads within them only contend


class CachedBatches:
    """Batches {"img", "label", "idx"} from CachedImages, like a DataLoader over SceneDataset.

    batches: an iterable of index lists (e.g. the training engine's batch sampler; it is iterated
    afresh on every pass, so a sampler gives a new order each epoch). Images are gathered where
    the cache lives, moved to `device` as uint8 and augmented (augment=True) or only normalised there.
    With augment=True on the CPU (cache and device), the colour ops use Pillow's 8-bit arithmetic
    (see _augment_cpu) and, with num_workers > 0, whole batches are augmented in that many
    DataLoader worker processes (one thread each), ahead of the consumer; the random choices are
    still drawn in this process from `generator`, so the batches equal those of num_workers=0.
    """

    def __init__(self, cache, batches, device="cpu", augment=False, generator=None, num_workers=0):
        self.cache, self.batches = cache, batches
        self.device, self.augment, self.generator = torch.device(device), augment, generator
        self.num_workers = num_workers

    def __len__(self):
        return len(self.batches)

    def _jobs(self):
        for batch in self.batches:
            idx = torch.as_tensor(list(batch), dtype=torch.long)
            yield idx, sample_augmentation(len(idx), self.generator)

    def __iter__(self):
        on_cpu = self.cache.images.device.type == "cpu"
        if self.augment and on_cpu and self.device.type == "cpu":
            hue_tables()  # built before the workers fork, so that they share them
            jobs = _BatchJobs(self.cache)
            if self.num_workers > 0:
                batches = DataLoader(jobs, batch_size=None, sampler=self._jobs(), num_workers=self.num_workers,
                                     worker_init_fn=_one_thread)
            else:
                batches = map(jobs.__getitem__, self._jobs())
            yield from batches
            return
        for batch in self.batches:
            idx = torch.as_tensor(list(batch), dtype=torch.long)
            x = self.cache.images[idx.to(self.cache.images.device)]
            if self.device.type == "cuda" and x.device.type == "cpu":
                x = x.pin_memory()  # lets the copy below run asynchronously
            x = x.to(self.device, non_blocking=True)
            img = augment_batch(x, self.generator) if self.augment else normalize_batch(x)
            yield {"img": img, "label": self.cache.labels[idx], "idx": idx}
