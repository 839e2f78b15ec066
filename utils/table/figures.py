"""The table's figures, drawn with matplotlib from the curves every run records: mean test mAP@100
against bits with the paper's points, precision against recall over the Hamming radii, and
precision at K. Every row has its own colour, marker and line style, and a caption names the
error bars."""


def _figure(n_panels, width=4.8, height=3.9):
    """A matplotlib figure drawn by the Agg backend (files only: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(7.0, width * n_panels), height + 0.9), layout="constrained")  # room for the legend
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(n_panels, 1), squeeze=False)[0]
    return fig, axes


# Rows 1-10 take tab10's colours, 11-20 the light halves of tab20 with another marker (a light blue
# beside a blue is easier told apart by its marker); every further 10 rows the next marker, and past
# 80 another line style ("--" is the paper's): no two of a figure's first 240 rows share colour,
# marker and line style.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


LINE_STYLES = ("-", ":", "-.")


def row_styles(labels):
    """{label: {"color", "marker", "ls"}}, a distinct combination per label (in order)."""
    from matplotlib import colormaps
    tab20 = colormaps["tab20"]
    palette = [tab20(2 * k) for k in range(10)] + [tab20(2 * k + 1) for k in range(10)]  # tab10, then light
    return {label: {"color": palette[i % 20], "marker": MARKERS[(i // 10) % len(MARKERS)],
                    "ls": LINE_STYLES[(i // (10 * len(MARKERS))) % len(LINE_STYLES)]}  # i mod 240 told apart
            for i, label in enumerate(labels)}


def seed_counts(rows, labels):
    """({label: sorted distinct n_seeds of its rows}, for the labels that have rows; whether every
    such label has one and the same n)."""
    counts = {label: sorted({r["n_seeds"] for r in rows if r["method"] == label}) for label in labels}
    counts = {label: c for label, c in counts.items() if c}
    distinct = {tuple(c) for c in counts.values()}
    return counts, len(distinct) == 1 and len(next(iter(distinct))) == 1


def _seeds(counts):
    """"3 seeds", "1 seed", "1-3 seeds" (a row whose cells had different numbers of finished seeds)."""
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} seed" + ("" if counts == [1] else "s")


def legend_labels(labels, counts, same):
    """A row's name, with its number of seeds when the rows do not all have the same."""
    return {label: label if same or label not in counts else f"{label} (n = {_seeds(counts[label])})"
            for label in labels}


def _save(fig, stem):
    paths = [f"{stem}.png", f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def _legend(fig, handles_labels, caption=None):
    """The legend under the panels; `caption` (what the lines and bars are) over them."""
    if caption:  # wrapped to the figure's width (about 0.075 inches a character at 10 pt)
        import textwrap
        fig.suptitle(textwrap.fill(caption, int(fig.get_figwidth() / 0.075)), fontsize="medium")
    if handles_labels and handles_labels[0]:
        # An entry takes about 0.7 inches for its handle and 0.075 per character (10 pt): rows
        # named by their flags are long, and too many columns run off the figure's sides.
        longest = max(len(label) for label in handles_labels[1])
        columns = max(1, int(fig.get_figwidth() / max(2.2, 0.7 + 0.075 * longest)))
        fig.legend(*handles_labels, loc="outside lower center", ncols=min(columns, len(handles_labels[0])),
                   frameon=False)


def table_figure(stem, rows, ties="index"):
    """mAP@100 against bits (log2 axis), one panel per dataset, one colour per method: ours as solid
    lines with error bars of +- the std over seeds, the paper's as dashed lines with open circles
    where the paper has a value; ties "expected": the tie-aware mAP@100 (--ties). Writes stem.png and
    stem.pdf; returns their paths."""
    return _save(draw_table(rows, ties), stem)


def draw_table(rows, ties="index"):
    """table_figure's Figure: every row its own colour, marker and line style (row_styles); the caption
    says what the error bars are, the sample std over how many seeds (in the legend, per row, when
    the rows have different numbers)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    labels = list(dict.fromkeys(r["method"] for r in rows if r["mean"] is not None or r["paper"] is not None))
    styles, bits = row_styles(labels), sorted({r["bits"] for r in rows})
    counts, same = seed_counts([r for r in rows if r["mean"] is not None], labels)
    names = legend_labels(labels, counts, same)
    fig, axes = _figure(len(datasets))
    legend = {}
    for ax, d in zip(axes, datasets):
        for label in labels:
            mine = sorted((r for r in rows if r["dataset"] == d and r["method"] == label), key=lambda r: r["bits"])
            ours = [r for r in mine if r["mean"] is not None]
            style = styles[label]
            if ours:
                h = ax.errorbar([r["bits"] for r in ours], [r["mean"] for r in ours],
                                yerr=[r["std"] or 0.0 for r in ours], color=style["color"], ls=style["ls"],
                                marker=style["marker"], ms=5, lw=1.8, capsize=3, label=names[label])
                legend.setdefault(names[label], h)
            paper = [r for r in mine if r["paper"] is not None]
            if paper:
                ax.plot([r["bits"] for r in paper], [r["paper"] for r in paper], color=style["color"], ls="--",
                        lw=1.2, marker=style["marker"], ms=5, mfc="white")
        ax.set_xscale("log", base=2)
        ax.set_xticks(bits, [str(b) for b in bits])
        ax.minorticks_off()
        ax.set(title=d, xlabel="code length (bits)", ylabel="test mAP@100 (%)" if ties == "index" else "tie-aware test mAP@100 (%)")
        ax.grid(alpha=0.3)
    if any(r["paper"] is not None for r in rows):
        from matplotlib.lines import Line2D
        legend["ours (mean ± std over seeds)"] = Line2D([], [], color="black", marker="o", lw=1.8)
        legend["the paper's Table I"] = Line2D([], [], color="black", ls="--", marker="o", mfc="white", lw=1.2)
    _legend(fig, (list(legend.values()), list(legend)), table_caption(counts, same))
    return fig


def table_caption(counts, same):
    """What the points and the error bars are: the mean and sample std over how many seeds."""
    if not counts:
        return None
    first = next(iter(counts.values()))
    if same and first == [1]:
        return "Ours: one seed per point (no error bars)"
    return (f"Ours: mean ± sample std over {_seeds(first) if same else 'n seeds'} "
            f"(error bars{'' if same else '; n per row in the legend, no bar where n = 1'})")


def _curves_figure(stem, rows, bits, key, x, y, xlabel, ylabel, what):
    return _save(draw_curves(rows, bits, key, x, y, xlabel, ylabel, what), stem)


def draw_curves(rows, bits, key, x, y, xlabel, ylabel, what):
    """The PR or precision@K Figure at `bits`: one line per row with its own style (row_styles), the
    mean over the row's seeds; the caption says over how many (the legend per row, when they differ)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    drawn_rows = [r for r in rows if r["bits"] == bits and r.get(key)]
    labels = list(dict.fromkeys(r["method"] for r in drawn_rows))
    styles = row_styles(labels)
    counts, same = seed_counts(drawn_rows, labels)
    names = legend_labels(labels, counts, same)
    fig, axes = _figure(len(datasets))
    legend = {}
    for ax, d in zip(axes, datasets):
        drawn = 0
        for r in drawn_rows:
            if r["dataset"] == d:
                style = styles[r["method"]]
                h, = ax.plot(r[key][x], r[key][y], color=style["color"], ls=style["ls"], marker=style["marker"],
                             ms=3, lw=1.5, label=names[r["method"]])
                legend.setdefault(names[r["method"]], h)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, f"no {what} recorded\nat {bits} bits", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{d}, {bits} bits", xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
        if key == "pr_curve":
            ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
    caption = None
    if counts:
        caption = "Each line: the mean over " + (_seeds(next(iter(counts.values()))) if same else
                                                 "n seeds (n per row in the legend)")
    _legend(fig, (list(legend.values()), list(legend)), caption)
    return fig


def pr_curves_figure(stem, rows, bits):
    """Precision against recall over the Hamming radii 0..L of the test queries (mean over seeds), one
    panel per dataset, one line per method, at `bits`. Writes stem.png and stem.pdf."""
    return _curves_figure(stem, rows, bits, "pr_curve", "recall", "precision", "recall",
                          "precision (within Hamming radius)", "PR curves")


def precision_at_k_figure(stem, rows, bits, ties="index"):
    """Precision at K (top K of the Hamming ranking, test queries, mean over seeds) against K, one
    panel per dataset, one line per method, at `bits`. Writes stem.png and stem.pdf."""
    return _curves_figure(stem, rows, bits, "precision_at_k", "k", "precision", "K (retrieved images)",
                          "precision@K" if ties == "index" else "tie-aware precision@K", "precision@K curves")
