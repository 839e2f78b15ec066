"""The table's figures (utils/table/figures.py): every row its own colour, marker and line style, and
the legend says what the error bars and curves are (over how many seeds), read from the artists."""
import matplotlib.colors as mcolors
import pytest

from utils.table.figures import draw_curves, draw_table, row_styles, table_figure

# What --collect of a learning-rate grid without --lr-grid gives: every trained method once per rate,
# 12 rows, one more than tab10 has colours (rows 11 and 12 used to take rows 1 and 2's).
LABELS = [f"{m} [lr={lr}]" for m in ("CDNE(MB)", "CDNE(MU)", "DHCNN", "Triplet", "DPSH") for lr in (0.01, 0.001)] \
    + ["CNN+PCA-ITQ", "CNN+LSH"]


def rows_for(labels, n_seeds=lambda i, bits: 3, paper=False):
    rows = []
    for i, label in enumerate(labels):
        for bits in (16, 32, 64):
            n = n_seeds(i, bits)
            rows.append({"method": label, "dataset": "digits", "bits": bits, "n_seeds": n, "mean": 50.0 + i + bits / 8,
                         "std": 0.5 + i / 10 if n > 1 else None, "paper": 60.0 + i if paper else None,
                         "pr_curve": {"recall": [0.1, 0.5, 1.0], "precision": [0.9, 0.6 - i / 100, 0.1]},
                         "precision_at_k": {"k": [1, 10, 100], "precision": [0.9, 0.7, 0.5 - i / 100]}})
    return rows


def style_of(line):
    return (mcolors.to_hex(line.get_color()), line.get_linestyle(), line.get_marker())


def legend_texts(fig):
    assert len(fig.legends) == 1
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_every_row_of_a_twelve_row_table_has_its_own_style():
    fig = draw_table(rows_for(LABELS))
    (ax,) = fig.axes
    drawn = {c.get_label(): style_of(c.lines[0]) for c in ax.containers}  # one errorbar container per row
    assert sorted(drawn) == sorted(LABELS)
    assert len(set(drawn.values())) == len(LABELS)
    # The issue's pair: the first row and ITQ (the 11th) were both tab10's blue.
    assert drawn["CDNE(MB) [lr=0.01]"][0] == "#1f77b4" and drawn["CNN+PCA-ITQ"][0] != "#1f77b4"
    assert len({colour for colour, _, _ in drawn.values()}) == len(LABELS)  # up to 20 rows: colours alone differ
    for key, x, y in (("pr_curve", "recall", "precision"), ("precision_at_k", "k", "precision")):
        curves = draw_curves(rows_for(LABELS), 64, key, x, y, "x", "y", key)
        lines = {line.get_label(): style_of(line) for line in curves.axes[0].lines}
        assert sorted(lines) == sorted(LABELS) and len(set(lines.values())) == len(LABELS)
        assert lines == drawn  # a row looks the same in all three figures


@pytest.mark.parametrize("n", [21, 81, 240])
def test_styles_stay_distinct_past_the_palette(n):
    styles = row_styles([f"row {i}" for i in range(n)])
    combos = {(mcolors.to_hex(s["color"]), s["ls"], s["marker"]) for s in styles.values()}
    assert len(combos) == n
    assert len({mcolors.to_hex(s["color"]) for s in styles.values()}) == min(n, 20)
    assert all(s["ls"] != "--" for s in styles.values())  # dashed lines are the paper's


def test_the_caption_names_the_error_bars_and_their_seeds():
    fig = draw_table(rows_for(LABELS[:3], paper=True))
    assert fig.get_suptitle() == "Ours: mean ± sample std over 3 seeds (error bars)"
    assert legend_texts(fig) == LABELS[:3] + ["ours (mean ± std over seeds)", "the paper's Table I"]
    # The bars are ± the row's std: CDNE(MU) [lr=0.01] (row 2) has std 0.7 at every bit length.
    bars = [c for c in fig.axes[0].containers if c.get_label() == LABELS[2]][0]
    (segments,) = [col.get_segments() for col in bars.lines[2]]
    assert [round(float(s[1][1] - s[0][1]), 6) for s in segments] == [1.4, 1.4, 1.4]
    curves = draw_curves(rows_for(LABELS[:3]), 32, "pr_curve", "recall", "precision", "x", "y", "PR")
    assert curves.get_suptitle() == "Each line: the mean over 3 seeds"
    assert legend_texts(curves) == LABELS[:3]


def test_rows_with_different_numbers_of_seeds_say_theirs():
    # Row 0: 3 seeds; row 1: 1 seed; row 2: 2 seeds at 16 bits and 3 at the others.
    seeds = lambda i, bits: {0: 3, 1: 1}.get(i, 2 if bits == 16 else 3)  # noqa: E731
    fig = draw_table(rows_for(LABELS[:3], seeds))
    assert " ".join(fig.get_suptitle().split()) == ("Ours: mean ± sample std over n seeds (error bars; n per row "
                                                    "in the legend, no bar where n = 1)")
    assert legend_texts(fig) == [f"{LABELS[0]} (n = 3 seeds)", f"{LABELS[1]} (n = 1 seed)",
                                 f"{LABELS[2]} (n = 2-3 seeds)"]
    curves = draw_curves(rows_for(LABELS[:3], seeds), 16, "precision_at_k", "k", "precision", "x", "y", "P@K")
    assert curves.get_suptitle() == "Each line: the mean over n seeds (n per row in the legend)"
    assert legend_texts(curves) == [f"{LABELS[0]} (n = 3 seeds)", f"{LABELS[1]} (n = 1 seed)",
                                    f"{LABELS[2]} (n = 2 seeds)"]
    one = draw_table(rows_for(LABELS[:2], lambda i, bits: 1))
    assert one.get_suptitle() == "Ours: one seed per point (no error bars)" and legend_texts(one) == LABELS[:2]


def test_the_legend_and_caption_fit_the_figure():
    seeds = lambda i, bits: 1 if i == 0 else 3  # noqa: E731 - the longest caption
    fig = draw_table(rows_for([f"{label} [epochs=130, pipeline=cached]" for label in LABELS], seeds))
    fig.canvas.draw()
    for box in (fig.legends[0].get_window_extent(), fig._suptitle.get_window_extent()):
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width  # nothing runs off the sides


def test_the_figure_files_are_written(tmp_path):
    paths = table_figure(str(tmp_path / "table"), rows_for(LABELS))
    assert paths == [str(tmp_path / "table.png"), str(tmp_path / "table.pdf")]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("table.png", "table.pdf"))
