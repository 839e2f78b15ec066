"""Two-process DistributedDataParallel training on the CPU (gloo): torchrun runs of the real
scripts, and the trainer's step on 2 ranks against one process holding the global batch."""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO, load_script

SCRIPTS = {"MU": os.path.join(REPO, "train", "main.py"), "MB": os.path.join(REPO, "train_MB", "main.py")}


@pytest.mark.parametrize("variant", ["MU", "MB"])
def test_two_processes_keep_identical_memories(variant, digits_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           SCRIPTS[variant], "--data", digits_root, "--dataset", "digits", "--epochs", "2", "-b", "32",
           "--lr", "0.01", "--out", str(tmp_path), "--name", "ddp", "--no-pretrained", "--img-size", "32",
           "--dim", "16", "--num_workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Written once, by rank 0.
    assert os.listdir(tmp_path) == ["ddp"]
    run_dir = tmp_path / "ddp"
    assert len(os.listdir(run_dir / "tensorboard")) == 1
    assert proc.stdout.count("results written to") == 1
    ckpt = torch.load(run_dir / "checkpoint_last.pth", weights_only=True)
    # Every rank's memory, fingerprinted at the save: identical on both ranks, and trained.
    prints = ckpt["fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    memory = ckpt["method"]["memory.memory"]
    assert torch.allclose(memory.norm(dim=1), torch.ones(len(memory)), atol=1e-4)  # every row was written
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["val"]["P@20"] > 0.25, results["val"]  # chance is 0.1


def test_distributed_resume_continues_exactly(tmp_path):
    from utils.data.digits import make_digits

    make_digits(str(tmp_path / "data"), size=16, per_class=12)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               SCRIPTS["MB"], "--data", str(tmp_path / "data"), "--dataset", "digits", "-b", "16", "--lr", "0.01",
               "--out", str(tmp_path), "--no-pretrained", "--img-size", "16", "--dim", "8", "--num_workers", "0",
               "--device", "cpu", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("--epochs", "2", "--name", "straight")
    launch("--epochs", "1", "--name", "cut")
    launch("--epochs", "2", "--resume", str(tmp_path / "cut" / "checkpoint_last.pth"))
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k].double(), b["model"][k].double(), rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(a["method"]["memory.memory"], b["method"]["memory.memory"], rtol=0, atol=1e-6)


def test_a_method_without_a_classifier_trains_under_torchrun(tiny_root, tmp_path):
    """DPSH never uses FC2: DDP needs that layer frozen, or the second step fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "baselines", "main.py"), "--method", "dpsh", "--data", tiny_root, "--dataset", "digits",
           "--epochs", "1", "-b", "16", "--lr", "0.01", "--out", str(tmp_path), "--name", "dpsh", "--no-pretrained",
           "--img-size", "16", "--dim", "8", "--num_workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "dpsh" / "checkpoint_last.pth", weights_only=True)
    assert ckpt["fingerprints"][0] == ckpt["fingerprints"][1]  # U identical on both ranks
    assert ckpt["method"]["U"].abs().sum(1).gt(0).all()  # every row written


# ------------------------------------------------- one process's gradients on 2 ranks

# Two steps of a 16-image train set: the global batches and their cut into the 2 ranks' slices
# (uneven in step 2). Rank r's slice of a step is its rows of the global batch, in rank order.
STEPS = [([3, 12, 7, 0, 9, 14, 5, 10], 4), ([1, 8, 15, 6, 2, 11, 13, 4], 5)]
NUM_TRAIN, CLASSES, BITS = 16, 4, 8


class TinyHashingNet(nn.Module):
    """HashingNet's interface (f, e, logits; fc1, fc2) without BatchNorm, whose batch statistics
    are the one thing several processes are allowed to change."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.Tanh())
        self.fc1 = nn.Linear(32, BITS)
        self.fc2 = nn.Linear(BITS, CLASSES)

    def forward(self, x):
        f = self.fc1(self.body(x))
        return f, F.normalize(f, dim=1), self.fc2(f)


def train_set():
    g = torch.Generator().manual_seed(0)
    return torch.randn(NUM_TRAIN, 3, 4, 4, generator=g) * 2, torch.arange(NUM_TRAIN) % CLASSES


def method_classes():
    from baselines.dch import DCH
    from baselines.dhcnn import DHCNN
    from baselines.dpsh import DPSH
    from baselines.hashnet import HashNet
    from baselines.triplet import Triplet

    class DHCNNInBatch(DHCNN):
        """DHCNN with --pairs batch (the default, "dhcnn", is the authors' buffer definition)."""

        @staticmethod
        def add_arguments(parser):
            DHCNN.add_arguments(parser)
            parser.set_defaults(pairs="batch")

    return {"dpsh": DPSH, "triplet": Triplet, "dhcnn": DHCNN, "dhcnn_batch": DHCNNInBatch, "hashnet": HashNet,
            "dch": DCH, "cdne_mb": load_script("train_MB").MemoryBankCDNE,
            "cdne_mu": load_script("train").MemoryUnitCDNE}


def two_steps(method_cls, rows):
    """The trainer's step (utils.trainer.Trainer.train_step, DDP-wrapped under a process group)
    twice from a fixed state; rows(step) = this process's rows of that step's global batch.
    Returns each step's gradients and parameters after it, and the method's state after the two
    steps and before them."""
    from utils.training.trainer import Trainer

    images, labels = train_set()
    parser = argparse.ArgumentParser()
    method_cls.add_arguments(parser)
    args = parser.parse_args([])
    args.dim = BITS
    torch.manual_seed(0)
    trainer = Trainer.__new__(Trainer)  # the step alone: no data folder, run folder or evaluation
    trainer.device, trainer.amp_dtype, trainer.args = torch.device("cpu"), None, args
    trainer.model = TinyHashingNet()
    trainer.method = method_cls(args, trainer.model, labels)
    if not method_cls.uses_logits:
        trainer.model.fc2.requires_grad_(False)
    trainer.ddp_model = trainer.model
    if torch.distributed.is_initialized():
        trainer.ddp_model = nn.parallel.DistributedDataParallel(trainer.model)
    trained = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.SGD([p for _, p in trained], lr=0.5, momentum=0.9, nesterov=True,
                                        weight_decay=5e-4)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.method_params, trainer.lr_per_step = [], False  # what Trainer.__init__ sets: no method parameters
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    out = []
    for step in range(len(STEPS)):
        idx = torch.tensor(rows(step))
        trainer.train_step({"img": images[idx], "label": labels[idx], "idx": idx})
        out.append({"grad": {n: p.grad.clone() for n, p in trained},
                    "param": {n: p.detach().clone() for n, p in trained}})
    return {"steps": out, "state": {k: v.clone() for k, v in trainer.method.state_dict().items()}, "before": before}


def rank_rows(rank):
    return lambda step: STEPS[step][0][:STEPS[step][1]] if rank == 0 else STEPS[step][0][STEPS[step][1]:]


def two_rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {name: two_steps(cls, rank_rows(rank)) for name, cls in method_classes().items()}
        results["mu_keys_with_bn"] = mu_key_targets(rank_rows(rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(out_dir, timeout=300):
    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port on the loopback interface
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if "lo" in dict((name, i) for i, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on the loopback interface too
    context = mp.spawn(two_rank_worker, args=(port, str(out_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            raise AssertionError(f"the 2-rank step did not finish within {timeout} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The 2-rank worker's results (every method's two steps, MU's keys with BatchNorm), run once."""
    return run_two_ranks(tmp_path_factory.mktemp("ranks"))


def test_two_ranks_train_as_one_process_holding_the_global_batch(ranks):
    """For every trained method (DPSH, Triplet, DHCNN with its authors' buffer and --pairs batch,
    HashNet, DCH, CDNE(MB), CDNE(MU)): on 2 gloo ranks, the gradient reaching every parameter and
    the parameters after each of two steps equal those of one process with the whole global batch;
    so do the method's state after them: DPSH's and DHCNN's U, HashNet's step count,
    CDNE(MB)'s memory bank, CDNE(MU)'s memory unit and key encoder (every row of the memories is
    written in step 1 or 2, and step 2's loss reads step 1's rows)."""
    for name, cls in method_classes().items():
        single = two_steps(cls, lambda step: STEPS[step][0])
        for step, expected in enumerate(single["steps"]):
            for kind in ("grad", "param"):
                for param, ref in expected[kind].items():
                    assert ref.abs().sum() > 0, (name, step, kind, param)  # something to compare
                    for rank in range(2):
                        err = relative_error(ranks[rank][name]["steps"][step][kind][param], ref)
                        assert err < 1e-5, f"{name} step {step + 1} rank {rank} {kind} of {param}: rel. error {err:.2e}"
        for key, ref in single["state"].items():
            for rank in range(2):
                got = ranks[rank][name]["state"][key]
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=key)
                if key.startswith("key_encoder."):
                    # The key encoder moves by (1 - 0.999) of the network's steps: compared by how
                    # far it moved, which the values themselves would hide under rtol.
                    start = single["before"][key]
                    assert (ref - start).abs().sum() > 0, (name, key)
                    err = relative_error(got - start, ref - start)
                    assert err < 1e-5, f"{name} rank {rank} {key} moved otherwise: rel. error {err:.2e}"
                elif key.startswith("memory."):
                    assert not torch.equal(ref, single["before"][key]), key  # written
                    err = relative_error(got, ref)
                    assert err < 1e-5, f"{name} rank {rank} {key}: rel. error {err:.2e}"


# ------------------------------------------------- CDNE(MU)'s shuffled BN on 2 ranks

class TinyBNNet(TinyHashingNet):
    """TinyHashingNet with a BatchNorm layer: what shuffled BN is about."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.BatchNorm1d(32), nn.Tanh())


def mu_key_targets(rows):
    """CDNE(MU)'s key embeddings of the two steps' global batches (memory_targets, what the memory
    unit is written with) from a key encoder with BatchNorm; rows(step) as in two_steps."""
    from utils.method import StepBatch

    mu = load_script("train").MemoryUnitCDNE
    images, labels = train_set()
    parser = argparse.ArgumentParser()
    mu.add_arguments(parser)
    args = parser.parse_args([])
    args.dim = BITS
    torch.manual_seed(0)
    method = mu(args, TinyBNNet(), labels)
    out = []
    for step in range(len(STEPS)):
        idx = torch.tensor(rows(step))
        unused = torch.zeros(len(idx), BITS)  # memory_targets reads the images only
        batch = StepBatch(images[idx], labels[idx], idx, unused, unused, unused, nullcontext)
        torch.manual_seed(100 + step)  # the shuffle's draw (rank 0's is broadcast)
        out.append(method.memory_targets(batch))
    return out


def keys_of_slices(step, sizes):
    """What shuffled BN computes, written out in one process: the global batch in the shuffled
    order, cut into the ranks' slices (`sizes`), each through the key encoder with its own batch
    statistics, back in the batch's order."""
    images, _ = train_set()
    torch.manual_seed(0)
    key = TinyBNNet().train()  # the key encoder is the network's copy; BatchNorm on batch statistics
    x = images[torch.tensor(STEPS[step][0])]
    torch.manual_seed(100 + step)
    perm = torch.randperm(len(x))
    with torch.no_grad():
        k = torch.cat([key(part)[1] for part in x[perm].split(sizes)])
    return k[torch.argsort(perm)]


def test_mu_shuffled_bn_on_two_ranks_is_batchnorm_over_each_ranks_slice_of_the_shuffled_batch(ranks):
    """With BatchNorm the key embeddings cannot equal one process's: under DDP each rank's BN
    normalises its own slice of the shuffled global batch (that is what shuffled BN is for, as in
    MoCo), where one process normalises the whole batch. What holds: both ranks write the same
    rows, and they are exactly those of the shuffled batch cut into the ranks' slices."""
    whole = mu_key_targets(lambda step: STEPS[step][0])  # one process: BN over the whole global batch
    for step, (ids, cut) in enumerate(STEPS):
        expected = keys_of_slices(step, [cut, len(ids) - cut])
        on_rank = [ranks[r]["mu_keys_with_bn"][step] for r in range(2)]
        assert torch.equal(on_rank[0], on_rank[1])  # the memories stay identical
        err = relative_error(on_rank[0], expected)
        assert err < 1e-5, f"step {step + 1}: 2-rank keys against the per-slice BN: rel. error {err:.2e}"
        # One process's keys are another computation (BatchNorm over 8 rows, not 4 or 5 and 3).
        assert relative_error(whole[step], keys_of_slices(step, [len(ids)])) < 1e-5
        assert relative_error(on_rank[0], whole[step]) > 0.05
