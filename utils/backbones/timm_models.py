"""Backbones other than the paper's ResNets: any timm model by name, weight files of either
library's key names, and the input normalisation a backbone was pretrained with.

torchvision's resnet18 / resnet50 (ImageNet V1 weights, the paper's) stay in utils/models.py;
every other --model name is timm's: `timm.create_model(name, num_classes=0, in_chans=...,
img_size=...)` returns the pooled features that FC1 reads, `num_features` wide.
"""
import contextlib
import difflib
import functools
import logging

import torch

from utils.backbones.weight_files import check_keys
from utils.errors import UserError

TORCHVISION_NAMES = ("resnet18", "resnet50")
LIST_HINT = "python -c \"import timm; print(timm.list_models('convnext*'))\""
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = utils.data's; repeated so this module imports no data code
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pretrained downloads of timm models, name -> URL; empty means timm's own source (Hugging Face
# hub or its URL). A table so that tests can point a download at a local server.
TIMM_URLS = {}
HF_HUB = "https://huggingface.co"


@functools.lru_cache(maxsize=None)
def check_model_name(name):
    """A UserError unless `name` is resnet18, resnet50 or a model name (with or without a tag) of timm."""
    if name in TORCHVISION_NAMES:
        return
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
        maybe = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model {name!r}{maybe}: --model takes resnet18, resnet50 or a timm model "
                        f"name; list timm's names with {LIST_HINT}")


def normalization(name):
    """(mean, std) of the RGB input the backbone was pretrained on: ImageNet's for the ResNets,
    else the model's pretrained configuration in timm (e.g. 0.5 / 0.5 for vit_tiny_patch16_224)."""
    if name in TORCHVISION_NAMES:
        return IMAGENET_MEAN, IMAGENET_STD
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.mean or not cfg.std:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def classifier_prefixes(name):
    """The classifier's module names in timm's pretrained configuration (e.g. head.fc)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    heads = (cfg.classifier if cfg else None) or "fc"
    return tuple(h + "." for h in ((heads,) if isinstance(heads, str) else heads))


# ---------------------------------------------------------------------------
# timm models


@contextlib.contextmanager
def _quiet_timm():
    """timm logs a warning per adapted key while loading; our checks say what matters."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _create(name, img_size, **kwargs):
    """timm.create_model, with img_size for the models that take one (transformers)."""
    import timm

    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **kwargs)


def build_timm(name, download=False, state=None, source=None, in_chans=3, img_size=None):
    """A timm model as a trunk: (module, feature width). `download`: timm's default pretrained
    weights; `state`: a state_dict of this model (from `source`, a file or torchgeo), whose
    classifier is dropped; neither: random initialisation."""
    check_model_name(name)
    kwargs = dict(num_classes=0, in_chans=in_chans)
    size = img_size or 224
    try:
        with _quiet_timm():
            if state is not None:
                net = _from_state(name, img_size, kwargs, state, source)
            elif download:
                net = _download(name, img_size, kwargs)
            else:
                net = _create(name, img_size, pretrained=False, **kwargs)
    except UserError:
        raise
    except (RuntimeError, ValueError, AssertionError) as err:
        if "size mismatch" in str(err):
            raise UserError(f"weights {source} do not fit {name} ({_first_line(err, 'size mismatch')}); pass a state_dict of "
                            f"{name} or the --model it belongs to") from None
        raise UserError(f"timm could not build {name} for {in_chans}-band {size} x {size} input "
                        f"({_first_line(err)}); try another --img-size, or --bands / --weights that fit") from None
    _check_input_size(net, name, in_chans, size)
    return net, net.num_features


def _from_state(name, img_size, kwargs, state, source):
    """timm's own loading of a state_dict (its filters resample position embeddings, adapt a
    3-band first layer to in_chans), then the key names checked against the model."""
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefixes(name))}
    names = set(state)  # timm loads non-strictly: what the file held is compared below
    try:
        net = _create(name, img_size, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state)), **kwargs)
    except (RuntimeError, KeyError, ValueError, AssertionError, IndexError):
        check_keys(state, _create(name, img_size, pretrained=False, **kwargs), name, source)
        raise
    check_keys(dict.fromkeys(names), net, name, source, shapes_may_differ=True)
    return net


def _download(name, img_size, kwargs):
    import timm.models

    timm.models.set_pretrained_download_progress(True)
    timm.models.set_pretrained_check_hash(True)  # URLs with a sha256 prefix in the file name are verified
    url = TIMM_URLS.get(name)
    overlay = dict(url=url, hf_hub_id=None) if url else None
    cfg = timm.models.get_pretrained_cfg(name)
    where = url or (f"{HF_HUB}/{cfg.hf_hub_id}" if cfg and cfg.hf_hub_id else (cfg.url if cfg else None))
    if not where:
        raise UserError(f"timm has no pretrained weights for {name}; train from scratch with --no-pretrained "
                        "or pass a state_dict with --weights PATH")
    # Without network the Hugging Face hub retries for minutes; ask it for its cache only then.
    offline = not url and cfg.hf_hub_id and not _reachable(HF_HUB)
    try:
        with _hub_offline(offline):
            return _create(name, img_size, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if "size mismatch" in str(err) or "Kernel size" in str(err):
            raise
        raise UserError(f"could not download timm's pretrained weights for {name} from {where} "
                        f"({type(err).__name__}: {_first_line(err)}); on a machine without network, train from "
                        "scratch with --no-pretrained, or pass a local state_dict with --weights PATH") from None


def _reachable(url, timeout=5.0):
    """Whether a TCP connection to the URL's host can be opened (name resolved, port open)."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline):
    """huggingface_hub in offline mode (its cache only) while `offline`."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def _check_input_size(net, name, in_chans, size):
    """One forward pass of a blank image: a size the model cannot take fails here, in one line,
    not at the first training step."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_chans, size, size))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise UserError(f"{name} cannot take {size} x {size} input ({_first_line(err)}); choose another "
                        "--img-size (transformers: a multiple of the patch size; CNNs: large enough for "
                        "their downsampling)") from None
    finally:
        net.train(was_training)


def _first_line(err, containing=""):
    lines = [line.strip() for line in str(err).strip().splitlines() if containing in line]
    return (lines[0] if lines else type(err).__name__)[:200]
