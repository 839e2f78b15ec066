"""The network side of retrieval: a checkpoint's network, its evaluation transform, and the
encoding of image files into codes."""
from contextlib import nullcontext

from torch.utils.data import DataLoader, Dataset

from utils.backbones.input_spec import model_channels
from utils.data.scenes import read_image
from utils.data.transforms import eval_transform_for
from utils.evaluation.encoding import encode
from utils.models import HashingNet
from utils.retrieval.index_file import weights_fingerprint
from utils.training import checkpoint as ckpt_io


class ImageFiles(Dataset):
    """Image paths (and labels, -1 where unknown) as items {"img", "label", "idx"}."""

    def __init__(self, paths, labels, transform, bands=3):
        self.paths, self.labels, self.transform, self.bands = list(paths), labels, transform, bands

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        img = read_image(path, self.bands)
        label = int(self.labels[i]) if self.labels is not None else -1
        return {"img": self.transform(img), "label": label, "idx": i}


class Loaded:
    """A checkpoint's network (never the key encoder), configuration, flags and weights fingerprint."""

    def __init__(self, path, device):
        ckpt = ckpt_io.load_checkpoint(path)
        self.path, self.config, self.flags = path, ckpt["config"], ckpt.get("args") or {}
        self.config.setdefault("in_channels", self.flags.get("bands", 3))
        self.fingerprint = weights_fingerprint(ckpt["model"])
        # The trunk's own channels and size (a timm transformer's position embeddings follow img_size).
        # The head the method asked for (utils/models.py); checkpoints without "head" have the paper's.
        model = HashingNet(self.config["arch"], self.config["num_classes"], self.config["dim"], pretrained=False,
                           in_channels=model_channels(self.config), img_size=self.config.get("img_size"),
                           head=self.config.get("head"))
        model.load_state_dict(ckpt["model"])
        self.model = model.to(device).eval()


def load_model(path, device):
    """The network of a checkpoint (never the key encoder) and the checkpoint's configuration."""
    loaded = Loaded(path, device)
    return loaded.model, loaded.config


def transform_of(config):
    """The checkpoint's recorded input (bands, order, the backbone's normalisation); ImageNet's or
    the band statistics for checkpoints from before it was recorded."""
    return eval_transform_for(config)


def encode_files(model, config, paths, labels, device, batch_size, num_workers):
    ds = ImageFiles(paths, labels, transform_of(config), config.get("in_channels", 3))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return encode(model, loader, len(ds), config["dim"], device, nullcontext, "encode")
