"""Weight files of a backbone: torch.save (weights only) or .safetensors, timm's or torchvision's
key names, unwrapped from the containers training libraries save them in, and checked against
the model they are loaded into (one line naming what does not fit)."""
import os

import torch

from utils.errors import UserError

# Containers that training libraries wrap a state_dict in, and prefixes they put before its keys.
WRAPPER_KEYS = ("state_dict", "model", "module", "net")
KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def read_state_dict(path):
    """The tensors of a weight file: torch.save (weights only) or .safetensors, unwrapped from a
    {"state_dict": ...} / {"model": ...} container, with a prefix common to every key
    (module., model., backbone., encoder.) removed."""
    fix = "pass a state_dict file (torch.save or .safetensors) of the --model backbone"
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist; {fix}")
    try:
        if path.endswith(".safetensors"):
            import safetensors.torch
            state = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise UserError(f"could not read weights file {path} ({type(err).__name__}); {fix}") from None
    while isinstance(state, dict) and not _tensors(state):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not _tensors(state):
        raise UserError(f"weights file {path} holds no state_dict (no tensors by name); {fix}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _tensors(d):
    return any(isinstance(v, torch.Tensor) for v in d.values())


def check_keys(state, model, arch, source, ignore=(), shapes_may_differ=False):
    """A one-line UserError when `state` (names -> tensors, or None where only the name counts) is
    not a state_dict of `model`: missing and unexpected
    key names (a few of each and their counts) and shapes that differ (unless they may: timm
    resamples position embeddings to the model's size)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in {arch}"
              for k in own if state.get(k) is not None and state[k].shape != own[k].shape]
    if not (missing or unexpected or (shapes and not shapes_may_differ)):
        return
    raise UserError(f"weights {source} do not fit {arch}: {_few(missing)} missing keys, {_few(unexpected)} "
                    f"unexpected{'; ' + shapes[0] if shapes else ''}; pass a state_dict of {arch} "
                    f"(timm's or torchvision's key names) or the --model it belongs to")


def _few(keys, n=3):
    if not keys:
        return "0"
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"
