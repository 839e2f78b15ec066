"""The optimiser flags (--optimizer, --nesterov, --backbone-lr-mult, --lr-step-unit), a method's own
defaults of the shared flags (Method.defaults) and head options (Method.head, HashingNet's head):
docs/method.md section 5."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.backbones import build_backbone
from utils.errors import UserError
from utils.method import Method
from utils.models import HashingNet
from utils.training.flags import build_parser, check_args
from utils.training.settings import OptimSettings
from utils.training.trainer import optimizer_for, run

TINY = ["--no-pretrained", "--img-size", "16", "--dim", "8", "--num_workers", "0", "--device", "cpu"]


class AuthorsMethod(Method):
    """A method whose authors train with Adam, a slow trunk and a per-step schedule, with every head option
    and a trainable parameter of its own."""

    name = "AuthorsTest"
    defaults = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "backbone_lr_mult": 0.1, "lr_step": 2,
                "lr_step_unit": "step", "lr_gamma": 0.5, "batch_size": 32}
    head = {"fc1_bias": False, "fc1_bn": True, "fc1_init": 0.01, "fc2_bias": False, "codewords": True}

    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.codewords.copy_(torch.randint(0, 2, model.codewords.shape, generator=g).float() * 2 - 1)
        self.scale = nn.Parameter(torch.ones(()))  # trained by the optimiser, with the heads

    def losses(self, batch):
        ce = F.cross_entropy(batch.logits * self.scale, batch.label)
        return {"total": ce, "ce": ce}


class PlainMethod(Method):
    name = "PlainTest"

    def losses(self, batch):
        ce = F.cross_entropy(batch.logits, batch.label)
        return {"total": ce, "ce": ce}


def settings(**kw):
    base = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, lr_step=30, lr_gamma=0.5)
    return OptimSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def net():
    return HashingNet("resnet18", num_classes=3, dim=8, pretrained=False)


def test_the_papers_optimiser_is_one_sgd_group_in_parameter_order(net):
    opt, own = optimizer_for(settings(), net, PlainMethod(None, net, None))
    assert isinstance(opt, torch.optim.SGD) and own == [] and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters()]  # an older checkpoint's state loads
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == 1e-4
    assert not optimizer_for(settings(nesterov=False), net, PlainMethod(None, net, None))[0].param_groups[0]["nesterov"]
    # Nesterov needs momentum: SGD with --momentum 0 is plain SGD whatever --nesterov says.
    assert not optimizer_for(settings(momentum=0.0), net, PlainMethod(None, net, None))[0].param_groups[0]["nesterov"]


class OwnParameters(PlainMethod):
    def __init__(self, args, model, train_labels):
        super().__init__(args, model, train_labels)
        self.scale = nn.Parameter(torch.ones(()))
        self.key = nn.Linear(2, 2).requires_grad_(False)  # frozen (a key encoder, say): not trained


def test_the_trunk_trains_at_lr_times_the_multiplier_and_the_rest_at_lr(net):
    method = OwnParameters(None, net, None)
    opt, own = optimizer_for(settings(backbone_lr_mult=0.01), net, method)
    trunk, heads = opt.param_groups
    assert trunk["lr"] == pytest.approx(0.001) and heads["lr"] == 0.1
    assert {id(p) for p in trunk["params"]} == {id(p) for p in net.backbone.parameters()}
    assert {id(p) for p in heads["params"]} == {id(p) for p in (*net.fc1.parameters(), *net.fc2.parameters(),
                                                                method.scale)}
    assert own == [method.scale]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    scheduler.step()  # the schedule scales both groups
    assert trunk["lr"] == pytest.approx(0.0005) and heads["lr"] == pytest.approx(0.05)


def test_adam_and_rmsprop_take_the_flags(net):
    adam, _ = optimizer_for(settings(optimizer="adam", lr=1e-3, momentum=0.8, weight_decay=5e-4), net,
                            PlainMethod(None, net, None))
    assert type(adam) is torch.optim.Adam
    g = adam.param_groups[0]
    assert g["betas"] == (0.8, 0.999) and g["lr"] == 1e-3 and g["weight_decay"] == 5e-4 and g["eps"] == 1e-8
    rms, _ = optimizer_for(settings(optimizer="rmsprop", lr=1e-5, momentum=0.0, weight_decay=1e-5), net,
                           PlainMethod(None, net, None))
    g = rms.param_groups[0]
    assert type(rms) is torch.optim.RMSprop and g["momentum"] == 0.0 and g["alpha"] == 0.99 and g["eps"] == 1e-8
    assert g["lr"] == 1e-5 and g["weight_decay"] == 1e-5


def parsed(method_cls, *argv):
    args = build_parser("test", method_cls).parse_args(["--dataset", "digits", *TINY, *argv])
    check_args(args)
    return args


def test_the_flags_resolve_into_the_settings():
    from utils.training.flags import select_device
    from utils.training.settings import resolve

    args = parsed(PlainMethod, "--optimizer", "rmsprop", "--momentum", "0.5", "--no-nesterov",
                  "--backbone-lr-mult", "0.05", "--lr-step-unit", "step")
    args.device_obj = select_device("cpu")
    o = resolve(args, "PlainTest").optim
    assert (o.optimizer, o.momentum, o.nesterov, o.backbone_lr_mult, o.lr_step_unit) == \
        ("rmsprop", 0.5, False, 0.05, "step")
    d = parsed(PlainMethod)
    assert (d.optimizer, d.nesterov, d.backbone_lr_mult, d.lr_step_unit, d.lr, d.momentum, d.weight_decay,
            d.lr_step, d.lr_gamma) == ("sgd", True, 1.0, "epoch", 0.1, 0.9, 1e-4, 30, 0.5)  # the paper's


def test_bad_optimiser_flags_get_one_line(capsys):
    with pytest.raises(UserError, match="--backbone-lr-mult must be 0 or more"):
        parsed(PlainMethod, "--backbone-lr-mult", "-1")
    with pytest.raises(UserError, match="beta1 with --optimizer adam and must be below 1"):
        parsed(PlainMethod, "--optimizer", "adam", "--momentum", "1")
    parsed(PlainMethod, "--optimizer", "rmsprop", "--momentum", "1")  # RMSprop's momentum may be 1
    with pytest.raises(SystemExit) as exit_info:
        parsed(PlainMethod, "--optimizer", "adamw")
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_methods_defaults_are_the_parsers_and_shown_in_help():
    parser = build_parser("test", AuthorsMethod)
    args = parser.parse_args([])
    assert (args.optimizer, args.lr, args.weight_decay, args.backbone_lr_mult, args.lr_step, args.lr_step_unit,
            args.batch_size) == ("adam", 1e-3, 0.0, 0.1, 2, "step", 32)
    assert parser.parse_args(["--optimizer", "sgd"]).optimizer == "sgd"  # still a flag
    text = " ".join(parser.format_help().split())
    assert "(default: adam)" in text and "(default: 0.1)" in text and "(default: step)" in text

    class Wrong(PlainMethod):
        defaults = {"optimiser": "adam"}

    with pytest.raises(ValueError, match="names no flag"):
        build_parser("test", Wrong)


def test_the_tables_wanted_flags_carry_a_methods_defaults(monkeypatch):
    from utils.table import cells, identity

    monkeypatch.setattr(cells, "script_parser", lambda method: build_parser("test", AuthorsMethod))
    cell = cells.Cell("mb", "digits", 16, 0)
    wanted = cells.wanted_flags(cell)
    assert (wanted["optimizer"], wanted["backbone_lr_mult"], wanted["lr"], wanted["lr_step_unit"]) == \
        ("adam", 0.1, 1e-3, "step")
    assert identity.flag_differences("mb", wanted, dict(wanted)) == []
    other = {**wanted, "optimizer": "sgd", "backbone_lr_mult": 1.0}  # a run made with the paper's optimiser
    assert sorted(identity.flag_differences("mb", wanted, other)) == [("--backbone-lr-mult", 0.1, 1.0),
                                                                      ("--optimizer", "adam", "sgd")]


def test_lsh_and_itq_ignore_the_optimiser_flags():
    from utils.table import cells, identity

    wanted = cells.wanted_flags(cells.Cell("itq", "digits", 16, 0))
    other = {**wanted, "optimizer": "adam", "backbone_lr_mult": 0.1, "nesterov": False, "lr_step_unit": "step"}
    assert identity.flag_differences("itq", wanted, other) == []  # they train nothing


def test_no_head_is_the_papers_network_exactly():
    torch.manual_seed(3)
    net = HashingNet("resnet18", num_classes=5, dim=8, pretrained=False)
    torch.manual_seed(3)  # the network as it was built before the head options, draw for draw
    backbone, feature_dim = build_backbone("resnet18", False, 3, None)
    fc1, fc2 = nn.Linear(feature_dim, 8), nn.Linear(8, 5)
    nn.init.kaiming_normal_(fc1.weight)
    nn.init.kaiming_normal_(fc2.weight)
    old = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
           **{f"fc1.{k}": v for k, v in fc1.state_dict().items()}, **{f"fc2.{k}": v for k, v in fc2.state_dict().items()}}
    new = net.state_dict()
    assert list(new) == list(old)
    for k in old:
        assert torch.equal(new[k], old[k]), k
    assert net.fc1_bn is None and net.codewords is None


def test_each_head_option_builds_its_modules_and_init():
    torch.manual_seed(0)
    net = HashingNet("resnet18", num_classes=5, dim=64, pretrained=False,
                     head={"fc1_bias": False, "fc1_bn": True, "fc2_bias": False})
    assert net.fc1.bias is None and net.fc2.bias is None and isinstance(net.fc1_bn, nn.BatchNorm1d)
    assert set(net.state_dict()) - set(HashingNet("resnet18", 5, 64, pretrained=False).state_dict()) == {
        "fc1_bn.weight", "fc1_bn.bias", "fc1_bn.running_mean", "fc1_bn.running_var", "fc1_bn.num_batches_tracked"}
    x = torch.randn(6, 3, 32, 32)
    net.train()
    f, e, logits = net(x)
    # BatchNorm after FC1 (train mode: the batch's statistics): each bit has mean 0 and variance 1 over the batch.
    torch.testing.assert_close(f.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    expected = net.fc1_bn(net.fc1(net.backbone(x)))
    torch.testing.assert_close(f, expected)
    torch.testing.assert_close(logits, f @ net.fc2.weight.t())  # no bias
    torch.testing.assert_close(e, F.normalize(f, dim=1))

    torch.manual_seed(0)
    wide = HashingNet("resnet18", num_classes=5, dim=256, pretrained=False, head={"fc1_init": 0.01})
    assert wide.fc1.weight.std().item() == pytest.approx(0.01, rel=0.02) and abs(wide.fc1.weight.mean()) < 1e-3
    assert torch.count_nonzero(wide.fc1.bias) == 0
    with pytest.raises(ValueError, match="unknown head option"):
        HashingNet("resnet18", 5, 8, pretrained=False, head={"fc1_norm": True})
    with pytest.raises(ValueError, match="fc1_init"):
        HashingNet("resnet18", 5, 8, pretrained=False, head={"fc1_init": "xavier"})


def test_codewords_code_each_image_by_its_predicted_class_in_eval_only():
    torch.manual_seed(0)
    net = HashingNet("resnet18", num_classes=4, dim=8, pretrained=False, head={"codewords": True})
    assert torch.count_nonzero(net.codewords) == 0 and "codewords" in net.state_dict()  # zeros until filled
    words = torch.randint(0, 2, (4, 8)).float() * 2 - 1
    net.codewords.copy_(words)
    x = torch.randn(5, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        f, e, logits = net(x)
        u = net.fc1(net.backbone(x))
    torch.testing.assert_close(logits, net.fc2(u))
    assert torch.equal(f, words[logits.argmax(1)])
    torch.testing.assert_close(e, F.normalize(f, dim=1))
    net.train()
    f_train, _, _ = net(x)
    assert not torch.equal(f_train.detach(), words[logits.argmax(1)])  # the relaxed codes FC1(x) while training


def test_a_methods_run_records_its_flags_and_head_and_retrieval_rebuilds_it(tiny_root, tmp_path):
    from utils.retrieval.network import Loaded
    from utils.training import checkpoint as ckpt_io

    out = tmp_path / "runs"
    base = ["--data", tiny_root, "--dataset", "digits", *TINY, "--out", str(out), "--name", "a"]
    assert run(AuthorsMethod, "test", argv=base + ["--epochs", "1"]) == 0
    results = json.loads((out / "a" / "results.json").read_text())
    args = results["args"]
    assert (args["optimizer"], args["backbone_lr_mult"], args["lr"], args["lr_step_unit"], args["nesterov"]) == \
        ("adam", 0.1, 1e-3, "step", True)
    last = ckpt_io.load_checkpoint(str(out / "a" / "checkpoint_last.pth"))
    assert last["config"]["head"] == AuthorsMethod.head
    # 84 training images in batches of 32: 3 steps, the rate halved every 2 of them (once).
    trunk, heads = last["optimizer"]["param_groups"]
    assert last["scheduler"]["last_epoch"] == 3
    assert heads["lr"] == pytest.approx(5e-4) and trunk["lr"] == pytest.approx(5e-5)
    assert last["method"]["scale"] != 1.0  # the method's own parameter trained

    loaded = Loaded(str(out / "a" / "checkpoint_best.pth"), torch.device("cpu"))
    net = HashingNet("resnet18", num_classes=10, dim=8, pretrained=False, head=AuthorsMethod.head).eval()
    net.load_state_dict(ckpt_io.load_checkpoint(str(out / "a" / "checkpoint_best.pth"))["model"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for a, b in zip(loaded.model(x), net(x)):
            torch.testing.assert_close(a, b)
        f = loaded.model(x)[0]
    assert torch.equal(f, loaded.model.codewords[loaded.model(x)[2].argmax(1)])  # coded by the classifier

    # Resumed for a second epoch: the two groups' state loads and the schedule goes on per step.
    assert run(AuthorsMethod, "test", argv=base + ["--epochs", "2", "--resume", str(out / "a" / "checkpoint_last.pth")]) == 0
    again = ckpt_io.load_checkpoint(str(out / "a" / "checkpoint_last.pth"))
    assert again["scheduler"]["last_epoch"] == 6 and again["optimizer"]["param_groups"][1]["lr"] == \
        pytest.approx(1e-3 * 0.5 ** 3)


def test_an_old_checkpoint_without_head_or_optimiser_flags_loads(tiny_root, tmp_path):
    """A checkpoint of before the head options and optimiser flags (no config["head"], no
    args["optimizer"]): retrieval builds the paper's head and a resume continues with SGD."""
    from utils.retrieval.network import Loaded
    from utils.training import checkpoint as ckpt_io

    out = tmp_path / "runs"
    base = ["--data", tiny_root, "--dataset", "digits", *TINY, "-b", "32", "--lr", "0.01", "--out", str(out),
            "--name", "old"]
    assert run(PlainMethod, "test", argv=base + ["--epochs", "1"]) == 0
    path = out / "old" / "checkpoint_last.pth"
    ckpt = ckpt_io.load_checkpoint(str(path))
    assert "head" not in ckpt["config"]
    for k in ("optimizer", "nesterov", "backbone_lr_mult", "lr_step_unit"):
        del ckpt["args"][k]
    torch.save(ckpt, path)
    loaded = Loaded(str(path), torch.device("cpu"))
    assert loaded.model.fc1_bn is None and loaded.model.codewords is None

    class NowAdam(PlainMethod):  # the method's defaults changed since: the old run still continues with SGD
        defaults = {"optimizer": "adam", "nesterov": False}

    assert run(NowAdam, "test", argv=base + ["--epochs", "2", "--resume", str(path)]) == 0
    again = ckpt_io.load_checkpoint(str(path))
    assert again["args"]["optimizer"] == "sgd" and again["args"]["nesterov"] is True
    assert "momentum_buffer" in next(iter(again["optimizer"]["state"].values()))
