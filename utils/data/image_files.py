"""What an image file on disk holds, read cheaply (a TIFF's pages and samples per pixel from its
header), and the errors for a file that cannot be read as asked. The readers (utils/data/scenes.py,
utils/data/multiband.py) and the image check (utils/data/image_check.py) share these."""
from utils.errors import UserError

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order


def is_tiff(path):
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in TIFF_MAGIC
    except OSError:
        return False


def tiff_layout(path):
    """(pages, samples per pixel, array shape) of a TIFF's first image series, from its header
    (no pixel data is read), or None for a file that is no TIFF tifffile can parse."""
    import tifffile

    if not is_tiff(path):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]  # reduced-resolution copies and thumbnails are other series
            return len(series.pages), series.pages[0].samplesperpixel, tuple(series.shape)
    except Exception:  # noqa: BLE001 - a damaged TIFF has no layout to report
        return None


def tiff_bands(path):
    """The number of bands of a TIFF that tifffile can read (the shorter end axis of a
    multi-page or multi-sample image), else None."""
    layout = tiff_layout(path)
    if layout is None:
        return None
    pages, samples, shape = layout
    return samples if pages == 1 else min(shape[0], shape[-1])


def multiband_as_rgb_error(path):
    """The UserError for a multi-band TIFF read as RGB (more than one page, or more than 4
    samples per pixel: Pillow would read one page and train on it), else None."""
    layout = tiff_layout(path)
    if layout is None or (layout[0] == 1 and layout[1] <= 4):
        return None
    pages, samples, shape = layout
    bands = tiff_bands(path)
    return unreadable(f"image {path} holds {bands} bands ({pages} page{'s' * (pages != 1)} of {samples} "
                      f"sample{'s' * (samples != 1)} per pixel, array shape {shape}), not an RGB image",
                      f"pass --bands {bands} to read multi-band TIFFs", broken=False)


def refuse_multiband(img, path):
    """Raise multiband_as_rgb_error(path) when the open Pillow image `img` is a TIFF of several
    pages that holds bands rather than an RGB image (one page of an RGB TIFF passes cheaply)."""
    if img.format == "TIFF" and getattr(img, "n_frames", 1) > 1:
        multiband = multiband_as_rgb_error(path)
        if multiband is not None:
            raise multiband


def rgb_read_failure(path, err):
    """The UserError for Pillow failing on `path`: a multi-band TIFF's message where it is one
    (Pillow fails on more than 4 samples per pixel), else the broken-image one."""
    return (multiband_as_rgb_error(path) if is_tiff(path) else None) or broken_image(path, err)


def unreadable(problem, fix="", broken=True):
    """The UserError for an image that cannot be read as asked: `problem` names the file and what is
    wrong, `fix` what to do; `broken` tells a damaged file (which --skip-bad-images may leave out)
    from one of the wrong kind (where it would leave out every image). A plain UserError with these
    as attributes, not a subclass: a DataLoader worker re-raises it as type(err)(message), and the
    scripts fold a worker's traceback into one line by its "UserError: " line."""
    err = UserError(f"{problem}; {fix}" if fix else problem)
    err.problem, err.fix, err.broken = problem, fix, broken
    return err


def broken_image(path, err):
    return unreadable(f"cannot read image {path} ({err})",
                      "replace or remove the file, or pass --skip-bad-images to leave unreadable files out")
