"""Pictures: a grid of queries and their top-k results, bit balance, and the table's figures (matplotlib)."""
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


def _figure(n_panels, width=4.8, height=3.9):
    """A matplotlib figure drawn by the Agg backend (files only: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(7.0, width * n_panels), height + 0.9), layout="constrained")  # room for the legend
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(n_panels, 1), squeeze=False)[0]
    return fig, axes


def _colours(labels):
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _save(fig, stem, handles_labels=None):
    """stem.png and stem.pdf, the legend under the panels."""
    if handles_labels and handles_labels[0]:
        columns = max(1, int(fig.get_figwidth() / 2.2))  # about 2.2 inches per legend entry
        fig.legend(*handles_labels, loc="outside lower center", ncols=min(columns, len(handles_labels[0])),
                   frameon=False)
    paths = [f"{stem}.png", f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def table_figure(stem, rows):
    """mAP@100 against bits (log2 axis), one panel per dataset, one colour per method: ours as solid
    lines with error bars of +- the std over seeds, the paper's as dashed lines with open circles
    where the paper has a value. Writes stem.png and stem.pdf; returns their paths."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    labels = list(dict.fromkeys(r["method"] for r in rows))
    colours, bits = _colours(labels), sorted({r["bits"] for r in rows})
    fig, axes = _figure(len(datasets))
    legend = {}
    for ax, d in zip(axes, datasets):
        for label in labels:
            mine = sorted((r for r in rows if r["dataset"] == d and r["method"] == label), key=lambda r: r["bits"])
            ours = [r for r in mine if r["mean"] is not None]
            if ours:
                h = ax.errorbar([r["bits"] for r in ours], [r["mean"] for r in ours],
                                yerr=[r["std"] or 0.0 for r in ours], color=colours[label], marker="o", ms=5,
                                lw=1.8, capsize=3)
                legend.setdefault(label, h)
            paper = [r for r in mine if r["paper"] is not None]
            if paper:
                ax.plot([r["bits"] for r in paper], [r["paper"] for r in paper], color=colours[label], ls="--",
                        lw=1.2, marker="o", ms=5, mfc="white")
        ax.set_xscale("log", base=2)
        ax.set_xticks(bits, [str(b) for b in bits])
        ax.minorticks_off()
        ax.set(title=d, xlabel="code length (bits)", ylabel="test mAP@100 (%)")
        ax.grid(alpha=0.3)
    if any(r["paper"] is not None for r in rows):
        from matplotlib.lines import Line2D
        legend["ours (mean ± std over seeds)"] = Line2D([], [], color="black", marker="o", lw=1.8)
        legend["the paper's Table I"] = Line2D([], [], color="black", ls="--", marker="o", mfc="white", lw=1.2)
    return _save(fig, stem, (list(legend.values()), list(legend)))


def _curves_figure(stem, rows, bits, key, x, y, xlabel, ylabel, what):
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    labels = list(dict.fromkeys(r["method"] for r in rows))
    colours = _colours(labels)
    fig, axes = _figure(len(datasets))
    legend = {}
    for ax, d in zip(axes, datasets):
        drawn = 0
        for r in rows:
            if r["dataset"] == d and r["bits"] == bits and r.get(key):
                h, = ax.plot(r[key][x], r[key][y], color=colours[r["method"]], marker=".", ms=4, lw=1.5)
                legend.setdefault(r["method"], h)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, f"no {what} recorded\nat {bits} bits", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{d}, {bits} bits", xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
        if key == "pr_curve":
            ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
    return _save(fig, stem, (list(legend.values()), list(legend)))


def pr_curves_figure(stem, rows, bits):
    """Precision against recall over the Hamming radii 0..L of the test queries (mean over seeds), one
    panel per dataset, one line per method, at `bits`. Writes stem.png and stem.pdf."""
    return _curves_figure(stem, rows, bits, "pr_curve", "recall", "precision", "recall",
                          "precision (within Hamming radius)", "PR curves")


def precision_at_k_figure(stem, rows, bits):
    """Precision at K (top K of the Hamming ranking, test queries, mean over seeds) against K, one
    panel per dataset, one line per method, at `bits`. Writes stem.png and stem.pdf."""
    return _curves_figure(stem, rows, bits, "precision_at_k", "k", "precision", "K (retrieved images)",
                          "precision@K", "precision@K curves")
