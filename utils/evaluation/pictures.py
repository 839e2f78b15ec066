"""Pictures of retrieval: a grid of queries and their top-k results (green: same class), thumbnails, bit balance."""
import numpy as np
import torch
from PIL import Image, ImageDraw

from utils.data.multiband import read_multiband
from utils.data.scenes import read_rgb

GREEN, RED, GREY = (40, 170, 60), (210, 40, 40), (150, 150, 150)


def thumbnail(path, size, bands=3):
    """An image file as a size x size RGB thumbnail; multispectral files show their first three bands."""
    if bands == 3:
        return read_rgb(path).resize((size, size), Image.BILINEAR)
    # Sentinel-2 band order B01, B02 (blue), B03 (green), B04 (red), ...: show 4-3-2 as RGB.
    x = read_multiband(path, bands)[[3, 2, 1] if bands >= 4 else [0, 0, 0]]
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp(min=1e-6) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(x)).resize((size, size), Image.BILINEAR)


def retrieval_grid(query_paths, result_paths, relevant=None, distances=None, size=64, border=4, bands=3):
    """One row per query: the query, then its results framed green (relevant), red
    (irrelevant) or grey (relevance unknown), with the Hamming distance written in."""
    rows, cols = len(query_paths), 1 + max((len(r) for r in result_paths), default=0)
    cell = size + 2 * border
    gap = border * 3  # between the query and its results
    canvas = Image.new("RGB", (cols * cell + gap, max(rows, 1) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (query, results) in enumerate(zip(query_paths, result_paths)):
        y = r * cell
        canvas.paste(thumbnail(query, size, bands), (border, y + border))
        for c, path in enumerate(results):
            x = (c + 1) * cell + gap
            colour = GREY if relevant is None else (GREEN if relevant[r][c] else RED)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            canvas.paste(thumbnail(path, size, bands), (x + border, y + border))
            if distances is not None:
                draw.text((x + border + 2, y + border + 1), str(int(distances[r][c])), fill=(255, 255, 0))
    return canvas


def bit_balance(codes):
    """How often each bit is 1 over a set of codes (ideal: 0.5 for every bit)."""
    return (torch.as_tensor(codes) > 0).float().mean(dim=0)


def to_chw(image):
    """A PIL image as a uint8 C x H x W array (TensorBoard's add_image default)."""
    return np.asarray(image).transpose(2, 0, 1).copy()
