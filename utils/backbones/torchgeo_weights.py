"""torchgeo's Sentinel-2 ResNet weights (`--weights torchgeo:ENUM`): their registry, download, band
order and input scaling (input_spec.py turns them into what the network sees).

torchgeo is not a dependency (it pulls in Lightning, rasterio, kornia, geopandas, ...: 34 more
packages): this table holds the facts of its enums that loading needs (URL with the sha256
prefix that torch.hub verifies, architecture, bands in the weights' order, input scaling), read
from torchgeo/models/resnet.py; tests/test_backbones.py checks them against torchgeo wherever
torchgeo is installed (last checked against torchgeo 0.8.1, 2026-12-01: every entry
agrees). torchgeo builds these models as timm's resnet18/50 and loads the file with
load_state_dict, allowing only fc.* to differ; timm's and torchvision's ResNets have the same
key names and layers, so the file loads into the paper's torchvision trunk as it is.
"""
import urllib.error

import torch

from utils.errors import UserError

HF = "https://hf.co/torchgeo"
S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S2_RGB = ("B04", "B03", "B02")
S2_NO_CIRRUS = tuple(b for b in S2_ALL if b != "B10")
# Band order of the files of the datasets we know. EuroSAT's 13-band GeoTIFFs put B8A last
# (torchgeo's EuroSAT dataset says the same, after github.com/phelber/EuroSAT/issues/7).
DATASET_BANDS = {"EuroSAT_MS": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11",
                                "B12", "B8A")}

# torchgeo's transforms are chains of Normalize(mean, std) (we resize to --img-size ourselves
# instead of their Resize/CenterCrop); each chain is kept step by step as torchgeo writes it.
TEN_K = ((0.0, 10000.0),)
SECO = (((3.0, 2.0, 0.0), (85.0, 101.0, 129.0)), (0.0, 1 / 255), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def _entry(arch, path, bands, steps=TEN_K):
    return {"arch": arch, "url": path if path.startswith("https://") else f"{HF}/{path}", "bands": bands,
            "steps": steps}


TORCHGEO = {
    "ResNet18_Weights.SENTINEL2_ALL_MOCO": _entry("resnet18", "resnet18_sentinel2_all_moco/resolve/5b8cddc9a14f3844350b7f40b85bcd32aed75918/resnet18_sentinel2_all_moco-59bfdff9.pth", S2_ALL),  # noqa: E501
    "ResNet18_Weights.SENTINEL2_RGB_MOCO": _entry("resnet18", "resnet18_sentinel2_rgb_moco/resolve/e1c032e7785fd0625224cdb6699aa138bb304eec/resnet18_sentinel2_rgb_moco-e3a335e3.pth", S2_RGB),  # noqa: E501
    "ResNet18_Weights.SENTINEL2_RGB_SECO": _entry("resnet18", "resnet18_sentinel2_rgb_seco/resolve/f8dcee692cf7142163b55a5c197d981fe0e717a0/resnet18_sentinel2_rgb_seco-cefca942.pth", S2_RGB, SECO),  # noqa: E501
    "ResNet50_Weights.SENTINEL2_ALL_MOCO": _entry("resnet50", "resnet50_sentinel2_all_moco/resolve/da4f3c9dbe09272eb902f3b37f46635fa4726879/resnet50_sentinel2_all_moco-df8b932e.pth", S2_ALL),  # noqa: E501
    "ResNet50_Weights.SENTINEL2_ALL_DINO": _entry("resnet50", "resnet50_sentinel2_all_dino/resolve/d7f14bf5530d70ac69d763e58e77e44dbecfec7c/resnet50_sentinel2_all_dino-d6c330e9.pth", S2_ALL),  # noqa: E501
    "ResNet50_Weights.SENTINEL2_ALL_DECUR": _entry("resnet50", "https://huggingface.co/torchgeo/decur/resolve/eba7ae5945d482a4319be046d34b552db5dd9950/rn50_ssl4eo-s12_ms_decur_ep100-fc6b09ff.pth", S2_ALL),  # noqa: E501
    "ResNet50_Weights.SENTINEL2_ALL_SECO_ECO": _entry("resnet50", "seco-eco/resolve/aea279ea46572cfca5876ac1f9d8d8595fcdeb3b/resnet50_sentinel2_all_seco_eco-90ec322f.pth", S2_NO_CIRRUS),  # noqa: E501
    "ResNet50_Weights.SENTINEL2_RGB_MOCO": _entry("resnet50", "resnet50_sentinel2_rgb_moco/resolve/efd9723b59a88e9dc1420dc1e96afb25b0630a3c/resnet50_sentinel2_rgb_moco-2b57ba8b.pth", S2_RGB),  # noqa: E501
    "ResNet50_Weights.SENTINEL2_RGB_SECO": _entry("resnet50", "resnet50_sentinel2_rgb_seco/resolve/fbd07b02a8edb8fc1035f7957160deed4321c145/resnet50_sentinel2_rgb_seco-018bf397.pth", S2_RGB, SECO),  # noqa: E501
}
# Left out: SOFTCON (its file name has no hash to verify), the NDVI entry (a computed band),
# Satlas (clamped 8-bit scaling), CLOSP (not torchgeo's own files), Landsat and Sentinel-1.
# Where each is downloaded from; a table so that tests can point a download at a local server.
TORCHGEO_URLS = {name: e["url"] for name, e in TORCHGEO.items()}


def torchgeo_entry(weights):
    """The registry entry of "torchgeo:ENUM" (the prefix optional)."""
    name = weights.split(":", 1)[1] if weights.startswith("torchgeo:") else weights
    if name not in TORCHGEO:
        raise UserError(f"--weights torchgeo:{name} is not one we load; choose one of "
                        f"{', '.join('torchgeo:' + n for n in TORCHGEO)}")
    return name, TORCHGEO[name]


def is_torchgeo(weights):
    return isinstance(weights, str) and weights.startswith("torchgeo:")


def scaling(steps, channels):
    """One per-channel (mean, std) equal to torchgeo's chain of Normalize steps:
    ((x - m1) / s1 - m2) / s2 = (x - (m1 + m2 s1)) / (s1 s2)."""
    mean, std = [0.0] * channels, [1.0] * channels
    for m, s in steps:
        m = list(m) if isinstance(m, (tuple, list)) else [m] * channels
        s = list(s) if isinstance(s, (tuple, list)) else [s] * channels
        mean = [a + b * c for a, b, c in zip(mean, m, std)]
        std = [a * b for a, b in zip(std, s)]
    return mean, std


def band_order(dataset, file_bands, wanted):
    """Indices of the file bands that give the weights' bands `wanted`, in the weights' order;
    (indices, a warning or None)."""
    names = DATASET_BANDS.get(dataset)
    note = None
    if names is None or len(names) != file_bands:
        if file_bands not in (len(S2_ALL), len(wanted)):
            raise UserError(f"the band order of {dataset}'s {file_bands}-band files is not known, and the weights "
                            f"take {len(wanted)} bands ({' '.join(wanted)}); use files of 13 Sentinel-2 bands "
                            f"or of the weights' {len(wanted)}")
        names = S2_ALL if file_bands == len(S2_ALL) else wanted
        note = (f"warning: the band order of {dataset} is not known; taking its {file_bands} bands as "
                f"{' '.join(names)} (EuroSAT_MS's files put B8A last and are reordered)")
    missing = [b for b in wanted if b not in names]
    if missing:
        raise UserError(f"the weights take band(s) {' '.join(missing)}, which {dataset}'s files "
                        f"({' '.join(names)}) do not have")
    return [names.index(b) for b in wanted], note


def download_torchgeo(weights):
    """The state_dict of torchgeo:ENUM, downloaded once into torch.hub's cache and verified
    against the sha256 prefix in its file name."""
    name, _ = torchgeo_entry(weights)
    url = TORCHGEO_URLS[name]
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, map_location="cpu",
                                                  weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise UserError(f"could not download torchgeo:{name} from {url} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160] if str(err) else ''}); on a machine without network, "
                        f"download it elsewhere and put it in {torch.hub.get_dir()}/checkpoints/") from None
