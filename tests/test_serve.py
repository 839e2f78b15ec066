"""`python -m utils.retrieve serve` on a digits demo index: the endpoints through FastAPI's test
client (rankings against `retrieve query --json`, metrics against utils.metrics and `retrieve
evaluate`, hostile requests), the real server in a subprocess (address, raw traversal paths, the
Host check, signals, nothing changed in the index folder), and the page in headless Chromium.

Kept fast (about 40 s on a loaded 2-core machine): one tiny training run and its index for the
module, one torch thread, the two real servers started together while the test-client tests run.

README's screenshot of the page (docs/serve.png) is taken by the browser test's screenshot():
docs/make_serve_png.sh runs it with

    CDNE_SERVE_INDEX=/tmp/docs_runs/digits.index CDNE_SERVE_SCREENSHOT=docs/serve.png \
        .venv/bin/python -m pytest -q tests/test_serve.py -k headless_chromium

(CDNE_SERVE_INDEX: an index to drive instead of the test's own, here the 5-epoch demo run's.)"""
import contextlib
import hashlib
import http.client
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import REPO, load_script
from fastapi.testclient import TestClient
from PIL import Image

from utils import retrieve as retrieve_mod
from utils.data.scenes import SceneDataset
from utils.metrics import retrieval_metrics, retrieval_metrics_by_ties
from utils.retrieval import serve as serve_mod
from utils.retrieval import serve_sides
from utils.retrieval.command import engine_of
from utils.retrieval.index_file import IndexWriter, load_index
from utils.retrieval.parser import build_parser

K = 10


# ----------------------------------------------------------------------------- fixtures and helpers


def run_retrieve(capsys, *args):
    """utils.retrieve.main in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = retrieve_mod.main([*args, "--device", "cpu"])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def quietly(main, argv):
    """A command's main in this process with its output kept: (exit status, stdout and stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread while this module runs: its networks see 16-pixel digits, where a second
    thread on a loaded 2-core machine makes a training epoch 8 s instead of 1 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tiny_root, tmp_path_factory):
    """A tiny CDNE(MB) run on the digits (one epoch, 16 bits, 16 px; trained in this process, which
    has torch imported already) and the index of its train split, with the sha256 of each of its
    files (the last test checks that nothing here changed them)."""
    from utils.training.trainer import run

    out = tmp_path_factory.mktemp("serve_runs")
    method = load_script("train_MB").MemoryBankCDNE
    code, log = quietly(lambda argv: run(method, "serve test", argv),
                        ["--data", tiny_root, "--dataset", "digits", "--no-pretrained", "--img-size", "16", "-b", "64",
                         "--dim", "16", "--epochs", "1", "--num_workers", "0", "--device", "cpu", "--out", str(out),
                         "--name", "demo"])
    assert code in (0, None), log[-2000:]
    checkpoint = str(out / "demo" / "checkpoint_best.pth")
    index = str(out / "digits.index")
    code, log = quietly(retrieve_mod.main, ["index", "--checkpoint", checkpoint, "--out", index, "--device", "cpu",
                                            "--num_workers", "0"])
    assert code == 0, log[-2000:]
    return {"root": tiny_root, "checkpoint": checkpoint, "index": index, "folder": out,
            "digest": folder_digest(index)}


def serve_args(*argv):
    return build_parser().parse_args(["serve", *argv, "--device", "cpu"])


def open_served(*argv):
    return serve_mod.open_served(serve_args(*argv), torch.device("cpu"), lambda a, i: engine_of(a, i, keep=False))


@pytest.fixture(scope="module")
def served(demo):
    return open_served("--index", demo["index"])


@pytest.fixture(scope="module")
def client(served):
    return TestClient(serve_mod.create_app(served))


def folder_digest(folder):
    """{relative path: sha256} of every file under a folder."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def write_index(out, like, paths, labels, packed, checkpoint="/nonexistent/checkpoint.pth"):
    """An index folder written directly (IndexWriter), with the header of the opened index `like`."""
    header = {key: value for key, value in like.header.items() if key not in ("format", "version", "count")}
    header["checkpoint"] = checkpoint
    writer = IndexWriter.create(str(out), header, paths, labels)
    rows = writer.open_rows()
    rows[:] = packed
    rows.flush()
    del rows
    writer.finish()
    return str(out)


def assert_error(response, status):
    """A one-line JSON error with this status, and nothing of a traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in response.text
    return body["error"]


def png_bytes(size=(16, 16), colour=(200, 30, 30)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def png_header_only(width, height):
    """A PNG that declares width x height pixels but holds a few bytes: a decompression bomb's header."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def hamming(packed_rows, packed):
    return np.unpackbits(np.bitwise_xor(packed_rows, packed), axis=1).sum(1)


# ----------------------------------------------------------------------------- rankings and metrics


def test_a_search_by_id_is_query_exclude_self(demo, served, client, capsys):
    """GET /api/search?id=I is `retrieve query --exclude-self --json` of item I's image, for every item."""
    index = load_index(demo["index"])
    paths = [index.paths[j] for j in range(len(index))]
    code, out, err = run_retrieve(capsys, "query", "--index", demo["index"], *paths, "--topk", str(K),
                                  "--exclude-self", "--json", "-")
    assert code == 0, err
    ranking = json.loads(out)
    for j, query in enumerate(ranking["queries"]):
        answer = client.get(f"/api/search?id={j}&k={K}").json()
        assert answer["query"] == {"id": j, "path": paths[j], "label": query["label"]}
        assert [{k: v for k, v in r.items() if k != "id"} for r in answer["results"]] == query["results"]
        assert [paths[r["id"]] for r in answer["results"]] == [r["path"] for r in query["results"]]
        assert answer["engine"] == "exact" and answer["bits"] == 16 and answer["search_ms"] >= 0
        bits = np.unpackbits(np.asarray(index.search.codes[j]))[:16]
        assert answer["code"] == "".join(map(str, bits.tolist()))


def test_metrics_are_those_of_utils_metrics(demo, served, client):
    """Each item's AP@K and P@K, ties by index and tie-aware, are utils.metrics' for its code against the
    index without it (K up to past the index's size): every item through what GET /api/search answers
    with (serve_sides.answer, called here: the test client's 10 ms a request would be most of this
    test), and some through the endpoint itself."""
    index = load_index(demo["index"])
    codes = torch.from_numpy(np.unpackbits(np.asarray(index.search.codes), axis=1)[:, :16].astype(np.float32) * 2 - 1)
    labels = torch.from_numpy(np.asarray(index.labels).copy())
    side, ks = served.main, (1, 5, 20, 200)
    for j in range(len(index)):
        rest = torch.arange(len(index)) != j
        want = retrieval_metrics_by_ties(codes[j:j + 1], labels[j:j + 1], codes[rest], labels[rest], topk=ks)
        for k in ks:
            m = serve_sides.answer(side, np.asarray(side.search.codes[j]), k, side.label_name(j),
                                   own=side.paths.raw(j), own_row=j)["metrics"]
            if j % 10 == 0:
                assert client.get(f"/api/search?id={j}&k={k}").json()["metrics"] == m
            assert m["K"] == min(k, len(index) - 1)
            for ties, ap, p in (("index", "AP", "P"), ("expected", "AP_tie_aware", "P_tie_aware")):
                assert m[ap] == pytest.approx(want[ties][f"mAP@{k}"], abs=1e-12), (k, j, ties)
                assert m[p] == pytest.approx(want[ties][f"P@{k}"], abs=1e-12), (k, j, ties)


def test_rankings_and_metrics_on_spread_codes(demo, tmp_path):
    """Random 16-bit codes (every distance occurs, ties within each), a class of 0 items and a duplicate of
    an item: rankings are the stable sort by distance without the item's rows, and the metrics
    utils.metrics' against the index without them, for K from 1 to past the index's size."""
    like = load_index(demo["index"])
    rng = np.random.default_rng(3)
    n = 300
    packed = rng.integers(0, 256, (n, 2), dtype=np.uint8)
    labels = rng.integers(0, 4, n)  # class 4 of the header's ten has no item
    paths = [f"/nowhere/digits/{int(y)}/{i:04d}.png" for i, y in enumerate(labels)]
    paths[10], packed[10], labels[10] = paths[3], packed[3], labels[3]  # row 10 is item 3 again
    index = write_index(tmp_path / "spread.index", like, paths, labels, packed)
    client = TestClient(serve_mod.create_app(open_served("--index", index)))
    codes = torch.from_numpy(np.unpackbits(packed, axis=1).astype(np.float32) * 2 - 1)
    for j in (0, 3, 10, 150, n - 1):
        own = [i for i in range(n) if paths[i] == paths[j]]
        d = hamming(packed, packed[j])
        for k in (1, 7, 50, n - 2, 1000):
            answer = client.get(f"/api/search?id={j}&k={k}").json()
            asked = [int(i) for i in np.argsort(d, kind="stable")][:k + 1]
            ranked = [i for i in asked if paths[i] != paths[j]][:k]
            assert [r["id"] for r in answer["results"]] == ranked and \
                [r["distance"] for r in answer["results"]] == [int(d[i]) for i in ranked]
            m = answer["metrics"]
            rest = torch.tensor([i not in own for i in range(n)]) if all(i in asked for i in own) else \
                torch.arange(n) != j
            if len(ranked) < min(k, int(rest.sum())):  # the duplicate took a place: no tie-aware values
                assert m["AP_tie_aware"] is None
                continue
            for ties, ap, p in (("index", "AP", "P"), ("expected", "AP_tie_aware", "P_tie_aware")):
                want = retrieval_metrics(codes[j:j + 1], torch.tensor(labels[j:j + 1]), codes[rest],
                                         torch.from_numpy(labels)[rest], topk=(k,), ties=ties)
                assert m[ap] == pytest.approx(want[f"mAP@{k}"], abs=1e-12), (j, k, ties)
                assert m[p] == pytest.approx(want[f"P@{k}"], abs=1e-12), (j, k, ties)
    worst = client.get("/api/worst?label=2&k=7&n=200").json()
    assert worst["queries"] == int((labels == 2).sum()) == len(worst["worst"])
    assert client.get("/api/worst?label=4&k=7").json()["worst"] == []
    assert client.get("/api/items?label=4").json()["total"] == 0


def test_uploads_give_evaluate_s_numbers(demo, served, client, capsys, tmp_path):
    """Every test image uploaded with its class: the mean of their AP@20 and P@20 is `retrieve evaluate`'s
    mAP@20 and P@20, in both columns; an upload's ranking is `retrieve query`'s for the same file."""
    code, _, err = run_retrieve(capsys, "evaluate", "--checkpoint", demo["checkpoint"], "--split", "test", "--json",
                                str(tmp_path / "e.json"), "--num_workers", "0")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    test = SceneDataset(demo["root"], "digits", "test", "png")
    got = {"AP": [], "P": [], "AP_tie_aware": [], "P_tie_aware": []}
    for path, label in test.samples:
        with open(path, "rb") as fh:
            answer = client.post("/api/search", files={"file": ("q.png", fh, "image/png")},
                                 data={"k": "20", "label": test.classes[label]}).json()
        for key in got:
            got[key].append(answer["metrics"][key])
    assert np.mean(got["AP"]) == pytest.approx(report["metrics"]["mAP@20"], abs=1e-9)
    assert np.mean(got["P"]) == pytest.approx(report["metrics"]["P@20"], abs=1e-9)
    assert np.mean(got["AP_tie_aware"]) == pytest.approx(report["metrics_tie_aware"]["mAP@20"], abs=1e-9)
    assert np.mean(got["P_tie_aware"]) == pytest.approx(report["metrics_tie_aware"]["P@20"], abs=1e-9)

    path = test.samples[0][0]
    code, out, err = run_retrieve(capsys, "query", "--index", demo["index"], path, "--topk", "7", "--json", "-")
    assert code == 0, err
    with open(path, "rb") as fh:
        answer = client.post("/api/search", files={"file": ("x.png", fh)}, data={"k": "7"}).json()
    assert answer["query"] == {"id": None, "path": None, "label": None, "filename": "x.png"}
    assert [{k: v for k, v in r.items() if k != "id"} for r in answer["results"]] == \
        [{**r, "relevant": None} for r in json.loads(out)["queries"][0]["results"]]
    assert answer["metrics"] is None  # no class given


def test_items_random_and_worst_queries(demo, served, client):
    index = load_index(demo["index"])
    info = client.get("/api/info").json()
    assert info["index"]["count"] == len(index) and info["default_k"] == 20 and info["compare"] is None
    assert info["root"] == os.path.join(demo["root"], "digits") and info["index"]["upload"]
    counts = {c["name"]: c["count"] for c in info["index"]["classes"]}
    assert sum(counts.values()) == len(index)

    listing = client.get("/api/items?label=3&limit=5").json()
    assert listing["total"] == counts["3"] and len(listing["items"]) == 5 and listing["more"]
    assert all(item["label"] == "3" and "/3/" in item["path"] for item in listing["items"])
    rest = client.get("/api/items?label=3&offset=5&limit=100").json()
    assert len(rest["items"]) == counts["3"] - 5 and not rest["more"]
    name = os.path.basename(index.paths[7])
    found = client.get(f"/api/items?q={name}").json()
    assert 7 in [item["id"] for item in found["items"]]
    assert all(name in item["path"] for item in found["items"]) and found["total"] == len(found["items"])
    both = client.get(f"/api/items?q={name}&label=3").json()
    assert all(item["label"] == "3" for item in both["items"])
    assert client.get("/api/items?q=no-such-path").json() == {"total": 0, "offset": 0, "more": False, "items": []}
    for _ in range(5):
        assert client.get("/api/random?label=5").json()["label"] == "5"
    assert_error(client.get("/api/random?q=no-such-path"), 404)

    worst = client.get("/api/worst?label=3&k=5&n=4").json()
    assert worst["queries"] == counts["3"] == worst["scored"] and not worst["sampled"] and len(worst["worst"]) == 4
    every = [client.get(f"/api/search?id={item['id']}&k=5").json()["metrics"]["AP"]
             for item in client.get("/api/items?label=3&limit=100").json()["items"]]
    assert [q["AP"] for q in worst["worst"]] == sorted(every)[:4]
    assert worst["mean_AP"] == pytest.approx(np.mean(every))
    for q in worst["worst"]:
        assert client.get(f"/api/search?id={q['id']}&k=5").json()["metrics"]["AP"] == q["AP"]


def test_compare_ranks_with_the_second_index(demo, tmp_path):
    """--compare: an index of the same images in another order (random codes here) ranks by its own codes,
    its results named by the main index's ids; an index of other images is refused in one line."""
    index = load_index(demo["index"])
    n = len(index)
    order = np.arange(n)[::-1].copy()
    rng = np.random.default_rng(1)
    other = rng.integers(0, 256, (n, 2), dtype=np.uint8)
    compare = write_index(tmp_path / "other.index", index, [index.paths[int(j)] for j in order],
                          np.asarray(index.labels)[order], other)
    served = open_served("--index", demo["index"], "--compare", compare)
    client = TestClient(serve_mod.create_app(served))
    assert client.get("/api/info").json()["compare"]["path"] == compare
    for j in (0, 17, n - 1):
        answer = client.get(f"/api/search?id={j}&k=6&index=compare").json()
        row = int(np.flatnonzero(order == j)[0])
        d = hamming(other, other[row])
        ranked = [int(i) for i in np.argsort(d, kind="stable") if i != row][:6]
        assert [r["id"] for r in answer["results"]] == [int(order[i]) for i in ranked]
        assert [r["distance"] for r in answer["results"]] == [int(d[i]) for i in ranked]
        assert answer["query"]["id"] == j and answer["index"] == "compare"
        assert client.get(f"/api/search?id={j}&k=6").json()["index"] == "main"
    assert_error(client.post("/api/search?index=compare", files={"file": ("a.png", png_bytes())}), 503)
    assert client.get("/api/worst?label=2&k=5&index=compare").json()["index"] == "compare"

    fewer = write_index(tmp_path / "fewer.index", index, [index.paths[j] for j in range(n - 1)],
                        np.asarray(index.labels)[:n - 1], other[:n - 1])
    with pytest.raises(serve_sides.UserError, match="is not an index of the same images"):
        open_served("--index", demo["index"], "--compare", fewer)


def test_an_approximate_engine_is_built_in_memory(demo):
    before = folder_digest(demo["index"])
    served = open_served("--index", demo["index"], "--engine", "ivf", "--nlist", "4", "--nprobe", "4")
    client = TestClient(serve_mod.create_app(served))
    answer = client.get("/api/search?id=3&k=5").json()
    assert answer["engine"] == "ivf" and answer["engine_params"]["nprobe"] == 4
    assert answer["metrics"]["AP_tie_aware"] is None and len(answer["results"]) == 5
    assert folder_digest(demo["index"]) == before  # no engine-ivf.faiss kept: the server writes nothing there


# ----------------------------------------------------------------------------- hostile requests


def test_bad_requests_get_one_line_errors(demo, served, client):
    n = len(served.main)
    for url, status in [("/api/search", 400), (f"/api/search?id={n}", 404), ("/api/search?id=-1", 404),
                        ("/api/search?id=abc", 404), ("/api/search?id=1e1", 404), ("/api/search?id=%D9%A1", 404),
                        ("/api/search?id=1&k=0", 400), ("/api/search?id=1&k=1001", 400),
                        ("/api/search?id=1&k=-3", 400), ("/api/search?id=1&k=x", 400),
                        ("/api/search?id=1&index=other", 400), ("/api/search?id=1&index=compare", 400),
                        ("/api/items?label=nope", 400), ("/api/items?limit=100000", 400),
                        ("/api/items?offset=-1", 400), ("/api/worst", 400), ("/api/worst?label=11", 400),
                        (f"/api/image/{n}", 404), ("/api/image/-1", 404), ("/api/image/0x1", 404),
                        ("/api/image/%D9%A1", 404), ("/api/image/1?size=huge", 400), ("/api/nothing", 404),
                        ("/static/nothing.js", 404)]:
        assert_error(client.get(url), status)
    assert_error(client.delete("/api/search"), 405)
    assert_error(client.put("/api/image/1", content=b"x"), 405)
    # A path in the query string is not looked at: item 3's image comes back.
    shown = client.get("/api/image/3?path=/etc/passwd")
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(shown.content)).size == (16, 16)
    assert shown.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in shown.headers["content-security-policy"]


def test_hostile_uploads_get_4xx(demo, served, client):
    def post(data, **form):
        return client.post("/api/search", files={"file": ("x", data)}, data=form)

    assert_error(post(b""), 400)
    assert_error(post(b"just some text, not an image"), 415)
    assert_error(post(b"#!/bin/sh\nrm -rf /\n"), 415)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert "GIF" in assert_error(post(gif.getvalue()), 415)
    assert_error(post(png_bytes()[:60]), 422)  # a header and part of the data: decoding fails
    # Decompression bombs: the header's size is refused before anything decodes, by Pillow's guard
    # (over 2 x MAX_IMAGE_PIXELS) or by --max-pixels (50 M by default) below it.
    assert "pixels" in assert_error(post(png_header_only(100_000, 100_000)), 413)
    assert "9000 x 9000" in assert_error(post(png_header_only(9000, 9000)), 413)
    assert_error(post(png_bytes(), k="0"), 400)
    assert_error(post(png_bytes(), label="not a class"), 400)
    assert_error(client.post("/api/search", data={"k": "5"}), 400)  # no file
    assert_error(client.post("/api/search", content=b"\x00" * 100, headers={"content-type": "application/json"}), 400)
    # More bytes than --max-upload-mb: by the declared length, and by a body sent in chunks without one.
    small = open_served("--index", demo["index"], "--max-upload-mb", "0.01", "--max-pixels", "100")
    tight = TestClient(serve_mod.create_app(small))
    assert "bytes" in assert_error(tight.post("/api/search", files={"file": ("x.png", b"\0" * 20000)}), 413)

    def chunks():
        for _ in range(100):
            yield b"\0" * 1024
    assert_error(tight.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; b=x"}),
                 413)
    assert "20 x 20" in assert_error(tight.post("/api/search", files={"file": ("x.png", png_bytes((20, 20)))}), 413)
    assert tight.post("/api/search", files={"file": ("x.png", png_bytes((8, 8)))}).status_code == 200
    # The upload's file name is never a path: a hostile one is echoed back, nothing is written by it.
    before = sorted(os.listdir(demo["folder"]))
    answer = client.post("/api/search", files={"file": ("../../../../tmp/cdne-evil.png", png_bytes())})
    assert answer.status_code == 200 and answer.json()["query"]["filename"] == "../../../../tmp/cdne-evil.png"
    assert not os.path.exists("/tmp/cdne-evil.png") and sorted(os.listdir(demo["folder"])) == before
    assert os.listdir(os.path.join(served.cache, "uploads")) == []  # nothing left of the uploads


def test_an_internal_error_is_a_one_line_500(demo, served, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith a second line")
    monkeypatch.setattr(serve_mod, "answer", broken)
    client = TestClient(serve_mod.create_app(served), raise_server_exceptions=False)
    message = assert_error(client.get("/api/search?id=1"), 500)
    assert "a bug" not in message


def test_images_are_served_by_id_only(demo, tmp_path):
    """An index whose image folder holds links leading out of it (to an image and to /etc/passwd), a FIFO
    and a missing file: each is refused in one line; the real images are served and cached once."""
    like = load_index(demo["index"])
    folder, outside = tmp_path / "images" / "a", tmp_path / "private"
    folder.mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(folder / "good.png")
    Image.new("RGB", (300, 200), (0, 0, 255)).save(folder / "big.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "evil.png")
    os.symlink("/etc/passwd", folder / "passwd.png")
    os.mkfifo(folder / "fifo.png")
    paths = [str(folder / name) for name in ("good.png", "big.png", "evil.png", "passwd.png", "fifo.png", "gone.png")]
    index = write_index(tmp_path / "links.index", like, paths, np.zeros(len(paths), np.int64),
                        np.zeros((len(paths), 2), np.uint8))
    client = TestClient(serve_mod.create_app(open_served("--index", index)))
    good = client.get("/api/image/0")
    assert good.status_code == 200 and Image.open(io.BytesIO(good.content)).size == (20, 10)
    assert Image.open(io.BytesIO(client.get("/api/image/1").content)).size == (160, 107)
    assert Image.open(io.BytesIO(client.get("/api/image/1?size=large").content)).size == (300, 200)
    assert "outside" in assert_error(client.get("/api/image/2"), 403)
    assert "outside" in assert_error(client.get("/api/image/3"), 403)
    assert "not a regular file" in assert_error(client.get("/api/image/4"), 404)
    assert "does not exist" in assert_error(client.get("/api/image/5"), 404)
    cache = os.path.join(index + ".cache", "thumbnails")
    cached = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files]
    assert len(cached) == 3 and all(f.endswith(".png") for f in cached)
    again = client.get("/api/image/0")
    assert again.content == good.content and "etag" in again.headers  # the cached file itself
    assert len([f for _, _, files in os.walk(cache) for f in files]) == 3
    assert_error(client.post("/api/search", files={"file": ("x.png", png_bytes())}), 503)  # no checkpoint


def test_bad_flags_are_one_line(demo, tmp_path, capsys):
    def refused(*argv, fragment):
        code, _, err = run_retrieve(capsys, "serve", *argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err

    refused("--index", str(tmp_path / "missing.index"), fragment="does not exist")
    other = tmp_path / "other.pth"
    ckpt = torch.load(demo["checkpoint"], weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 0.01
    torch.save(ckpt, other)
    refused("--index", demo["index"], "--checkpoint", str(other), fragment="built with other weights")
    refused("--index", demo["index"], "--checkpoint", str(tmp_path / "none.pth"), fragment="does not exist")
    refused("--index", demo["index"], "--cache", os.path.join(demo["index"], "cache"), fragment="inside the index")
    refused("--index", demo["index"], "--topk", "5000", fragment="--topk")
    refused("--index", demo["index"], "--port", "abc", fragment="--port: invalid int value")
    refused("--index", demo["index"], "--port", "70000", fragment="--port must be from 0 to 65535")
    refused("--index", demo["index"], "--max-pixels", "0", fragment="must be positive")
    refused("--index", demo["index"], "--bogus", fragment="unrecognized arguments: --bogus")
    refused(fragment="required: --index")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        refused("--index", demo["index"], "--port", str(busy.getsockname()[1]), fragment="cannot listen")
    finally:
        busy.close()


# ----------------------------------------------------------------------------- the real server


class Server:
    """`retrieve serve` in a subprocess, started from another working directory (the static files are
    found from the module), on a free port of 127.0.0.1. Starting does not wait: `ready()` does, so
    that two servers started one after the other import torch at the same time."""

    def __init__(self, *argv, cwd):
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}  # one thread: see one_torch_thread
        self.proc = subprocess.Popen([sys.executable, "-m", "utils.retrieve", "serve", *argv, "--port", "0",
                                      "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=cwd, env=env)
        self.lines, self.err, self.url = queue.Queue(), [], None
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()  # never a full pipe

    def ready(self):
        if self.url is not None:
            return self
        deadline = time.time() + 120
        while True:
            try:
                self.line = self.lines.get(timeout=0.1)
                break
            except queue.Empty:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    time.sleep(0.2)
                    raise AssertionError(f"the server printed no address: {''.join(self.err)[-2000:]}") from None
        found = re.search(r"at (http://([\d.\[\]:a-f]+):(\d+)/)", self.line)
        assert found, (self.line, "".join(self.err))
        self.url, self.host, self.port = found.group(1), found.group(2), int(found.group(3))
        return self

    def raw(self, path, method="GET", host=None, body=None, headers=None):
        """A request to 127.0.0.1 sent with its path exactly as given: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{self.port}")
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None and "Content-Length" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        out = response.status, dict(response.getheaders()), response.read()
        conn.close()
        return out

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self):
        """(exit status, everything the server wrote on stderr) once it has stopped."""
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.1)  # the reader thread takes the last lines
        return code, "".join(self.err)

    def stop(self, sig):
        self.signal(sig)
        return self.wait()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Servers:
    """The real servers of the demo index, each started from an empty folder when first asked for:
    `live` (the page in the browser and the raw requests; SIGTERM stops it) and `second` (SIGINT stops
    it). With CDNE_SERVE_INDEX set (docs/make_serve_png.sh), `live` serves that index instead."""

    def __init__(self, demo, cwd):
        self.demo, self.cwd, self.started = demo, cwd, {}
        self.beside = sorted(os.listdir(os.path.dirname(demo["index"])))

    def __getitem__(self, name):
        if name not in self.started:
            index = os.environ.get("CDNE_SERVE_INDEX") if name == "live" else None
            self.started[name] = Server("--index", index or self.demo["index"], cwd=str(self.cwd))
        return self.started[name]

    def kill(self):
        for server in self.started.values():
            server.kill()


@pytest.fixture(scope="module")
def servers(demo, tmp_path_factory):
    started = Servers(demo, tmp_path_factory.mktemp("serve_cwd"))
    yield started
    started.kill()


@pytest.fixture(scope="module", autouse=True)
def servers_started_early(request):
    """Both real servers start with this module's first test when a test selected uses them: they boot
    (about 5 s of imports each, at the same time) while the tests through the test client run. Not
    under pytest-xdist: a worker does not know which of the tests it collected it will be given (each
    server starts when a test first asks for it), and the other worker keeps the second core busy."""
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("CDNE_SERVE_INDEX"):
        return
    if any("servers" in item.fixturenames for item in request.session.items):
        servers = request.getfixturevalue("servers")
        servers["live"], servers["second"]  # noqa: B018 - started, not waited for


def assert_raw_error(answer, status):
    code, headers, body = answer
    assert code == status, (code, body[:300])
    assert headers["content-type"] == "application/json"
    text = json.loads(body)["error"]
    assert "\n" not in text and b"Traceback" not in body and b"root:" not in body
    return text


# ----------------------------------------------------------------------------- the page in a browser


def no_browser(reason):
    """Skip where the browser cannot be installed; fail under .ci/run, which installs it."""
    if os.environ.get("CDNE_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (CDNE_REQUIRE_BROWSER is set: .ci/run installs it)")
    pytest.skip(reason)


def browser(size=(1280, 1000)):
    """A headless Chromium driven by Selenium through Debian's chromium-driver (nothing downloaded),
    with a profile of its own in a temporary folder: (driver, profile folder)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        no_browser("selenium is not installed: .venv/bin/pip install -r requirements.txt")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        no_browser("headless Chromium is not installed: apt-get install -y chromium chromium-driver (as .ci/run "
                   "does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="cdne-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver), options=options), profile
    except Exception:
        shutil.rmtree(profile, ignore_errors=True)
        raise


def wait_for(check, timeout=30, what="the page"):
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - an element not there yet, or replaced while read
            if time.time() > deadline:
                raise
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def api_json(server, path):
    status, _, body = server.raw(path)
    assert status == 200, body
    return json.loads(body)


def shown_ranking(driver):
    from selenium.webdriver.common.by import By
    cards = driver.find_elements(By.CSS_SELECTOR, "#ranking-main .result")
    return [{"id": int(c.get_attribute("data-id")), "distance": int(c.get_attribute("data-distance")),
             "relevant": c.get_attribute("data-relevant"), "classes": c.get_attribute("class").split(),
             "border": c.value_of_css_property("border-top-color"),
             "caption": c.find_element(By.CSS_SELECTOR, ".distance").text} for c in cards]


def check_ranking(driver, answer):
    """The cards show the API's results: ids, distances, and green exactly where the class is the query's."""
    shown = shown_ranking(driver)
    assert [s["id"] for s in shown] == [r["id"] for r in answer["results"]]
    assert [s["distance"] for s in shown] == [r["distance"] for r in answer["results"]]
    assert [s["caption"] for s in shown] == [f"d={r['distance']}" for r in answer["results"]]
    label = answer["query"]["label"]
    for s, r in zip(shown, answer["results"]):
        if label is None:
            assert s["relevant"] == "" and "unknown" in s["classes"]
            continue
        same = r["label"] == label
        assert s["relevant"] == str(same).lower() and ("relevant" if same else "irrelevant") in s["classes"]
        assert s["border"] in (("rgb(42, 154, 60)", "rgba(42, 154, 60, 1)") if same else
                               ("rgb(210, 48, 48)", "rgba(210, 48, 48, 1)")), s["border"]


def thumbnails_loaded(driver, css):
    from selenium.webdriver.common.by import By
    images = driver.find_elements(By.CSS_SELECTOR, css)
    wait_for(lambda: all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                               img) for img in images), what=f"the images of {css}")
    return images


def upload_form(path, k, label=None):
    """A multipart form as the page's upload sends it: (body, headers)."""
    boundary = "----cdne"
    fields = [("k", str(k))] + ([("label", label)] if label else [])
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
                    for name, value in fields)
    with open(path, "rb") as fh:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + fh.read() + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def drive_page(driver, server, k=12):
    """What a user does on the page, each step checked against the API: a query clicked among the
    index's items (K results, the API's distances, green/red by class, AP@K, the code), an upload
    of that item's file with its class, the worst queries of the class and one of them clicked.
    Returns the item first clicked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(server.url)
    wait_for(lambda: "images" in driver.find_element(By.ID, "index-info").text, what="the index's summary")
    tiles = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#items .item"), what="the items")
    field = driver.find_element(By.ID, "k")
    field.clear()
    field.send_keys(str(k))
    tile = tiles[min(5, len(tiles) - 1)]
    chosen = int(tile.get_attribute("data-id"))
    tile.click()
    wait_for(lambda: driver.find_element(By.ID, "query-panel").get_attribute("data-id") == str(chosen) and
             driver.find_element(By.ID, "ranking-main").get_attribute("data-count") == str(k), what=f"{k} results")
    answer = api_json(server, f"/api/search?id={chosen}&k={k}")
    check_ranking(driver, answer)
    assert driver.find_element(By.CSS_SELECTOR, "#ranking-main .metrics .ap").text == f"{answer['metrics']['AP']:.4f}"
    assert driver.find_element(By.CSS_SELECTOR, "#ranking-main .metrics .p").text == f"{answer['metrics']['P']:.4f}"
    assert driver.find_element(By.CSS_SELECTOR, "#ranking-main .code").text.replace(" ", "") == answer["code"]
    assert "exact search" in driver.find_element(By.CSS_SELECTOR, "#ranking-main .facts").text
    thumbnails_loaded(driver, "#ranking-main .result img")

    # An upload: the chosen item's own file, with its class; the cards are the API's upload answer.
    path, label = answer["query"]["path"], answer["query"]["label"]
    driver.find_element(By.ID, "upload-file").send_keys(path)
    Select(driver.find_element(By.ID, "upload-label")).select_by_value(label)
    driver.find_element(By.ID, "upload-button").click()
    wait_for(lambda: "(uploaded)" in driver.find_element(By.ID, "query-path").text, what="the upload's answer")
    form, headers = upload_form(path, k, label)
    status, _, body = server.raw("/api/search", "POST", body=form, headers=headers)
    assert status == 200, body
    check_ranking(driver, json.loads(body))

    # The worst queries of the class, one click away; a click on one shows its ranking.
    driver.find_element(By.ID, "query-worst").click()
    worst = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#worst-items .item"), what="worst queries")
    first = int(worst[0].get_attribute("data-id"))
    assert first == api_json(server, f"/api/worst?label={label}&k={k}&n=12")["worst"][0]["id"]
    worst[0].click()
    wanted = api_json(server, f"/api/search?id={first}&k={k}")
    wait_for(lambda: driver.find_element(By.ID, "query-panel").get_attribute("data-id") == str(first) and
             [s["id"] for s in shown_ranking(driver)] == [r["id"] for r in wanted["results"]], what="a worst query")
    check_ranking(driver, wanted)
    assert not driver.find_element(By.ID, "message").is_displayed()
    return chosen


def telling_query(server, k=20):
    """An item whose top K mixes both colours: among the worst queries of every class, the one whose
    P@K is nearest 0.75 (ties: the lower id)."""
    classes = [c["name"] for c in api_json(server, "/api/info")["index"]["classes"]]
    found = [q for c in classes for q in api_json(server, f"/api/worst?label={c}&k={k}&n=200")["worst"]]
    return min(found, key=lambda q: (abs(q["P"] - 0.75), q["id"]))["id"]


def screenshot(driver, server, item, path, k=20):
    """The page as README shows it (docs/serve.png): item `item`'s top K, and the worst queries of its
    class beside it, every image loaded."""
    from selenium.webdriver.common.by import By

    driver.execute_script("location.hash = arguments[0]", f"#id={item}&k={k}")
    wanted = api_json(server, f"/api/search?id={item}&k={k}")
    wait_for(lambda: driver.find_element(By.ID, "query-panel").get_attribute("data-id") == str(item) and
             [s["id"] for s in shown_ranking(driver)] == [r["id"] for r in wanted["results"]], what="the ranking")
    check_ranking(driver, wanted)
    driver.find_element(By.ID, "query-worst").click()
    wait_for(lambda: f"AP@{k})" in driver.find_element(By.ID, "worst-title").text, what="the worst queries")
    thumbnails_loaded(driver, "img")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(path)


def test_the_page_in_headless_chromium(demo, servers):
    """The page in headless Chromium against the real server: see drive_page. With CDNE_SERVE_SCREENSHOT
    set, it also writes the screenshot there (docs/make_serve_png.sh makes README's)."""
    driver, profile = browser()
    try:
        server = servers["live"].ready()
        drive_page(driver, server)
        shot = os.environ.get("CDNE_SERVE_SCREENSHOT")
        if shot:
            item = os.environ.get("CDNE_SERVE_ITEM")
            screenshot(driver, server, int(item) if item else telling_query(server), os.path.abspath(shot))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------- the process, the signals


RAW_HOSTILE = [  # sent as written: the client library would normalise some of them away
    "/api/image/../../../../etc/passwd", "/api/image/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/api/image/%252e%252e%252fetc%252fpasswd",
    "/api/image/..%252f..%252fetc%252fpasswd", "/api/image//etc/passwd", "/api/image/%2Fetc%2Fpasswd",
    "/api/image/0%00", "/api/image/0/../1", "/api/image/0%2F..%2F1", "/api/image/~root",
    "/static/../serve.py", "/static/..%2Fserve.py", "/static/%2e%2e/serve.py", "/static/%252e%252e/serve.py",
    "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/static/..%5cserve.py",
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/api/search?id=../../etc/passwd",
]


def test_the_server_process(demo, servers):
    """The real server: its address (127.0.0.1 by default), raw traversal paths, the Host check, uploads
    good and hostile, then SIGTERM (exit 143) and, for the second server, SIGINT (130); nothing beside
    the index but its cache, nothing where the servers were started, no upload left."""
    if os.environ.get("CDNE_SERVE_INDEX"):
        pytest.skip("CDNE_SERVE_INDEX is set: the live server serves another index than the demo's")
    second = servers["second"]  # booting, if it is not up already, while `live` is questioned
    server = servers["live"].ready()
    try:
        assert server.host == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        status, headers, body = server.raw("/")
        assert status == 200 and b"<title>CDNE retrieval</title>" in body
        for page in ("/", "/static/app.js", "/static/style.css"):  # nothing to fetch from elsewhere: works offline
            status, _, body = server.raw(page)
            assert status == 200 and b"http://" not in body and b"https://" not in body and b"//cdn" not in body
        for path in [*RAW_HOSTILE, f"/api/image/{demo['index']}%2Fheader.json"]:
            status, headers, body = server.raw(path)
            assert status in (400, 404), (path, status)
            assert b"def serve" not in body and b"root:" not in body and b"Traceback" not in body
            if headers.get("content-type") == "application/json":
                assert_raw_error((status, headers, body), status)
        status, headers, body = server.raw("/api/image/3")
        assert status == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
        assert "127.0.0.1 or localhost" in assert_raw_error(server.raw("/api/info", host="evil.example"), 400)
        assert server.raw("/api/info", host=f"localhost:{server.port}")[0] == 200
        search = json.loads(server.raw("/api/search?id=5&k=4")[2])
        assert len(search["results"]) == 4
        assert_raw_error(server.raw("/api/search", "POST", body=b"x" * 100, headers={
            "Content-Length": str(40 * 2 ** 20), "Content-Type": "multipart/form-data; boundary=b"}), 413)
        form, headers = upload_form(search["results"][0]["path"], 3)
        status, _, body = server.raw("/api/search", "POST", body=form, headers=headers)
        assert status == 200 and len(json.loads(body)["results"]) == 3
        boundary = "----cdne"
        bomb = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.png\"\r\n\r\n").encode() \
            + png_header_only(60_000, 60_000) + f"\r\n--{boundary}--\r\n".encode()
        assert_raw_error(server.raw("/api/search", "POST", body=bomb,
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}), 413)
        assert json.loads(server.raw("/api/worst?label=1&k=5")[2])["label"] == "1"
        assert second.ready().raw("/api/search?id=1&k=2")[0] == 200
    finally:  # both stopped at once: a server takes about 1.5 s to shut down and exit
        server.signal(signal.SIGTERM)
        second.signal(signal.SIGINT)
        (code, err), (second_code, second_err) = server.wait(), second.wait()
    assert code == 143 and "Traceback" not in err, err
    assert second_code == 130 and "Traceback" not in second_err, second_err
    assert folder_digest(demo["index"]) == demo["digest"]
    assert sorted(os.listdir(os.path.dirname(demo["index"]))) == sorted({*servers.beside, "digits.index.cache"})
    assert os.listdir(demo["index"] + ".cache/uploads") == []
    assert os.listdir(servers.cwd) == []  # nothing written where they were started


def test_listening_beyond_this_machine_warns_in_one_line(demo, monkeypatch, capsys):
    """--host 0.0.0.0: one warning line, then it serves (here uvicorn's loop is replaced by a Ctrl-C at
    once, so that nothing listens beyond this machine during the tests: exit 130)."""
    import uvicorn

    bound = []

    def interrupted(self, sockets=None):
        bound.append(sockets[0].getsockname()[0])
        raise KeyboardInterrupt
    monkeypatch.setattr(uvicorn.Server, "run", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        serve_mod.serve(serve_args("--index", demo["index"], "--host", "0.0.0.0", "--port", "0"), torch.device("cpu"),
                        lambda a, i: engine_of(a, i, keep=False))
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 130 and len(warnings) == 1 and bound == ["0.0.0.0"], err
    assert warnings[0].startswith("warning: listening on 0.0.0.0:") and "no login" in warnings[0]
    assert re.search(r"at http://0\.0\.0\.0:\d+/", out), out
    # The default, and an explicit loopback address: no warning.
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(SystemExit):
            serve_mod.serve(serve_args("--index", demo["index"], "--host", host, "--port", "0"), torch.device("cpu"),
                            lambda a, i: engine_of(a, i, keep=False))
        assert capsys.readouterr().err.strip() == ""


def test_the_index_was_never_changed(demo):
    """After every test of this module (the last of them): each file of the index as it was built."""
    assert folder_digest(demo["index"]) == demo["digest"]
