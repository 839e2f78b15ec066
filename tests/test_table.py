"""python -m utils.table: the paper's Table I from run folders; cells run, skipped, resumed, reported."""
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from utils import table

FAST = ["--no-pretrained", "--img-size", "16", "-b", "16", "--lr", "0.01", "--num_workers", "0", "--device", "cpu"]


def write_run(root, name, variant, dataset, dim, seed, map100):
    """A finished run folder as the scripts leave it (results.json only)."""
    folder = os.path.join(root, name)
    os.makedirs(folder)
    metrics = {"mAP@100": map100, "P@20": 0.9, "mAP": 0.8}
    with open(os.path.join(folder, "results.json"), "w") as fh:
        json.dump({"variant": variant, "dataset": dataset, "best_epoch": 3, "val": metrics, "test": metrics,
                   "args": {"dim": dim, "seed": seed, "dataset": dataset, "epochs": 5}}, fh)
    return folder


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two threads per run on 2 busy cores is several times slower


def run_table(*args):
    return subprocess.run([sys.executable, "-m", "utils.table", *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=300)


@pytest.fixture
def runs(tmp_path):
    """Hand-made runs; folder names say nothing, the cell comes from results.json."""
    root = tmp_path / "runs"
    write_run(root, "a/x", "MB", "NWPU-RESISC45", 16, 0, 0.9731)
    write_run(root, "a/b/y", "MB", "NWPU-RESISC45", 16, 1, 0.9531)
    write_run(root, "z", "LSH", "EuroSAT", 128, 0, 0.80)
    write_run(root, "w", "MB", "digits", 16, 0, 0.5)
    os.makedirs(root / "broken")
    (root / "broken" / "results.json").write_text("{not json")
    return str(root)


def test_collect_aggregates_and_writes_every_format(runs, tmp_path, capsys):
    report = str(tmp_path / "report")
    assert table.main(["--collect", runs, "--report", report]) == 0
    out = capsys.readouterr().out
    assert report in out.splitlines()[0] and "wrote" in out and "broken" in out  # the bad json is named, skipped

    md = open(os.path.join(report, "table.md")).read()
    assert md.startswith("Test mAP@100 (%)") and "database = train split" in md
    assert "| method | NWPU-RESISC45 16 bits | 128 | EuroSAT 16 bits | 128 | digits 16 bits | 128 |" in md
    mean, std = statistics.mean([97.31, 95.31]), statistics.stdev([97.31, 95.31])
    assert f"{mean:.2f} ± {std:.2f} (n=2) (paper 99.69, {mean - 99.69:+.2f})" in md
    assert ("| CNN+LSH | — (paper 32.98) | — (paper 77.35) | — (paper 49.44) | 80.00 (paper 87.89, -7.89) "
            "| — | — |") in md
    assert "| CDNE(MB) |" in md and md.index("CDNE(MB)") < md.index("CNN+LSH")  # the paper's row order
    assert "50.00 |" in md  # digits: ours only, no paper column

    rows = list(csv.DictReader(open(os.path.join(report, "table.csv"))))
    assert len(rows) == 2 * 3 * 2  # methods x (dataset, bits) columns found
    mb = next(r for r in rows if (r["method"], r["dataset"], r["bits"]) == ("CDNE(MB)", "NWPU-RESISC45", "16"))
    assert mb["n_seeds"] == "2" and mb["seeds"] == "0 1" and float(mb["paper"]) == 99.69
    assert float(mb["mean"]) == pytest.approx(mean, abs=1e-4) and float(mb["std"]) == pytest.approx(std, abs=1e-4)
    assert float(mb["diff"]) == pytest.approx(mean - 99.69, abs=1e-4)
    digits = next(r for r in rows if r["dataset"] == "digits" and r["method"] == "CDNE(MB)")
    assert digits["paper"] == "" and digits["diff"] == "" and float(digits["mean"]) == 50.0

    data = json.load(open(os.path.join(report, "table.json")))
    row = next(r for r in data["rows"] if (r["key"], r["dataset"], r["bits"]) == ("mb", "NWPU-RESISC45", 16))
    assert [(r["seed"], round(r["value"], 2)) for r in row["runs"]] == [(0, 97.31), (1, 95.31)]
    assert row["runs"][1]["folder"] == os.path.join(runs, "a", "b", "y")

    with Image.open(os.path.join(report, "table.png")) as img:
        assert img.width >= 3 * 400 and 300 <= img.height <= 1000  # one panel per dataset
        assert len(img.convert("RGB").getcolors(1 << 16)) > 10  # lines in several colours, not a blank page


def test_collect_filters_and_reports_into_the_runs_folder(runs, capsys):
    assert table.main(["--collect", runs, "--dataset", "NWPU-RESISC45", "--seeds", "1"]) == 0
    md = open(os.path.join(runs, "table.md")).read()
    assert "95.31 (paper 99.69, -4.38)" in md and "EuroSAT" not in md and "n=2" not in md


def test_print_commands_lists_only_unfinished_cells_and_runs_nothing(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_run(out, "digits/mb_8bit_seed0", "MB", "digits", 8, 0, 0.5)
    os.makedirs(os.path.join(out, "digits", "mb_16bit_seed0"))
    open(os.path.join(out, "digits", "mb_16bit_seed0", "checkpoint_last.pth"), "w").close()
    before = sorted(os.walk(out))
    assert table.main(["--dataset", "digits", "--bits", "8", "16", "--methods", "mb", "mu", "--out", out,
                       "--data", str(tmp_path / "data"), "--print-commands", "--", "--epochs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(os.walk(out)) == before
    cmds = {(c[1].split(os.sep)[-2], c[c.index("--dim") + 1]): c for c in map(shlex.split, lines)}
    assert set(cmds) == {("train_MB", "16"), ("train", "8"), ("train", "16")}  # finished mb 8 bits left out
    resumed = cmds["train_MB", "16"]
    assert resumed[resumed.index("--resume") + 1] == os.path.join(out, "digits", "mb_16bit_seed0",
                                                                  "checkpoint_last.pth")
    fresh = cmds["train", "8"]
    assert "--resume" not in fresh and fresh[0] == sys.executable
    flags = dict(zip(fresh[2::2], fresh[3::2]))
    assert flags == {"--data": str(tmp_path / "data"), "--dataset": "digits", "--dim": "8", "--seed": "0",
                     "--out": os.path.join(out, "digits"), "--name": "mu_8bit_seed0", "--epochs": "3"}


def test_a_baseline_cell_runs_baselines_main_with_its_method():
    cmd = table.command(table.Cell("itq", "EuroSAT", 64, 2), "/o", extra=["--epochs", "3"])
    assert cmd == [sys.executable, os.path.join(REPO, "baselines", "main.py"), "--method", "itq",
                   "--dataset", "EuroSAT", "--dim", "64", "--seed", "2", "--out", os.path.join("/o", "EuroSAT"),
                   "--name", "itq_64bit_seed2", "--epochs", "3"]
    assert [table.METHODS[k][0] for k in table.METHODS] == ["CDNE(MB)", "CDNE(MU)", "DHCNN", "Triplet", "DPSH",
                                                            "CNN+PCA-ITQ", "CNN+LSH"]


@pytest.mark.parametrize("argv, words", [
    (["--methods", "mb", "cdne"], "unknown method 'cdne'"),
    (["--bits", "16", "0"], "--bits must be positive"),
    (["--collect", "/no/such/folder"], "does not exist"),
    (["--collect", "EMPTY"], "no results.json"),
    (["--bits", "x"], "invalid int value"),
    (["--", "--dim", "8"], "--dim after -- clashes"),
])
def test_bad_input_exits_2_with_one_line(argv, words, tmp_path, capsys):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        table.main(argv + ["--out", str(tmp_path / "out")] if "--" not in argv else argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and words in err
    assert not os.path.exists(tmp_path / "out")


def test_bad_input_from_the_command_line():
    proc = run_table("--methods", "nope")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown method")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


FAKE = """import json, os, sys
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
print("fake run", sys.argv[1:])
if a["--seed"] == "1":
    sys.exit(3)
folder = os.path.join(a["--out"], a["--name"])
os.makedirs(folder, exist_ok=True)
m = {"mAP@100": int(a["--dim"]) / 100}
json.dump({"variant": "DHCNN", "dataset": a["--dataset"], "best_epoch": 0, "val": m, "test": m,
           "args": {"dim": int(a["--dim"]), "seed": 0, "dataset": a["--dataset"]}}, open(folder + "/results.json", "w"))
"""


def test_a_failed_cell_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    monkeypatch.setitem(table.METHODS, "dhcnn", ("DHCNN", str(fake), "DHCNN"))
    out = str(tmp_path / "out")
    code = table.main(["--dataset", "fake", "--bits", "8", "16", "--methods", "dhcnn", "--seeds", "0", "1",
                       "--out", out])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.count("FAILED") == 2 and "exit status 3" in captured.out
    assert "2 cell(s) failed" in captured.err and "mb_" not in captured.out
    log = open(os.path.join(out, "fake", "dhcnn_16bit_seed1", "log.txt")).read()
    assert log.startswith("$ ") and "fake run" in log
    md = open(os.path.join(out, "table.md")).read()
    assert "| DHCNN | 8.00 | 16.00 |" in md and md.count("Failed: dhcnn fake") == 2
    assert len(json.load(open(os.path.join(out, "table.json")))["failed"]) == 2


def test_real_runs_finish_are_skipped_then_resume(tiny_root, tmp_path):
    """Three short CDNE(MB) runs: one by the table, one by hand (then marked interrupted), one resumed."""
    out = str(tmp_path / "out")
    grid = ["--dataset", "digits", "--bits", "8", "--methods", "mb", "--data", tiny_root, "--out", out]
    first = run_table(*grid, "--", *FAST, "--epochs", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    folder = os.path.join(out, "digits", "mb_8bit_seed0")
    results = os.path.join(folder, "results.json")
    assert "running digits mb_8bit_seed0" in first.stdout and "finished digits mb_8bit_seed0" in first.stdout
    assert "results written to" in open(os.path.join(folder, "log.txt")).read()
    assert "| CDNE(MB) | " in open(os.path.join(out, "table.md")).read()
    stamp = os.path.getmtime(results)

    again = run_table(*grid, "--", *FAST, "--epochs", "1")
    assert again.returncode == 0 and "skipped digits mb_8bit_seed0: finished" in again.stdout
    assert os.path.getmtime(results) == stamp

    # An interrupted cell: seed 1 trained by hand with the cell's flags, its results.json removed.
    other = os.path.join(out, "digits", "mb_8bit_seed1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_MB", "main.py"), "--data", tiny_root,
                           "--dataset", "digits", "--dim", "8", "--seed", "1", "--out", os.path.join(out, "digits"),
                           "--name", "mb_8bit_seed1", *FAST, "--epochs", "1"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    os.remove(os.path.join(other, "results.json"))
    resumed = run_table(*grid, "--seeds", "0", "1", "--", *FAST, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming digits mb_8bit_seed1" in resumed.stdout and os.path.getmtime(results) == stamp
    assert "resumed from" in open(os.path.join(other, "log.txt")).read()
    assert json.load(open(os.path.join(other, "results.json")))["args"]["epochs"] == 2
    assert "(n=2)" in open(os.path.join(out, "table.md")).read()
