"""Images as they come (grayscale, palette, RGBA, 16-bit, odd sizes) and multispectral input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO
from PIL import Image

from utils.data.multiband import band_statistics, read_multiband
from utils.data.scenes import SceneDataset, read_rgb
from utils.errors import UserError
from utils.models import HashingNet


def test_every_mode_reads_as_8bit_rgb(tmp_path):
    gradient = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    cases = {
        "gray.tif": Image.fromarray(gradient, "L"),
        "palette.png": Image.fromarray(gradient, "L").convert("P"),
        "rgba.png": Image.fromarray(np.dstack([gradient] * 4), "RGBA"),
        "odd.TIF": Image.fromarray(np.dstack([gradient[:, :15]] * 3), "RGB"),
        "photo.jpg": Image.fromarray(np.dstack([gradient] * 3), "RGB"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
    for name in cases:
        out = read_rgb(str(tmp_path / name))
        assert out.mode == "RGB", name
        arr = np.asarray(out)
        assert arr.dtype == np.uint8 and arr[:, -1].mean() > 200 and arr[:, 0].mean() < 30, name


def test_16bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (8, 1))
    Image.fromarray(arr).save(tmp_path / "deep.png")
    tifffile.imwrite(tmp_path / "deep.tif", arr)
    for name in ("deep.png", "deep.tif"):
        out = np.asarray(read_rgb(str(tmp_path / name)))
        assert out.shape == (8, 16, 3), name
        # Scaled over the 16-bit range: black stays black, white white, mid-grey mid-grey.
        assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 100 < out[0, 8, 0] < 155, (name, out[0, :, 0])


def test_truncated_image_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(UserError, match="cut.jpg"):
        read_rgb(str(path))


def write_ms_tree(root, classes=3, per_class=10, bands=13, size=12):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = os.path.join(root, "ms", f"class{c}")
        os.makedirs(d)
        for i in range(per_class):
            # Class-dependent band levels, like land covers with different spectra (uint16 as in Sentinel-2).
            levels = 1000 + 400 * c + 50 * np.arange(bands)
            img = (levels[None, None, :] + rng.normal(0, 60, (size, size, bands))).clip(0, 65535).astype(np.uint16)
            tifffile.imwrite(os.path.join(d, f"{i}.tif"), img)  # H x W x C, as GeoTIFFs are stored


def test_multiband_reading_and_statistics(tmp_path):
    write_ms_tree(str(tmp_path))
    x = read_multiband(os.path.join(str(tmp_path), "ms", "class1", "0.tif"), 13)
    assert x.shape == (13, 12, 12) and x.dtype == torch.float32
    assert 1400 + 50 * 12 - 300 < x[12].mean() < 1400 + 50 * 12 + 300
    with pytest.raises(UserError, match="not 4 bands"):
        read_multiband(os.path.join(str(tmp_path), "ms", "class1", "0.tif"), 4)
    ds = SceneDataset(str(tmp_path), "ms", "train", "tif", bands=13)
    mean, std = band_statistics(ds)
    stacked = torch.stack([read_multiband(p, 13) for p, _ in ds.samples])
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), stacked.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), stacked.double().std(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-5, atol=1e-2)


def test_multiband_network_replaces_the_first_convolution():
    net = HashingNet("resnet18", num_classes=3, dim=8, pretrained=False, in_channels=13).eval()
    assert net.backbone.conv1.in_channels == 13
    f, e, logits = net(torch.randn(2, 13, 32, 32))
    assert f.shape == (2, 8) and logits.shape == (2, 3)


def test_multispectral_training_end_to_end(tmp_path):
    write_ms_tree(str(tmp_path))
    cmd = [sys.executable, os.path.join(REPO, "train_MB", "main.py"), "--data", str(tmp_path), "--dataset", "ms",
           "--imgEXT", "tif", "--bands", "13", "--epochs", "1", "-b", "8", "--lr", "0.01", "--no-pretrained",
           "--img-size", "16", "--dim", "8", "--num_workers", "0", "--device", "cpu", "--out", str(tmp_path),
           "--name", "run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert ckpt["config"]["in_channels"] == 13 and len(ckpt["config"]["band_mean"]) == 13
    assert ckpt["model"]["backbone.conv1.weight"].shape[1] == 13
    # Band means rise with the band index as generated.
    assert ckpt["config"]["band_mean"] == sorted(ckpt["config"]["band_mean"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["test"]["mAP@100"] <= 1
    # Resuming a 13-band run as RGB would change the run: refused.
    proc = subprocess.run(cmd[:cmd.index("--bands")] + ["--bands", "3"] + cmd[cmd.index("--bands") + 2:]
                          + ["--resume", str(tmp_path / "run" / "checkpoint_last.pth"), "--epochs", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--bands 3 (the run's: 13)" in proc.stderr
