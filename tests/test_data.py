"""The split of docs/method.md section 1 and the dataset class."""
import os
import random

import pytest
from PIL import Image

from utils.data.scenes import SceneDataset, split_files
from utils.data.transforms import eval_transform
from utils.errors import UserError


def make_tree(root, counts, ext="tif"):
    for name, n in counts.items():
        d = os.path.join(root, "scenes", name)
        os.makedirs(d)
        for i in range(n):
            Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(os.path.join(d, f"img{i:03d}.{ext}"))


def test_split_counts_follow_python_float_products(tmp_path):
    make_tree(str(tmp_path), {"b_small": 10, "a_big": 90, "c_odd": 7})
    sizes = {s: len(SceneDataset(str(tmp_path), "scenes", s)) for s in ("train", "val", "test")}
    # int(0.7*90) = 62 (0.7*90 = 62.99999...), int(0.8*90) = 72; 10 -> 7/1/2; 7 -> int(4.8999)=4, int(5.6)=5 -> 4/1/2
    assert sizes == {"train": 62 + 7 + 4, "val": 10 + 1 + 1, "test": 18 + 2 + 2}


def test_split_counts_for_700():
    files = [f"f{i}" for i in range(700)]
    assert [len(split_files(files, s)) for s in ("train", "val", "test")] == [489, 71, 140]


def test_exact_order_small_case(tmp_path):
    make_tree(str(tmp_path), {"cls_b": 5, "cls_a": 6})
    ds = SceneDataset(str(tmp_path), "scenes", "train")
    assert ds.classes == ["cls_a", "cls_b"]
    # Independently: per class, files sorted by path, random.seed(42), shuffle, first int(0.7 n).
    expected = []
    for label, name in enumerate(["cls_a", "cls_b"]):
        d = os.path.join(str(tmp_path), "scenes", name)
        files = sorted(os.path.join(d, f) for f in os.listdir(d))
        rng = random.Random(42)
        rng.shuffle(files)
        expected += [(p, label) for p in files[:int(0.7 * len(files))]]
    assert ds.samples == expected
    assert ds.labels.tolist() == [label for _, label in expected]
    val = SceneDataset(str(tmp_path), "scenes", "val")
    test = SceneDataset(str(tmp_path), "scenes", "test")
    # The three splits partition every class.
    everything = sorted(p for p, _ in ds.samples + val.samples + test.samples)
    assert everything == sorted(os.path.join(str(tmp_path), "scenes", c, f)
                                for c in ["cls_a", "cls_b"] for f in os.listdir(os.path.join(str(tmp_path), "scenes", c)))


def test_split_is_deterministic_and_ignores_global_random_state(tmp_path):
    make_tree(str(tmp_path), {"x": 20, "y": 13})
    first = SceneDataset(str(tmp_path), "scenes", "test").samples
    random.seed(123)
    assert SceneDataset(str(tmp_path), "scenes", "test").samples == first


def test_extension_matches_case_insensitively_and_not_recursively(tmp_path):
    make_tree(str(tmp_path), {"a": 4}, ext="TIF")
    os.makedirs(os.path.join(str(tmp_path), "scenes", "a", "nested"))
    Image.new("RGB", (4, 4)).save(os.path.join(str(tmp_path), "scenes", "a", "nested", "x.tif"))
    ds = SceneDataset(str(tmp_path), "scenes", "train", ext="tif")
    assert len(ds) == int(0.7 * 4)


def test_items_are_dicts_with_memory_index(tmp_path):
    make_tree(str(tmp_path), {"a": 5, "b": 5})
    ds = SceneDataset(str(tmp_path), "scenes", "train", transform=eval_transform(8))
    item = ds[3]
    assert set(item) == {"img", "label", "idx"} and item["idx"] == 3
    assert item["img"].shape == (3, 8, 8) and item["label"] == ds.labels[3].item()


@pytest.mark.parametrize("counts,message", [
    ({"a": 5, "empty": 0}, "has no .tif files"),
    ({"a": 1}, "too few"),
])
def test_bad_folders_are_user_errors(tmp_path, counts, message):
    for name, n in counts.items():
        os.makedirs(os.path.join(str(tmp_path), "scenes", name))
    make_tree(str(tmp_path / "other"), {k: v for k, v in counts.items()})
    root = str(tmp_path / "other")
    with pytest.raises(UserError, match=message):
        SceneDataset(root, "scenes", "train")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SceneDataset(str(tmp_path), "nowhere", "train")


def test_default_extensions_match_the_dataset_catalog():
    from data.catalog import DATASETS
    from utils.training.flags import DATASET_EXTENSIONS, image_extension

    for spec in DATASETS.values():
        assert DATASET_EXTENSIONS[spec["name"]] == spec["ext"], spec["name"]
    assert image_extension("digits") == "png" and image_extension("mine") == "tif"
    assert image_extension("EuroSAT", ".PNG") == "PNG"


# ----------------------------------------------------------------------------- split files

def write_ours(tmp_path, counts=None):
    """A dataset and our split of it written by data/prepare.py split; returns the split file."""
    from data.prepare import main as prepare
    make_tree(str(tmp_path), counts or {"a": 12, "b": 9, "c": 15}, ext="png")
    out = tmp_path / "split.json"
    prepare(["split", "--dataset", "scenes", "--data", str(tmp_path), "--imgEXT", "png", "--out", str(out)])
    return out


def test_our_split_written_and_read_back_gives_the_same_samples_and_hash(tmp_path):
    import json

    from utils.data.split_files import lists_sha256, relative_lists
    out = write_ours(tmp_path)
    lists = json.loads(out.read_text())
    assert set(lists) == {"train", "val", "test"} and lists["train"][0].startswith("a/")
    folder = str(tmp_path / "scenes")
    ours = [SceneDataset(str(tmp_path), "scenes", s, "png") for s in ("train", "val", "test")]
    read = [SceneDataset(str(tmp_path), "scenes", s, "png", split_file=str(out)) for s in ("train", "val", "test")]
    for a, b in zip(ours, read):
        assert a.classes == b.classes and a.samples == b.samples and a.labels.tolist() == b.labels.tolist()
    assert lists_sha256(relative_lists(ours, folder)) == lists_sha256(relative_lists(read, folder))
    # Another split of the same files has another hash.
    lists["train"][0], lists["test"][0] = lists["test"][0], lists["train"][0]
    assert lists_sha256(lists) != lists_sha256(relative_lists(ours, folder))


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not readable JSON"),
    ('{"train": [], "test": []}', "exactly the keys train, val and test"),
    ('{"train": ["a/img000.png", "/abs/x.png", "loose.png"], "val": [], "test": []}',
     r"2 path\(s\) that are not <class>/<image>.*: /abs/x.png, loose.png"),
    ('{"train": ["a/img000.png"], "val": ["a/img000.png"], "test": []}', "names a/img000.png twice"),
    ('{"train": ["a/img000.png", "a/gone.png"], "val": [], "test": ["b/nope.png"]}',
     "2 of the 3 files named in split file .* do not exist in .*scenes: a/gone.png, b/nope.png; check --data"),
])
def test_a_bad_split_file_is_one_clear_error(tmp_path, content, message):
    make_tree(str(tmp_path), {"a": 3, "b": 3}, ext="png")
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        SceneDataset(str(tmp_path), "scenes", "train", "png", split_file=str(path))


def test_a_missing_file_named_in_a_split_file_stops_the_run_in_one_line(tmp_path, capsys):
    from conftest import load_script

    from utils.training.trainer import run
    out = write_ours(tmp_path)
    os.remove(tmp_path / "scenes" / "b" / "img004.png")
    argv = ["--data", str(tmp_path), "--dataset", "scenes", "--imgEXT", "png", "--split-file", str(out),
            "--no-pretrained", "--img-size", "16", "--device", "cpu", "--num_workers", "0", "--out",
            str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as stop:
        run(load_script("train_MB").MemoryBankCDNE, "test", argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "1 of the 36 files named in split file" in lines[0] and "b/img004.png" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_retrieval_evaluates_on_the_runs_own_split_file(tmp_path):
    import json
    from types import SimpleNamespace

    from utils.retrieval.command import resolve_dataset_flags, split_of
    lists = json.loads(write_ours(tmp_path).read_text())
    lists["train"][0], lists["test"][0] = lists["test"][0], lists["train"][0]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(lists))
    run_args = {"dataset": "scenes", "imgEXT": "png", "data": str(tmp_path), "split_file": str(other)}
    loaded = SimpleNamespace(flags=run_args, config={"num_classes": 3, "dataset": "scenes"}, path="run.pth")
    args = SimpleNamespace(dataset=None, imgEXT=None, data=None, split="test", skip_bad_images=False)
    assert "split_file" in resolve_dataset_flags(args, loaded)
    test = split_of(args, loaded.config)
    assert [p for p, _ in test.samples][0].endswith(lists["test"][0])
    assert test.samples != SceneDataset(str(tmp_path), "scenes", "test", "png").samples
