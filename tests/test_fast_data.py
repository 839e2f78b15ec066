"""The cached, batched input pipeline against the per-image torchvision/Pillow transforms."""
import pytest
import torch
from torchvision.transforms import functional as TF

from utils import fast_data as fd
from utils.data import IMAGENET_MEAN, IMAGENET_STD, SceneDataset, eval_transform, read_rgb
from utils.digits import make_digits

SIZE = 24  # not the digits' 16, so the cache really resizes


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fast_data"))
    make_digits(root, size=16, per_class=5)
    return SceneDataset(root, "digits", "train", ext="png")


@pytest.fixture(scope="module")
def cache(train_set):
    return fd.CachedImages(train_set, size=SIZE, num_workers=0, progress=False)


def colourful(n=12, size=20, seed=0):
    """Random colours plus the edge cases of the HSV formulas: grays, ties between channels,
    black, white, pure primaries, and 8-bit values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5                       # gray: no hue
    x[1, 1] = x[1, 0]                # r == g ties
    x[2, 2] = x[2, 1]                # g == b ties
    x[3] = torch.randint(0, 256, (3, size, size), generator=g) / 255.0
    x[4] = torch.randint(0, 2, (3, size, size), generator=g).float()  # primaries, black, white
    x[5] = torch.randint(0, 4, (3, size, size), generator=g) / 3.0    # many exact ties
    return x


# --- the cache -------------------------------------------------------------------------


def test_cache_shapes_dtype_and_label_order(train_set, cache):
    assert cache.images.shape == (len(train_set), 3, SIZE, SIZE)
    assert cache.images.dtype == torch.uint8
    assert len(cache) == len(train_set)
    assert torch.equal(cache.labels, train_set.labels)


def test_cache_holds_the_pillow_resized_images_in_dataset_order(train_set, cache):
    for i in (0, 7, len(train_set) - 1):
        img = TF.resize(read_rgb(train_set.samples[i][0]), [SIZE, SIZE])  # = transforms.Resize((S, S))
        assert torch.equal(cache.images[i], TF.pil_to_tensor(img))


def test_cache_with_workers_equals_cache_without(train_set, cache):
    assert torch.equal(fd.CachedImages(train_set, size=SIZE, num_workers=2, progress=False).images, cache.images)


# --- eval -----------------------------------------------------------------------------


def test_normalize_batch_equals_eval_transform(train_set, cache):
    out = fd.normalize_batch(cache.images)
    ref = torch.stack([eval_transform(SIZE)(read_rgb(path)) for path, _ in train_set.samples])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)


# --- the colour ops against torchvision's functional ops, one image at a time -----------


@pytest.mark.parametrize("op, ref_op, lo, hi", [
    (fd.adjust_brightness_, TF.adjust_brightness, 0.6, 1.4),
    (fd.adjust_contrast_, TF.adjust_contrast, 0.6, 1.4),
    (fd.adjust_saturation_, TF.adjust_saturation, 0.6, 1.4),
    (fd.adjust_hue_, TF.adjust_hue, -0.4, 0.4),
    (fd.adjust_hue_, TF.adjust_hue, -0.5, 0.5),
])
def test_batched_jitter_op_equals_torchvision_per_image(op, ref_op, lo, hi):
    x = colourful()
    factors = torch.linspace(lo, hi, len(x))  # includes both ends of the range
    out = op(x.clone(), factors)
    ref = torch.stack([ref_op(img, float(f)) for img, f in zip(x, factors)])
    assert torch.allclose(out, ref, rtol=0, atol=2e-6)


def test_hue_shift_of_zero_and_one_keeps_the_image():
    x = colourful()
    assert torch.allclose(fd.adjust_hue_(x.clone(), torch.zeros(len(x))), x, atol=2e-6)


def test_grayscale_equals_torchvision():
    x = colourful()
    ref = torch.stack([TF.rgb_to_grayscale(img) for img in x])
    assert torch.allclose(fd.rgb_to_grayscale(x), ref, rtol=0, atol=1e-7)


def test_jitter_factors_of_one_are_identities():
    x = colourful()
    ones = torch.ones(len(x))
    for op in (fd.adjust_brightness_, fd.adjust_contrast_, fd.adjust_saturation_):
        assert torch.allclose(op(x.clone(), ones), x, atol=1e-6)


def test_fixed_augmentation_equals_torchvision_composition():
    # Each image's grayscale flag, jitter order, factors and flip as torchvision would apply them.
    x = colourful(n=10)
    params = fd.sample_augmentation(len(x), torch.Generator().manual_seed(1))
    params["grayscale"][:3] = torch.tensor([True, False, True])
    params["flip"][:3] = torch.tensor([True, True, False])
    ref = [torchvision_choices(img, params, i) for i, img in enumerate(x)]
    out = fd.apply_augmentation_(x.clone(), params)
    assert torch.allclose(out, torch.stack(ref), rtol=0, atol=5e-6)


def torchvision_choices(img, params, i):
    """Image i's sampled grayscale flag, jitter order and factors, and flip, applied with
    torchvision's functional ops (to a tensor or a Pillow image)."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if params["grayscale"][i]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    for op_id in params["order"][i].tolist():
        img = ops[op_id](img, float(params["factors"][i, op_id]))
    return TF.hflip(img) if params["flip"][i] else img


# --- the train augmentation end to end -----------------------------------------------------


def pil_reference(x_uint8, params):
    """train_transform's colour ops, flip, ToTensor and Normalize on Pillow images, for given choices."""
    return torch.stack([TF.normalize(TF.to_tensor(torchvision_choices(TF.to_pil_image(img), params, i)),
                                     IMAGENET_MEAN, IMAGENET_STD) for i, img in enumerate(x_uint8)])


def uint8_colourful(n=12, size=20, seed=0):
    return (colourful(n, size, seed) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("op, ref_op, factors", [
    (fd.brightness_u8_, TF.adjust_brightness, [0.6, 0.77, 1.0, 1.23, 1.4]),
    (fd.contrast_u8_, TF.adjust_contrast, [0.6, 0.77, 1.0, 1.23, 1.4]),
    (fd.saturation_u8_, TF.adjust_saturation, [0.6, 0.77, 1.0, 1.23, 1.4]),
    (fd.hue_u8_, TF.adjust_hue, [-0.5, -0.4, -0.13, -0.001, 0.0, 0.001, 0.29, 0.4, 0.5]),
])
def test_uint8_jitter_op_equals_torchvision_on_pillow_images(op, ref_op, factors):
    for img in uint8_colourful(n=6):
        for f in factors:
            ref = TF.pil_to_tensor(ref_op(TF.to_pil_image(img), f))
            assert torch.equal(op(img.clone(), f), ref), (op.__name__, f)


def test_uint8_grayscale_equals_pillow():
    for img in uint8_colourful(n=6):
        ref = TF.pil_to_tensor(TF.rgb_to_grayscale(TF.to_pil_image(img), num_output_channels=3))
        assert torch.equal(fd.grayscale_u8_(img.clone()), ref)


def test_luma_u8_is_pillows_convert_L_on_all_colours():
    to_hsv, _ = fd.hsv_tables()
    c = torch.arange(0, 1 << 24, 97, dtype=torch.int32)  # a spread of 173,000 colours
    rgb = torch.stack([c >> 16, (c >> 8) & 255, c & 255]).view(3, 1, -1)
    ref = TF.pil_to_tensor(TF.to_pil_image(rgb.to(torch.uint8)).convert("L"))
    assert torch.equal(fd.luma_u8(rgb).to(torch.uint8), ref[0])


def test_cpu_augment_batch_equals_train_transform_ops_on_pillow_images(cache):
    # On the CPU, for the same random choices, augment_batch gives what train_transform's
    # RandomGrayscale, ColorJitter, RandomHorizontalFlip, ToTensor and Normalize give.
    x = torch.cat([cache.images[:9], uint8_colourful(n=9, size=SIZE)])
    params = fd.sample_augmentation(len(x), torch.Generator().manual_seed(5))
    params["grayscale"][:4] = torch.tensor([True, False, True, False])
    out = fd.augment_batch(x, torch.Generator().manual_seed(5))
    ref = pil_reference(x, fd.sample_augmentation(len(x), torch.Generator().manual_seed(5)))
    assert torch.allclose(out, ref, rtol=0, atol=2e-6)
    out = fd._augment_cpu(x, params)
    assert torch.allclose(out, pil_reference(x, params), rtol=0, atol=2e-6)
    # Same seed, same batch; another seed, another batch.
    assert torch.equal(fd.augment_batch(x, torch.Generator().manual_seed(5)),
                       fd.augment_batch(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, fd.augment_batch(x, torch.Generator().manual_seed(6)))


def test_augment_batch_shape_dtype_range_over_several_sub_batches():
    x = torch.randint(0, 256, (21, 3, 200, 200), dtype=torch.uint8)  # 21: not a multiple of the CPU sub-batch (13)
    out = fd.augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    unit = out * std + mean  # back to [0, 1]
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    assert torch.equal(x, x.clone())  # input untouched


def test_augmentation_statistics():
    n = 20000
    p = fd.sample_augmentation(n, torch.Generator().manual_seed(0))
    assert abs(p["flip"].float().mean() - 0.5) < 0.015
    assert abs(p["grayscale"].float().mean() - 0.2) < 0.015
    # Each op lands at each of the 4 positions a quarter of the time; all 24 orders occur.
    assert torch.equal(p["order"].sort(dim=1).values, torch.arange(4).expand(n, 4))
    for position in range(4):
        counts = torch.bincount(p["order"][:, position], minlength=4).float() / n
        assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.015)
    assert len(torch.unique(p["order"], dim=0)) == 24
    # Factors uniform on their ranges.
    f = p["factors"]
    for j, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.4, 0.4)]):
        assert f[:, j].min() >= lo and f[:, j].max() <= hi
        assert abs(f[:, j].mean() - (lo + hi) / 2) < 0.01
        assert abs(f[:, j].std() - (hi - lo) / 12 ** 0.5) < 0.01


def test_flips_and_grayscale_show_in_the_output():
    # An image whose left and right halves differ and that has colour, without jitter
    # (factors that are identities): the flipped and grayscale images are exactly those chosen.
    n = 400
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, :, :2] = 0.9
    x[:, 2, :, 2:] = 0.3
    params = fd.sample_augmentation(n, torch.Generator().manual_seed(2))
    params["factors"] = torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(n, 4).clone()
    out = fd.apply_augmentation_(x.clone(), params)
    flipped = out[:, :, :, 0].sum(dim=(1, 2)) < out[:, :, :, 3].sum(dim=(1, 2))
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert torch.equal(flipped, params["flip"])
    assert torch.equal(gray, params["grayscale"])
    assert 0.4 < flipped.float().mean() < 0.6 and 0.12 < gray.float().mean() < 0.28


# --- batches --------------------------------------------------------------------------------


def test_cached_batches(cache):
    batches = [[3, 0, 5], [1, 2], [len(cache) - 1]]
    eval_batches = list(fd.CachedBatches(cache, batches, augment=False))
    assert len(eval_batches) == len(batches) == len(fd.CachedBatches(cache, batches))
    for batch, idx in zip(eval_batches, batches):
        assert torch.equal(batch["idx"], torch.tensor(idx))
        assert torch.equal(batch["label"], cache.labels[idx])
        assert batch["label"].dtype == torch.long and batch["idx"].dtype == torch.long
        assert torch.equal(batch["img"], fd.normalize_batch(cache.images[idx]))
    train = list(fd.CachedBatches(cache, batches, augment=True, generator=torch.Generator().manual_seed(0)))
    assert [b["img"].shape for b in train] == [(len(i), 3, SIZE, SIZE) for i in batches]
    assert not torch.equal(train[0]["img"], eval_batches[0]["img"])
    # Worker processes give the very same batches (the choices are drawn in this process).
    workers = list(fd.CachedBatches(cache, batches, augment=True, generator=torch.Generator().manual_seed(0),
                                    num_workers=2))
    for a, b in zip(train, workers):
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["idx"], b["idx"])
        assert torch.equal(a["label"], b["label"])


def test_cached_batches_reiterates_a_sampler(cache):
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(len(cache))), 8, False)
    loader = fd.CachedBatches(cache, sampler, augment=True)
    assert len(loader) == len(sampler)
    epoch1 = torch.cat([b["idx"] for b in loader])
    epoch2 = torch.cat([b["idx"] for b in loader])
    assert sorted(epoch1.tolist()) == sorted(epoch2.tolist()) == list(range(len(cache)))  # last partial batch kept


def test_float_luma_is_pillows_convert_L_on_all_colours():
    c = torch.arange(0, 1 << 24, 97, dtype=torch.int32)
    rgb = torch.stack([c >> 16, (c >> 8) & 255, c & 255]).view(3, 1, -1)
    ref = TF.pil_to_tensor(TF.to_pil_image(rgb.to(torch.uint8)).convert("L"))
    assert torch.equal(fd._luma_f(rgb.float()).to(torch.uint8), ref[0])


def test_is_gray():
    for size in (24, 21):  # 21 * 21 pixels: not a multiple of 8, the bytewise compare
        x = uint8_colourful(n=6, size=size)
        assert not fd._is_gray(x[1])
        gray = x[1, :1].expand(3, -1, -1).contiguous()
        assert fd._is_gray(gray)
        gray[2, -1, -1] ^= 1
        assert not fd._is_gray(gray)


def test_cpu_augment_of_gray_images_and_odd_sizes_equals_pillow():
    # Gray images (unflagged: the one-plane shortcut, where saturation and hue are identities),
    # flagged ones, colour ones, at a size that is not a multiple of 8 pixels, each op at each position.
    x = uint8_colourful(n=24, size=21, seed=3)
    x[:12] = x[:12, :1]
    params = fd.sample_augmentation(len(x), torch.Generator().manual_seed(7))
    params["order"] = torch.stack([torch.roll(torch.arange(4), i) for i in range(4)] * 6)
    params["grayscale"][:] = torch.arange(len(x)) % 3 == 0
    out = fd._augment_cpu(x, params)
    assert torch.allclose(out, pil_reference(x, params), rtol=0, atol=2e-6)


def test_hue_tables_equal_pillows_hsv_conversions_on_all_inputs():
    to_hsv, to_rgb = fd.hsv_tables()  # Pillow's convert("HSV") / convert("RGB") over all 2**24 inputs
    hue_shl8, sat, weights = fd.hue_tables()
    v = torch.arange(256, dtype=torch.float64)
    for start in range(0, 1 << 24, 1 << 20):
        c = torch.arange(start, start + (1 << 20), dtype=torch.int32)
        r, g, b = c >> 16, (c >> 8) & 255, c & 255
        hsv = to_hsv[c]
        assert torch.equal(hue_shl8[(r - g + 255) * 511 + (g - b + 255)] >> 8, hsv >> 16)
        vmax, vmin = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
        assert torch.equal(sat[vmax * 256 + vmin], (hsv >> 8) & 255)
        hs = c[::256] >> 8  # the h << 8 | s of this chunk, each with all 256 values of v
        ref = to_rgb[c].view(-1, 256)
        for ch in range(3):
            out = (weights[ch][hs].view(-1, 1) * v.view(1, -1)).round_()
            assert torch.equal(out, ((ref >> (8 * ch)) & 255).double()), ch
