"""The hash code of relaxed codes (docs/method.md section 2), shared by the metrics
(utils/metrics.py), their counting fast path (utils/rank_counting.py) and the search."""
import torch


def binarize(codes):
    """+-1 float32 codes: +1 where the value is > 0, else -1 (docs/method.md section 2)."""
    codes = torch.as_tensor(codes)
    return torch.where(codes > 0, 1.0, -1.0).to(torch.float32)
