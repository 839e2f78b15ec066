"""Evaluation of a trained network: encode a split, score its queries against the database,
the test pictures.

    encoding.py   encode, evaluate, every_metric, the precision-at-K curve, TensorBoard tags
    pictures.py   retrieval grids, thumbnails, bit balance
"""
from utils.evaluation.encoding import encode, evaluate, every_metric, precision_at_k_curve

__all__ = ["encode", "evaluate", "every_metric", "precision_at_k_curve"]
