"""The web side of `retrieve serve` that is not a route: the guard in front of every request,
one-line JSON errors, the listening socket, the cache folder.

The guard refuses, while the server listens on the loopback only, requests that name another
host (a web page elsewhere could otherwise reach it through DNS rebinding); refuses a body over
the upload bound by its declared length, or once that many bytes have arrived, before the app
parses anything; and adds headers that keep the browser from sniffing types, framing the page
or loading anything from elsewhere.
"""
import ipaddress
import os
import socket
import tempfile
import time

from fastapi.responses import JSONResponse

from utils.errors import UserError
from utils.retrieval.serve_images import inside

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: "
                                 b"data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                                 b"frame-ancestors 'none'"),
]


def error(status, message):
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """ASGI middleware in front of every request: the Host check (loopback servers), the body bound
    (a declared Content-Length over it is refused unread, and a body is read whole, at most that
    many bytes, before the app parses it), and the security headers on every response."""

    def __init__(self, app, max_body, allowed_hosts=None):
        self.app, self.max_body, self.allowed_hosts = app, max_body, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_guarded(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def refuse(status, message):
            await error(status, message)(scope, receive, send_guarded)

        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None and host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            return await refuse(400, "this server answers requests for 127.0.0.1 or localhost only (it listens on "
                                     "the loopback); open it by that name")
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await refuse(400, "the request's Content-Length is not a number")
        if length is not None and int(length) > self.max_body:
            return await refuse(413, f"the request is {int(length)} bytes, more than the {self.max_body} this "
                                     f"server reads (--max-upload-mb)")
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return await refuse(413, f"the request is more than the {self.max_body} bytes this server "
                                             f"reads (--max-upload-mb)")
                more = message.get("more_body", False)
            body, given = b"".join(chunks), False

            async def replay():
                nonlocal given
                if not given:
                    given = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, replay, send_guarded)
        return await self.app(scope, receive, send_guarded)


def host_name(host):
    host = host.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cache_folder(index_path, given):
    """The folder for thumbnails and uploads in flight: --cache, else NAME.index.cache beside the index;
    never inside the index folder, which the server does not change."""
    index_path = os.path.abspath(index_path)
    folder = os.path.abspath(given) if given else index_path.rstrip("/") + ".cache"
    if os.path.isdir(index_path) and inside(os.path.realpath(folder), os.path.realpath(index_path)):
        raise UserError(f"--cache {folder} is inside the index folder {index_path}, which the server never "
                        f"changes; pass a folder beside it")
    try:
        for sub in ("thumbnails", "uploads"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        tempfile.TemporaryFile(dir=os.path.join(folder, "uploads")).close()
    except OSError as err:
        raise UserError(f"cannot write the cache folder {folder} ({err.strerror}); pass --cache DIR, a folder "
                        f"you can write") from None
    uploads = os.path.join(folder, "uploads")
    for name in os.listdir(uploads):  # left by a server that was killed (SIGKILL) during an upload
        try:
            if time.time() - os.path.getmtime(os.path.join(uploads, name)) > 3600:
                os.remove(os.path.join(uploads, name))
        except OSError:
            pass
    return folder


def listen(host, port):
    """A listening socket on host:port (port 0: any free one), or one line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host} is not an address of this machine ({err.strerror}); pass an address "
                        f"such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port "
                        f"(0 takes a free one)") from None
    return sock, [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos[:1]]
