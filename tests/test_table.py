"""python -m utils.table: the paper's Table I from run folders; a cell is its settings (stale runs stop
the table, larger --epochs resume), learning rates chosen on val, the cost, the figures, the report."""
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_script
from PIL import Image

from utils.table import cells as table_cells
from utils.table import command as table
from utils.table import grid_runner, identity
from utils.training import checkpoint as ckpt_io
from utils.training.checkpoint import write_json_atomic
from utils.training.flags import build_parser, image_extension

FAST = ["--no-pretrained", "--img-size", "16", "-b", "16", "--lr", "0.01", "--num_workers", "0", "--device", "cpu"]


def recorded_args(method, dataset, bits, seed, extra=()):
    """The flags a script records for a cell: its parser, built here as the script builds it, imgEXT resolved."""
    if method in ("mb", "mu"):
        module = load_script("train_MB" if method == "mb" else "train")
        parser = build_parser("x", module.MemoryBankCDNE if method == "mb" else module.MemoryUnitCDNE)
        argv = []
    else:
        from baselines.main import METHODS
        parser = build_parser("x", METHODS[method])
        parser.add_argument("--method")
        argv = ["--method", method]
    args = vars(parser.parse_args(argv + ["--dataset", dataset, "--dim", str(bits), "--seed", str(seed), *extra]))
    args["imgEXT"] = image_extension(dataset, args["imgEXT"])
    if args["pipeline"] == "auto":  # runs record the pipeline that auto chose: pil on a CPU
        args["pipeline"] = "pil"
    return args


def cpu_environment(threads=None):
    """What a CPU cell started here now records as its environment (one process, this torch)."""
    env = identity.cell_environment({"device": "cpu", "model": "resnet18"})
    return env if threads is None else dict(env, cpu_threads=threads)


def write_run(root, name, variant, dataset, dim, seed, map100, args=None, val=None, seconds=None, curves=False,
              environment=None, world_size=None):
    """A finished run folder as the scripts leave it (results.json only)."""
    folder = os.path.join(root, name)
    os.makedirs(folder)
    metrics = {"mAP@100": map100, "P@20": 0.9, "mAP": 0.8}
    test = dict(metrics)
    if curves:
        test.update(pr_precision=[map100, 0.5, 0.1], pr_recall=[0.1, 0.6, 1.0],
                    precision_at_k={"k": [1, 5, 10], "precision": [map100, map100 * 0.9, map100 * 0.7]})
    result = {"variant": variant, "dataset": dataset, "best_epoch": 3, "val": dict(metrics, **{"mAP@100": val or map100}),
              "test": test, "args": args or {"dim": dim, "seed": seed, "dataset": dataset, "epochs": 5}}
    if seconds is not None:
        result.update(train_seconds=seconds, device="cpu", world_size=1)
    if environment is not None:
        result["environment"] = environment
    if world_size is not None:
        result["world_size"] = world_size
    with open(os.path.join(folder, "results.json"), "w") as fh:
        json.dump(result, fh)
    return folder


def write_checkpoint(folder, epoch, args):
    """What the table reads of a checkpoint: its progress and its flags."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"format": "cdne-checkpoint", "epoch": epoch, "args": args},
               os.path.join(folder, "checkpoint_last.pth"))


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


@pytest.fixture
def no_runs(monkeypatch):
    """The grid runner must not be reached (a test of what stops the table before it runs anything)."""
    def refuse(*a, **k):
        raise AssertionError("cells were run")
    monkeypatch.setattr(grid_runner, "run_jobs", refuse)


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
    assert "Total: no recorded time (4 run(s) without a recorded time)." in md  # runs from before the cost

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
    assert "lr" not in row and data["lr_grid"] is None  # no grid asked: no rate chosen

    with Image.open(os.path.join(report, "table.png")) as img:
        assert img.width > 2.5 * img.height  # one panel per dataset, side by side
        assert len(img.convert("RGB").getcolors(1 << 20)) > 10  # lines in several colours, not a blank page
    for name in ("table", "pr_curves", "precision_at_k"):
        assert open(os.path.join(report, f"{name}.pdf"), "rb").read(5) == b"%PDF-"


def test_collect_filters_and_reports_into_the_runs_folder(runs, capsys):
    assert table.main(["--collect", runs, "--dataset", "NWPU-RESISC45", "--seeds", "1"]) == 0
    md = open(os.path.join(runs, "table.md")).read()
    assert "95.31 (paper 99.69, -4.38)" in md and "EuroSAT" not in md and "n=2" not in md


def test_collect_never_averages_runs_made_with_other_flags(tmp_path, capsys):
    root = str(tmp_path / "runs")
    write_run(root, "quick", "MB", "digits", 16, 0, 0.50, args=recorded_args("mb", "digits", 16, 0, ["--epochs", "5"]))
    write_run(root, "long", "MB", "digits", 16, 1, 0.90, args=recorded_args("mb", "digits", 16, 1, ["--epochs", "130"]))
    write_run(root, "long2", "MB", "digits", 16, 0, 0.80, args=recorded_args("mb", "digits", 16, 0, ["--epochs", "130"]))
    assert table.main(["--collect", root]) == 0
    md = open(os.path.join(root, "table.md")).read()
    assert "| CDNE(MB) [epochs=5] | 50.00 |" in md
    assert f"| CDNE(MB) [epochs=130] | 85.00 ± {statistics.stdev([80.0, 90.0]):.2f} (n=2) |" in md


def test_collect_keeps_runs_of_other_environments_in_rows_of_their_own(tmp_path, capsys):
    root = str(tmp_path / "runs")
    env = {"torch": "2.14.1", "cpu_threads": 1, "cuda": None, "cudnn": None}
    args = [recorded_args("mb", "digits", 16, seed) for seed in range(4)]
    write_run(root, "s0", "MB", "digits", 16, 0, 0.50, args=args[0], environment=env)
    write_run(root, "s1", "MB", "digits", 16, 1, 0.60, args=args[1], environment=dict(env, cpu_threads=2))
    write_run(root, "s3", "MB", "digits", 16, 3, 0.40, args=args[3], environment=env)
    write_run(root, "s2", "MB", "digits", 16, 2, 0.70, args=args[2])  # from before runs recorded it
    assert table.main(["--collect", root]) == 0
    md = open(os.path.join(root, "table.md")).read()
    assert "| CDNE(MB) [cpu_threads=1, torch=2.14.1] | 45.00 ± 7.07 (n=2) |" in md
    assert "| CDNE(MB) [cpu_threads=2, torch=2.14.1] | 60.00 |" in md
    assert "| CDNE(MB) [cpu_threads=?, torch=?] | 70.00 |" in md  # unknown is not taken for the same
    assert "warning" not in capsys.readouterr().err  # no row mixes environments


def test_collect_never_averages_runs_that_differ_only_in_world_size(tmp_path, capsys):
    """Issue 21, case 3: two results.json differing only in world_size (1 and 2)."""
    root = str(tmp_path / "runs")
    env = cpu_environment(1)
    del env["world_size"]  # as runs recorded it before the environment held it: results.json's world_size alone
    for seed, world, value in ((0, 1, 0.50), (1, 2, 0.70)):
        write_run(root, f"s{seed}", "MB", "digits", 16, seed, value, seconds=5.0, world_size=world, environment=env,
                  args=recorded_args("mb", "digits", 16, seed))
    assert table.main(["--collect", root]) == 0
    md = open(os.path.join(root, "table.md")).read()
    assert "| CDNE(MB) [world_size=1] | 50.00 |" in md and "| CDNE(MB) [world_size=2] | 70.00 |" in md
    assert "n=2" not in md


def test_seeds_whose_resumed_parts_ran_under_other_thread_counts_are_warned_about(tmp_path, capsys):
    root = str(tmp_path / "runs")
    env = cpu_environment(1)
    folder = write_run(root, "s0", "MB", "digits", 16, 0, 0.50, seconds=3.0, args=recorded_args("mb", "digits", 16, 0))
    record = json.load(open(os.path.join(folder, "results.json")))
    record["environments"] = [dict(env, cpu_threads=2), env]  # resumed under another thread count
    json.dump(record, open(os.path.join(folder, "results.json"), "w"))
    assert table.main(["--collect", root]) == 0
    line = ("CDNE(MB) on digits at 16 bits: its runs differ in cpu_threads 1; cpu_threads 2, so its spread is not "
            "only the seeds'")
    assert f"warning: {line}" in capsys.readouterr().err
    md = open(os.path.join(root, "table.md")).read()
    assert "| CDNE(MB) | 50.00 |" in md and f"Note: {line}." in md


def test_print_commands_lists_only_unfinished_cells_and_runs_nothing(tmp_path, capsys):
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    write_run(out, "digits/mb_8bit_seed0", "MB", "digits", 8, 0, 0.5,
              args=recorded_args("mb", "digits", 8, 0, ["--epochs", "3", "--data", "/elsewhere", "--num_workers", "9"]))
    write_checkpoint(os.path.join(out, "digits", "mb_16bit_seed0"), 1, recorded_args("mb", "digits", 16, 0, ["--epochs", "3"]))
    before = sorted(os.walk(out))
    assert table.main(["--dataset", "digits", "--bits", "8", "16", "--methods", "mb", "mu", "--out", out,
                       "--data", data, "--print-commands", "--", "--epochs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(os.walk(out)) == before
    cmds = {(c[1].split(os.sep)[-2], c[c.index("--dim") + 1]): c for c in map(shlex.split, lines)}
    # mb 8 bits is finished: its other --data and --num_workers cannot change a number.
    assert set(cmds) == {("train_MB", "16"), ("train", "8"), ("train", "16")}
    resumed = cmds["train_MB", "16"]
    assert resumed[resumed.index("--resume") + 1] == os.path.join(out, "digits", "mb_16bit_seed0",
                                                                  "checkpoint_last.pth")
    fresh = cmds["train", "8"]
    assert "--resume" not in fresh and fresh[0] == sys.executable
    flags = dict(zip(fresh[2::2], fresh[3::2]))
    assert flags == {"--data": data, "--dataset": "digits", "--dim": "8", "--seed": "0",
                     "--out": os.path.join(out, "digits"), "--name": "mu_8bit_seed0", "--epochs": "3"}


def test_a_stale_cell_stops_the_table_before_anything_runs(tmp_path, capsys, no_runs):
    """Flags the table does not pass count at their defaults: a run made with --lr 0.01 is not the cell
    that the table asks for without --lr (the default 0.1)."""
    out = str(tmp_path / "out")
    made = recorded_args("mb", "digits", 8, 0, ["--epochs", "3", "--lr", "0.01", "--img-size", "16"])
    folder = write_run(out, "digits/mb_8bit_seed0", "MB", "digits", 8, 0, 0.5, args=made)
    write_run(out, "digits/mb_8bit_seed1", "MB", "digits", 8, 1, 0.5, environment=cpu_environment(),
              args=recorded_args("mb", "digits", 8, 1, ["--epochs", "3", "--img-size", "32", "--device", "cuda"]))
    before = sorted(os.walk(out))
    with pytest.raises(SystemExit) as exc:
        table.main(["--dataset", "digits", "--bits", "8", "--methods", "mb", "--seeds", "0", "1", "2", "--out", out,
                    "--", "--epochs", "3", "--img-size", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1  # seed 1 differs only in --device: it is the cell
    assert err[0].startswith(f"error: cell digits mb_8bit_seed0 ({folder}) is not the run asked for: ")
    assert "--lr 0.1 asked, the run's 0.01" in err[0] and "--img-size 32 asked, the run's 16" in err[0]
    assert "--rerun-stale" in err[0] and "new --out" in err[0]
    assert sorted(os.walk(out)) == before  # nothing ran, nothing was written (seed 2's folder neither)


def test_rerun_stale_sets_the_old_folder_aside_and_collect_leaves_it_out(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    made = recorded_args("mb", "digits", 8, 0, ["--epochs", "3", "--lr", "0.01"])
    folder = write_run(out, "digits/mb_8bit_seed0", "MB", "digits", 8, 0, 0.5, args=made)
    with monkeypatch.context() as patch:  # a folder that cannot be renamed: one line, the run left as it was
        patch.setattr(table.os, "rename", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
        with pytest.raises(SystemExit) as exc:
            table.main(["--dataset", "digits", "--bits", "8", "--methods", "mb", "--out", out, "--rerun-stale",
                        "--print-commands", "--", "--epochs", "3"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"cannot set aside {folder} as" in err and "(Read-only file system); make" in err
        assert os.path.isfile(os.path.join(folder, "results.json"))
    assert table.main(["--dataset", "digits", "--bits", "8", "--methods", "mb", "--out", out, "--rerun-stale",
                       "--print-commands", "--", "--epochs", "3"]) == 0
    captured = capsys.readouterr()
    assert not os.path.exists(folder) and "--resume" not in captured.out and "mb_8bit_seed0" in captured.out
    aside = [d for d in os.listdir(os.path.join(out, "digits")) if d.startswith("mb_8bit_seed0.stale-")]
    assert len(aside) == 1 and os.path.isfile(os.path.join(out, "digits", aside[0], "results.json"))
    with pytest.raises(SystemExit):  # the set-aside run is not found by --collect either
        table.main(["--collect", out])
    assert "left out 1 folder(s) set aside by --rerun-stale" in capsys.readouterr().out


@pytest.mark.parametrize("ran, ckpt_epoch, asked, state, words", [
    (2, 2, 3, "resume", "--epochs 3 asked, the run has 2"),       # a larger --epochs continues the run
    (2, 2, 1, "stale", "--epochs 1 asked, the run's 2"),
    (2, None, 3, "stale", "no checkpoint_last.pth to continue"),
    (2, 4, 5, "resume", "its checkpoint has 4 epochs, more than its results.json's 2"),  # resumed by hand, stopped
    (2, 4, 2, "stale", "its checkpoint has trained 4 epochs, more than the --epochs 2 asked"),
    (2, 2, 2, "finished", ""),
])
def test_epochs_done_against_epochs_asked(tmp_path, ran, ckpt_epoch, asked, state, words):
    out, cell = str(tmp_path / "out"), table.Cell("mb", "digits", 8, 0)
    folder = write_run(out, "digits/mb_8bit_seed0", "MB", "digits", 8, 0, 0.5,
                       args=recorded_args("mb", "digits", 8, 0, ["--epochs", str(ran)]))
    if ckpt_epoch is not None:
        write_checkpoint(folder, ckpt_epoch, recorded_args("mb", "digits", 8, 0, ["--epochs", str(max(ran, ckpt_epoch))]))
    found = identity.assess(cell, out, extra=["--epochs", str(asked)])
    assert found.state == state and words in found.reason


def test_lr_grid_chooses_on_val_never_on_test_and_counts_every_run(tmp_path, capsys):
    root = str(tmp_path / "runs")
    # (lr, seed, val %, test %, seconds): 0.01 is better on test, 0.001 on val; 0.1 has one seed only.
    for lr, seed, val, test, sec in [(0.01, 0, 50, 90, 10.0), (0.01, 1, 60, 91, 11.0), (0.001, 0, 70, 40, 12.0),
                                     (0.001, 1, 72, 41, 13.0), (0.1, 0, 99, 99, 14.0)]:
        write_run(root, f"mb_{lr}_{seed}", "MB", "digits", 16, seed, test / 100, val=val / 100, seconds=sec, curves=True,
                  args=recorded_args("mb", "digits", 16, seed, ["--lr", str(lr)]))
    write_run(root, "lsh", "LSH", "digits", 16, 0, 0.3, seconds=2.0, curves=True,
              args=recorded_args("lsh", "digits", 16, 0))
    report = str(tmp_path / "report")
    assert table.main(["--collect", root, "--report", report, "--lr-grid", "0.01", "0.001", "0.1"]) == 0
    rows = {r["key"]: r for r in json.load(open(os.path.join(report, "table.json")))["rows"]}
    mb = rows["mb"]
    assert mb["lr"] == 0.001 and mb["mean"] == pytest.approx(40.5) and mb["seeds"] == [0, 1]
    assert mb["lr_grid"] == {"0.01": pytest.approx(55.0), "0.001": pytest.approx(71.0), "0.1": pytest.approx(99.0)}
    assert mb["seconds"] == pytest.approx(60.0)  # the cost of the cell: every rate and seed it took
    assert rows["lsh"]["lr"] is None and rows["lsh"]["lr_grid"] is None and rows["lsh"]["mean"] == pytest.approx(30.0)
    md = open(os.path.join(report, "table.md")).read()
    assert "| CDNE(MB) | 40.50 ± 0.71 (n=2) lr 0.001 |" in md and "| CDNE(MB) | 60 s |" in md
    assert "Total: 62 s on cpu." in md
    assert mb["precision_at_k"] == {"k": [1, 5, 10], "precision": pytest.approx([0.405, 0.3645, 0.2835])}

    # Only the rates asked for take part: without 0.001, 0.01 is chosen.
    assert table.main(["--collect", root, "--report", report, "--lr-grid", "0.01"]) == 0
    rows = json.load(open(os.path.join(report, "table.json")))["rows"]
    assert rows[0]["lr"] == 0.01 and rows[0]["mean"] == pytest.approx(90.5)
    for name in ("table", "pr_curves", "precision_at_k"):
        with Image.open(os.path.join(report, f"{name}.png")) as img:
            assert len(img.convert("RGB").getcolors(1 << 20)) > 10, name  # curves drawn, not an empty panel


def test_a_tie_on_val_goes_to_the_rate_listed_first():
    from utils.table.report import choose_lr
    runs = [{"lr": 0.001, "val": 50.0}, {"lr": 0.01, "val": 50.0}, {"lr": 0.1, "val": 49.0}]
    assert choose_lr(runs, [0.01, 0.001, 0.1])[0] == 0.01 and choose_lr(runs, [0.001, 0.01, 0.1])[0] == 0.001


def test_lr_grid_cells_are_one_per_rate_and_lsh_runs_once(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert table.main(["--dataset", "digits", "--bits", "8", "--methods", "dpsh", "lsh", "--out", out,
                       "--lr-grid", "0.01", "0.001", "--print-commands", "--", "--epochs", "2"]) == 0
    cmds = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    named = {c[c.index("--name") + 1]: c for c in cmds}
    assert set(named) == {"dpsh_8bit_lr0.01_seed0", "dpsh_8bit_lr0.001_seed0", "lsh_8bit_seed0"}
    assert named["dpsh_8bit_lr0.001_seed0"][-2:] == ["--lr", "0.001"] and "--lr" not in named["lsh_8bit_seed0"]


@pytest.mark.parametrize("argv, words", [
    (["--methods", "mb", "cdne"], "unknown method 'cdne'"),
    (["--bits", "16", "0"], "--bits must be positive"),
    (["--collect", "/no/such/folder"], "does not exist"),
    (["--collect", "EMPTY"], "no results.json"),
    (["--bits", "x"], "invalid int value"),
    (["--", "--dim", "8"], "--dim after -- clashes"),
    (["--lr-grid", "0.1", "--", "--lr", "0.01"], "--lr after -- clashes"),
    (["--lr-grid", "0.1", "0"], "--lr-grid takes positive learning rates"),
    (["--bits", "16", "--figure-bits", "32"], "--figure-bits 32 is not one of the table's --bits"),
    (["--report", "FILE/sub"], "is a file, not a folder"),
])
def test_bad_input_exits_2_with_one_line(argv, words, tmp_path, capsys, no_runs):
    (tmp_path / "file").write_text("")
    argv = [str(tmp_path) if a == "EMPTY" else str(tmp_path / "file" / "sub") if a == "FILE/sub" else a for a in argv]
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


def test_a_json_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "results.json")
    write_json_atomic(path, {"a": 1})
    assert os.stat(path).st_mode & 0o044 == 0o044 & ~current_umask()  # readable as a plain open() would make it
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # fails half-way through the dump
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


FAKE = """import argparse, json, os, sys


def parser():  # the fake script's flags (no torch to import: each cell starts in a moment)
    p = argparse.ArgumentParser()
    for flag in ("--dataset", "--out", "--name"):
        p.add_argument(flag)
    p.add_argument("--dim", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, default=4)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    print("fake run", sys.argv[1:])
    if args.seed == 1:
        sys.exit(3)
    folder = os.path.join(args.out, args.name)
    os.makedirs(folder, exist_ok=True)
    m = {"mAP@100": args.dim / 100}
    json.dump({"variant": "DHCNN", "dataset": args.dataset, "best_epoch": 0, "val": m, "test": m,
               "args": vars(args), "environment": json.loads(os.environ["FAKE_ENVIRONMENT"])},
              open(folder + "/results.json", "w"))
"""


def use_fake_script(source, tmp_path, monkeypatch):
    """DHCNN's cells run the fake script `source` (its parser is the table's view of their flags)."""
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    monkeypatch.setitem(table.METHODS, "dhcnn", ("DHCNN", str(fake), "DHCNN"))
    fake_parser = {}
    exec(compile(source, str(fake), "exec"), fake_parser)
    monkeypatch.setattr(table_cells, "script_parser", lambda method: fake_parser["parser"]())
    monkeypatch.setenv("FAKE_ENVIRONMENT", json.dumps(cpu_environment()))  # what a real run records


def test_a_failed_cell_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    use_fake_script(FAKE, tmp_path, monkeypatch)
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
    assert "| DHCNN | 8.00 | 16.00 |" in md and md.count("Failed: fake dhcnn_") == 2
    assert len(json.load(open(os.path.join(out, "table.json")))["failed"]) == 2
    # The same command again: the finished cells are the asked-for ones, the failed ones run again.
    assert table.main(["--dataset", "fake", "--bits", "8", "16", "--methods", "dhcnn", "--seeds", "0", "1",
                       "--out", out]) == 1
    assert capsys.readouterr().out.count("skipped fake dhcnn_") == 2


def test_real_runs_finish_are_skipped_then_trained_on_with_more_epochs(tiny_root, tmp_path, monkeypatch, capsys):
    """A short CDNE(MB) cell run by the table, skipped by the same command, trained on by a larger
    --epochs; a smaller --epochs then stops the table. (The table in-process; its cells are child processes.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two threads per run on 2 busy cores is several times slower
    out = str(tmp_path / "out")
    grid = ["--dataset", "digits", "--bits", "8", "--methods", "mb", "--data", tiny_root, "--out", out, "--"]
    assert table.main(grid + FAST + ["--epochs", "1"]) == 0
    first = capsys.readouterr()
    folder = os.path.join(out, "digits", "mb_8bit_seed0")
    results = os.path.join(folder, "results.json")
    assert "started digits mb_8bit_seed0" in first.out and "finished digits mb_8bit_seed0" in first.out
    assert "results written to" in open(os.path.join(folder, "log.txt")).read()
    assert "| CDNE(MB) | " in open(os.path.join(out, "table.md")).read()
    record = json.load(open(results))
    assert record["train_seconds"] > 0 and record["device"] == "cpu" and record["world_size"] == 1
    assert record["environment"]["cpu_threads"] == 1 and record["environment"]["torch"] == torch.__version__
    pk = record["test"]["precision_at_k"]
    assert pk["k"][:3] == [1, 5, 10] and len(pk["k"]) == len(pk["precision"]) and pk["k"][-1] <= 1000
    assert all(0 <= p <= 1 for p in pk["precision"]) and len(record["test"]["pr_recall"]) == 9
    stamp = os.path.getmtime(results)

    assert table.main(grid + FAST + ["--epochs", "1"]) == 0
    assert "skipped digits mb_8bit_seed0: finished" in capsys.readouterr().out
    assert os.path.getmtime(results) == stamp

    # The first part ran under another environment (as a checkpoint from another machine would say).
    last = os.path.join(folder, "checkpoint_last.pth")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["environments"] == [record["environment"]]
    ckpt["environments"] = [dict(record["environment"], cpu_threads=2)]
    ckpt_io.atomic_save(ckpt, last)  # replaced, not written in place: checkpoint_best.pth may be a link to it
    with pytest.raises(SystemExit) as exc:  # its cell here would run under 1 thread: refused before anything runs
        table.main(grid + FAST + ["--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [
        f"error: cell digits mb_8bit_seed0 ({folder}) ran in another environment than a cell here would get: "
        "cpu_threads 2 (now 1); run it again with --rerun-stale (the old folder is kept as <folder>.stale-<time>), "
        "take it as it is with --accept-environment, or pass a new --out"]
    assert json.load(open(results)) == record
    assert table.main(["--accept-environment"] + grid + FAST + ["--epochs", "2"]) == 0
    longer = capsys.readouterr()
    assert (f"warning: cell digits mb_8bit_seed0 ({folder}) ran in another environment than a cell here would get: "
            "cpu_threads 2 (now 1); taken with --accept-environment (marked in table.md)") in longer.err
    assert "resuming digits mb_8bit_seed0: --epochs 2 asked, the run has 1" in longer.out, longer.out + longer.err
    md = open(os.path.join(out, "table.md")).read()
    assert "| CDNE(MB) | " in md and " † |" in md
    assert "Note: † CDNE(MB) on digits at 8 bits: accepted with --accept-environment: seed 0 ran in another" in md
    assert "resumed from" in open(os.path.join(folder, "log.txt")).read()
    record2 = json.load(open(results))
    assert record2["args"]["epochs"] == 2 and record2["train_seconds"] > record["train_seconds"]
    assert [e["cpu_threads"] for e in record2["environments"]] == [2, 1]
    assert "CDNE(MB) on digits at 8 bits: its runs differ in cpu_threads 1; cpu_threads 2" in longer.err

    with pytest.raises(SystemExit) as exc:
        table.main(grid + FAST + ["--epochs", "1"])
    assert exc.value.code == 2 and "--epochs 1 asked, the run's 2" in capsys.readouterr().err
    assert json.load(open(results)) == record2

    # The split is compared by the sha256 the run recorded: the same images elsewhere are the same
    # split; one image more is another.
    import shutil
    copy = str(tmp_path / "moved")
    shutil.copytree(os.path.join(tiny_root, "digits"), os.path.join(copy, "digits"))
    cell, extra = table.Cell("mb", "digits", 8, 0), FAST + ["--epochs", "2"]
    assert identity.assess(cell, out, copy, extra).state == "finished"
    shutil.copy(os.path.join(copy, "digits", "3", os.listdir(os.path.join(copy, "digits", "3"))[0]),
                os.path.join(copy, "digits", "3", "extra.png"))
    identity.current_split.cache_clear()
    found = identity.assess(cell, out, copy, extra)
    assert found.state == "stale" and "the split now (the 70/10/20 split of " in found.reason


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Issue 21: a cell is what its run computed with (the pipeline, the weights' content, the environment),
# and the flags after -- are read as the scripts read them.

DHCNN_CELL = ["--dataset", "digits", "--bits", "16", "--methods", "dhcnn"]
DHCNN_FLAGS = ["--no-pretrained", "--img-size", "16", "--epochs", "2", "--lr", "0.001"]


def dhcnn_run(out, extra=(), environment=None, **kw):
    """A finished DHCNN cell at 16 bits (2 epochs, lr 0.001, 16 px) as a CPU run records it."""
    args = recorded_args("dhcnn", "digits", 16, 0, [*DHCNN_FLAGS, *extra])
    args.update(kw)
    return write_run(out, "digits/dhcnn_16bit_seed0", "DHCNN", "digits", 16, 0, 0.6136, args=args, seconds=4.0,
                     world_size=1, environment=cpu_environment() if environment is None else environment)


def test_a_run_made_with_the_cached_pipeline_is_not_the_auto_cell_on_a_cpu(tmp_path, capsys, no_runs):
    """Issue 21, case 1: made with --pipeline cached; the same table command without --pipeline runs pil here."""
    out = str(tmp_path / "out")
    folder = dhcnn_run(out, ["--pipeline", "cached"])
    with pytest.raises(SystemExit) as exc:
        table.main([*DHCNN_CELL, "--out", out, "--", *DHCNN_FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [
        f"error: cell digits dhcnn_16bit_seed0 ({folder}) is not the run asked for: --pipeline auto runs pil here "
        "(the Pillow pipeline on cpu; the cached one pays on GPUs), the run ran cached; run it again with "
        "--rerun-stale (the old folder is kept as <folder>.stale-<time>) or pass a new --out"]
    # Asked for as it ran, it is the cell; asked for pil, it is not.
    assert table.main([*DHCNN_CELL, "--out", out, "--report", str(tmp_path / "r"), "--", *DHCNN_FLAGS,
                       "--pipeline", "cached"]) == 0
    assert "skipped digits dhcnn_16bit_seed0: finished" in capsys.readouterr().out
    found = identity.assess(table.Cell("dhcnn", "digits", 16, 0), out, extra=[*DHCNN_FLAGS, "--pipeline", "pil"])
    assert found.state == "stale" and found.reason == "--pipeline 'pil' asked, the run's 'cached'"
    # Commands run elsewhere (--print-commands, --slurm): auto is the node's choice, the run's is taken.
    assert table.main([*DHCNN_CELL, "--out", out, "--print-commands", "--", *DHCNN_FLAGS]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "note: the cells' commands run elsewhere" in captured.err


@pytest.mark.parametrize("recorded, device, state, words", [
    ("pil", "cpu", "finished", ""),
    ("auto", "cpu", "finished", ""),   # no run of these scripts records auto; off CUDA it can only have been pil
    ("auto", "cuda (NVIDIA H100)", "stale", "the run recorded --pipeline 'auto', not the pipeline it ran"),
])
def test_a_run_that_recorded_auto_counts_as_pil_only_where_nothing_else_can_have_run(tmp_path, recorded, device,
                                                                                     state, words):
    out = str(tmp_path / "out")
    folder = dhcnn_run(out, pipeline=recorded)
    record = json.load(open(os.path.join(folder, "results.json")))
    record["device"] = device
    json.dump(record, open(os.path.join(folder, "results.json"), "w"))
    found = identity.assess(table.Cell("dhcnn", "digits", 16, 0), out, extra=DHCNN_FLAGS)
    assert found.state == state and words in found.reason


def test_auto_resolves_on_cuda_by_the_listed_images_and_the_ram(tiny_root, monkeypatch):
    from utils.data import pipeline
    wanted = table_cells.wanted_flags(table.Cell("dhcnn", "digits", 16, 0), tiny_root, DHCNN_FLAGS)
    n = identity.current_split(tiny_root, "digits", "png", None)[1]
    assert n == 120  # 12 per class, listed (not decoded)
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2 * n * 3 * 16 ** 2)
    assert identity.resolve_pipeline(wanted, "cuda")[0] == "cached"
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2 * n * 3 * 16 ** 2 - 1)
    assert identity.resolve_pipeline(wanted, "cuda")[0] == "pil"
    assert identity.resolve_pipeline(dict(wanted, bands=13), "cuda")[0] == "pil"
    pipeline, why = identity.resolve_pipeline(dict(wanted, data="/no/such/data"), "cuda")
    assert pipeline is None and "cannot be listed here" in why


def test_weights_are_compared_by_their_content_not_their_path(tmp_path, capsys, no_runs):
    """Issue 21, case 2: the weights file overwritten with other weights is another cell."""
    from utils.training.records import file_sha256
    out, weights = str(tmp_path / "out"), tmp_path / "w.pth"
    weights.write_bytes(b"weights one")
    first = file_sha256(str(weights))
    folder = dhcnn_run(out, weights=str(tmp_path / "elsewhere.pth"), weights_sha256=first, no_pretrained=False)
    flags = [f for f in DHCNN_FLAGS if f != "--no-pretrained"] + ["--weights", str(weights)]
    cell = table.Cell("dhcnn", "digits", 16, 0)
    assert identity.assess(cell, out, extra=flags).state == "finished"  # same bytes, another path: the same
    time_ns = os.stat(weights).st_mtime_ns
    weights.write_bytes(b"weights two")
    os.utime(weights, ns=(time_ns + 10**9, time_ns + 10**9))
    with pytest.raises(SystemExit) as exc:
        table.main([*DHCNN_CELL, "--out", out, "--", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    second = file_sha256(str(weights))
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: cell digits dhcnn_16bit_seed0 ({folder})")
    assert (f"--weights {weights} now holds other weights (sha256 {second[:12]}...) than the run's "
            f"(sha256 {first[:12]}...)") in err[0]
    # A run from before runs recorded the hash: not taken for the same weights.
    record = json.load(open(os.path.join(folder, "results.json")))
    del record["args"]["weights_sha256"]
    json.dump(record, open(os.path.join(folder, "results.json"), "w"))
    found = identity.assess(cell, out, extra=flags)
    assert found.state == "stale" and found.reason == (
        f"the run recorded no sha256 of its --weights {tmp_path / 'elsewhere.pth'} (made before runs recorded it), "
        f"so it cannot be checked against {weights} now (sha256 {second[:12]}...)")
    weights.unlink()
    record["args"]["weights_sha256"] = first
    json.dump(record, open(os.path.join(folder, "results.json"), "w"))
    assert "cannot be read now (No such file or directory)" in identity.assess(cell, out, extra=flags).reason
    # torchgeo weights by their name.
    dhcnn_run(str(tmp_path / "geo"), weights="torchgeo:ResNet18_Weights.SENTINEL2_RGB_MOCO", no_pretrained=False)
    geo = [f for f in DHCNN_FLAGS if f != "--no-pretrained"] + ["--weights", "torchgeo:ResNet18_Weights.SENTINEL2_RGB_SECO"]
    found = identity.assess(cell, str(tmp_path / "geo"), extra=geo)
    assert found.state == "stale" and "--weights 'torchgeo:ResNet18_Weights.SENTINEL2_RGB_SECO' asked" in found.reason


def test_a_files_sha256_is_read_once_per_state(tmp_path):
    from utils.training import records
    path = tmp_path / "w.pth"
    path.write_bytes(b"x" * 100)
    records._file_sha256.cache_clear()
    digest = records.file_sha256(str(path))
    assert digest == __import__("hashlib").sha256(b"x" * 100).hexdigest()
    for _ in range(3):
        records.file_sha256(str(path))
    assert records._file_sha256.cache_info().misses == 1
    path.write_bytes(b"y" * 101)  # another size: read again
    assert records.file_sha256(str(path)) != digest and records._file_sha256.cache_info().misses == 2
    assert records.weights_sha256("torchgeo:ResNet18_Weights.SENTINEL2_RGB_MOCO") is None
    assert records.weights_sha256(None) is None


def test_a_cell_made_under_other_cpu_threads_stops_the_table(tmp_path, capsys, monkeypatch, no_runs):
    """Issue 21, case 3: a cell made under OMP_NUM_THREADS=2 is not the cell under OMP_NUM_THREADS=1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "out")
    folder = dhcnn_run(out, environment=cpu_environment(2))
    grid = [*DHCNN_CELL, "--out", out]
    with pytest.raises(SystemExit) as exc:
        table.main([*grid, "--", *DHCNN_FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [
        f"error: cell digits dhcnn_16bit_seed0 ({folder}) ran in another environment than a cell here would get: "
        "cpu_threads 2 (now 1); run it again with --rerun-stale (the old folder is kept as <folder>.stale-<time>), "
        "take it as it is with --accept-environment, or pass a new --out"]
    # Knowingly: a warning, the number, a mark in table.md.
    assert table.main([*grid, "--accept-environment", "--", *DHCNN_FLAGS]) == 0
    err = capsys.readouterr().err
    assert (f"warning: cell digits dhcnn_16bit_seed0 ({folder}) ran in another environment than a cell here would "
            "get: cpu_threads 2 (now 1); taken with --accept-environment (marked in table.md)") in err
    md = open(os.path.join(out, "table.md")).read()
    assert "| DHCNN | 61.36 † |" in md
    assert ("Note: † DHCNN on digits at 16 bits: accepted with --accept-environment: seed 0 ran in another "
            "environment than a cell here would get: cpu_threads 2 (now 1).") in md
    # Two threads again: the cell is the asked-for one.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert identity.assess(table.Cell("dhcnn", "digits", 16, 0), out, extra=DHCNN_FLAGS).environment == ""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ran = []
    monkeypatch.setattr(table, "run", lambda jobs, args: ran.extend(jobs) or ([], None))
    assert table.main([*grid, "--rerun-stale", "--", *DHCNN_FLAGS]) == 0
    assert f"set aside {folder} as {folder}.stale-" in capsys.readouterr().out and not os.path.exists(folder)
    assert [job.label for job in ran] == ["digits dhcnn_16bit_seed0"]  # run again


@pytest.mark.parametrize("change, words", [
    (dict(world_size=2), "world_size 2 (now 1)"),
    (dict(device="cuda", cuda="13.0", cudnn=92400), "device cuda (now cpu)"),
    (dict(torch="2.0.0"), f"torch 2.0.0 (now {torch.__version__})"),
    (dict(device=None), "device not recorded (now cpu)"),
])
def test_the_environment_a_run_recorded_is_compared_part_by_part(tmp_path, change, words):
    out = str(tmp_path / "out")
    folder = dhcnn_run(out, environment=dict(cpu_environment(), **change))
    record = json.load(open(os.path.join(folder, "results.json")))
    del record["device"]  # only the environment says where it ran
    json.dump(record, open(os.path.join(folder, "results.json"), "w"))
    found = identity.assess(table.Cell("dhcnn", "digits", 16, 0), out, extra=DHCNN_FLAGS)
    assert found.state == "finished" and words in found.environment, found


def test_a_run_from_before_the_environment_record_is_not_taken_for_this_one(tmp_path):
    out = str(tmp_path / "out")
    folder = dhcnn_run(out)
    record = json.load(open(os.path.join(folder, "results.json")))
    del record["environment"]
    json.dump(record, open(os.path.join(folder, "results.json"), "w"))
    found = identity.assess(table.Cell("dhcnn", "digits", 16, 0), out, extra=DHCNN_FLAGS)
    assert found.environment == "recorded no environment (made before runs recorded it)"


def test_the_cells_environment_on_gpus_follows_the_place_and_the_amp_dtype(monkeypatch):
    seen = {"torch": "2.14.1", "cpu_threads": 16, "cuda": "13.0", "cudnn": 92400, "gpus_bf16": [True, False],
            "mps": False}
    monkeypatch.setattr(identity, "probe", lambda: seen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    wanted = {"device": "auto", "amp": True, "model": "resnet18"}
    assert identity.cell_environment(wanted, gpu="4")["amp_dtype"] == "bfloat16"
    env = identity.cell_environment(wanted, gpu="7")  # a GPU without bfloat16: float16, as the trainer picks
    assert env["device"] == "cuda" and env["amp_dtype"] == "float16" and env["world_size"] == 1
    assert identity.cell_environment(wanted, trains=False)["amp_dtype"] is None  # LSH/ITQ: no autocast
    assert identity.cell_environment(dict(wanted, device="cpu"))["amp_dtype"] == "bfloat16"
    args = {"amp": True, "model": "resnet18"}
    recorded = dict(env, amp_dtype="bfloat16", cpu_threads=2)  # threads do not count on a GPU
    assert identity.environment_difference(env, [recorded], args) == (
        "ran in another environment than a cell here would get: amp_dtype bfloat16 (now float16)")
    assert identity.environment_difference(env, [dict(env, cpu_threads=2)], args) == ""
    timm = dict(wanted, model="convnext_atto")
    assert "timm" in identity.cell_environment(timm, gpu="4") and "timm" not in env


@pytest.mark.parametrize("extra, words", [
    (["--see", "5", "--di", "64"], "--see after -- clashes with the cell's own flag --seed (argparse takes --see for it)"),
    (["--seed=3"], "--seed after -- clashes with the cell's own flag --seed;"),
    (["--epochs", "2", "--nam", "x"], "--nam after -- clashes with the cell's own flag --name (argparse takes --nam"),
    (["--datas", "EuroSAT"], "--datas after -- clashes with the cell's own flag --dataset"),
])
def test_flags_after_the_separator_are_read_as_the_scripts_read_them(extra, words, tmp_path, capsys, no_runs):
    """Issue 21, case 4: abbreviations that argparse takes for a flag the table sets."""
    with pytest.raises(SystemExit) as exc:
        table.main(["--dataset", "digits", "--bits", "16", "--methods", "mb", "--out", str(tmp_path / "out"),
                    "--", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not os.path.exists(tmp_path / "out")


def test_the_issues_abbreviated_command_is_refused_in_one_line():
    proc = run_table("--dataset", "digits", "--bits", "16", "--methods", "mb", "--", "--see", "5", "--di", "64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip().splitlines() == [
        "error: --see after -- clashes with the cell's own flag --seed (argparse takes --see for it); use the "
        "table's --dataset/--bits/--seeds/--lr-grid/--data/--out instead"]


def test_abbreviations_of_other_flags_still_pass_and_lr_counts_with_a_grid(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert table.main(["--dataset", "digits", "--bits", "8", "--methods", "dpsh", "--out", out, "--print-commands",
                       "--", "--epo", "2", "--lr", "0.01"]) == 0
    assert "--epo 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        table.main(["--dataset", "digits", "--bits", "8", "--methods", "dpsh", "--out", out, "--lr-grid", "0.1",
                    "--print-commands", "--", "--learn", "0.01"])
    assert "--learn after -- clashes with the cell's own flag --learning-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --method is the baselines' own
        table.main(["--dataset", "digits", "--bits", "8", "--methods", "dpsh", "--out", out, "--print-commands",
                    "--", "--meth", "lsh"])
    assert "--meth after -- clashes with the cell's own flag --method" in capsys.readouterr().err


def test_collect_does_not_replace_a_grid_runs_report_with_another_table(tmp_path, capsys):
    """Issue 21: --collect DIR used to replace the grid's table (rates chosen on val) by a per-rate one."""
    root = str(tmp_path / "runs")
    for lr, val in ((0.01, 0.5), (0.001, 0.7)):
        write_run(root, f"digits/mb_16bit_lr{lr}_seed0", "MB", "digits", 16, 0, val, val=val,
                  args=recorded_args("mb", "digits", 16, 0, ["--lr", str(lr)]))
    # As a grid run leaves its report: table.json records what made it.
    grid = {"mode": "grid", "command": "python -m utils.table --dataset digits --bits 16 --methods mb --lr-grid 0.01 "
            "0.001", "lr_grid": [0.01, 0.001], "methods": ["mb"], "datasets": ["digits"], "bits": [16]}
    write_json_atomic(os.path.join(root, "table.json"), {"lr_grid": [0.01, 0.001], "rows": [], "made_by": grid})
    before = open(os.path.join(root, "table.json")).read()
    with pytest.raises(SystemExit) as exc:
        table.main(["--collect", root])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [
        f"error: --report {root} holds the report of a grid run: {grid['command']}; this --collect would replace it "
        "with another table (lr_grid [0.01, 0.001] there, None here): pass --report DIR to write it elsewhere, or "
        "the grid's options (e.g. its --lr-grid)"]
    assert open(os.path.join(root, "table.json")).read() == before
    assert table.main(["--collect", root, "--report", str(tmp_path / "per_rate")]) == 0
    assert table.main(["--collect", root, "--lr-grid", "0.001", "0.01"]) == 0  # the grid's own table again
    made = json.load(open(os.path.join(root, "table.json")))["made_by"]
    assert made["mode"] == "collect" and made["lr_grid"] == [0.001, 0.01] and "--collect" in made["command"]
    assert table.main(["--collect", root]) == 0  # a --collect's report: made from the folders again, replaced


def test_the_grids_report_records_what_made_it(tmp_path, capsys):
    root = str(tmp_path / "runs")
    write_run(root, "digits/mb_16bit_seed0", "MB", "digits", 16, 0, 0.5, seconds=2.0, world_size=1,
              environment=cpu_environment(), args=recorded_args("mb", "digits", 16, 0))
    argv = ["--dataset", "digits", "--bits", "16", "--methods", "mb", "--out", root]
    assert table.main(argv) == 0
    made = json.load(open(os.path.join(root, "table.json")))["made_by"]
    assert made == {"mode": "grid", "command": shlex.join([sys.executable, "-m", "utils.table", *argv]),
                    "lr_grid": None, "methods": ["mb"], "datasets": ["digits"], "bits": [16], "ties": "index"}
    assert "skipped digits mb_16bit_seed0: finished" in capsys.readouterr().out


DIVERGING = """import argparse, json, os, sys


def parser():  # a fake script whose runs diverge above lr 0.05
    p = argparse.ArgumentParser()
    for flag in ("--dataset", "--out", "--name"):
        p.add_argument(flag)
    p.add_argument("--dim", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    folder = os.path.join(args.out, args.name)
    os.makedirs(folder, exist_ok=True)
    record = {"variant": "DHCNN", "dataset": args.dataset, "args": vars(args),
              "environments": [json.loads(os.environ["FAKE_ENVIRONMENT"])]}
    if args.lr > 0.05:  # what the trainer writes on a non-finite loss, and its exit status
        json.dump(dict(record, loss="nan", epoch=1, step=3), open(folder + "/diverged.json", "w"))
        sys.exit(2)
    m = {"mAP@100": args.lr * 10 + args.seed / 100}
    json.dump(dict(record, best_epoch=1, val=m, test=m, environment=record["environments"][0]),
              open(folder + "/results.json", "w"))
"""


def test_a_rate_that_diverges_is_out_of_the_choice_not_a_failed_cell(tmp_path, monkeypatch, capsys):
    use_fake_script(DIVERGING, tmp_path, monkeypatch)
    out = str(tmp_path / "out")
    # x2 x1 x0.2 of the script's default 0.05: 0.1 (diverges), 0.05 and 0.01.
    argv = ["--dataset", "fake", "--bits", "8", "--methods", "dhcnn", "--seeds", "0", "1", "--out", out,
            "--lr-grid", "x2", "x1", "x0.2"]
    assert table.main(argv) == 0
    captured = capsys.readouterr()
    assert "FAILED" not in captured.out and "cell(s) failed" not in captured.err
    assert captured.out.count("diverged fake dhcnn_8bit_lr0.1_seed") == 2
    names = sorted(os.listdir(os.path.join(out, "fake")))
    assert names == [f"dhcnn_8bit_lr{lr}_seed{s}" for lr in ("0.01", "0.05", "0.1") for s in (0, 1)]
    row = json.load(open(os.path.join(out, "table.json")))["rows"][0]
    assert row["lr"] == 0.05 and row["mean"] == pytest.approx(50.5) and row["diverged"] == []
    assert row["lr_grid"] == {"0.1": "diverged", "0.05": pytest.approx(50.5), "0.01": pytest.approx(10.5)}
    assert json.load(open(os.path.join(out, "table.json")))["made_by"]["lr_grid"] == ["x2", "x1", "x0.2"]
    # Run again: nothing runs; the diverged cells are results, not cells to retry.
    assert table.main(argv) == 0
    assert capsys.readouterr().out.count("diverged at this rate (loss nan at step 3 of epoch 1)") == 2
    # Without a grid, the rate's row says diverged and has no mean; --collect finds the records too.
    assert table.main(["--collect", out, "--report", str(tmp_path / "r")]) == 0
    md = open(tmp_path / "r" / "table.md").read()
    assert "| DHCNN [lr=0.1] | diverged |" in md and "| DHCNN [lr=0.05] | 50.50 ± 0.71 (n=2) |" in md


def test_every_rate_diverging_leaves_the_cell_without_a_number():
    from utils.table.report import _row, format_cell
    runs = [{"lr": lr, "seed": 0, "value": None, "val": None, "diverged": "loss nan at step 0 of epoch 1",
             "folder": "f", "seconds": None, "args": {}, "device": None, "world_size": 1} for lr in (0.1, 0.01)]
    row = _row("dpsh", "digits", 16, runs, "DPSH", [0.1, 0.01])
    assert row["lr"] is None and row["mean"] is None and row["diverged"] == ["every rate of the grid"]
    assert format_cell(row).startswith("diverged")


def test_methods_default_to_the_papers_seven_and_all_takes_every_method(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert table.main(["--dataset", "digits", "--bits", "8", "--out", out, "--print-commands"]) == 0
    names = {shlex.split(line)[shlex.split(line).index("--name") + 1] for line in capsys.readouterr().out.splitlines()}
    assert names == {f"{m}_8bit_seed0" for m in table_cells.PAPER_METHODS}
    assert table.main(["--dataset", "digits", "--bits", "8", "--methods", "all", "--out", out, "--print-commands",
                       "--lr-grid", "x10", "x1"]) == 0
    cmds = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    rates = {(c[c.index("--method") + 1] if "--method" in c else c[1]): [] for c in cmds}
    for c in cmds:
        rates[c[c.index("--method") + 1] if "--method" in c else c[1]].append(c[c.index("--lr") + 1] if "--lr" in c
                                                                               else None)
    assert len(cmds) == 2 * 12 + 2  # twelve trained methods at two rates each, LSH and ITQ once
    # Each method's own default, times 10 and times 1: CSQ's Adam 1e-3, OrthoHash's 1e-4, DCH's 0.05.
    assert rates["csq"] == ["0.01", "0.001"] and rates["orthohash"] == ["0.001", "0.0001"]
    assert rates["dch"] == ["0.5", "0.05"] and rates["lsh"] == [None]


@pytest.mark.parametrize("grid", [["x0"], ["-0.1"], ["x"], ["fast"]])
def test_a_bad_rate_in_the_grid_is_refused_in_one_line(grid, tmp_path, no_runs):
    from utils.errors import UserError
    with pytest.raises(UserError, match="--lr-grid takes positive learning rates or factors"):
        table.parse_args(["--dataset", "digits", "--out", str(tmp_path), "--lr-grid", *grid])
