"""Pictures: a grid of queries and their top-k results, bit balance, and the Table I plot."""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import read_rgb
from .multiband import read_multiband

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


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def mAP_against_bits(path, rows):
    """The table's picture: mAP@100 against bits (log2 axis), one panel per dataset, one colour per method:
    solid lines with filled dots are ours, dashed lines with rings the paper's."""
    from PIL import ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one small bitmap font
            return ImageFont.load_default()

    small, big = font(14), font(18)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    labels = list(dict.fromkeys(r["method"] for r in rows))
    bits = sorted({r["bits"] for r in rows})
    values = [v for r in rows for v in (r["mean"], r["paper"]) if v is not None]
    lo = min(values, default=0.0)
    step = next(s for s in (1, 2, 5, 10, 20) if (100 - lo) / s <= 8)
    lo = min(math.floor(lo / step) * step, 100 - step)
    pw, ph, left, top, right, bottom = 460, 360, 70, 50, 20, 60
    entries = [(label, COLOURS[j % len(COLOURS)], False) for j, label in enumerate(labels)]
    entries += [("ours", "black", False), ("the paper's Table I", "black", True)]
    per_row = max(1, pw * len(datasets) // 230)
    legend_h = 30 * math.ceil(len(entries) / per_row) + 20
    img = Image.new("RGB", (pw * len(datasets), ph + legend_h), "white")
    dr = ImageDraw.Draw(img)
    x_lo, x_hi = math.log2(bits[0]), math.log2(bits[-1])
    for i, d in enumerate(datasets):
        x0, x1, y0, y1 = i * pw + left, (i + 1) * pw - right, top, ph - bottom

        def px(b, x0=x0, x1=x1):  # one bit length: the middle; else log2 spacing, 10 px from the frame
            return (x0 + x1) / 2 if x_hi == x_lo else x0 + 10 + (x1 - x0 - 20) * (math.log2(b) - x_lo) / (x_hi - x_lo)

        def py(v, y0=y0, y1=y1):
            return y1 - (y1 - y0) * (v - lo) / (100 - lo)
        dr.text(((x0 + x1) / 2, 20), d, fill="black", font=big, anchor="mm")
        for v in range(int(lo), 101, step):
            dr.line([(x0, py(v)), (x1, py(v))], fill="#e6e6e6")
            dr.text((x0 - 6, py(v)), str(v), fill="black", font=small, anchor="rm")
        for b in bits:
            dr.line([(px(b), y1), (px(b), y1 + 5)], fill="black")
            dr.text((px(b), y1 + 8), str(b), fill="black", font=small, anchor="mt")
        dr.rectangle([x0, y0, x1, y1], outline="black")
        dr.text(((x0 + x1) / 2, y1 + 32), "bits (log scale)", fill="black", font=small, anchor="mt")
        dr.text((x0 - 6, y0 - 8), "mAP@100 (%)", fill="black", font=small, anchor="ls")
        for j, label in enumerate(labels):
            colour = COLOURS[j % len(COLOURS)]
            mine = [r for r in rows if r["dataset"] == d and r["method"] == label]
            for field, dashed in (("paper", True), ("mean", False)):
                pts = [(px(r["bits"]), py(r[field])) for r in mine if r[field] is not None]
                for a, b in zip(pts, pts[1:]):
                    _line(dr, a, b, colour, dashed)
                for x, y in pts:
                    dr.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colour, width=2,
                               fill="white" if dashed else colour)
    for j, (label, colour, dashed) in enumerate(entries):
        x, y = 20 + (j % per_row) * 230, ph + 10 + 30 * (j // per_row)
        _line(dr, (x, y + 8), (x + 40, y + 8), colour, dashed)
        dr.ellipse([x + 16, y + 4, x + 24, y + 12], outline=colour, width=2, fill="white" if dashed else colour)
        dr.text((x + 50, y + 8), label, fill="black", font=small, anchor="lm")
    img.save(path)


def _line(draw, a, b, colour, dashed):
    if not dashed:
        draw.line([a, b], fill=colour, width=3)
        return
    n = max(1, int(math.dist(a, b) // 8))
    for k in range(0, n, 2):  # every other 8-pixel piece
        p, q = k / n, min(k + 1, n) / n
        draw.line([(a[0] + (b[0] - a[0]) * p, a[1] + (b[1] - a[1]) * p),
                   (a[0] + (b[0] - a[0]) * q, a[1] + (b[1] - a[1]) * q)], fill=colour, width=2)
