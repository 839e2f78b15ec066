"""data/prepare.py and utils/data/download.py against a local HTTP server (127.0.0.1 only)."""
import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile

import pytest
from PIL import Image

from data import catalog, prepare
from utils.data.download import download, extract
from utils.data.scenes import SceneDataset
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(REPO, "data", "prepare.py")


# ---------------------------------------------------------------------------
# A file server that honours "Range: bytes=N-" and can be told to misbehave
# ---------------------------------------------------------------------------

class FileServer:
    def __init__(self):
        self.files = {}          # name -> bytes
        self.cut = {}            # name -> bytes to send before hanging up (next request only)
        self.ignore_range = False
        self.redirects = {}      # name -> name to redirect to (hf.co redirects to its CDN)
        self.requests = []       # (name, Range header or None)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", "/" + server.redirects[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut.pop(name, None)
                # HTTP/1.0: the connection closes when the handler returns, mid-body if cut
                self.wfile.write(body if cut is None else body[:cut])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


# ---------------------------------------------------------------------------
# Fake archives
# ---------------------------------------------------------------------------

def image_bytes(fmt, seed):
    img = Image.new("RGB", (8, 8), (seed * 40 % 256, 100, 200))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


FAKE = {  # dataset key -> (classes, file name pattern, Pillow format)
    "ucmerced": (["agricultural", "airplane", "beach"], "UCMerced_LandUse/Images/{c}/{c}{i:02d}.tif", "TIFF"),
    "eurosat": (["AnnualCrop", "Forest"], "2750/{c}/{c}_{i}.jpg", "JPEG"),
}
PER_CLASS = 3


def make_zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def fake_archive(key):
    classes, pattern, fmt = FAKE[key]
    members = {pattern.format(c=c, i=i): image_bytes(fmt, i) for c in classes for i in range(PER_CLASS)}
    members["README.txt"] = b"outside the image folder: must not end up in the dataset"
    return make_zip(members)


def serve_dataset(monkeypatch, server, key, data, md5=None):
    """Point the download table at the local server and shrink the expected counts to the fake tree."""
    source = dict(catalog.DOWNLOADS[key])
    server.files[source["filename"]] = data
    source["url"] = server.url(source["filename"])
    source["md5"] = md5 or hashlib.md5(data).hexdigest()
    monkeypatch.setitem(catalog.DOWNLOADS, key, source)
    monkeypatch.setitem(catalog.DATASETS[key], "classes", {c: PER_CLASS for c in FAKE[key][0]})
    return source


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["ucmerced", "eurosat"])
def test_download_extracts_to_the_section1_layout(tmp_path, server, monkeypatch, capsys, key):
    source = serve_dataset(monkeypatch, server, key, fake_archive(key))
    spec = catalog.DATASETS[key]
    prepare.main(["download", key, "--root", str(tmp_path)])

    classes = FAKE[key][0]
    target = tmp_path / spec["name"]
    assert sorted(os.listdir(target)) == sorted(classes)
    for c in classes:
        assert len([f for f in os.listdir(target / c) if f.endswith("." + spec["ext"])]) == PER_CLASS
    ds = SceneDataset(str(tmp_path), spec["name"], "train", ext=spec["ext"])
    assert len(ds) == len(classes) * int(0.7 * PER_CLASS)
    assert ds[0]["img"].size == (8, 8)

    archive = tmp_path / "downloads" / source["filename"]
    assert archive.exists(), "the archive is kept by default"
    assert sorted(os.listdir(tmp_path / "downloads")) == [source["filename"]]  # no .part, no leftovers
    out = capsys.readouterr().out
    assert f"--data {tmp_path} --dataset {spec['name']} --imgEXT {spec['ext']}" in out
    assert "warning" not in out

    n_requests = len(server.requests)
    prepare.main(["download", key, "--root", str(tmp_path)])
    assert "already there" in capsys.readouterr().out
    assert len(server.requests) == n_requests


def test_remove_archive(tmp_path, server, monkeypatch):
    source = serve_dataset(monkeypatch, server, "ucmerced", fake_archive("ucmerced"))
    prepare.main(["download", "ucmerced", "--root", str(tmp_path), "--remove-archive"])
    assert (tmp_path / "UCMerced" / "beach").is_dir()
    assert not (tmp_path / "downloads" / source["filename"]).exists()


def test_wrong_md5_exits_2_and_leaves_no_bad_file(tmp_path, server, monkeypatch, capsys):
    data = fake_archive("ucmerced")
    source = serve_dataset(monkeypatch, server, "ucmerced", data, md5="0" * 32)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["download", "ucmerced", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    archive = tmp_path / "downloads" / source["filename"]
    for part in ("checksum mismatch", str(archive), "0" * 32, hashlib.md5(data).hexdigest(),
                 "run the command again", source["url"]):
        assert part.lower() in line.lower(), part
    assert os.listdir(tmp_path / "downloads") == []
    assert not (tmp_path / "UCMerced").exists()


def test_bad_file_placed_by_hand_is_rejected(tmp_path, server):
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"not the archive")
    with pytest.raises(UserError, match="checksum mismatch"):
        download(server.url("a.zip"), str(dest), "0" * 32, progress=False)
    assert not dest.exists()
    assert server.requests == []


def test_interrupted_download_resumes_with_range(tmp_path, server, monkeypatch, capsys):
    data = fake_archive("ucmerced")
    source = serve_dataset(monkeypatch, server, "ucmerced", data)
    half = len(data) // 2
    server.cut[source["filename"]] = half

    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["download", "ucmerced", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "run the command again to resume" in error_line(capsys.readouterr().err)
    part = tmp_path / "downloads" / (source["filename"] + ".part")
    assert part.stat().st_size == half

    prepare.main(["download", "ucmerced", "--root", str(tmp_path)])
    assert server.requests[-1] == (source["filename"], f"bytes={half}-")
    archive = tmp_path / "downloads" / source["filename"]
    assert archive.read_bytes() == data and not part.exists()
    assert len(os.listdir(tmp_path / "UCMerced" / "airplane")) == PER_CLASS


def test_server_ignoring_range_restarts(tmp_path, server):
    data = os.urandom(100_000)
    server.files["blob.bin"] = data
    server.cut["blob.bin"] = 30_000
    server.ignore_range = True
    dest = str(tmp_path / "blob.bin")
    md5 = hashlib.md5(data).hexdigest()
    with pytest.raises(UserError, match="stopped after 30000 of 100000 bytes"):
        download(server.url("blob.bin"), dest, md5, progress=False)
    download(server.url("blob.bin"), dest, md5, progress=False)
    assert server.requests[-1][1] == "bytes=30000-"  # asked to resume, got the whole file
    assert open(dest, "rb").read() == data


def test_resume_survives_a_redirect(tmp_path, server):
    data = os.urandom(100_000)
    server.files["cdn/blob.bin"] = data
    server.redirects["blob.bin"] = "cdn/blob.bin"
    server.cut["cdn/blob.bin"] = 40_000
    dest = str(tmp_path / "blob.bin")
    md5 = hashlib.md5(data).hexdigest()
    with pytest.raises(UserError, match="stopped after 40000"):
        download(server.url("blob.bin"), dest, md5, progress=False)
    download(server.url("blob.bin"), dest, md5, progress=False)
    assert server.requests[-2:] == [("blob.bin", "bytes=40000-"), ("cdn/blob.bin", "bytes=40000-")]
    assert open(dest, "rb").read() == data


def test_complete_part_file_is_verified_not_refetched(tmp_path, server):
    data = os.urandom(10_000)
    server.files["blob.bin"] = data
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(data)  # a run that stopped before verifying
    download(server.url("blob.bin"), str(dest), hashlib.md5(data).hexdigest(), progress=False)
    assert dest.read_bytes() == data  # the server answered 416: nothing left to send


def test_network_failure_names_the_url_and_the_manual_route(tmp_path):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.zip"
    dest = str(tmp_path / "x.zip")
    with pytest.raises(UserError) as err:
        download(url, dest, "0" * 32, progress=False)
    assert url in str(err.value) and "by hand" in str(err.value) and dest in str(err.value)


def test_http_error_is_a_user_error(tmp_path, server):
    with pytest.raises(UserError, match="HTTP 404"):
        download(server.url("missing.zip"), str(tmp_path / "m.zip"), "0" * 32, progress=False)


# ---------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------

def test_interrupted_extraction_restarts_cleanly(tmp_path, monkeypatch):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({f"d/f{i}.txt": b"x" for i in range(5)}))
    dest = tmp_path / "out"

    real_extract, calls = zipfile.ZipFile.extract, []

    def extract_then_stop(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract(str(archive), str(dest))
    assert not dest.exists()
    monkeypatch.undo()

    # A hard kill leaves the temporary folder behind: it must be thrown away, not merged.
    (tmp_path / "out.partial" / "d").mkdir(parents=True)
    (tmp_path / "out.partial" / "d" / "stale.txt").write_bytes(b"junk")
    extract(str(archive), str(dest))
    assert sorted(os.listdir(dest / "d")) == [f"f{i}.txt" for i in range(5)]
    assert not (tmp_path / "out.partial").exists()


def test_extract_tar_gz(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i in range(3):
            data = image_bytes("JPEG", i)
            info = tarfile.TarInfo(f"2750/Forest/Forest_{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    extract(str(archive), str(tmp_path / "out"))
    assert len(os.listdir(tmp_path / "out" / "2750" / "Forest")) == 3


def _tar_with(member):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("ok.txt"), io.BytesIO(b""))
        tf.addfile(member, io.BytesIO(b"evil") if member.isreg() else None)
    return buf.getvalue()


def _evil_tar_file(name):
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def _evil_symlink():
    info = tarfile.TarInfo("sub/link")
    info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
    return info


@pytest.mark.parametrize("kind,data", [
    ("zip", lambda: make_zip({"ok.txt": b"", "../evil.txt": b"evil"})),
    ("zip", lambda: make_zip({"ok.txt": b"", "/tmp/evil-abs.txt": b"evil"})),
    ("tar", lambda: _tar_with(_evil_tar_file("../evil.txt"))),
    ("tar", lambda: _tar_with(_evil_symlink())),
], ids=["zip-dotdot", "zip-absolute", "tar-dotdot", "tar-symlink"])
def test_path_traversal_is_refused(tmp_path, kind, data):
    work = tmp_path / "work"
    work.mkdir()
    archive = work / f"a.{kind}"
    archive.write_bytes(data())
    with pytest.raises(UserError, match="refusing to extract"):
        extract(str(archive), str(work / "out"))
    assert sorted(os.listdir(work)) == [archive.name]  # nothing extracted, no temporary folder
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------

CHECK_CLASSES = {"a": 3, "b": 3, "c": 3, "d": 3}

# Runs the real command in a fresh interpreter with the expected counts shrunk to the test tree.
PATCHED_CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from data import catalog, prepare
    catalog.DATASETS["ucmerced"]["classes"] = {classes!r}
    prepare.main(["check", "ucmerced", "--path", {path!r}])
""")


def write_tree(root, counts):
    for c, n in counts.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(os.path.join(root, c, f"{c}{i:02d}.tif"))


def run_check(path, cwd):
    code = PATCHED_CHECK.format(repo=REPO, classes=CHECK_CLASSES, path=str(path))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_check_accepts_a_correct_tree(tmp_path, monkeypatch, capsys):
    tree = tmp_path / "UCMerced"
    write_tree(tree, CHECK_CLASSES)
    (tree / "a" / ".DS_Store").write_bytes(b"")  # OS clutter is not a difference
    monkeypatch.setitem(catalog.DATASETS["ucmerced"], "classes", CHECK_CLASSES)
    prepare.main(["check", "ucmerced", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "OK: 4 classes, 12 images" in out
    assert "--dataset UCMerced --imgEXT tif" in out

    proc = run_check(tree, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_check_lists_every_difference_and_exits_2(tmp_path):
    tree = tmp_path / "UCMerced"
    write_tree(tree, {"a": 3, "b": 2, "c": 3, "e": 3})  # d missing, e extra, b short by one
    unreadable = tree / "c" / "c01.tif"
    unreadable.write_bytes(b"II*\x00 this is not a TIFF")
    wrong_ext = tree / "a" / "a03.png"
    Image.new("RGB", (8, 8)).save(wrong_ext)

    proc = run_check(tree, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert error_line(proc.stderr).startswith(f"error: {tree} differs from the published UC Merced")
    for line in ("missing class: d (expected 3 images)",
                 "extra class: e",
                 "class b: 2 .tif images, expected 3 (1 missing)",
                 f"unreadable: {unreadable} (",
                 f"wrong extension: {wrong_ext} (expected .tif)"):
        assert line in proc.stdout, (line, proc.stdout)


def test_check_command_runs_from_any_directory(tmp_path):
    tree = tmp_path / "mine"
    write_tree(tree, {"beach": 2})
    proc = subprocess.run([sys.executable, PREPARE, "check", "ucmerced", "--path", str(tree)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing class: tenniscourt (expected 100 images)" in proc.stdout
    assert "class beach: 2 .tif images, expected 100 (98 missing)" in proc.stdout

    proc = subprocess.run([sys.executable, PREPARE, "check", "aid", "--root", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_line(proc.stderr) == (f"error: {tmp_path / 'AID'} does not exist; put AID there as "
                                       "<class>/<image>.jpg or point --path (or --root) at it")


def test_check_counts_only_for_aid(tmp_path, monkeypatch, capsys):
    tree = tmp_path / "AID"
    write_tree(tree, {"x": 3, "y": 1})
    monkeypatch.setitem(catalog.DATASETS, "aid", dict(catalog.DATASETS["aid"], num_classes=2, total=4,
                                                      per_class=(2, 3), ext="tif", size=(16, 16)))
    with pytest.raises(SystemExit):
        prepare.main(["check", "aid", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "class y: 1 .tif images, expected between 2 and 3" in out
    assert "class x" not in out
    assert "note: 4 images are not 16x16 as published" in out  # reported, but sizes alone never fail


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------

def test_digits(tmp_path, capsys):
    prepare.main(["digits", "--root", str(tmp_path), "--size", "8"])
    assert sorted(os.listdir(tmp_path / "digits")) == [str(d) for d in range(10)]
    assert "--dataset digits --imgEXT png" in capsys.readouterr().out
    prepare.main(["digits", "--root", str(tmp_path)])
    assert "already there" in capsys.readouterr().out
