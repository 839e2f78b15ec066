"""Backbones (utils/backbones/): timm trunks, weight files, torchgeo's weights,
the band order and the normalisation every pipeline uses. Tiny timm models (test_vit,
test_efficientnet: a few hundred thousand parameters) at 16-32 px, random weights."""
import functools
import hashlib
import http.server
import json
import os
import socket
import threading

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from conftest import load_script

from utils.backbones import timm_models as backbones
from utils.backbones import torchgeo_weights as weights
from utils.backbones.input_spec import resolve_input
from utils.data.transforms import eval_transform, multiband_eval_transform
from utils.errors import UserError
from utils.models import HashingNet

SERVED = {}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """serve(name, state_dict) -> URL of the file saved as name-<sha256 prefix>.pth on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def serve(name, state, digest=None):
        raw = tmp_path / "raw.pth"
        torch.save(state, raw)
        digest = digest or hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
        os.replace(raw, folder / f"{name}-{digest}.pth")
        return f"http://127.0.0.1:{httpd.server_address[1]}/{name}-{digest}.pth"

    yield serve
    httpd.shutdown()


def closed_port_url(name):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{name}-abcdef12.pth"


def pooled(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_timm_trunk_widths_and_sizes():
    torch.manual_seed(0)
    net = HashingNet("test_vit", num_classes=4, dim=8, pretrained=False, img_size=32).eval()
    assert net.fc1.in_features == net.backbone.num_features == 64
    f, e, logits = net(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 8) and logits.shape == (2, 4)
    assert net.backbone.patch_embed.img_size == (32, 32)  # trained at --img-size, not timm's 160
    with pytest.raises(UserError, match=r"test_convnext cannot take 16 x 16 input .*choose another --img-size"):
        HashingNet("test_convnext", num_classes=4, dim=8, pretrained=False, img_size=16)
    with pytest.raises(UserError, match=r"unknown model 'convnext_attp' \(did you mean convnext_atto.*timm.list_models"):
        backbones.check_model_name("convnext_attp")


def test_a_timm_weights_file_is_the_trunk_used(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=7).eval()  # with a classifier
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(st))
    wrapped = tmp_path / "w.pth"  # a training library's container and DDP's prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    x = torch.randn(2, 3, 32, 32)
    for path in (st, wrapped):
        net = HashingNet("test_efficientnet", num_classes=3, dim=8, pretrained=str(path), img_size=32).eval()
        torch.testing.assert_close(net.backbone(x), pooled(source, x), rtol=0, atol=0)
    # Another architecture: one line naming missing and unexpected keys, with counts.
    with pytest.raises(UserError, match=r"do not fit test_vit: 78 \(cls_token, .*\) missing keys, 88 \(.*\) unexpected; pass a state_dict of test_vit"):
        HashingNet("test_vit", num_classes=3, dim=8, pretrained=str(st), img_size=32)


def test_vit_weights_of_another_size_are_resampled(tmp_path):
    torch.manual_seed(2)
    source = timm.create_model("test_vit", num_classes=5)  # 160 px: 10 x 10 patches
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    net = HashingNet("test_vit", num_classes=3, dim=8, pretrained=str(path), img_size=32)
    assert net.backbone.pos_embed.shape[1] == source.pos_embed.shape[1] - 100 + 4  # 2 x 2 patches (+ prefix tokens)
    torch.testing.assert_close(net.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_a_13_band_first_layer_is_kept(tmp_path):
    torch.manual_seed(3)
    r18 = torchvision.models.resnet18(weights=None)
    r18.conv1 = torch.nn.Conv2d(13, 64, 7, 2, 3, bias=False)
    path = tmp_path / "r18_13.pth"
    torch.save(r18.state_dict(), path)
    net = HashingNet("resnet18", num_classes=3, dim=8, pretrained=str(path), in_channels=13)
    torch.testing.assert_close(net.backbone.conv1.weight, r18.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, r18.layer4[1].conv2.weight, rtol=0, atol=0)
    with pytest.raises(UserError, match="takes 13 input bands, this run 3; pass --bands 13"):
        HashingNet("resnet18", num_classes=3, dim=8, pretrained=str(path), in_channels=3)
    vit = timm.create_model("test_vit", in_chans=13, num_classes=0)  # timm: the file's 13-band layer too
    torch.save(vit.state_dict(), path)
    net = HashingNet("test_vit", num_classes=3, dim=8, pretrained=str(path), in_channels=13, img_size=32)
    torch.testing.assert_close(net.backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight, rtol=0, atol=0)


def test_timm_download_is_verified_and_offline_is_one_line(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(4)
    source = timm.create_model("test_efficientnet").eval()
    url = server("test_efficientnet", source.state_dict())
    monkeypatch.setitem(backbones.TIMM_URLS, "test_efficientnet", url)
    net = HashingNet("test_efficientnet", num_classes=3, dim=8, pretrained=True, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net.backbone(x), pooled(source, x), rtol=0, atol=0)
    bad = server("test_efficientnet_bad", source.state_dict(), digest="00000000")  # hash not that of the file
    monkeypatch.setitem(backbones.TIMM_URLS, "test_efficientnet", bad)
    with pytest.raises(UserError, match="could not download timm's pretrained weights for test_efficientnet from "
                                        + bad.replace(".", r"\.")):
        HashingNet("test_efficientnet", num_classes=3, dim=8, pretrained=True, img_size=32)
    offline = closed_port_url("test_vit")
    monkeypatch.setitem(backbones.TIMM_URLS, "test_vit", offline)
    with pytest.raises(UserError, match=f"from {offline}.*--no-pretrained"):
        HashingNet("test_vit", num_classes=3, dim=8, pretrained=True, img_size=32)


def test_band_order_of_eurosat_for_the_weights():
    # EuroSAT's files: B01..B12 with B8A last; the weights: B8A after B08.
    order, note = weights.band_order("EuroSAT_MS", 13, weights.S2_ALL)
    assert order == [0, 1, 2, 3, 4, 5, 6, 7, 12, 8, 9, 10, 11] and note is None
    assert weights.band_order("EuroSAT_MS", 13, weights.S2_RGB)[0] == [3, 2, 1]
    assert weights.band_order("EuroSAT_MS", 13, weights.S2_NO_CIRRUS)[0] == [0, 1, 2, 3, 4, 5, 6, 7, 12, 8, 10, 11]
    order, note = weights.band_order("MyS2", 13, weights.S2_ALL)  # unknown files: the standard order, said so
    assert order == list(range(13)) and "not known" in note
    with pytest.raises(UserError, match="band order of MyS2's 4-band files is not known"):
        weights.band_order("MyS2", 4, weights.S2_ALL)
    # The transform feeds the weights' bands, scaled as torchgeo scales them (/ 10000).
    spec = _spec("resnet18", "torchgeo:ResNet18_Weights.SENTINEL2_ALL_MOCO", 13)
    x = torch.arange(13, dtype=torch.float32).view(13, 1, 1).expand(13, 4, 4) * 1000
    y = multiband_eval_transform(4, spec.mean, spec.std, spec.band_order)(x)
    torch.testing.assert_close(y[:, 0, 0], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 12, 8, 9, 10, 11]) / 10.0)
    rgb = _spec("resnet50", "torchgeo:ResNet50_Weights.SENTINEL2_RGB_SECO", 13)
    assert rgb.channels == 3 and rgb.band_order == [3, 2, 1]
    steps = torch.tensor([[3.0, 2, 0], [60, 50, 40]]).t()  # SECO's chain, step by step, equals the one affine map
    chain = (((steps - torch.tensor([3.0, 2, 0]).view(3, 1)) / torch.tensor([85.0, 101, 129]).view(3, 1) * 255)
             - torch.tensor([0.485, 0.456, 0.406]).view(3, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1)
    one = (steps - torch.tensor(rgb.mean).view(3, 1)) / torch.tensor(rgb.std).view(3, 1)
    torch.testing.assert_close(one, chain)


def _spec(model, weights_flag=None, bands=3, dataset="EuroSAT_MS"):
    return resolve_input(model, weights_flag, bands, dataset)


def test_input_spec_refusals_and_timm_normalisation():
    assert _spec("resnet18").mean == [0.485, 0.456, 0.406]
    assert _spec("test_vit").mean == [0.5, 0.5, 0.5]  # the model's pretrained config
    assert _spec("test_vit", bands=13).mean is None  # per-band statistics
    with pytest.raises(UserError, match="holds resnet18 weights; pass --model resnet18"):
        _spec("resnet50", "torchgeo:ResNet18_Weights.SENTINEL2_ALL_MOCO", 13)
    with pytest.raises(UserError, match="not 8-bit RGB images; read the 13-band TIFFs with --bands 13"):
        _spec("resnet18", "torchgeo:ResNet18_Weights.SENTINEL2_ALL_MOCO", 3)
    with pytest.raises(UserError, match="is not one we load; choose one of torchgeo:ResNet18_Weights"):
        _spec("resnet18", "torchgeo:ResNet18_Weights.NOPE", 13)


def test_torchgeo_download_verified_into_the_paper_trunk(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(5)
    tg = timm.create_model("resnet18", in_chans=13, num_classes=1000)  # as torchgeo builds it
    name = "ResNet18_Weights.SENTINEL2_ALL_MOCO"
    monkeypatch.setitem(weights.TORCHGEO_URLS, name, server("resnet18_sentinel2_all_moco", tg.state_dict()))
    net = HashingNet("resnet18", num_classes=3, dim=8, pretrained=f"torchgeo:{name}", in_channels=13).eval()
    x = torch.randn(2, 13, 32, 32)
    torch.testing.assert_close(net.backbone(x), pooled(tg.eval(), x), rtol=1e-5, atol=1e-5)
    # A file whose sha256 does not start with the prefix in its name (the check comes before loading).
    monkeypatch.setitem(weights.TORCHGEO_URLS, name, server("tampered", {"x": torch.ones(1)}, digest="00000000"))
    with pytest.raises(UserError, match=f"could not download torchgeo:{name} from .*tampered-00000000.pth"):
        HashingNet("resnet18", num_classes=3, dim=8, pretrained=f"torchgeo:{name}", in_channels=13)


@pytest.fixture
def eurosat_ms(tmp_path):
    """A 13-band dataset named EuroSAT_MS: 2 classes x 10 GeoTIFFs of 8 x 8 uint16 reflectances."""
    import tifffile

    rng = np.random.default_rng(0)
    for c in ("Forest", "River"):
        (tmp_path / "EuroSAT_MS" / c).mkdir(parents=True)
        for i in range(10):
            tifffile.imwrite(tmp_path / "EuroSAT_MS" / c / f"{c}_{i}.tif",
                             rng.integers(0, 4000, (8, 8, 13), dtype=np.uint16))
    return str(tmp_path)


def test_torchgeo_offline_exits_2_in_one_line(eurosat_ms, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    name = "ResNet18_Weights.SENTINEL2_ALL_MOCO"
    url = closed_port_url("resnet18_sentinel2_all_moco")
    monkeypatch.setitem(weights.TORCHGEO_URLS, name, url)
    from utils.training.trainer import run
    with pytest.raises(SystemExit) as exit_info:
        run(load_script("train_MB").MemoryBankCDNE, "CDNE(MB)", argv=[
            "--data", eurosat_ms, "--dataset", "EuroSAT_MS", "--bands", "13", "--weights", f"torchgeo:{name}",
            "--img-size", "16", "-b", "4", "--dim", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
            "--out", str(tmp_path / "runs"), "--name", "tg"])
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # progress bars end in \r
    assert exit_info.value.code == 2 and "Traceback" not in "".join(err)
    assert err[-1].startswith(f"error: could not download torchgeo:{name} from {url}")


def test_every_pipeline_normalises_with_the_backbone(tiny_root):
    from utils.data.cached import CachedImages, normalize_batch
    from utils.data.scenes import SceneDataset, read_rgb
    from utils.retrieve import transform_of

    ds = SceneDataset(tiny_root, "digits", "train", "png")
    spec = _spec("test_vit")
    ref = torch.stack([eval_transform(16, (0.5,) * 3, (0.5,) * 3)(read_rgb(p)) for p, _ in ds.samples[:4]])
    assert ref.min() < -0.9  # (x - 0.5) / 0.5 reaches -1 on black pixels; ImageNet's would give -2.1
    cache = CachedImages(ds, 16, progress=False, mean=spec.mean, std=spec.std)
    torch.testing.assert_close(normalize_batch(cache.images[:4], cache.mean, cache.std), ref)
    config = {"img_size": 16, "in_channels": 3, "input": spec.as_dict()}
    torch.testing.assert_close(torch.stack([transform_of(config)(read_rgb(p)) for p, _ in ds.samples[:4]]), ref)
    old = transform_of({"img_size": 16, "in_channels": 3})  # checkpoints from before: ImageNet's
    torch.testing.assert_close(old(read_rgb(ds.samples[0][0])), eval_transform(16)(read_rgb(ds.samples[0][0])))


def test_a_timm_run_and_retrieve_evaluate_agree(tiny_root, tmp_path, capsys):
    from utils import retrieve as retrieve_mod
    from utils.training.trainer import run

    out = tmp_path / "runs"
    code = run(load_script("train_MB").MemoryBankCDNE, "CDNE(MB)", argv=[
        "--data", tiny_root, "--dataset", "digits", "--model", "test_vit", "--no-pretrained", "--img-size", "16",
        "-b", "32", "--lr", "0.01", "--dim", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
        "--out", str(out), "--name", "vit"])
    assert code == 0
    results = json.loads((out / "vit" / "results.json").read_text())
    best = torch.load(out / "vit" / "checkpoint_best.pth", weights_only=True)
    assert best["config"]["input"]["mean"] == [0.5, 0.5, 0.5] and best["config"]["arch"] == "test_vit"
    capsys.readouterr()
    assert retrieve_mod.main(["evaluate", "--checkpoint", str(out / "vit" / "checkpoint_best.pth"), "--split", "test",
                              "--device", "cpu", "--json", str(tmp_path / "eval.json")]) in (0, None)
    again = json.loads((tmp_path / "eval.json").read_text())
    metrics = again.get("metrics", again)
    assert metrics["mAP@100"] == pytest.approx(results["test"]["mAP@100"], abs=1e-6)


def test_lsh_hashes_a_timm_backbone(tiny_root, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("baselines_main", os.path.join(os.path.dirname(__file__), "..",
                                                                                 "baselines", "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "runs"
    assert module.main(["--method", "lsh", "--data", tiny_root, "--dataset", "digits", "--model", "test_vit",
                        "--no-pretrained", "--img-size", "16", "-b", "32", "--dim", "8", "--num_workers", "0",
                        "--device", "cpu", "--out", str(out), "--name", "lsh"]) == 0
    best = torch.load(out / "lsh" / "checkpoint_best.pth", weights_only=True)
    assert best["model"]["fc1.weight"].shape == (8, 64)  # test_vit's 64 pooled features
    assert best["config"]["input"]["source"] == "timm:test_vit"


def test_registry_matches_torchgeo():
    """Our facts of torchgeo's enums against torchgeo itself, where it is installed (it is not a
    dependency: utils/backbones/torchgeo_weights.py says why)."""
    tg = pytest.importorskip("torchgeo.models")

    def band(name):  # torchgeo writes B1 / B8a, we write B01 / B8A
        return "B8A" if name.upper() in ("B8A", "B08A") else f"B{int(name[1:]):02d}"

    for name, entry in weights.TORCHGEO.items():
        enum, member = name.split(".")
        w = getattr(tg, enum)[member]
        assert (w.url, w.meta["model"]) == (entry["url"], entry["arch"]), name
        assert [band(b) for b in w.meta["bands"]] == list(entry["bands"]) and w.meta["in_chans"] == len(entry["bands"])
        c = len(entry["bands"])
        x = (torch.arange(1, c + 1, dtype=torch.float32) * 700).view(1, c, 1, 1).expand(1, c, 256, 256).contiguous()
        try:
            y = w.transforms({"image": x})["image"]
        except (TypeError, KeyError, IndexError):
            y = w.transforms(x)
        mean, std = weights.scaling(entry["steps"], c)
        torch.testing.assert_close(y[0, :, 0, 0], (x[0, :, 0, 0] - torch.tensor(mean)) / torch.tensor(std))
