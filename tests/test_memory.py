"""Memory update rules (docs/method.md section 3) and the key encoder's EMA."""
import math

import torch
import torch.nn.functional as F
from conftest import load_script

from utils.memory import MemoryBank, MemoryUnit


def test_initialisation_range_and_scores():
    torch.manual_seed(0)
    mem = MemoryUnit(500, 12, temperature=0.05)
    a = 1 / math.sqrt(12 / 3)
    assert mem.memory.shape == (500, 12)
    assert mem.memory.abs().max() <= a and mem.memory.abs().max() > 0.9 * a
    e = F.normalize(torch.randn(3, 12), dim=1).requires_grad_()
    s = mem(e, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(s, e @ mem.memory.t() / 0.05)
    s.sum().backward()
    assert e.grad is not None and not mem.memory.requires_grad


def test_memory_bank_momentum_update():
    torch.manual_seed(0)
    bank = MemoryBank(10, 4, momentum=0.5)
    before = bank.memory.clone()
    x = torch.randn(2, 4)
    idx = torch.tensor([3, 7])
    bank.momentum = 0.8
    bank.update(x, idx)
    expected = F.normalize(0.8 * before[idx] + 0.2 * x, dim=1)
    torch.testing.assert_close(bank.memory[idx], expected)
    others = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(bank.memory[others], before[others])


def test_memory_unit_replaces_rows():
    unit = MemoryUnit(10, 4)
    x = torch.randn(2, 4)
    unit.update(x, torch.tensor([1, 9]))
    assert torch.equal(unit.memory[1], x[0]) and torch.equal(unit.memory[9], x[1])


def memory_unit_variant():
    """train/main.py's variant around a small random network; returns (network, variant)."""
    from utils.models import HashingNet

    torch.manual_seed(0)
    model = HashingNet("resnet18", num_classes=3, dim=8, pretrained=False)
    args = type("A", (), {"dim": 8, "temperature": 0.05, "margin": 0.0, "key_momentum": 0.999})()
    return model, load_script("train").MemoryUnitCDNE(args, model, torch.arange(5) % 3)


def test_key_encoder_ema_changes_parameters_only():
    model, variant = memory_unit_variant()
    key = variant.key_encoder
    # Buffers start equal; now change the network's parameters and buffers.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.backbone.bn1.running_mean.add_(5.0)
    key_params_before = [p.clone() for p in key.parameters()]
    key_bn_before = key.backbone.bn1.running_mean.clone()
    variant.after_step(model)
    for pk, pk0, pq in zip(key.parameters(), key_params_before, model.parameters()):
        torch.testing.assert_close(pk, 0.999 * pk0 + 0.001 * pq)
    assert torch.equal(key.backbone.bn1.running_mean, key_bn_before)


def test_key_encoder_shuffled_bn_keys_match_unshuffled_order():
    _, variant = memory_unit_variant()
    from contextlib import nullcontext

    from utils.method import StepBatch

    img = torch.randn(6, 3, 32, 32)
    keys = variant.memory_targets(StepBatch(img, None, torch.arange(6), None, None, None, nullcontext))
    # In train-mode BN the batch statistics do not depend on the order, so un-permuting
    # the keys must give the keys of the unshuffled batch.
    ref = variant.key_encoder(img)[1]
    torch.testing.assert_close(keys, ref, rtol=1e-4, atol=1e-5)
    assert variant.key_encoder.backbone.bn1.training and not variant.key_encoder.training
