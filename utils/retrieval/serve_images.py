"""Images of `retrieve serve`: thumbnails of the index's items, made once and kept in the cache
folder beside the index (NAME.index.cache/thumbnails/), and the checks an uploaded image passes
before anything decodes it.

An item's image is found by its id alone, through the path the index holds; no path from a
request is ever opened. The file must be a regular file whose real path lies inside the
deepest folder holding all of the index's images (a link placed in the image folder that
leads elsewhere is refused), and its header must declare at most --max-pixels pixels before
Pillow decodes it. A thumbnail's file name is a hash of the image's real path, size, mtime and
the thumbnail size, so an image changed or an index rebuilt in place never shows a stale one.
"""
import hashlib
import io
import os
import stat
import sys
import tempfile
import threading
import warnings

from PIL import Image, UnidentifiedImageError

from utils.data.image_files import refuse_multiband
from utils.data.scenes import to_rgb8
from utils.errors import UserError, one_line
from utils.evaluation.pictures import thumbnail as square_thumbnail
from utils.retrieval.serve_sides import Refused

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}  # those `retrieve index` reads
# (MPO: what Pillow calls the JPEG of many cameras and phones, a JPEG with more frames after the first)
SIZES = {"thumb": 160, "large": 512}
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError,
              TypeError, ZeroDivisionError, MemoryError)  # what Pillow's plugins raise on a damaged header


def inside(path, folder):
    return path == folder or os.path.commonpath([path, folder]) == folder


class Thumbnails:
    """PNG thumbnails of the items of a PathTable, cached in `folder` (two levels of hashed names)."""

    def __init__(self, folder, paths, root, bands, max_pixels):
        self.folder, self.paths, self.bands, self.max_pixels = folder, paths, bands, max_pixels
        self.root, self.root_real = root, os.path.realpath(root)
        self.warned = threading.Event()

    def get(self, item, size_name):
        """("file", path) of a cached thumbnail, or ("bytes", png) of one just made."""
        size = SIZES[size_name]
        path = self.paths[item]
        real = os.path.realpath(path)
        if not inside(real, self.root_real):
            raise Refused(403, f"item {item}'s image {path} leads outside the folder of the index's images "
                               f"({self.root}), so it is not served")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags)  # no link followed, and a FIFO put in its place does not block
        except FileNotFoundError:
            raise Refused(404, f"item {item}'s image {path} does not exist (moved or deleted since it was "
                               f"indexed)") from None
        except OSError as err:
            raise Refused(404, f"item {item}'s image {path} cannot be opened ({err.strerror})") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused(404, f"item {item}'s image {path} is not a regular file")
            opened = f"/proc/self/fd/{fd}"  # what was opened, should a folder have been swapped for a link
            if os.path.islink(opened) and not inside(os.readlink(opened), self.root_real):
                raise Refused(403, f"item {item}'s image {path} leads outside the folder of the index's images "
                                   f"({self.root}), so it is not served")
            key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{size}\0{self.bands}".encode()).hexdigest()
            cached = os.path.join(self.folder, key[:2], key[2:] + ".png")
            if os.path.isfile(cached):
                return "file", cached
            png = self.make(fh, real, item, path, size)
        self.keep(cached, png)
        return "bytes", png

    def make(self, fh, real, item, path, size):
        try:
            if self.bands != 3:  # multispectral: bands 4-3-2 as RGB, as the retrieval grid shows them
                img = square_thumbnail(real, size, self.bands)
            else:
                img = self.rgb(fh, item, path, size)
        except UserError as err:
            raise Refused(404, f"item {item}'s image cannot be read: {one_line(err)}") from None
        out = io.BytesIO()
        img.save(out, "PNG")
        return out.getvalue()

    def rgb(self, fh, item, path, size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(fh)
            except Image.DecompressionBombError:
                raise Refused(404, f"item {item}'s image {path} has too many pixels to be shown") from None
            except UNREADABLE as err:
                raise Refused(404, f"item {item}'s image {path} cannot be read ({err})") from None
            with img:
                if img.width * img.height > self.max_pixels:
                    raise Refused(404, f"item {item}'s image {path} is {img.width} x {img.height} pixels, more "
                                       f"than --max-pixels {self.max_pixels}, so it is not shown")
                refuse_multiband(img, path)
                img.draft("RGB", (size, size))  # a JPEG decodes at the smallest scale still above the size
                try:
                    img.load()
                except UNREADABLE as err:
                    raise Refused(404, f"item {item}'s image {path} cannot be read ({err})") from None
                rgb = to_rgb8(img)
        rgb.thumbnail((size, size), Image.LANCZOS)
        return rgb

    def keep(self, cached, png):
        tmp = f"{cached}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(png)
            os.replace(tmp, cached)  # whole or absent: a reader never sees half a thumbnail
        except OSError as err:  # a full disk: the thumbnail is served all the same, and made again next time
            if not self.warned.is_set():
                self.warned.set()
                print(f"warning: thumbnails cannot be kept in {self.folder} ({err.strerror}); they are made "
                      f"anew for every request", file=sys.stderr)
            try:
                os.remove(tmp)
            except OSError:
                pass


def check_upload(data, max_bytes, max_pixels):
    """The file extension for an uploaded image (bytes) that may be decoded: a PNG, JPEG, TIFF or BMP
    of at most `max_bytes` bytes whose header declares at most `max_pixels` pixels; else Refused."""
    if not data:
        raise Refused(400, "the upload is empty; send an image file in the form field `file`")
    if len(data) > max_bytes:
        raise Refused(413, f"the upload is {len(data)} bytes, more than the {max_bytes} bytes this server takes "
                           f"(--max-upload-mb)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                fmt, (width, height) = img.format, img.size
        except Image.DecompressionBombError:
            raise Refused(413, f"the uploaded image declares more pixels than Pillow decodes "
                               f"({Image.MAX_IMAGE_PIXELS * 2}) and more than the {max_pixels} this server takes "
                               f"(--max-pixels)") from None
        except UNREADABLE:
            if data[:4] in TIFF_MAGIC:  # a TIFF of more bands than Pillow reads: tifffile's header
                return check_tiff(data, max_pixels)
            raise Refused(415, "the upload is not an image this server reads (PNG, JPEG, TIFF or BMP)") from None
    if fmt not in FORMATS:
        raise Refused(415, f"the upload is a {fmt} image; this server takes PNG, JPEG, TIFF or BMP")
    if width * height > max_pixels:
        raise Refused(413, f"the uploaded image is {width} x {height} pixels, more than the {max_pixels} this "
                           f"server takes (--max-pixels)")
    return FORMATS[fmt]


def check_tiff(data, max_pixels):
    import tifffile  # noqa: PLC0415 - only for multi-band uploads
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            shape = tuple(tif.series[0].shape)
    except Exception:  # noqa: BLE001 - whatever tifffile makes of a damaged file, the answer is the same
        raise Refused(415, "the upload is not an image this server reads (a damaged TIFF)") from None
    samples = 1
    for n in shape:
        samples *= int(n)
    pixels = samples // min(shape) if len(shape) >= 3 else samples  # the band axis is the shortest
    if pixels > max_pixels:
        raise Refused(413, f"the uploaded TIFF is {' x '.join(map(str, shape))}, more than the {max_pixels} pixels "
                           f"this server takes (--max-pixels)")
    return ".tif"


def stored_upload(folder, data, extension):
    """The upload as a file in the cache's uploads/ folder, read from there as `retrieve query` reads a
    file (the caller removes it)."""
    fd, path = tempfile.mkstemp(prefix="upload-", suffix=extension, dir=folder)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path
