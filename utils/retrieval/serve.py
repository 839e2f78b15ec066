"""`python -m utils.retrieve serve --index NAME.index`: a local web page over an index, and the
JSON endpoints behind it (README, "Looking at the retrieval: `retrieve serve`").

FastAPI serves the page (plain HTML, JS and CSS in static/, no build step, nothing fetched from
elsewhere) and the endpoints; uvicorn runs it. What the answers hold is computed in
serve_sides.py (rankings), serve_metrics.py (AP@K, P@K, worst queries) and serve_images.py
(thumbnails, uploads); serve_http.py guards every request and opens the socket.

Safe by default: it listens on 127.0.0.1 unless --host says otherwise (one warning line when it
listens beyond this machine; while it listens on the loopback only, requests naming another
host are refused, which keeps a web page elsewhere from reaching it through DNS rebinding),
serves an image only by its id in the index, bounds uploads in bytes before reading them and
in pixels before decoding them, answers every error with a 4xx/5xx and {"error": "one line"}
(no traceback reaches the client: it goes to the server's log), and never writes into the
index folder: thumbnails and uploads in flight live in the cache folder beside it.
"""
import os
import signal
import sys

import faiss
import numpy as np
from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser

from utils.errors import UserError, one_line
from utils.retrieval.serve_http import LOOPBACK_NAMES, Guard, cache_folder, error, listen
from utils.retrieval.serve_images import SIZES, Thumbnails, check_upload, stored_upload
from utils.retrieval.serve_metrics import worst_queries
from utils.retrieval.serve_sides import Refused, align, answer, encode_upload, open_side

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")  # found from any working directory
MAX_K = 1000          # results per query the API gives
MAX_LISTED = 500      # items per /api/items page
COUNT_MATCHES = 10000  # matches of a path substring counted (and drawn from, for a random pick) at most
MULTIPART_SLACK = 64 * 1024  # form fields and boundaries around the uploaded file


def one_search_thread():
    """One faiss thread for the searches of the calling thread (a worker thread of the server: OpenMP
    counts threads per calling thread, so the setting is made where the search runs). The server's
    concurrency comes from its requests; OpenMP's threads on one query cost more than they gave: at
    10^6 x 64 bits on this 2-core machine under load, 3 ms a query with one thread, 50-190 ms with two."""
    faiss.omp_set_num_threads(1)


# ----------------------------------------------------------------------------- what is served


class Served:
    """The sides (the index, and --compare's), the thumbnails, the cache folder and the limits."""

    def __init__(self, main, compare, cache, default_k, max_bytes, max_pixels):
        self.main, self.compare, self.cache = main, compare, cache
        self.default_k, self.max_bytes, self.max_pixels = default_k, max_bytes, max_pixels
        self.uploads = os.path.join(cache, "uploads")
        self.root = main.paths.common_folder()
        bands = main.opened.config.get("in_channels", 3)
        self.thumbnails = Thumbnails(os.path.join(cache, "thumbnails"), main.paths, self.root, bands, max_pixels)

    def side(self, name):
        if name in (None, "", "main"):
            return self.main
        if name == "compare":
            if self.compare is None:
                raise Refused(400, "this server compares with no second index; start it with --compare OTHER.index")
            return self.compare
        raise Refused(400, f"index must be main or compare, got {name[:40]!r}")

    def item(self, text):
        """An item id from a request: ASCII digits naming a row of the index (anything else is unknown)."""
        if text is None or text == "":
            raise Refused(400, "pass the id of an item of the index (id=I, I from 0 to "
                               f"{len(self.main) - 1})")
        if not (text.isascii() and text.isdigit() and len(text) <= 18) or int(text) >= len(self.main):
            raise Refused(404, f"unknown id {text[:40]!r}: the index's items are 0 to {len(self.main) - 1}")
        return int(text)

    def k(self, text):
        if text is None or text == "":
            return self.default_k
        if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 1 <= int(text) <= MAX_K:
            raise Refused(400, f"k must be a whole number from 1 to {MAX_K}, got {text[:40]!r}")
        return int(text)

    def count(self, text, name, default, most):
        if text is None or text == "":
            return default
        if not (text.isascii() and text.isdigit() and len(text) <= 12) or int(text) > most:
            raise Refused(400, f"{name} must be a whole number from 0 to {most}, got {text[:40]!r}")
        return int(text)

    def class_id(self, side, name):
        if not side.classes:
            raise Refused(400, f"index {side.path} records no classes (it was built from a folder of images)")
        class_id = side.class_id(name)
        if class_id is None:
            shown = ", ".join(side.classes[:10]) + (", ..." if len(side.classes) > 10 else "")
            raise Refused(400, f"unknown class {name[:40]!r}; the index's classes are {shown}")
        return class_id

    def candidates(self, label, text):
        """The main index's rows of a class and/or whose path holds a substring: (rows, exact count)."""
        side = self.main
        class_id = self.class_id(side, label) if label else None
        if not text:
            if class_id is None:
                return None, len(side)
            rows = np.flatnonzero(np.asarray(side.labels) == class_id)
            return rows, len(rows)
        if "\n" in text or len(text) > 400:
            raise Refused(400, "q must be a part of a path (one line, at most 400 characters)")
        found = []
        for row in side.paths.rows_containing(text.encode()):
            if class_id is None or int(side.labels[row]) == class_id:
                found.append(row)
                if len(found) >= COUNT_MATCHES:
                    return np.array(found), None
        return np.array(found, np.int64), len(found)

    def item_json(self, j):
        return {"id": int(j), "path": self.main.paths[j], "label": self.main.label_name(j)}

    def info(self):
        def side_info(side):
            if side is None:
                return None
            return {"path": side.path, "count": len(side), "bits": side.bits, **side.describe_engine(),
                    "checkpoint": side.loaded.path if side.loaded else None, "upload": side.loaded is not None,
                    "upload_note": side.upload_note,
                    "classes": [{"name": c, "count": n} for c, n in zip(side.classes, side.class_counts)]}
        return {"index": side_info(self.main), "compare": side_info(self.compare), "root": self.root,
                "default_k": self.default_k, "max_k": MAX_K, "max_upload_bytes": self.max_bytes,
                "max_pixels": self.max_pixels, "thumbnail_sizes": SIZES}


# ----------------------------------------------------------------------------- the app


def create_app(served, allowed_hosts=None):
    """The FastAPI app over `served` (a Served). `allowed_hosts`: the Host names it answers (None:
    any, for a server that listens beyond the loopback, and for tests)."""
    # The upload stays in memory while it is parsed (it is bounded by then): above Starlette's
    # default of 1 MB a part would be spooled to a file in the system's temporary folder.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, served.max_bytes + MULTIPART_SLACK)
    # No /docs or /redoc: their pages load Swagger's scripts from a CDN, and the page must work offline.
    app = FastAPI(title="CDNE retrieval", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(Guard, max_body=served.max_bytes + MULTIPART_SLACK, allowed_hosts=allowed_hosts)

    @app.exception_handler(Refused)
    async def refused(request, exc):
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        detail = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such page or endpoint: {request.url.path[:80]}"
        return error(exc.status_code, one_line(Exception(detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        problems = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return error(400, one_line(Exception("; ".join(problems) or "invalid request")))

    @app.exception_handler(Exception)
    async def internal(request, exc):  # the traceback goes to the server's log (uvicorn prints it), not here
        return error(500, "internal error of the server; its log has the details")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"cache-control": "no-cache"})

    @app.get("/api/info")
    def info():
        """The index (and --compare's): size, bits, engine, classes with their counts, limits."""
        return served.info()

    @app.get("/api/items")
    def items(label: str | None = None, q: str | None = None, offset: str | None = None, limit: str | None = None):
        """Items of the index of a class (label) and/or whose path holds q, offset / limit at a time."""
        start = served.count(offset, "offset", 0, 10 ** 12)
        limit = served.count(limit, "limit", 60, MAX_LISTED)
        rows, total = served.candidates(label, q)
        picked = range(start, min(start + limit, total if rows is None else len(rows)))
        listed = [served.item_json(j if rows is None else rows[j]) for j in picked]
        available = len(served.main) if rows is None else len(rows)
        return {"total": total, "offset": start, "more": start + len(listed) < available or total is None,
                "items": listed}

    @app.get("/api/random")
    def random_item(label: str | None = None, q: str | None = None):
        """An item drawn at random among those of a class and/or whose path holds q."""
        rows, total = served.candidates(label, q)
        available = len(served.main) if rows is None else len(rows)
        if available == 0:
            raise Refused(404, "no item of the index matches")
        pick = int(np.random.default_rng().integers(available))
        return served.item_json(pick if rows is None else rows[pick])

    @app.get("/api/search")
    def search_item(item: str | None = Query(None, alias="id"), k: str | None = None, index: str | None = None):
        """`retrieve query --exclude-self` for the image of item `id`, with its code, metrics and time."""
        side, j, k = served.side(index), served.item(item), served.k(k)
        one_search_thread()
        row = side.row_of(j)
        label = side.label_name(row)
        out = answer(side, np.asarray(side.search.codes[row]), k, label, own=side.paths.raw(row), own_row=row)
        return {"query": {"id": j, "path": side.paths[row], "label": label}, "results": out.pop("results"), **out}

    @app.post("/api/search")
    def search_upload(file: UploadFile | None = File(None), k: str | None = Form(None),
                      label: str | None = Form(None), index: str | None = None):
        """`retrieve query` for an uploaded image (multipart field `file`; `label`: its class, if known)."""
        side, k = served.side(index), served.k(k)
        if side.loaded is None:
            raise Refused(503, side.upload_note)
        if label:
            served.class_id(side, label)
        if file is None:
            raise Refused(400, "send the image as the multipart form field `file`")
        data = file.file.read(served.max_bytes + 1)
        extension = check_upload(data, served.max_bytes, served.max_pixels)
        stored = stored_upload(served.uploads, data, extension)
        try:
            packed = encode_upload(side, stored)
        except UserError as err:
            raise Refused(422, one_line(err).replace(stored, "the uploaded image")) from None
        finally:
            os.remove(stored)
        one_search_thread()
        out = answer(side, packed, k, label or None)
        return {"query": {"id": None, "path": None, "label": label or None, "filename": file.filename},
                "results": out.pop("results"), **out}

    @app.get("/api/image/{item}")
    def image(item: str, size: str = "thumb"):
        """Item `item`'s image as a PNG thumbnail (size thumb: 160 px, large: 512 px; never enlarged)."""
        if size not in SIZES:
            raise Refused(400, f"size must be {' or '.join(SIZES)}, got {size[:40]!r}")
        kind, thumb = served.thumbnails.get(served.item(item), size)
        if kind == "file":
            return FileResponse(thumb, media_type="image/png", headers={"cache-control": "no-cache"})
        return Response(thumb, media_type="image/png", headers={"cache-control": "no-cache"})

    @app.get("/api/worst")
    def worst(label: str | None = None, k: str | None = None, n: str | None = None, index: str | None = None):
        """The queries of a class with the lowest AP@K, each ranked as GET /api/search ranks it."""
        side, k = served.side(index), served.k(k)
        if not label:
            raise Refused(400, "pass the class whose worst queries to list (label=NAME)")
        one_search_thread()
        return worst_queries(side, served.class_id(side, label), k, served.count(n, "n", 12, 200))

    return app


# ----------------------------------------------------------------------------- the server


def open_served(args, device, engine_of):
    """The Served of serve's flags: the index, --compare's, the cache folder and the limits."""
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise UserError("--max-upload-mb and --max-pixels must be positive")
    if args.topk > MAX_K:
        raise UserError(f"--topk must be at most {MAX_K}, got {args.topk}")
    main = open_side("main", args.index, args.checkpoint, args, device, engine_of)
    compare = None
    if args.compare:
        compare = open_side("compare", args.compare, None, args, device, engine_of)
        align(main, compare)
    return Served(main, compare, cache_folder(args.index, args.cache), args.topk, int(args.max_upload_mb * 2 ** 20),
                  args.max_pixels)


def announce(args, served, port, local):
    """The notes, the warning of a server reachable from elsewhere, and the address line."""
    main, compare = served.main, served.compare
    for side in (main, compare):
        if side is not None and side.upload_note:
            print(f"note: {side.upload_note}", file=sys.stderr)
    if not local:
        print(f"warning: listening on {args.host}:{port}, beyond this machine: anyone who can reach it can see "
              f"the index's images and query it (there is no login); --host 127.0.0.1 keeps it local",
              file=sys.stderr)
    what = f"{len(main)} images, {main.bits} bits, {main.search.engine} search" + \
        (f", compared with {compare.path}" if compare else "")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {main.path} ({what}) at http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)


def serve(args, device, engine_of):
    """Open the index (and --compare's), listen, print the address and serve until SIGINT or
    SIGTERM: exit 130 or 143, once the requests in flight are answered (or at once while the
    index is still being opened)."""
    import uvicorn  # noqa: PLC0415

    if args.port < 0 or args.port > 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")

    def stop_on_term(signum, frame):  # uvicorn raises it again once it has shut down gracefully
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop_on_term)
    sock = None
    try:
        served = open_served(args, device, engine_of)
        sock, addresses = listen(args.host, args.port)
        local = all(a.is_loopback for a in addresses)
        app = create_app(served, allowed_hosts=LOOPBACK_NAMES if local else None)
        announce(args, served, sock.getsockname()[1], local)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                               timeout_graceful_shutdown=10))
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: while the index opens, or raised again by uvicorn after its shutdown
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sock is not None:
            sock.close()
    return 0
