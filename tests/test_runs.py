"""What a user meets running and resuming: flags taken from the checkpoint, refused changes,
a finished run left alone, one epoch numbering, the same run with any number of loader
workers, --resume auto, the pipeline and AMP choices, and --help."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

MB = os.path.join(REPO, "train_MB", "main.py")
MU = os.path.join(REPO, "train", "main.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def script(path, *args, cwd=None):
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=600)


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def first_epoch(tiny_root, tmp_path_factory):
    """One epoch of CDNE(MB) with flags other than the defaults; the run folder."""
    out = tmp_path_factory.mktemp("runs")
    proc = script(MB, "--data", tiny_root, "--dataset", "digits", "--no-pretrained", "--img-size", "16", "--dim", "8",
                  "-b", "16", "--lr", "0.02", "--memory-momentum", "0.3", "--num_workers", "0", "--device", "cpu",
                  "--epochs", "1", "--out", str(out), "--name", "r")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "r"


def test_resume_takes_the_runs_flags_from_the_checkpoint(first_epoch, tmp_path):
    run = tmp_path / "r"
    subprocess.run(["cp", "-r", str(first_epoch), str(run)], check=True)
    # Nothing but the checkpoint and a longer run, from an unrelated folder.
    proc = script(MB, "--resume", str(run / "checkpoint_last.pth"), "--epochs", "2", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "after epoch 1" in proc.stdout
    ckpt = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert ckpt["epoch"] == 2
    assert ckpt["args"]["lr"] == 0.02 and ckpt["args"]["dim"] == 8 and ckpt["args"]["memory_momentum"] == 0.3
    assert ckpt["args"]["epochs"] == 2
    # One epoch numbering: the console's best epoch is results.json's, and TensorBoard's steps count from 1.
    results = json.loads((run / "results.json").read_text())
    best = re.search(r"best epoch (\d+):", proc.stdout)
    assert best and int(best.group(1)) == results["best_epoch"] and results["best_epoch"] in (1, 2)
    assert "epoch 2: val mAP@100" in proc.stdout


def test_resume_refuses_flags_that_would_change_the_run(first_epoch):
    last = first_epoch / "checkpoint_last.pth"
    before = last.read_bytes()
    line = one_error_line(script(MB, "--resume", str(last), "--dim", "16", "--lr", "0.02"))
    assert "--dim 16 (the run's: 8)" in line and "--lr" not in line and "--learning-rate" not in line
    assert "another --name" in line
    assert last.read_bytes() == before


def test_resuming_a_finished_run_changes_nothing(first_epoch):
    files = ["args.json", "results.json", "checkpoint_last.pth", "checkpoint_best.pth"]
    files += [os.path.join("tensorboard", f) for f in os.listdir(first_epoch / "tensorboard")]
    before = {f: (first_epoch / f).read_bytes() for f in files}
    proc = script(MB, "--resume", str(first_epoch / "checkpoint_last.pth"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is finished after 1 of 1 epochs" in proc.stdout and "nothing to do" in proc.stdout
    assert {f: (first_epoch / f).read_bytes() for f in files} == before
    assert sorted(os.listdir(first_epoch / "tensorboard")) == sorted(f.split(os.sep)[1] for f in files[4:])


def test_resume_auto_starts_then_continues(tiny_root, tmp_path):
    flags = ["--data", tiny_root, "--dataset", "digits", "--no-pretrained", "--img-size", "16", "--dim", "8",
             "-b", "16", "--lr", "0.01", "--num_workers", "0", "--device", "cpu", "--out", str(tmp_path),
             "--name", "auto", "--resume", "auto"]
    first = script(MU, *flags, "--epochs", "1")
    assert first.returncode == 0 and "resumed" not in first.stdout, first.stderr[-2000:]
    second = script(MU, *flags, "--epochs", "2")
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-2000:]
    assert torch.load(tmp_path / "auto" / "checkpoint_last.pth", weights_only=True)["epoch"] == 2
    no_name = flags[:flags.index("--name")] + ["--resume", "auto"]
    line = one_error_line(script(MU, *no_name))
    assert "--resume auto needs --name" in line


def test_the_run_does_not_depend_on_the_number_of_loader_workers(tiny_root, tmp_path):
    common = ["--data", tiny_root, "--dataset", "digits", "--no-pretrained", "--img-size", "16", "--dim", "8",
              "-b", "16", "--lr", "0.01", "--device", "cpu", "--epochs", "1", "--out", str(tmp_path)]
    for workers in ("0", "2"):
        proc = script(MB, *common, "--num_workers", workers, "--name", f"w{workers}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((tmp_path / "w0" / "results.json").read_text())
    b = json.loads((tmp_path / "w2" / "results.json").read_text())
    assert a["val"]["mAP@100"] == b["val"]["mAP@100"] and a["test"] == b["test"]
    wa = torch.load(tmp_path / "w0" / "checkpoint_last.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "w2" / "checkpoint_last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_per_sample_augmentation_is_a_function_of_seed_epoch_and_index(tiny_root):
    from utils.data.scenes import SceneDataset
    from utils.data.splits import PerSampleAugmentation
    from utils.data.transforms import train_transform

    ds = PerSampleAugmentation(SceneDataset(tiny_root, "digits", "train", "png"), train_transform(16), seed=3)
    first = ds[5]["img"]
    torch.rand(100)  # the global RNG's state does not matter
    assert torch.equal(ds[5]["img"], first)
    ds.epoch = 1
    assert not torch.equal(ds[5]["img"], first)


def test_amp_is_refused_on_a_cpu_without_native_bfloat16(tiny_root, tmp_path, monkeypatch, capsys):
    from conftest import load_script

    from utils.training import flags
    from utils.training.trainer import run

    monkeypatch.setattr(flags, "cpu_supports_bf16", lambda: False)  # as on an AVX2-only processor
    with pytest.raises(SystemExit) as stop:
        run(load_script("train_MB").MemoryBankCDNE, "test",
            ["--data", tiny_root, "--dataset", "digits", "--device", "cpu", "--amp", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err
    assert "--amp" in err and "float32 without it" in err
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_the_bfloat16_check_reads_the_processor_flags(monkeypatch, tmp_path):
    import builtins

    from utils.training import flags

    real_open = builtins.open
    for text, expected in (("flags : fpu avx2 fma", False), ("flags : avx2 avx512f avx512_bf16", True),
                           ("Features : fp asimd bf16", True)):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
            tmp_path / "cpuinfo" if path == "/proc/cpuinfo" else path, *a, **k))
        assert flags.cpu_supports_bf16() is expected, text


def test_pipeline_auto_chooses_by_device_and_memory(monkeypatch):
    from utils.data import pipeline

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert pipeline.choose_pipeline("auto", cpu, 1000, 3, 256)[0] == "pil"
    monkeypatch.setattr(pipeline, "available_memory", lambda: 100 * 2**30)
    chosen, why = pipeline.choose_pipeline("auto", cuda, 31_500, 3, 256)  # NWPU-RESISC45: 5.8 GiB
    assert chosen == "cached" and "5.8 GiB" in why
    monkeypatch.setattr(pipeline, "available_memory", lambda: 8 * 2**30)
    assert pipeline.choose_pipeline("auto", cuda, 31_500, 3, 256)[0] == "pil"
    assert pipeline.choose_pipeline("auto", cuda, 10, bands=13, img_size=64)[0] == "pil"
    assert pipeline.choose_pipeline("pil", cuda, 10, bands=3, img_size=64)[0] == "pil"


@pytest.mark.parametrize("path", [MB, MU, os.path.join(REPO, "baselines", "main.py")])
def test_help_has_a_line_for_every_flag_and_each_default_once(path):
    extra = ["--method", "triplet"] if "baselines" in path else []
    text = script(path, *extra, "--help").stdout
    options = text[text.index("options:"):]
    entries = re.split(r"\n  (?=-)", options)[1:]
    assert len(entries) > 25
    for entry in entries:
        flag, _, help_text = entry.partition("  ")
        assert help_text.strip(), f"{flag} has no help line"
        assert entry.count("default") <= 1, entry
    for flag in ("--epochs", "--seed", "--momentum", "--weight-decay", "--lr-step", "--lr-gamma"):
        entry = next(e for e in entries if re.match(rf"{flag}\b", e))
        assert "default" in entry, entry
    assert text.count("\n  python ") >= 2  # the epilog's example commands


def test_cached_pipeline_draws_each_images_augmentation_from_its_own_seed(tiny_root):
    from utils.data.cached import CachedBatches, CachedImages
    from utils.data.scenes import SceneDataset

    cache = CachedImages(SceneDataset(tiny_root, "digits", "train", "png"), 16, progress=False)

    def images(batches, workers=0, epoch=1):
        out = {}
        for batch in CachedBatches(cache, batches, augment=True, seed=5, epoch=epoch, num_workers=workers):
            out.update({int(i): img for i, img in zip(batch["idx"], batch["img"])})
        return out

    a = images([[0, 1, 2, 3, 4, 5]])
    b = images([[5, 3], [1, 0, 4], [2]], workers=1)
    assert all(torch.equal(a[i], b[i]) for i in a)
    assert not all(torch.equal(a[i], images([[0, 1, 2, 3, 4, 5]], epoch=2)[i]) for i in a)


def utils_imports():
    """{module: modules of the utils package it imports}, from the source (imports inside
    functions included: a lazy import is still an import)."""
    import ast

    sources = {}
    for folder, _, files in os.walk(os.path.join(REPO, "utils")):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                sources[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    graph = {}
    for module, path in sources.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        with open(path) as fh:
            tree = ast.parse(fh.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from . import x` imports the module x; `from .m import y`, the module m.
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names}
        graph[module] = {t for t in targets if t in sources and t != module}
    return graph


def test_no_two_modules_of_utils_import_each_other():
    graph = utils_imports()
    assert {"utils.data.scenes", "utils.data.multiband", "utils.metrics", "utils.metrics.rank_counting"} <= set(graph)
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles inside utils/: " + "; ".join(" -> ".join(c) for c in cycles)


# utils/ from the bottom up (docs/method.md section 10): a module imports its own layer and those
# below it only. The method core (models, losses, ...) and the data package need nothing of each
# other; the doors at the top re-export names README shows.
LAYERS = (("utils", "utils.errors", "utils.distributed"), ("utils.metrics",), ("utils.backbones",),
          ("utils.models", "utils.hashing", "utils.losses", "utils.memory", "utils.method", "utils.cdne"),
          ("utils.data",), ("utils.evaluation",), ("utils.training",), ("utils.retrieval",), ("utils.table",),
          ("utils.flags", "utils.trainer", "utils.search", "utils.retrieve", "utils.launch"))


def layer_of(module):
    for i, names in enumerate(LAYERS):
        if any(module == n or (n != "utils" and module.startswith(n + ".")) for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: place it")


def test_imports_run_one_way_through_the_layers():
    graph = utils_imports()
    upward = [f"{m} -> {t}" for m, targets in sorted(graph.items()) for t in sorted(targets)
              if layer_of(t) > layer_of(m)]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)
    # The rules the layout promises, spelled out.
    for low in ("utils.data", "utils.backbones", "utils.models"):
        for high in ("utils.training", "utils.evaluation", "utils.table", "utils.retrieval"):
            assert not [t for m, ts in graph.items() if m.startswith(low) for t in ts if t.startswith(high)]
    assert not [t for m, ts in graph.items() if m.startswith("utils.training") for t in ts
                if t.startswith(("utils.table", "utils.retrieval"))]
    # At most about 14 modules directly in utils/ (the rest are packages).
    top = [f for f in os.listdir(os.path.join(REPO, "utils")) if f.endswith(".py") and f != "__init__.py"]
    assert len(top) <= 14, top


def test_the_lower_layers_read_no_flags():
    """The flags stop at the door (utils/training/settings.py resolves them): no module of the data,
    backbone, model, evaluation, run folder, checkpoint or search layers reads `args.<flag>`."""
    import ast
    lower = ["utils/data", "utils/backbones", "utils/evaluation", "utils/metrics", "utils/models.py",
             "utils/training/run_folder.py", "utils/training/checkpoint.py", "utils/training/state.py",
             "utils/training/records.py", "utils/retrieval/search.py", "utils/retrieval/exact.py",
             "utils/retrieval/engines.py", "utils/retrieval/index_file.py", "utils/retrieval/build.py",
             "utils/retrieval/network.py", "utils/retrieval/engine_store.py"]
    paths = []
    for entry in lower:
        full = os.path.join(REPO, entry)
        paths += [os.path.join(full, f) for f in sorted(os.listdir(full)) if f.endswith(".py")] \
            if os.path.isdir(full) else [full]
    reads = []
    for path in paths:
        with open(path) as fh:
            for node in ast.walk(ast.parse(fh.read())):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                    reads.append(f"{os.path.relpath(path, REPO)}:{node.lineno} args.{node.attr}")
    assert not reads, reads


def run_inproc(folder, argv, capsys, script_name):
    """A training script's main in this process: (exit status, stdout, stderr)."""
    from conftest import load_script

    from utils.training.trainer import run
    module = load_script(folder)
    method = getattr(module, "MemoryBankCDNE", None) or module.MemoryUnitCDNE
    try:
        status = run(method, "test", argv, script=script_name)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("more", [[], ["--epochs", "3"]])
def test_another_methods_checkpoint_is_refused_first_naming_its_script(first_epoch, capsys, more):
    last = first_epoch / "checkpoint_last.pth"
    before = last.read_bytes()
    status, out, err = run_inproc("train", ["--resume", str(last), *more], capsys, "train/main.py")
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(lines) == 1 and "nothing to do" not in out, (out, err)
    assert f"was made by {os.path.relpath(MB)} (MB), not by this script (MU)" in lines[0]
    assert f"continue it with: {sys.executable} {os.path.relpath(MB)} --resume {last}" in lines[0]
    assert last.read_bytes() == before


def test_resume_refuses_another_split_and_ours_is_the_runs(first_epoch, tiny_root, tmp_path, capsys):
    from data.prepare import main as prepare
    from utils.data.split_files import lists_sha256
    ours = tmp_path / "ours.json"
    prepare(["split", "--dataset", "digits", "--data", tiny_root, "--out", str(ours)])
    recorded = torch.load(first_epoch / "checkpoint_last.pth", weights_only=True)["args"]["split_sha256"]
    assert json.loads((first_epoch / "args.json").read_text())["split_sha256"] == recorded
    assert lists_sha256(json.loads(ours.read_text())) == recorded
    lists = json.loads(ours.read_text())
    lists["train"][0], lists["test"][0] = lists["test"][0], lists["train"][0]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(lists))
    status, _, err = run_inproc("train_MB", ["--resume", str(first_epoch / "checkpoint_last.pth"), "--epochs", "2",
                                             "--split-file", str(other)], capsys, "train_MB/main.py")
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(lines) == 1, err
    assert "was trained on another split" in lines[0] and f"split file {other}" in lines[0]
    assert torch.load(first_epoch / "checkpoint_last.pth", weights_only=True)["epoch"] == 1


def test_test_pictures_are_logged_at_the_epoch_step(tmp_path):
    """TensorBoard steps are epochs: the bit fractions are one histogram at the test's epoch."""
    from types import SimpleNamespace

    from PIL import Image

    from utils.evaluation.encoding import log_test_pictures
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(paths[-1])
    split = SimpleNamespace(samples=[(p, i % 2) for i, p in enumerate(paths)], labels=torch.tensor([0, 1, 0, 1]))
    codes = torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, -1.0, -1.0]])
    calls = []

    class Writer:
        def __getattr__(self, name):
            def record(tag, *args, **kw):  # add_pr_curve_raw(tag, tp, fp, tn, fn, precision, recall, step, n)
                calls.append((name, tag, args[0], args[6] if name == "add_pr_curve_raw" else args[1]))
            return record

    metrics = {"pr_precision": [1.0] * 4, "pr_recall": [0.5] * 4}
    log_test_pictures(Writer(), SimpleNamespace(test=split, db=split), metrics, codes, codes, 3, step=7, k=2)
    assert {step for _, _, _, step in calls} == {7}
    hist = [value for name, tag, value, _ in calls if tag == "test/bit_fraction_ones"]
    assert len(hist) == 1 and hist[0].tolist() == [1.0, 0.25, 0.25]


def test_a_run_records_the_pipeline_that_ran_and_its_environment(first_epoch):
    """--pipeline auto is recorded as resolved (pil on a CPU) in args.json, the checkpoints and results.json,
    with no weights file (weights_sha256 None), and the environment the table compares."""
    records = [json.loads((first_epoch / "args.json").read_text()),
               torch.load(first_epoch / "checkpoint_last.pth", weights_only=True)["args"],
               json.loads((first_epoch / "results.json").read_text())["args"]]
    assert [(r["pipeline"], r["weights_sha256"]) for r in records] == [("pil", None)] * 3
    env = json.loads((first_epoch / "results.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["world_size"] == 1 and env["amp_dtype"] is None and env["cpu_threads"] == 1
    assert torch.load(first_epoch / "checkpoint_last.pth", weights_only=True)["environments"] == [env]


def test_a_weights_file_is_recorded_by_its_sha256(tiny_root, tmp_path):
    import hashlib

    import torchvision
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    proc = script(os.path.join(REPO, "baselines", "main.py"), "--method", "lsh", "--data", tiny_root, "--dataset",
                  "digits", "--weights", str(weights), "--img-size", "16", "--dim", "8", "-b", "32", "--num_workers",
                  "0", "--device", "cpu", "--out", str(tmp_path), "--name", "lsh")
    assert proc.returncode == 0, proc.stderr[-2000:]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    run = tmp_path / "lsh"
    records = [json.loads((run / "args.json").read_text()), json.loads((run / "results.json").read_text())["args"],
               torch.load(run / "checkpoint_last.pth", weights_only=True)["args"]]
    assert [r["weights_sha256"] for r in records] == [digest] * 3 and records[0]["weights"] == str(weights)
