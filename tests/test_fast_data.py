"""The cached, batched input pipeline against torchvision's per-image functional ops and the Pillow pipeline."""
import pytest
import torch
from torchvision.transforms import functional as TF

from utils.data import cached as fd
from utils.data.digits import make_digits
from utils.data.scenes import SceneDataset, read_rgb
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

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


def test_augment_batch_equals_torchvision_per_image(cache):
    # The definition: for the same random choices, torchvision's functional ops on each float image.
    x = torch.cat([cache.images[:9], uint8_colourful(n=9, size=SIZE)])
    params = fd.sample_augmentation(len(x), torch.Generator().manual_seed(5))
    out = fd.augment_batch(x, torch.Generator().manual_seed(5))
    ref = torch.stack([TF.normalize(torchvision_choices(img.float() / 255, params, i), IMAGENET_MEAN, IMAGENET_STD)
                       for i, img in enumerate(x)])
    assert torch.allclose(out, ref, rtol=0, atol=2e-5)
    # Same seed, same batch; another seed, another batch.
    assert torch.equal(fd.augment_batch(x, torch.Generator().manual_seed(5)), out)
    assert not torch.equal(out, fd.augment_batch(x, torch.Generator().manual_seed(6)))


def test_augment_batch_is_the_pillow_pipeline_up_to_its_8_bit_rounding():
    # train_transform rounds to 8 bits after each op (Pillow images): the same choices give
    # images that differ by a pixel's rounding, about 1.5/255 on average, never by a choice.
    x = uint8_colourful(n=16, size=SIZE, seed=4)
    params = fd.sample_augmentation(len(x), torch.Generator().manual_seed(3))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    diff = ((fd._augment(x, params) - pil_reference(x, params)) * std * 255).abs()
    assert diff.mean() < 3 and diff.amax(dim=(1, 2, 3)).max() < 40


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
