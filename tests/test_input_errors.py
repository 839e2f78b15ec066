"""What a new user's mistakes with the input folder lead to: one line naming the problem and a fix
that points the right way (the file type, --bands or the folder, not --skip-bad-images), exit 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO, load_script
from PIL import Image

from utils.data.image_files import unreadable
from utils.data.multiband import band_statistics, read_multiband
from utils.data.scenes import SceneDataset, read_rgb, remove_unreadable
from utils.errors import UserError

MB = os.path.join(REPO, "train_MB", "main.py")


def train(data, dataset, *flags, out):
    """The training script as a user runs it; returns (exit status, stderr)."""
    cmd = [sys.executable, MB, "--data", str(data), "--dataset", dataset, "--no-pretrained", "--img-size", "16",
           "--dim", "8", "--num_workers", "0", "--device", "cpu", "--epochs", "1", "-b", "16", "--out", str(out),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def the_error(status, err, *fragments, absent=()):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for fragment in absent:
        assert fragment not in lines[0], (fragment, lines[0])
    return lines[0]


def rgb_tree(root, ext="png", classes="abc", per_class=10):
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            Image.new("RGB", (8, 8), (20 * i, 100, 30)).save(os.path.join(root, c, f"{i}.{ext}"))


def write_bands(path, bands, size=8):
    # One page of `bands` samples per pixel, as GeoTIFFs such as EuroSAT's are stored.
    tifffile.imwrite(path, np.full((size, size, bands), 1000, np.uint16), photometric="minisblack",
                     planarconfig="contig")


def damage(path):
    """Cut the file inside the PNG header, as an interrupted download or copy does."""
    with open(path, "r+b") as fh:
        fh.truncate(20)


# ----------------------------------------------------------------------------- 1. nothing left to train on

def test_bands_13_with_skip_on_rgb_pngs_stops_with_the_fix(tmp_path):
    rgb_tree(str(tmp_path / "d" / "scenes"))
    line = the_error(*train(tmp_path / "d", "scenes", "--imgEXT", "png", "--bands", "13", "--skip-bad-images",
                            out=tmp_path),
                     "every one of the 30 .png images was unreadable with --bands 13",
                     "is a PNG image, not a multi-band TIFF", "pass --bands 3 for RGB images", "--imgEXT/--dataset",
                     absent=["pass --skip-bad-images"])
    assert str(tmp_path / "d" / "scenes" / "a" / "0.png") in line


def test_remove_unreadable_refuses_to_leave_nothing(tmp_path):
    rgb_tree(str(tmp_path / "scenes"))
    splits = [SceneDataset(str(tmp_path), "scenes", s, "png", bands=13) for s in ("train", "val", "test")]
    with pytest.raises(UserError, match=r"every one of the 30 \.png images was unreadable with --bands 13 "
                                        r"\(e\.g\. image .*0\.png is a PNG image, not a multi-band TIFF\); "
                                        r"--bands other than 3 reads multi-band \.tif files"):
        remove_unreadable(splits)


def test_every_file_damaged_says_download_again(tmp_path):
    rgb_tree(str(tmp_path / "scenes"), classes="ab")
    for c in "ab":
        for i in range(10):
            damage(tmp_path / "scenes" / c / f"{i}.png")
    ds = SceneDataset(str(tmp_path), "scenes", "test", "png")
    with pytest.raises(UserError, match="every one of the 4 .png images.*damaged or not images.*download"):
        remove_unreadable([ds])


def test_a_class_left_without_train_images_is_named(tmp_path):
    rgb_tree(str(tmp_path / "scenes"))
    train_set = SceneDataset(str(tmp_path), "scenes", "train", "png")
    for path, label in train_set.samples:
        if label == 1:
            damage(path)
    splits = [train_set] + [SceneDataset(str(tmp_path), "scenes", s, "png") for s in ("val", "test")]
    with pytest.raises(UserError, match=r"every train image of class b was unreadable with --bands 3, so "
                                        r"--skip-bad-images left the class without train images .*"
                                        r"replace the damaged images in .*scenes.b"):
        remove_unreadable(splits)


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_split_emptied_by_skipping_is_refused(tmp_path, split):
    # An empty val split would leave the best epoch unchosen: refused like any empty split.
    rgb_tree(str(tmp_path / "scenes"))
    splits = [SceneDataset(str(tmp_path), "scenes", s, "png") for s in ("train", "val", "test")]
    for path, _ in splits[("train", "val", "test").index(split)].samples:
        damage(path)
    with pytest.raises(UserError, match=f"left the {split} split empty"):
        remove_unreadable(splits)


def test_a_few_bad_images_are_still_just_skipped(tmp_path):
    rgb_tree(str(tmp_path / "scenes"))
    damage(tmp_path / "scenes" / "a" / "3.png")
    splits = [SceneDataset(str(tmp_path), "scenes", s, "png") for s in ("train", "val", "test")]
    assert remove_unreadable(splits) == [str(tmp_path / "scenes" / "a" / "3.png")]
    assert sum(len(ds) for ds in splits) == 29


def test_band_statistics_refuses_an_empty_split(tmp_path):
    rgb_tree(str(tmp_path / "scenes"))
    ds = SceneDataset(str(tmp_path), "scenes", "train", "png", bands=13)
    ds.samples = []
    with pytest.raises(UserError, match="train split of .*scenes has no images"):
        band_statistics(ds)


# ----------------------------------------------------------------------------- 2. hints that point the right way

def test_bands_13_on_rgb_pngs_without_skip(tmp_path):
    rgb_tree(str(tmp_path / "d" / "scenes"))
    the_error(*train(tmp_path / "d", "scenes", "--imgEXT", "png", "--bands", "13", out=tmp_path),
              "is a PNG image, not a multi-band TIFF", "pass --bands 3 for RGB images", "--imgEXT/--dataset",
              absent=["--skip-bad-images"])


@pytest.mark.parametrize("name,save,fragments", [
    ("photo.png", lambda p: Image.new("RGB", (8, 8)).save(p), ["is a PNG image, not a multi-band TIFF", "--bands 3"]),
    ("photo.jpg", lambda p: Image.new("RGB", (8, 8)).save(p), ["is a JPEG image, not a multi-band TIFF", "--bands 3"]),
    ("rgb.tif", lambda p: Image.new("RGB", (8, 8)).save(p), ["has 3 bands", "not 13 bands", "pass --bands 3"]),
    ("gray.tif", lambda p: tifffile.imwrite(p, np.zeros((8, 8), np.uint16)), ["has 1 band (", "pass --bands 1"]),
    ("four.tif", lambda p: write_bands(p, 4), ["has 4 bands", "not 13 bands", "pass --bands 4 if every image"]),
])
def test_read_multiband_names_the_kind_of_file(tmp_path, name, save, fragments):
    path = str(tmp_path / name)
    save(path)
    with pytest.raises(UserError) as caught:
        read_multiband(path, 13)
    message = str(caught.value)
    assert path in message and "--skip-bad-images" not in message and not caught.value.broken
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("content", [b"<html>404 Not Found</html>", None])
def test_read_multiband_suggests_skipping_only_damaged_files(tmp_path, content):
    path = tmp_path / "bad.tif"
    if content is None:  # a real TIFF, cut short
        write_bands(str(path), 13, size=32)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match="cannot read image .*bad.tif.*--skip-bad-images") as caught:
        read_multiband(str(path), 13)
    assert caught.value.broken


def test_read_rgb_names_a_multiband_tiff(tmp_path):
    path = str(tmp_path / "ms.tif")
    write_bands(path, 13)
    with pytest.raises(UserError, match=r"ms.tif holds 13 bands \(1 page of 13 samples per pixel, array shape "
                                        r"\(8, 8, 13\)\), not an RGB image; pass --bands 13") as caught:
        read_rgb(path)
    assert "--skip-bad-images" not in str(caught.value) and not caught.value.broken
    write_bands(path, 13)
    assert read_multiband(path, 13).shape == (13, 8, 8)


def test_unreadable_image_survives_a_dataloader_worker():
    """Workers re-raise an exception as type(err)(message): that must give the same one line."""
    err = unreadable("image x.png is a PNG image, not a multi-band TIFF", "pass --bands 3", broken=False)
    again = type(err)(str(err))
    assert type(err) is UserError and str(again) == str(err) == ("image x.png is a PNG image, not a multi-band "
                                                                  "TIFF; pass --bands 3")


# ----------------------------------------------------------------------------- 3. a dataset unpacked one level too deep

def test_dataset_unpacked_one_level_too_deep(tmp_path):
    data = tmp_path / "d"
    rgb_tree(str(data / "AID" / "AID"), ext="jpg", per_class=4)
    inner = data / "AID"
    the_error(*train(data, "AID", "--imgEXT", "jpg", out=tmp_path),
              f"the dataset in {inner} is one level too deep", "holds the 3 class folders (a, b, c)",
              f"pass --data {inner} --dataset AID", f"move the class folders from {inner / 'AID'} up into {inner}",
              absent=["--imgEXT"])


def test_too_deep_with_the_wrong_extension_too(tmp_path):
    rgb_tree(str(tmp_path / "AID" / "AID"), ext="jpg", classes="abcde", per_class=3)
    os.makedirs(tmp_path / "AID" / "__MACOSX" / "AID")  # what zips made on a Mac add
    with pytest.raises(UserError) as caught:
        SceneDataset(str(tmp_path), "AID", "train", "tif")
    assert str(caught.value) == (
        f"the dataset in {tmp_path / 'AID'} is one level too deep: its folder AID holds the 5 class folders "
        f"(a, b, c, ...); pass --data {tmp_path / 'AID'} --dataset AID, or move the class folders from "
        f"{tmp_path / 'AID' / 'AID'} up into {tmp_path / 'AID'}; the images are .jpg: add --imgEXT jpg")


def test_images_in_sub_folders_of_each_class(tmp_path):
    for c in "ab":
        rgb_tree(str(tmp_path / "scenes" / c), ext="png", classes=["images"], per_class=3)
    with pytest.raises(UserError, match=r"one level too deep: the class folders keep them in sub-folders "
                                        r"\(e\.g\. .*images\); move them up into the class folders"):
        SceneDataset(str(tmp_path), "scenes", "train", "png")


def test_wrong_extension_alone_still_suggests_imgext(tmp_path):
    rgb_tree(str(tmp_path / "scenes"), ext="jpg", per_class=3)
    with pytest.raises(UserError, match=r"has no \.tif files \(extensions found in the dataset: \.jpg\); "
                                        r"pass the right one with --imgEXT") as caught:
        SceneDataset(str(tmp_path), "scenes", "train", "tif")
    assert "too deep" not in str(caught.value)


def test_an_empty_class_folder_is_named(tmp_path):
    rgb_tree(str(tmp_path / "scenes"), classes="ab", per_class=3)
    os.makedirs(tmp_path / "scenes" / "c")
    with pytest.raises(UserError, match=r"class folder .*c has no \.png files, unlike the other class folders; "
                                        r"put the \.png images of class c there, or remove the folder"):
        SceneDataset(str(tmp_path), "scenes", "train", "png")
    for c in "ab":
        for f in (tmp_path / "scenes" / c).iterdir():
            f.unlink()
    with pytest.raises(UserError, match=r"class folder .*a has no files; put the images of class a there"):
        SceneDataset(str(tmp_path), "scenes", "train", "png")


# ----------------------------------------------------------------------------- 4. checked before training

@pytest.fixture(scope="module")
def mb():
    return load_script("train_MB")


def train_inproc(mb, data, dataset, out, *flags, capsys):
    """The training script's main in this process, as `train` runs it; returns (exit status, stderr)."""
    from utils.training.trainer import run
    argv = ["--data", str(data), "--dataset", dataset, "--no-pretrained", "--img-size", "16", "--dim", "8",
            "--num_workers", "0", "--device", "cpu", "--epochs", "1", "-b", "16", "--out", str(out), *flags]
    try:
        status = run(mb.MemoryBankCDNE, "test", argv)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    assert "epoch 1/1 train" not in captured.err  # stopped before training
    return status, captured.err


@pytest.mark.parametrize("shape,pages,samples", [((13, 16, 16), 13, 1), ((16, 16, 13), 16, 1), ((16, 16, 13), 1, 13)])
def test_multiband_tiffs_read_as_rgb_stop_before_training(mb, tmp_path, capsys, shape, pages, samples):
    # tifffile writes (13, H, W) as 13 pages and (H, W, 13) as H pages of W x 13, unless told it is
    # one page of 13 samples per pixel (as EuroSAT's GeoTIFFs are); Pillow would read one page of each.
    planar = {"photometric": "minisblack", "planarconfig": "contig"} if samples > 1 else {}
    for c in "ab":
        os.makedirs(tmp_path / "ms" / "X" / c)
        for i in range(5):
            tifffile.imwrite(tmp_path / "ms" / "X" / c / f"{i}.tif", np.full(shape, 100 * i, np.uint16), **planar)
    status, err = train_inproc(mb, tmp_path / "ms", "X", tmp_path / "runs", "--imgEXT", "tif", capsys=capsys)
    line = the_error(status, err, "holds 13 bands", f"{pages} page", f"{samples} sample", f"array shape {shape}",
                     "9 more file(s) like it", "pass --bands 13", absent=["--skip-bad-images"])
    assert os.path.join("X", "a", "0.tif") in line
    assert not (tmp_path / "runs").exists()


def test_rgb_tiffs_written_by_tifffile_and_pillow_still_read(tmp_path):
    from utils.data.image_check import check_images
    os.makedirs(tmp_path / "s" / "a")
    os.makedirs(tmp_path / "s" / "b")
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for i in range(4):
        tifffile.imwrite(tmp_path / "s" / "a" / f"{i}.tif", rgb, photometric="rgb")
        Image.fromarray(rgb).save(tmp_path / "s" / "b" / f"{i}.tif")
    splits = [SceneDataset(str(tmp_path), "s", split, "tif") for split in ("train", "val", "test")]
    assert check_images(splits) == []
    for path in (tmp_path / "s" / "a" / "0.tif", tmp_path / "s" / "b" / "0.tif"):
        img = read_rgb(str(path))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgb)


def test_every_unreadable_image_is_listed_before_training(mb, tmp_path, capsys):
    rgb_tree(str(tmp_path / "d" / "scenes"))
    damaged = [tmp_path / "d" / "scenes" / c / f"{i}.png" for c in "ab" for i in range(4)]
    for path in damaged[:-1]:
        damage(path)
    cut = damaged[-1]  # header intact, pixel data cut short: only decoding finds it
    Image.new("RGB", (64, 64), (1, 2, 3)).save(cut)
    cut.write_bytes(cut.read_bytes()[:70])
    status, err = train_inproc(mb, tmp_path / "d", "scenes", tmp_path / "runs", "--imgEXT", "png", capsys=capsys)
    line = the_error(status, err, "8 of the 30 images", "cannot be read", str(damaged[0]), "and 3 more",
                     "--skip-bad-images")
    assert not (tmp_path / "runs").exists()
    from utils.data.image_check import find_unreadable
    assert sorted(find_unreadable([str(p) for p in damaged] + [str(tmp_path / "d/scenes/c/0.png")])) == \
        sorted(str(p) for p in damaged)
    assert line.count(".png") >= 5


@pytest.mark.parametrize("per_class,fragments", [
    ({"a": 10}, ["has 1 class (a)", "at least 2 classes"]),
    ({"a": 3, "b": 3}, ["the val split of", "has no image", "a 3, b 3"]),
])
def test_degenerate_datasets_stop_before_anything_is_written(mb, tmp_path, capsys, per_class, fragments):
    for name, n in per_class.items():
        rgb_tree(str(tmp_path / "d" / "scenes"), classes=name, per_class=n)
    status, err = train_inproc(mb, tmp_path / "d", "scenes", tmp_path / "runs", "--imgEXT", "png", capsys=capsys)
    the_error(status, err, *fragments)
    assert not (tmp_path / "runs").exists()


def test_a_class_too_small_for_every_split_is_named_in_a_warning(tmp_path):
    from utils.data.split_files import check_split_sizes
    rgb_tree(str(tmp_path / "scenes"), classes="ab", per_class=10)
    rgb_tree(str(tmp_path / "scenes"), classes="c", per_class=2)
    warnings = []
    check_split_sizes(*(SceneDataset(str(tmp_path), "scenes", s, "png") for s in ("train", "val", "test")),
                      warn=warnings.append)
    assert warnings == ["warning: class c has 2 image(s): 1 train, 0 val, 1 test; too few to give every split an "
                        "image (10 or more always do)"]
