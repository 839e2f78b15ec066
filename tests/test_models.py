"""HashingNet (docs/method.md section 2) and loading of ImageNet / local weights."""
import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading

import pytest
import torch
import torchvision

from utils.backbones import resnets
from utils.errors import UserError
from utils.models import HashingNet


def test_forward_contract():
    torch.manual_seed(0)
    net = HashingNet("resnet18", num_classes=7, dim=16, pretrained=False).eval()
    x = torch.randn(3, 3, 32, 32)
    f, e, logits = net(x)
    assert f.shape == (3, 16) and e.shape == (3, 16) and logits.shape == (3, 7)
    torch.testing.assert_close(e, f / f.norm(dim=1, keepdim=True))
    torch.testing.assert_close(logits, net.fc2(f))  # logits come from f, not e
    feats = net.backbone(x)
    assert feats.shape == (3, 512)
    torch.testing.assert_close(f, net.fc1(feats))


def test_resnet50_feature_dim_and_kaiming_init():
    torch.manual_seed(0)
    net = HashingNet("resnet50", num_classes=5, dim=64, pretrained=False)
    assert net.fc1.in_features == 2048
    # kaiming_normal_ (fan_in, gain sqrt 2): std = sqrt(2 / 2048)
    assert net.fc1.weight.std().item() == pytest.approx((2 / 2048) ** 0.5, rel=0.05)
    assert net.fc2.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.15)
    # biases keep nn.Linear's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert net.fc1.bias.abs().max().item() <= 1 / 2048 ** 0.5


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="resnet18, resnet50 or a timm model name; list timm's names with python -c"):
        HashingNet("resnet_unheard_of", num_classes=2, pretrained=False)


def test_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    net = HashingNet("resnet18", num_classes=3, dim=8, pretrained=str(path))
    torch.testing.assert_close(net.backbone.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(net.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    with pytest.raises(UserError, match="do not fit resnet50: .* missing keys"):
        HashingNet("resnet50", num_classes=3, dim=8, pretrained=str(path))
    with pytest.raises(UserError, match="does not exist"):
        HashingNet("resnet18", num_classes=3, dim=8, pretrained=str(tmp_path / "missing.pth"))


@pytest.fixture
def weight_server(tmp_path):
    """Serves a generated resnet18 state_dict named like torchvision's files (sha256 prefix) on 127.0.0.1."""
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    raw = tmp_path / "raw.pth"
    torch.save(source.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(raw, served / f"resnet18-{digest}.pth")
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield source, f"http://127.0.0.1:{server.server_address[1]}/resnet18-{digest}.pth"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_imagenet_weights_are_downloaded_and_verified(weight_server, tmp_path, monkeypatch):
    source, url = weight_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(resnets.WEIGHT_URLS, "resnet18", url)
    net = HashingNet("resnet18", num_classes=3, dim=8, pretrained=True)
    torch.testing.assert_close(net.backbone.conv1.weight, source.conv1.weight)
    cached = os.listdir(tmp_path / "torch_home" / "hub" / "checkpoints")
    assert cached == [url.rsplit("/", 1)[1]]


def test_download_failure_names_the_offline_flags(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(resnets.WEIGHT_URLS, "resnet18", f"http://127.0.0.1:{port}/resnet18-abcdef12.pth")
    with pytest.raises(UserError, match="--no-pretrained.*--weights"):
        HashingNet("resnet18", num_classes=3, dim=8, pretrained=True)
