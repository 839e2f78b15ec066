"""What a new user's mistakes with the input folder lead to: one line naming the problem and a fix
that points the right way (the file type, --bands or the folder, not --skip-bad-images), exit 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import REPO
from utils.data import SceneDataset, read_rgb, remove_unreadable, unreadable
from utils.multiband import band_statistics, read_multiband
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
