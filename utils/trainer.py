"""`run(method_cls, description)` and the Trainer under the names README shows; the code is in
utils/training/trainer.py."""
from utils.training.trainer import Trainer, run

__all__ = ["Trainer", "run"]
