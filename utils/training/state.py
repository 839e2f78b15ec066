"""What a checkpoint holds: everything needed to continue a run exactly (network, method state,
optimiser, schedule, progress, best score, every rank's RNG states), and a fingerprint of the
method's shared state from every rank."""

import torch

from utils import distributed as dist
from utils.training import checkpoint as ckpt_io
from utils.training.records import environment, plain_args


def training_state(trainer):
    """The checkpoint of a trainer. Collective in distributed runs: every rank takes part."""
    # Each rank has its own augmentation RNG: keep them all.
    per_rank = {"rng": ckpt_io.rng_state(), "fingerprint": trainer.method.fingerprint()}
    gathered = [per_rank]
    if dist.is_distributed():
        gathered = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, per_rank)
        if any(g["fingerprint"] != gathered[0]["fingerprint"] for g in gathered):
            raise RuntimeError(f"the method's state differs between ranks: {[g['fingerprint'] for g in gathered]}")
    return {"format": ckpt_io.FORMAT, "version": 2, "config": trainer.config, "args": plain_args(trainer.args),
            "epoch": trainer.epoch, "step": trainer.step_in_epoch, "epoch_sums": trainer.epoch_sums,
            "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "best": trainer.best, "train_seconds": trainer.train_seconds,
            "environments": trainer.environments,
            "rng": [g["rng"] for g in gathered],
            "fingerprints": [g["fingerprint"] for g in gathered]}


def restore(trainer, ckpt, path):
    """Put a trainer back in the state of checkpoint `ckpt` (read from `path`)."""
    ckpt_io.check_config(ckpt["config"], trainer.config, path)
    trainer.model.load_state_dict(ckpt["model"])
    trainer.method.load_state_dict(method_state(ckpt))
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] and trainer.scaler.is_enabled():  # empty when the run had no float16 scaling
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.epoch, trainer.step_in_epoch = ckpt["epoch"], ckpt["step"]
    trainer.epoch_sums, trainer.best = ckpt["epoch_sums"], ckpt["best"]
    trainer.train_seconds = ckpt.get("train_seconds", 0.0)  # older checkpoints did not count
    now = environment(trainer.device, trainer.amp_dtype, trainer.settings.model.arch)
    earlier = list(ckpt.get("environments", []))  # older checkpoints did not record them
    trainer.environments = earlier + ([now] if now not in earlier else [])
    rng = ckpt["rng"]
    ckpt_io.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])


def method_state(ckpt):
    """The method's state_dict; checkpoints of version 1 nested it per part under "variant"."""
    if "method" in ckpt:
        return ckpt["method"]
    return {f"{part}.{k}": v for part, state in ckpt["variant"].items() for k, v in state.items()}
