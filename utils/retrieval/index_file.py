"""Index files of the retrieval command: the codes of a database, what built them, and the
checks that a query uses the same network (its configuration and a fingerprint of its weights)."""
import hashlib
import os
import sys

import torch

from .. import checkpoint as ckpt_io
from ..errors import UserError

INDEX_FORMAT = "cdne-index"
INDEX_VERSION = 2  # 2: "weights_sha256", the fingerprint of the weights that built the index
# What must agree between the checkpoint that built an index and the one that queries it.
CODE_KEYS = ("arch", "dim", "in_channels", "img_size")
BUILD_HINT = "python -m utils.retrieve index --checkpoint CHECKPOINT --out"


def weights_fingerprint(state_dict):
    """sha256 (hex) over a state_dict's tensors in key order: each name, dtype, shape and bytes.

    Two checkpoints have the same fingerprint iff their networks compute the same codes
    (bit for bit the same parameters and buffers), wherever the files lie."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_index(path):
    if not os.path.isfile(path):
        raise UserError(f"index file {path} does not exist; build one with `{BUILD_HINT} {path}` "
                        "(add --folder DIR to index a folder of images instead of the run's train split)")
    index = ckpt_io.safe_load(path, what="index")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise UserError(f"{path} is not an index file; build one with `python -m utils.retrieve index`")
    return index


def check_compatible(index_config, config, index_path, ckpt_path):
    diffs = [f"{k} {index_config.get(k)!r} vs {config.get(k)!r}" for k in CODE_KEYS
             if index_config.get(k) != config.get(k)]
    if diffs:
        raise UserError(f"index {index_path} was built with another kind of checkpoint than {ckpt_path} "
                        f"({', '.join(diffs)}); query it with the checkpoint that built it or rebuild the index")


def check_weights(index, loaded, index_path):
    """Refuse a checkpoint whose weights are not those that built the index; warn for old indexes."""
    built_with = index.get("weights_sha256")
    if built_with is None:
        print(f"warning: index {index_path} was written by an older version and records no fingerprint of the "
              f"weights that built it, so {loaded.path} cannot be checked against it; rebuild the index to have "
              f"it checked", file=sys.stderr)
    elif built_with != loaded.fingerprint:
        raise UserError(f"index {index_path} was built with other weights than those of {loaded.path} (it was "
                        f"built with {index.get('checkpoint')}), so its codes would not match; query it with the "
                        f"checkpoint that built it (omit --checkpoint) or rebuild the index with "
                        f"`python -m utils.retrieve index --checkpoint {loaded.path} ...`")
