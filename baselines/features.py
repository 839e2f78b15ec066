"""CNN+LSH and CNN+PCA-ITQ: hashing of fixed backbone features (ImageNet weights by default), nothing trained.

The train split is encoded with the backbone (eval transform), a projection is fitted on
those features (utils/hashing.py), and the codes b = sign((x - mu) W) are those of a
HashingNet whose FC1 holds W^T and the bias -mu W. So the run folder has the usual
checkpoint, and `python -m utils.retrieve` indexes and queries with it like any other.
"""
import time
from contextlib import nullcontext

import torch
from tensorboardX import SummaryWriter

from utils import distributed as dist
from utils.data.splits import Splits
from utils.evaluation.encoding import encode, evaluate, log_test_pictures, precision_at_k_curves, tb_tag
from utils.hashing import fit_itq, fit_lsh
from utils.method import Method
from utils.models import network_for
from utils.training import checkpoint as ckpt_io
from utils.training.checkpoint import write_json_atomic
from utils.training.flags import seed_everything
from utils.training.records import device_kind, environment, plain_args, run_config
from utils.training.run_folder import RunFolder
from utils.training.settings import record_splits, resolve


class LSH(Method):
    """Random Gaussian projections of the centred features (Charikar 2002)."""

    name = "LSH"

    @staticmethod
    def fit(features, args):
        return fit_lsh(features, args.dim, seed=args.seed)


class ITQ(Method):
    """PCA to L dimensions, then the rotation that iterative quantisation finds (Gong and Lazebnik 2011)."""

    name = "ITQ"

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--itq-iterations", type=int, default=50, help="rotation updates of ITQ")

    @staticmethod
    def fit(features, args):
        return fit_itq(features, args.dim, iterations=args.itq_iterations, seed=args.seed)


class _Pooled(torch.nn.Module):
    """The backbone's pooled features in the (f, e, logits) shape that encode() reads."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x), None, None


def run_features(method_cls, args):
    """Encode, fit, evaluate val and test once, and write the run folder; returns 0. The flags are
    resolved once (utils/training/settings.py); the method's fit reads its own (--dim, --seed, ...)."""
    s = resolve(args, method_cls.name, method_cls.head)
    device = s.device
    splits = Splits(s.data, s.loader, s.input)
    record_splits(args, splits)
    seed_everything(s.seed)
    model = network_for(s.model, len(splits.classes), s.input.channels).to(device)
    folder = RunFolder(s.out, s.name, s.resume, method_cls.name, s.default_name)
    autocast = nullcontext  # full precision: the fit wants the features as they are
    feature_dim = model.fc1.in_features
    started = time.perf_counter()  # the run's cost: encoding the train split and the fit (nothing trains)
    features = encode(_Pooled(model.backbone), splits.eval_loader("train"), len(splits.db), feature_dim,
                      device, autocast, "encode train features")
    mean, projection = method_cls.fit(features, args)
    with torch.no_grad():
        model.fc1.weight.copy_(projection.t())
        model.fc1.bias.copy_(-(mean @ projection))
    seconds = time.perf_counter() - started
    val, val_tie_aware = evaluate(model, splits, "val", device, s.topk, autocast, tie_aware=True)
    test, test_tie_aware, q_codes, db_codes = evaluate(model, splits, "test", device, s.topk, autocast,
                                                       return_codes=True, tie_aware=True)
    curves = precision_at_k_curves(q_codes, splits.test.labels.to(device), db_codes, splits.db.labels.to(device))
    test["precision_at_k"], test_tie_aware["precision_at_k"] = curves["index"], curves["expected"]
    config = run_config(method_cls.name, s.model, s.data, splits)
    env = environment(device, None, s.model.arch)  # full precision: no autocast dtype
    flags = plain_args(args)
    results = {"variant": method_cls.name, "dataset": s.data.dataset, "run_dir": folder.path, "best_epoch": 0,
               "val": val, "test": test, "val_tie_aware": val_tie_aware, "test_tie_aware": test_tie_aware,
               "args": flags, "train_seconds": seconds,
               "device": device_kind(device), "world_size": dist.world_size(), "environment": env,
               "environments": [env]}
    if dist.is_main():
        key = f"mAP@{s.topk}"
        state = {"format": ckpt_io.FORMAT, "version": 2, "config": config, "args": flags, "epoch": 0,
                 "step": 0, "model": model.state_dict(), "best": {"score": val[key], "epoch": 0}}
        folder.save(state, best=True)
        with SummaryWriter(folder.tensorboard) as writer:
            for split, metrics in (("val", val), ("test", test)):
                for k, v in metrics.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"{split}/{tb_tag(k)}", v, 0)
            log_test_pictures(writer, splits, test, q_codes, db_codes, s.data.bands, 0)
        for path, obj in ((f"{folder.path}/args.json", flags), (folder.results, results)):
            write_json_atomic(path, obj)
        print(f"{method_cls.name}: val {key} {val[key]:.4f}; test {key} {test[key]:.4f}  P@20 {test['P@20']:.4f}\n"
              f"results written to {folder.results}")
    return 0
